"""The project's tokenizer: a byte-level BPE trained on the offline corpus's train split.

It is shipped in ``polar_sparsity/assets/tokenizer/`` (a Hugging Face fast tokenizer) and copied into
each tiny model checkpoint. ``python -m polar_sparsity.data.tokenizer --build`` retrains it; the tiny
models are tied to the shipped one, so retraining means pretraining them again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from polar_sparsity.data.corpus import load_documents
from polar_sparsity.resources import ASSETS_DIR

VOCAB_SIZE = 2048
EOS_TOKEN = "<|endoftext|>"  # id 0: separates documents; also the bos token
PAD_TOKEN = "<pad>"  # id 1


def tokenizer_path() -> Path:
    """The shipped tokenizer directory."""
    return ASSETS_DIR / "tokenizer"


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Byte-level BPE with ``<|endoftext|>`` at id 0 and ``<pad>`` at id 1."""
    bpe = Tokenizer(models.BPE())
    # No prefix space: documents are joined raw, so " def" and "def" stay distinct as in GPT-2.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever <unk>
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    if bpe.get_vocab_size() != vocab_size:
        raise RuntimeError(f"BPE stopped at {bpe.get_vocab_size()} tokens, not {vocab_size}: too little text")
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )


def load_tokenizer(path: Path | None = None) -> PreTrainedTokenizerFast:
    """The shipped tokenizer (or one saved elsewhere)."""
    return PreTrainedTokenizerFast.from_pretrained(str(path or tokenizer_path()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true", help="retrain on the train split and save it")
    parser.add_argument("--out", type=Path, default=None, help="where to save (default: the package)")
    args = parser.parse_args(argv)
    out = args.out or tokenizer_path()
    if args.build:
        train_tokenizer(load_documents("train")).save_pretrained(str(out))
    tok = load_tokenizer(out)
    n_tokens = sum(len(ids) for ids in tok(load_documents("train"))["input_ids"])
    print(f"{out}: vocab {len(tok)}, train split {n_tokens} tokens")


if __name__ == "__main__":
    main()
