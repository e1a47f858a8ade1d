"""selective_down against the fp64 torch reference, plus the weight layout helper and checks."""

import os
import subprocess
import sys

import pytest
import torch

from polar_sparsity.kernels import (
    _common,
    _tuning,
    prepare_down_weight,
    selective_down,
    selective_down_reference,
)
from polar_sparsity.kernels._common import planning_for_sms, split_chunks, stream_k_plan
from polar_sparsity.kernels.testing import assert_rel_close, poisoned

DTYPES = (torch.float16, torch.bfloat16)


def _case(M, d, n, k, dtype, device, gen):
    a = torch.randn(M, k, generator=gen).to(dtype).to(device)
    w_t = (torch.randn(n, d, generator=gen) / n**0.5).to(dtype).to(device)
    b = torch.randn(d, generator=gen).to(dtype).to(device)
    idx = torch.randperm(n, generator=gen)[:k].int().to(device)
    return a, w_t, b, idx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("M", "d", "n", "k"), [(1, 64, 40, 1), (5, 80, 40, 40), (33, 200, 70, 29)])
@pytest.mark.parametrize("bias", [True, False])
def test_down(dtype, M, d, n, k, bias, device, gen):
    a, w_t, b, idx = _case(M, d, n, k, dtype, device, gen)
    b = b if bias else None
    out = poisoned((M, d), dtype, device)
    selective_down(a, w_t, idx, b, out=out)
    ref = selective_down_reference(
        a.cpu(), w_t.cpu(), idx.cpu(), None if b is None else b.cpu(), dtype=torch.float64
    )
    assert_rel_close(out.cpu(), ref, dtype, "down")


@pytest.mark.parametrize("splits", [1, 4])
def test_split_k_paths(splits, force_config, device, gen):
    force_config(
        {"BLOCK_M": 16, "BLOCK_D": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2, "splits": splits}
    )
    a, w_t, b, idx = _case(18, 72, 90, 61, torch.bfloat16, device, gen)
    out = poisoned((18, 72), torch.bfloat16, device)
    selective_down(a, w_t, idx, b, out=out)
    ref = selective_down_reference(a.cpu(), w_t.cpu(), idx.cpu(), b.cpu(), dtype=torch.float64)
    assert_rel_close(out.cpu(), ref, torch.bfloat16, f"split={splits}")


@pytest.mark.parametrize(
    ("programs_per_sm", "block_k", "k"),
    [(1, 16, 61), (3, 16, 61), (2, 32, 200), (64, 16, 61)],  # shares of 2+ steps; tiles over 1-4 programs
)
def test_stream_k_paths(programs_per_sm, block_k, k, force_config, device, gen):
    force_config(
        {"BLOCK_M": 16, "BLOCK_D": 32, "BLOCK_K": block_k, "num_warps": 4, "num_stages": 2, "splits": 1}
        | {"stream_k": programs_per_sm}
    )
    a, w_t, b, idx = _case(18, 72, 250, k, torch.float16, device, gen)  # 2 x 3 tiles
    out = poisoned((18, 72), torch.float16, device)
    selective_down(a, w_t, idx, b, out=out)
    ref = selective_down_reference(a.cpu(), w_t.cpu(), idx.cpu(), b.cpu(), dtype=torch.float64)
    assert_rel_close(out.cpu(), ref, torch.float16, f"stream-K x{programs_per_sm}")


