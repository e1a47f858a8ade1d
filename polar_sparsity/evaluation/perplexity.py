"""Token-level perplexity on a held-out split, with whatever masking hooks are installed.

Documents are packed into fixed-length sequences by the project's token-stream helpers (as collect
and pretraining see them), so the number is comparable between modes and runs. Imports torch and
the project's data helpers only: it runs on the GPU paths.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from polar_sparsity.data.tokens import batched, packed_sequences


def scored_targets(attention_mask: torch.Tensor, last_n: int | None) -> torch.Tensor:
    """(batch, seq - 1) bool: which next-token predictions count.

    Every real position predicts the next real token. With ``last_n`` only predictions made at the
    last N positions of each row count (the positions the masking touches); the row's final position
    has no next token inside the row, so N - 1 predictions per row are scored.
    """
    mask = attention_mask.bool()
    targets = mask[:, 1:] & mask[:, :-1]
    if last_n is None:
        return targets
    lengths = mask.sum(-1, keepdim=True)
    position = torch.arange(mask.shape[1] - 1, device=mask.device).unsqueeze(0)
    return targets & (position >= lengths - last_n)


@torch.inference_mode()
def perplexity(
    model: PreTrainedModel,
    tokenizer: Tokenizer,
    texts: Iterable[str],
    *,
    seq_len: int,
    batch_size: int,
    max_tokens: int | None = None,
    last_n: int | None = None,
    on_batch: Callable[[torch.Tensor], None] | None = None,
) -> dict[str, float]:
    """exp(mean next-token NLL) over the packed stream of ``texts``.

    ``max_tokens`` stops after that many sequence tokens; ``on_batch(lengths)`` is called before each
    forward (the masking controller uses it to find row ends for ``last:N``).
    """
    device = model.get_input_embeddings().weight.device
    vocab = model.get_input_embeddings().weight.shape[0]
    sequences = packed_sequences(texts, tokenizer, seq_len, vocab)
    total_nll, total_count, seen = 0.0, 0, 0
    for batch in batched(_take_tokens(sequences, max_tokens), batch_size, tokenizer.pad_token_id):
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        if on_batch is not None:
            on_batch(mask.sum(-1))
        scored = scored_targets(mask, last_n)
        # Logits only from the first position that predicts a scored token (last:N scores few of them).
        first = int(scored.any(0).nonzero()[0]) if scored.any() else scored.shape[1]
        keep = ids.shape[1] - first
        seen += int(mask.sum())
        if keep <= 1:
            continue
        out = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep)
        logits = out.logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, first + 1 :], reduction="none")
        scored = scored[:, first:]
        total_nll += float(nll[scored].sum())
        total_count += int(scored.sum())
    if total_count == 0:
        raise ValueError("perplexity: the held-out split produced no scored tokens")
    mean = total_nll / total_count
    return {"perplexity": math.exp(mean), "nll": mean, "scored_tokens": total_count, "tokens": seen}


def _take_tokens(sequences: Iterable[torch.Tensor], max_tokens: int | None) -> Iterable[torch.Tensor]:
    """Sequences until ``max_tokens`` tokens (the last one truncated to fit)."""
    remaining = max_tokens
    for sequence in sequences:
        if remaining is not None:
            if remaining <= 1:
                return
            sequence = sequence[:remaining]
            remaining -= len(sequence)
        yield sequence
