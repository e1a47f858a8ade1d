"""Tensor parallelism for the decoding engine: the process group and each rank's shard of the model.

Megatron-style sharding over ``tp`` ranks with ``torch.distributed`` (gloo on the CPU, NCCL on CUDA):

- attention: rank ``r`` owns a contiguous block of ``kv_heads / tp`` KV groups and their query heads
  (Q/K/V column-parallel: rows of q/k/v and their biases), and the matching columns of the output
  projection (row-parallel); its KV cache holds only those heads.
- MLP: rank ``r`` owns a contiguous block of ``ffn / tp`` neurons: rows of up (and gate) and their
  biases, columns of down.
- after the output projection and after the down projection, one ``all_reduce`` (sum) of the
  partial outputs; their biases live on rank 0 only, so they are added once.
- embeddings, positions, norms and the LM head are replicated: every rank computes the same logits.

Sparse decoding under TP (the one rule, :func:`local_keep`): each rank keeps ``num_kept(fraction,
local units)`` of its own units, where the fraction is the plan's ``attn_topk`` for heads / KV groups,
``mlp_topk`` for neurons, or ``k / ffn`` for a calibrated neuron count ``k``. Head routers and MLP
routers score all units and each rank ranks only its own slice (:class:`RankScorer`); MLP scores are
still summed over the batch (``selection.batch_neuron_scores``) before the per-rank top-k. The count
kept globally is therefore the asked fraction of every rank's block, not an over-selection by ``tp``;
but the choice is made within each rank: a per-rank top-k can differ from the global top-k of the
same total count (one rank may hold more of the globally best units than its share).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from polar_sparsity.decode.plan import DecodePlan
from polar_sparsity.models.decoder_weights import DecoderSpec
from polar_sparsity.sparsity.masking import Scorer
from polar_sparsity.sparsity.selection import num_kept

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def init_tensor_parallel(
    tp: int, device_type: str | None = None
) -> tuple[dist.ProcessGroup | None, torch.device]:
    """The process group of ``tp`` ranks from torchrun's environment, and this rank's device.

    ``tp=1``: no process group (None) and the single-process engine. Otherwise the job must be
    launched with ``torchrun --nproc-per-node=<tp>``. ``device_type`` "cuda" (the default when CUDA is
    available): NCCL, one GPU per rank (``cuda:LOCAL_RANK``); "cpu": gloo.
    """
    if tp < 1:
        raise ValueError(f"parallel.tp={tp} must be >= 1")
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type={device_type!r} must be 'cpu' or 'cuda'")
    if tp == 1:
        return None, torch.device(device_type)
    missing = [name for name in _TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ValueError(
            f"parallel.tp={tp} needs torchrun's environment ({', '.join(missing)} unset): launch with "
            f"torchrun --nproc-per-node={tp} ..."
        )
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size != tp:
        raise ValueError(
            f"parallel.tp={tp} but torchrun started WORLD_SIZE={world_size} processes: use "
            f"--nproc-per-node={tp} (the engine runs one tensor-parallel group over every rank)"
        )
    if device_type == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but this host has {torch.cuda.device_count()} GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return dist.group.WORLD, device


def check_divisible(spec: DecoderSpec, tp: int) -> None:
    """Refuse a TP degree that does not split heads, KV groups and neurons evenly."""
    g = spec.geometry
    counts = {"attention heads": g.num_heads, "KV heads": g.num_kv_heads, "MLP neurons": g.ffn_dim}
    for what, count in counts.items():
        if count % tp:
            raise ValueError(
                f"tensor parallelism over {tp} ranks needs the {what} to split evenly, but this "
                f"{spec.family} model has {count}; use a tp that divides {g.num_heads} heads, "
                f"{g.num_kv_heads} KV heads and {g.ffn_dim} neurons"
            )


def local_spec(spec: DecoderSpec, tp: int) -> DecoderSpec:
    """The spec of one rank's shard: ``1 / tp`` of the heads, KV heads and neurons of every layer."""
    check_divisible(spec, tp)
    g = spec.geometry
    geometry = replace(
        g, num_heads=g.num_heads // tp, num_kv_heads=g.num_kv_heads // tp, ffn_dim=g.ffn_dim // tp
    )
    return replace(spec, geometry=geometry)


def _block(units: int, rank: int, tp: int) -> slice:
    """Rank ``rank``'s contiguous block of ``units`` split over ``tp`` ranks."""
    size = units // tp
    return slice(rank * size, (rank + 1) * size)


