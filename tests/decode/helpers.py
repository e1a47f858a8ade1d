"""Shared pieces of the engine tests: prompts, the engine of a tiny model, HF reference logits."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from polar_sparsity.decode import DecodeEngine, DecodePlan
from polar_sparsity.models.decoder_weights import decoder_spec, hf_decoder_tensors
from polar_sparsity.models.families import family_for_config
from polar_sparsity.routers.bundle import LoadedRouter
from polar_sparsity.routers.nets import HeadRouter, MlpRouter
from polar_sparsity.schema import Mode
from polar_sparsity.sparsity import SparsityPlan

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


def routers(kind: str, layers: range, d_in: int, units: int, seed: int = 0) -> dict[int, LoadedRouter]:
    """Random routers in the bundle loader's own type (a net, its metadata)."""
    routers = {}
    for layer in layers:
        torch.manual_seed(seed + 100 * layer)
        net = HeadRouter(d_in, units) if kind == "mha" else MlpRouter(d_in, units, hidden=16)
        routers[layer] = LoadedRouter(layer=layer, net=net.eval(), meta={"kind": kind, "num_outputs": units})
    return routers


def sparse_plans(model: PreTrainedModel, attn_topk: float, mlp_topk: float | None, dense_layers=frozenset()):
    """The engine's plan and the evaluation masks' plan with the same routers and fractions."""
    geometry = family_for_config(model.config).geometry(model.config)
    layers = range(geometry.num_layers)
    heads = routers("mha", layers, geometry.hidden_size, geometry.num_kv_heads)
    mlp = routers("mlp", layers, geometry.hidden_size, geometry.ffn_dim) if mlp_topk is not None else {}
    engine_plan = DecodePlan(
        mode="sparse",
        attn_topk=attn_topk,
        dense_attn_layers=frozenset(dense_layers),
        head_routers=heads,
        mlp_routers=mlp,
        mlp_topk=mlp_topk,
    )
    mask_plan = SparsityPlan(
        mode=Mode.sparse,
        attn_topk=attn_topk,
        mlp_topk=mlp_topk,
        dense_attn_layers=frozenset(dense_layers),
        last_n=1,
        head_routers=heads,
        mlp_routers=mlp,
    )
    return engine_plan, mask_plan
