"""Tensor-parallel decoding: 2 gloo processes on the CPU decode like one process.

One spawn (module fixture) runs every scenario on both ranks and saves their outputs; the tests
compare them with the single-process engine on the same weights and routers.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from polar_sparsity.decode import DecodeEngine, DecodePlan
from polar_sparsity.decode.parallel import (
    check_divisible,
    init_tensor_parallel,
    local_keep,
    shard_tensors,
)
from polar_sparsity.models.decoder_weights import decoder_spec, hf_decoder_tensors
from polar_sparsity.sparsity.selection import batch_neuron_scores, num_kept, topk_indices
from tests.decode.helpers import MAX_SEQ_LEN, PROMPTS, engine_for, right_padded, sparse_plans
from tests.helpers import tiny_model

TP = 2
ATOL = 1e-5  # fp32; the all-reduce only changes the summation order
STEP_TOKENS = [[3, 50, 7], [8, 1, 90], [33, 21, 4]]  # fixed next tokens of 3 decode steps (B = 3)

# name -> (model, attn_topk, mlp_topk, what to run); every model has heads and neurons divisible by 2.
SCENARIOS = {
    "opt-dense": ("opt", None, None, "steps"),
    "llama-gqa-dense": ("llama-gqa", None, None, "steps"),
    "opt-topk1": ("opt", 1.0, 1.0, "generate"),
    "llama-gqa-topk1": ("llama-gqa", 1.0, None, "generate"),
    "opt-topk0.5": ("opt", 0.5, 0.5, "steps"),  # MHA heads and batch-shared neurons
    "qwen2-topk0.5": ("qwen2", 0.5, None, "steps"),  # GQA: 4 KV groups, 2 per rank
    "opt-calibrated-k": ("opt", 0.5, 25, "steps"),  # an int: a calibrated k of 25 of 96 neurons
}


def _plan(model, attn_topk: float | None, mlp: float | int | None) -> DecodePlan:
    """Dense (no attn_topk), or sparse with an MLP top-k fraction or a calibrated neuron count (int)."""
    if attn_topk is None:
        return DecodePlan()
    if isinstance(mlp, int):
        plan = sparse_plans(model, attn_topk=attn_topk, mlp_topk=0.5, dense_layers=())[0]
        return replace(plan, mlp_topk=None, mlp_keep=lambda layer, batch_size: mlp)
    return sparse_plans(model, attn_topk=attn_topk, mlp_topk=mlp, dense_layers=())[0]


def _run(engine: DecodeEngine, what: str) -> dict[str, object]:
    """Prefill + fixed-token decode steps (every logit), or greedy generation (the tokens)."""
    if what == "generate":
        return {"tokens": engine.generate(PROMPTS, max_new_tokens=6).new_tokens}
    logits = [engine.prefill(*right_padded(PROMPTS))]
    logits += [engine.decode_one_token(torch.tensor(step)) for step in STEP_TOKENS]
    return {"logits": torch.stack(logits)}


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(TP),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    group, device = init_tensor_parallel(TP, device_type="cpu")
    results = {}
    try:
        for key, (name, attn_topk, mlp_topk, what) in SCENARIOS.items():
            _, model = tiny_model(name)
            spec = decoder_spec(model.config)
            engine = DecodeEngine(
                spec,
                hf_decoder_tensors(model, spec),
                _plan(model, attn_topk, mlp_topk),
                max_batch_size=4,
                max_seq_len=MAX_SEQ_LEN,
                backend="torch",
                tp_group=group,
            )
            results[key] = _run(engine, what)
            results[key]["kv_heads"] = engine.cache.k[0].shape[1]
            results[key]["attn_keep"] = engine.model.attn_keep
    finally:
        dist.destroy_process_group()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Both ranks' outputs of every scenario, from one 2-process gloo run."""
    out_dir = tmp_path_factory.mktemp("tp")
    mp.spawn(_rank_main, args=(_free_port(), str(out_dir)), nprocs=TP, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(TP)]


def _single(key: str, plan_for=None) -> dict[str, object]:
    name, attn_topk, mlp_topk, what = SCENARIOS[key]
    _, model = tiny_model(name)
    plan = _plan(model, attn_topk, mlp_topk)
    return _run(engine_for(model, plan_for(plan) if plan_for else plan), what)


@pytest.mark.parametrize("key", ["opt-dense", "llama-gqa-dense"])
def test_dense_logits_equal_one_process(ranks, key: str) -> None:
    expected = _single(key)["logits"]
    for rank in ranks:
        torch.testing.assert_close(rank[key]["logits"], expected, atol=ATOL, rtol=0)
    # Each rank's cache holds only its heads: half of them.
    _, model = tiny_model(SCENARIOS[key][0])
    assert ranks[0][key]["kv_heads"] == decoder_spec(model.config).geometry.num_kv_heads // TP


