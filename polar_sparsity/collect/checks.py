"""What collect checks before it touches a store or loads weights: positions, stream size, memory.

Each check fails with the bad value, the limit, and what would be valid, so a run that cannot finish
stops in seconds instead of after a pass over the corpus.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import PretrainedConfig
from transformers import PreTrainedTokenizerBase as Tokenizer

from polar_sparsity.data.tokens import load_texts, packed_sequences
from polar_sparsity.schema import DataConfig

_FLOAT32 = 4


def max_positions(hf_config: PretrainedConfig) -> int | None:
    """The longest sequence the model's position embeddings (or RoPE training length) cover."""
    return getattr(hf_config, "max_position_embeddings", None)


def check_seq_len(seq_len: int, hf_config: PretrainedConfig, name: str) -> None:
    """Refuse sequences longer than the model's positions (an IndexError or silently wrong numbers)."""
    limit = max_positions(hf_config)
    if limit is not None and seq_len > limit:
        raise ValueError(
            f"{name}={seq_len} is longer than the model's {limit} positions "
            f"(max_position_embeddings); use {name}={limit} or less"
        )


def sequences_needed(
    data: DataConfig, tokenizer: Tokenizer, seq_len: int, vocab_size: int, samples: int
) -> int:
    """How many packed sequences hold ``samples`` tokens; refuses a stream that has fewer tokens.

    Tokenizes the stream up to ``samples`` tokens (seconds), so that a too-small source fails before
    a store is created, instead of after a whole pass through the model.
    """
    tokens = 0
    for count, sequence in enumerate(packed_sequences(load_texts(data), tokenizer, seq_len, vocab_size), 1):
        tokens += len(sequence)
        if tokens >= samples:
            return count
    raise ValueError(
        f"collect.samples={samples} but data={data.name} (split {data.split!r}) holds only {tokens} tokens "
        f"with this tokenizer; use collect.samples={tokens} or less, or a larger data source"
    )


def forward_bytes(geometry: dict, batch: int, seq_len: int, model_bytes: int) -> int:
    """Rough peak memory of one collect forward pass, besides the weights.

    Logits (float32, the largest single tensor for big vocabularies), one layer's working tensors,
    eager attention probabilities, and the captured tensors of every layer (held until written).
    """
    g, tokens = geometry, batch * seq_len
    logits = tokens * g["vocab_size"] * _FLOAT32
    layer = tokens * (4 * g["hidden_size"] + 2 * g["ffn_dim"]) * model_bytes
    attention = batch * g["num_heads"] * seq_len * seq_len * _FLOAT32
    captured_per_token = g["hidden_size"] * model_bytes + g["num_heads"] * _FLOAT32
    if g["mlp_kind"] == "relu":
        captured_per_token += g["ffn_dim"]  # one bool per neuron
    return logits + layer + attention + tokens * g["num_layers"] * captured_per_token


def weight_bytes(geometry: dict, model_bytes: int) -> int:
    """Approximate size of the model's weights (attention, MLP, embeddings and head)."""
    g = geometry
    per_layer = 4 * g["hidden_size"] ** 2 + 3 * g["hidden_size"] * g["ffn_dim"]
    return (g["num_layers"] * per_layer + 2 * g["vocab_size"] * g["hidden_size"]) * model_bytes


def available_memory(device: torch.device) -> int:
    """Free bytes on the device where the forward pass runs."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 2**63  # unknown platform: no estimate to refuse on


def check_batch_memory(
    geometry: dict, batch: int, batch_size: int, seq_len: int, model_bytes: int, device: torch.device
) -> None:
    """Refuse a batch whose forward pass cannot fit in the device's free memory."""
    free = available_memory(device) - weight_bytes(geometry, model_bytes)
    needed = forward_bytes(geometry, batch, seq_len, model_bytes)
    if needed <= free:
        return
    per_sequence = forward_bytes(geometry, 1, seq_len, model_bytes)
    fits = max(0, math.floor(free / per_sequence)) if per_sequence else 0
    advice = f"use collect.batch_size={fits} or less" if fits else "lower collect.seq_len or use more memory"
    raise ValueError(
        f"collect.batch_size={batch_size} needs about {needed / 2**30:.2f} GiB per forward pass on {device} "
        f"({batch} sequences of {seq_len} tokens), but only {max(free, 0) / 2**30:.2f} GiB is free after "
        f"the weights; {advice}"
    )