@pytest.mark.parametrize(
    ("schedule", "k"), [({"splits": 1}, 61), ({"splits": 3}, 61), ({"splits": 1, "stream_k": 2}, 200)]
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_tile_by_tma(schedule, k, dtype, force_config, device, gen):
    """The descriptor path (tma_a): rows past M and the partial last step read zeros or meet zero weight
    rows; a tensor whose base is not 16-byte aligned takes the per-thread copies instead."""
    tile = {"BLOCK_M": 16, "BLOCK_D": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2, "tma_a": 1}
    force_config(tile | schedule)
    wide, w_t, b, idx = _case(18, 72, 250, 16 * (k // 16 + 1), dtype, device, gen)  # rows 16-aligned
    for rows in (wide[:, :k], wide[:, 1 : k + 1]):  # aligned base; then 2 bytes off (per-thread copies)
        out = poisoned((18, 72), dtype, device)
        selective_down(rows, w_t, idx[:k], b, out=out)
        ref = selective_down_reference(rows.cpu(), w_t.cpu(), idx[:k].cpu(), b.cpu(), dtype=torch.float64)
        assert_rel_close(out.cpu(), ref, dtype, f"tma_a {schedule}")


def test_the_kernels_import_under_a_triton_without_host_descriptors():
    """Triton before 3.4 has no ``triton.tools.tensor_descriptor``: the kernels still import (they once
    failed to, on every such release) and know TMA is unavailable."""
    code = (
        "import sys\n"
        "import triton  # whose own modules may use descriptors\n"
        "sys.modules['triton.tools.tensor_descriptor'] = None  # importing it now raises ImportError\n"
        "from polar_sparsity.kernels import _common, selective_down\n"
        "print(_common.TensorDescriptor is None, _common.tma_feeds_shared_memory_mma(9))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.split() == ["True", "False"], run.stdout + run.stderr


def test_a_tma_config_under_a_triton_without_host_descriptors(force_config, device, gen, monkeypatch):
    """Triton before 3.4 has no host tensor descriptors: no GPU (nor the interpreter) takes the TMA path
    then, and a config that asks for it (a shipped table's, say) runs with per-thread copies."""
    monkeypatch.setattr(_common, "TensorDescriptor", None)
    _common.has_tma.cache_clear()
    try:
        assert not any(_common.tma_feeds_shared_memory_mma(major) for major in (8, 9, 10, 12))
        assert not _common.has_tma(device)
        tile = {"BLOCK_M": 16, "BLOCK_D": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2, "tma_a": 1}
        force_config(tile | {"splits": 3})
        a, w_t, b, idx = _case(18, 72, 250, 61, torch.float16, device, gen)
        out = poisoned((18, 72), torch.float16, device)
        selective_down(a, w_t, idx, b, out=out)
        ref = selective_down_reference(a.cpu(), w_t.cpu(), idx.cpu(), b.cpu(), dtype=torch.float64)
        assert_rel_close(out.cpu(), ref, torch.float16, "tma_a without descriptors")
    finally:
        _common.has_tma.cache_clear()


@pytest.mark.parametrize(
    ("tiles", "steps", "programs"), [(6, 4, 4), (6, 4, 5), (72, 288, 264), (1, 1, 8), (5, 7, 3)]
)
def test_stream_k_plan_covers_every_step_once(tiles, steps, programs):
    """Each program's share is a run of (tile, step) iterations; together they cover each exactly
    once, and no tile spans more programs than the partial-sum slots the plan allocates."""
    share, n_prog, parts = stream_k_plan(tiles * steps, steps, programs)
    owner = [it // share for it in range(tiles * steps)]
    assert max(owner) == n_prog - 1 and share >= min(2, steps)
    assert max(len(set(owner[t * steps : (t + 1) * steps])) for t in range(tiles)) <= parts


@pytest.mark.parametrize(
    ("length", "block", "wanted"), [(250, 16, 4), (250, 16, 15), (64, 64, 8), (9216, 64, 0), (7, 16, 3)]
)
def test_split_chunks_are_whole_steps_and_never_empty(length, block, wanted):
    chunk, splits = split_chunks(length, block, wanted)
    assert chunk % block == 0 and 1 <= splits <= max(1, wanted)
    assert (splits - 1) * chunk < length <= splits * chunk  # the last split holds at least one element


def test_a_stream_k_config_without_programs_is_named(force_config, device, gen):
    force_config(
        {
            "BLOCK_M": 16,
            "BLOCK_D": 32,
            "BLOCK_K": 16,
            "num_warps": 4,
            "num_stages": 2,
            "splits": 1,
            "stream_k": -1,
        }
    )
    a, w_t, b, idx = _case(3, 64, 20, 5, torch.float16, device, gen)
    out = poisoned((3, 64), torch.float16, device)
    with pytest.raises(ValueError, match=r"got -\d+ .*'stream_k' is programs per SM, >= 1"):
        selective_down(a, w_t, idx, b, out=out)
    assert torch.isnan(out.cpu()).all()  # nothing launched


def test_split_k_repeat_is_deterministic(force_config, device, gen):
    """The in-kernel split reduction resets its arrival counters: repeated calls are bitwise equal."""
    force_config({"BLOCK_M": 16, "BLOCK_D": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2, "splits": 3})
    a, w_t, b, idx = _case(20, 80, 90, 70, torch.float16, device, gen)  # 2 x 3 tiles, 3 splits
    outs = []
    for _ in range(3):
        out = poisoned((20, 80), torch.float16, device)
        selective_down(a, w_t, idx, b, out=out)
        outs.append(out.cpu())
    ref = selective_down_reference(a.cpu(), w_t.cpu(), idx.cpu(), b.cpu(), dtype=torch.float64)
    assert_rel_close(outs[0], ref, torch.float16, "split repeat")
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_matches_dense_linear_at_full_density(device, gen):
    """With every neuron selected, selective_down on prepare_down_weight(W) equals F.linear(a, W)."""
    w = (torch.randn(48, 30, generator=gen) / 30**0.5).half()  # nn.Linear(30 -> 48) weight: (d, n)
    a = torch.randn(4, 30, generator=gen).half()
    idx = torch.arange(30, dtype=torch.int32)
    out = selective_down(a.to(device), prepare_down_weight(w).to(device), idx.to(device))
    assert_rel_close(out.cpu(), torch.nn.functional.linear(a.double(), w.double()), torch.float16, "full")


def test_argument_errors(device, gen):
    a, w_t, b, idx = _case(3, 64, 20, 5, torch.float16, device, gen)
    with pytest.raises(ValueError, match="idx has 4 entries but a has k=5"):
        selective_down(a, w_t, idx[:4])
    with pytest.raises(ValueError, match="valid indices are 0..19"):
        selective_down(a, w_t, idx - 1 - idx.max())
    with pytest.raises(ValueError, match="bias must have shape"):
        selective_down(a, w_t, idx, b[:10])
    with pytest.raises(ValueError, match="unit stride"):
        selective_down(a, w_t.t().contiguous().t(), idx)
    with pytest.raises(ValueError, match="out must have shape"):
        selective_down(a, w_t, idx, out=torch.empty(3, 60, dtype=torch.float16, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 16, 64, 256])
@pytest.mark.parametrize(("d", "n"), [(9216, 36864), (4096, 14336)])
def test_real_shapes_gpu(dtype, M, d, n):
    dev = torch.device("cuda")
    gen = torch.Generator(device="cuda").manual_seed(4)
    k = int(0.3 * n)
    a = torch.randn(M, k, device=dev, dtype=dtype, generator=gen)
    w_t = torch.randn(n, d, device=dev, dtype=dtype, generator=gen) / n**0.5
    b = torch.randn(d, device=dev, dtype=dtype, generator=gen)
    idx = torch.randperm(n, device=dev, generator=gen)[:k].int()
    out = poisoned((M, d), dtype, dev)
    selective_down(a, w_t, idx, b, out=out)
    assert_rel_close(out, selective_down_reference(a, w_t, idx, b), dtype, "real shape")


@pytest.mark.gpu
@pytest.mark.parametrize("sms", [48, 64, 96])
@pytest.mark.parametrize(("M", "d", "n"), [(16, 9216, 16384), (64, 9216, 16384), (64, 4096, 14336)])
def test_heuristic_planned_for_fewer_sms_gpu(sms, M, d, n, monkeypatch):
    """What the heuristic launches on a GPU of 48-96 SMs (its split counts and one-wave tiles for GPUs
    with fewer SMs than tiles), run here on the whole GPU, matches the reference."""
    monkeypatch.setattr(_tuning, "pick", lambda key, device, heuristic, *launch_args: dict(heuristic()))
    dev = torch.device("cuda")
    gen = torch.Generator(device="cuda").manual_seed(5)
    k = int(0.3 * n)
    a = torch.randn(M, k, device=dev, dtype=torch.float16, generator=gen)
    w_t = torch.randn(n, d, device=dev, dtype=torch.float16, generator=gen) / n**0.5
    idx = torch.randperm(n, device=dev, generator=gen)[:k].int()
    out = poisoned((M, d), torch.float16, dev)
    with planning_for_sms(sms):
        selective_down(a, w_t, idx, out=out)
    assert_rel_close(out, selective_down_reference(a, w_t, idx), torch.float16, f"{sms} SMs")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "schedule", [{"splits": 8}, {"splits": 32}, {"splits": 1, "stream_k": 1}, {"splits": 1, "stream_k": 2}]
)
def test_split_k_gpu_deterministic_under_graph_replay(schedule, force_config):
    """Many splits (or stream-K shares) racing on one tile's counter: exact repeatability, eager and
    replayed in a graph."""
    force_config({"BLOCK_M": 64, "BLOCK_D": 256, "BLOCK_K": 32, "num_warps": 8, "num_stages": 4} | schedule)
    dev = torch.device("cuda")
    gen = torch.Generator(device="cuda").manual_seed(int.from_bytes(os.urandom(4), "little"))
    M, d, n, k = 64, 4096, 14336, 4300
    a = torch.randn(M, k, device=dev, dtype=torch.float16, generator=gen)
    w_t = torch.randn(n, d, device=dev, dtype=torch.float16, generator=gen) / n**0.5
    idx = torch.randperm(n, device=dev, generator=gen)[:k].int()
    first = selective_down(a, w_t, idx)
    assert_rel_close(first, selective_down_reference(a, w_t, idx), torch.float16, "split gpu")
    out = poisoned((M, d), torch.float16, dev)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        selective_down(a, w_t, idx, out=out, validate=False)
    for _ in range(5):
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, first)


@pytest.mark.parametrize("splits", [1, 2])
def test_out_of_range_indices_add_nothing(splits, force_config, device, gen):
    """Unchecked (validate=False, as in a CUDA graph) bad indices read no memory outside the weight
    and contribute zero: the result is the sum over the valid neurons only."""
    force_config(
        {"BLOCK_M": 16, "BLOCK_D": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2, "splits": splits}
    )
    M, d, n, k = 3, 64, 90, 40
    a, w_t, b, idx = _case(M, d, n, k, torch.float16, device, gen)
    bad = torch.tensor([3, 17, 38])
    idx[bad.to(device)] = torch.tensor([-1, n, n + 1000], dtype=torch.int32, device=device)
    out = poisoned((M, d), torch.float16, device)
    selective_down(a, w_t, idx, b, out=out, validate=False)
    keep = torch.ones(k, dtype=torch.bool)
    keep[bad] = False
    ref = selective_down_reference(a.cpu()[:, keep], w_t.cpu(), idx.cpu()[keep], b.cpu(), dtype=torch.float64)
    assert_rel_close(out.cpu(), ref, torch.float16, "out-of-range indices")


def test_top_k_int64_indices_need_no_conversion(device, gen):
    """torch.topk's int64 indices go straight in (no conversion kernel): the same result as int32."""
    a, w_t, b, idx = _case(9, 64, 90, 33, torch.float16, device, gen)
    torch.testing.assert_close(selective_down(a, w_t, idx.long(), b), selective_down(a, w_t, idx, b))
