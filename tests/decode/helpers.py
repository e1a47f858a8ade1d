"""Shared pieces of the engine tests: prompts, the engine of a tiny model, HF reference logits."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from polar_sparsity.decode import DecodeEngine, DecodePlan
from polar_sparsity.models.decoder_weights import decoder_spec, hf_decoder_tensors

# Different lengths on purpose: padding must not leak into any sequence.
PROMPTS = [[5, 17, 3, 9, 60, 2], [41, 7], [11, 12, 13, 14, 15, 16, 17, 18, 19]]
MAX_SEQ_LEN = 32  # <= the tiny Mistral's sliding window


def engine_for(model: PreTrainedModel, plan: DecodePlan | None = None, batch: int = 4) -> DecodeEngine:
    spec = decoder_spec(model.config)
    return DecodeEngine(
        spec,
        hf_decoder_tensors(model, spec),
        plan or DecodePlan(),
        max_batch_size=batch,
        max_seq_len=MAX_SEQ_LEN,
        backend="torch",
    )


def right_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, : len(prompt)] = torch.tensor(prompt)
    return ids, torch.tensor([len(p) for p in prompts])


@torch.no_grad()
def hf_last_logits(model: PreTrainedModel, sequences: list[list[int]], pad_id: int = 1) -> torch.Tensor:
    """(B, vocab) logits of each sequence's last token from the HF model, fed left-padded with a mask."""
    longest = max(map(len, sequences))
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):
        ids[i, longest - len(seq) :] = torch.tensor(seq)
        mask[i, longest - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
