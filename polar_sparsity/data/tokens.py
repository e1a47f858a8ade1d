"""Token streams: documents from a data source, packed into fixed-length sequences.

Documents are tokenized without special tokens and joined with the end-of-text token; each
sequence starts with the beginning-of-sequence token when the tokenizer has one (as the models
saw in pretraining). The stream is deterministic, so ``collect.resume`` can skip what is done.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from transformers import PreTrainedTokenizerBase as Tokenizer

from polar_sparsity.schema import DataConfig, DataKind


def load_texts(data: DataConfig, split: str | None = None) -> Iterable[str]:
    """The documents of one split of a data source (offline corpus or a Hugging Face dataset)."""
    split = split or data.split
    if data.kind == DataKind.offline:
        from polar_sparsity.data.corpus import load_documents

        return load_documents(split)
    return _hub_texts(data, split)


def _hub_texts(data: DataConfig, split: str) -> Iterator[str]:
    import datasets

    try:
        dataset = datasets.load_dataset(
            data.hf_path,
            data.hf_name,
            data_files=dict(data.hf_data_files) if data.hf_data_files else None,
            split=split,
            streaming=data.streaming,
        )
    except Exception as error:  # the hub raises many types (connection, missing split, auth)
        raise RuntimeError(
            f"could not load dataset {data.hf_path!r} ({data.hf_name}) split {split!r}: {error}. "
            f"data={data.name} needs network or a warm Hugging Face cache; data=offline always works."
        ) from error
    for example in dataset:
        text = example[data.text_field]
        if text and text.strip():
            yield text


def packed_sequences(
    texts: Iterable[str], tokenizer: Tokenizer, seq_len: int, vocab_size: int
) -> Iterator[torch.Tensor]:
    """Fixed-length LongTensor sequences; the last one may be shorter (the stream's tail)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no end-of-text token to join documents")
    body_len = seq_len - (bos is not None)
    buffer: list[int] = []
    for text in texts:
        buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        buffer.append(eos)
        while len(buffer) >= body_len:
            yield _sequence(buffer[:body_len], bos, vocab_size)
            del buffer[:body_len]
    if buffer:
        yield _sequence(buffer, bos, vocab_size)


def _sequence(ids: list[int], bos: int | None, vocab_size: int) -> torch.Tensor:
    sequence = torch.tensor(([bos] if bos is not None else []) + ids, dtype=torch.long)
    if int(sequence.max()) >= vocab_size:
        raise ValueError(f"token id {int(sequence.max())} is outside the model's vocabulary ({vocab_size})")
    return sequence


def batched(
    sequences: Iterator[torch.Tensor], batch_size: int, pad_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches with an attention mask (padding only ever comes from the stream's tail)."""
    batch: list[torch.Tensor] = []
    for sequence in sequences:
        batch.append(sequence)
        if len(batch) == batch_size:
            yield _collate(batch, pad_id)
            batch = []
    if batch:
        yield _collate(batch, pad_id)


def _collate(batch: list[torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(s) for s in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, sequence in enumerate(batch):
        input_ids[row, : len(sequence)] = sequence
        attention_mask[row, : len(sequence)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