@pytest.mark.parametrize("key", ["opt-topk1", "llama-gqa-topk1"])
def test_sparse_topk_one_generates_the_same_tokens(ranks, key: str) -> None:
    expected = _single(key)["tokens"]
    assert [rank[key]["tokens"] for rank in ranks] == [expected] * TP


@dataclass(frozen=True)
class RankwiseTopk:
    """The hand-computed TP selection on one process: boost each rank block's own top-k to the top.

    Head routers: per sequence, the top ``keep`` of each block's scores; MLP routers: the top ``keep``
    of each block's batch score. The global top-k of the boosted scores is then their union.
    """

    router: object
    kind: str
    keep: int

    @property
    def net(self):
        return self.router.net

    @property
    def meta(self):
        return self.router.meta

    @property
    def num_outputs(self) -> int:
        return self.router.num_outputs

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.router.scores(x).float()
        ranked = batch_neuron_scores(scores) if self.kind == "mlp" else scores
        blocks = ranked.unflatten(-1, (TP, ranked.shape[-1] // TP))
        chosen = torch.zeros_like(blocks).scatter_(-1, topk_indices(blocks, self.keep), 1.0)
        return scores + 1e4 * chosen.flatten(-2)


@pytest.mark.parametrize("key", ["opt-topk0.5", "qwen2-topk0.5", "opt-calibrated-k"])
def test_sparse_selects_top_k_within_each_rank(ranks, key: str) -> None:
    name, attn_topk, mlp, _ = SCENARIOS[key]
    _, model = tiny_model(name)
    g = decoder_spec(model.config).geometry
    heads_keep = num_kept(attn_topk, g.num_kv_heads // TP)
    assert ranks[0][key]["attn_keep"] == heads_keep
    assert TP * heads_keep == num_kept(attn_topk, g.num_kv_heads)  # no over-selection at this fraction

    def rankwise(plan: DecodePlan) -> DecodePlan:
        heads = {layer: RankwiseTopk(r, "head", heads_keep) for layer, r in plan.head_routers.items()}
        # A fraction applies to each rank's neurons; a calibrated k splits as ceil(k / tp) (25 -> 13).
        if isinstance(mlp, int):
            neurons_keep = math.ceil(mlp / TP)
        else:
            neurons_keep = num_kept(mlp, g.ffn_dim // TP) if mlp else 0
        neurons = {layer: RankwiseTopk(r, "mlp", neurons_keep) for layer, r in plan.mlp_routers.items()}
        plan = replace(plan, head_routers=heads, mlp_routers=neurons)
        if plan.mlp_keep is not None:  # one process keeps the union of the ranks' neurons
            plan = replace(plan, mlp_keep=lambda layer, batch_size: TP * neurons_keep)
        return plan

    expected = _single(key, rankwise)["logits"]
    for rank in ranks:
        torch.testing.assert_close(rank[key]["logits"], expected, atol=ATOL, rtol=0)
    # Not vacuous: the per-rank choice differs from the global top-k of the same count.
    global_topk = _single(key)["logits"]
    assert (expected - global_topk).abs().max() > 100 * ATOL


def test_shards_rebuild_the_full_tensors() -> None:
    _, model = tiny_model("qwen2")  # GQA with q/k/v biases
    spec = decoder_spec(model.config)
    full = hf_decoder_tensors(model, spec)
    shards = [shard_tensors(spec, dict(full), rank, TP) for rank in range(TP)]
    for name in ("layers.1.q.weight", "layers.1.k.bias", "layers.1.up.weight", "layers.1.gate.weight"):
        torch.testing.assert_close(torch.cat([s[name] for s in shards]), full[name], atol=0, rtol=0)
    for name in ("layers.1.o.weight", "layers.1.down.weight"):
        torch.testing.assert_close(torch.cat([s[name] for s in shards], dim=1), full[name], atol=0, rtol=0)
    assert shards[0]["embed.weight"] is full["embed.weight"]


def test_shard_sizes_must_divide() -> None:
    _, model = tiny_model("llama-gqa")  # 8 heads, 2 KV heads, 96 neurons
    with pytest.raises(ValueError, match="KV heads to split evenly, but this llama model has 2"):
        check_divisible(decoder_spec(model.config), 4)


def test_tp_needs_torchrun(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc-per-node=2"):
        init_tensor_parallel(2, device_type="cpu")
    assert init_tensor_parallel(1, device_type="cpu") == (None, torch.device("cpu"))


def test_calibrated_k_splits_per_rank() -> None:
    assert local_keep(24, 96, 48) == 12
    assert local_keep(25, 96, 48) == 13  # ceil: at most tp - 1 neurons over the asked total
    assert local_keep(1, 96, 48) == 1