def shard_tensors(
    spec: DecoderSpec, tensors: dict[str, torch.Tensor], rank: int, tp: int
) -> dict[str, torch.Tensor]:
    """This rank's engine tensors (``models.decoder_weights`` names): layer weights sliced, rest shared.

    The full layer tensors are popped out of ``tensors`` as their slices are made (contiguous copies),
    so each full tensor can be freed once sharded.
    """
    check_divisible(spec, tp)
    g = spec.geometry
    heads = _block(g.num_heads * g.head_dim, rank, tp)  # query heads of the rank's KV groups
    kv = _block(g.num_kv_heads * g.head_dim, rank, tp)
    neurons = _block(g.ffn_dim, rank, tp)
    rows = {"q": heads, "k": kv, "v": kv, "up": neurons, "gate": neurons}  # column-parallel outputs
    cols = {"o": heads, "down": neurons}  # row-parallel inputs
    out = {name: t for name, t in tensors.items() if not name.startswith("layers.")}
    for layer in range(g.num_layers):
        p = f"layers.{layer}."
        for name in ("attn_norm", "mlp_norm"):
            for kind in ("weight", "bias"):
                if p + f"{name}.{kind}" in tensors:
                    out[p + f"{name}.{kind}"] = tensors.pop(p + f"{name}.{kind}")
        for name, block in rows.items():
            for kind in ("weight", "bias"):
                if p + f"{name}.{kind}" in tensors:
                    out[p + f"{name}.{kind}"] = tensors.pop(p + f"{name}.{kind}")[block].contiguous()
        for name, block in cols.items():
            out[p + f"{name}.weight"] = tensors.pop(p + f"{name}.weight")[:, block].contiguous()
            bias = tensors.pop(p + f"{name}.bias", None)
            if bias is not None and rank == 0:  # summed by the all-reduce: added on one rank only
                out[p + f"{name}.bias"] = bias
    return out


@dataclass(frozen=True)
class RankScorer:
    """A router restricted to one rank's units: its scores' columns ``start .. stop - 1``."""

    router: Scorer
    start: int
    stop: int

    @property
    def num_outputs(self) -> int:
        return self.stop - self.start

    @property
    def net(self) -> Any:
        """The wrapped router's network (the engine checks its device)."""
        return getattr(self.router, "net", None)

    @property
    def meta(self) -> dict[str, Any]:
        return {**getattr(self.router, "meta", {}), "num_outputs": self.num_outputs}

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.router.scores(x)[..., self.start : self.stop]


def local_keep(kept: int, units: int, local_units: int) -> int:
    """Units one rank keeps when ``kept`` of ``units`` are asked globally: the same fraction locally.

    ``num_kept(kept / units, local_units)``: with evenly split units, ``ceil(kept / tp)`` per rank, so
    the global count is ``kept`` rounded up to a multiple of ``tp`` (never more than ``tp - 1`` over).
    """
    return num_kept(kept / units, local_units)


def shard_plan(plan: DecodePlan, spec: DecoderSpec, rank: int, tp: int) -> DecodePlan:
    """This rank's plan: routers sliced to its KV groups / neurons, the calibrated k split per rank.

    ``attn_topk`` and ``mlp_topk`` stay as fractions: the engine applies them to the local geometry
    (``num_kept(fraction, local units)``); a calibrated count goes through :func:`local_keep`.
    """
    g = spec.geometry
    plan.check(g)  # the routers must score the full model's units before they are sliced
    kv, neurons = _block(g.num_kv_heads, rank, tp), _block(g.ffn_dim, rank, tp)
    head_routers = {layer: RankScorer(r, kv.start, kv.stop) for layer, r in plan.head_routers.items()}
    mlp_routers = {layer: RankScorer(r, neurons.start, neurons.stop) for layer, r in plan.mlp_routers.items()}
    mlp_keep = plan.mlp_keep
    if mlp_keep is not None:
        full_keep = mlp_keep

        def mlp_keep(layer: int, batch_size: int) -> int:
            return local_keep(full_keep(layer, batch_size), g.ffn_dim, g.ffn_dim // tp)

    return replace(plan, head_routers=head_routers, mlp_routers=mlp_routers, mlp_keep=mlp_keep)


def shard_for_rank(
    spec: DecoderSpec, tensors: dict[str, torch.Tensor], plan: DecodePlan, group: dist.ProcessGroup
) -> tuple[DecoderSpec, dict[str, torch.Tensor], DecodePlan]:
    """The spec, engine tensors and plan of this process's rank in ``group`` (what the engine builds on)."""
    rank, tp = dist.get_rank(group), dist.get_world_size(group)
    check_divisible(spec, tp)
    return local_spec(spec, tp), shard_tensors(spec, tensors, rank, tp), shard_plan(plan, spec, rank, tp)
