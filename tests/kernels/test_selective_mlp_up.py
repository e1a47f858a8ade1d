"""selective_up / selective_gated_up against fp64 torch references, plus argument checks."""

import pytest
import torch

from polar_sparsity.kernels import (
    _tuning,
    selective_gated_up,
    selective_gated_up_reference,
    selective_up,
    selective_up_reference,
)
from polar_sparsity.kernels._common import num_sms, planning_for_sms, whole_wave_tiles
from polar_sparsity.kernels.testing import assert_rel_close, poisoned

DTYPES = (torch.float16, torch.bfloat16)


def _w(n, d, dtype, device, gen):
    return (torch.randn(n, d, generator=gen) / d**0.5).to(dtype).to(device)


def _idx(n, k, device, gen):
    return torch.randperm(n, generator=gen)[:k].int().to(device)


def _check_against_reference(gated, M, d, n, k, device, gen, label, calls=1):
    """Random fp16 inputs of these sizes through selective_up (with bias) or selective_gated_up,
    ``calls`` times into one output, each result against the fp64 reference."""
    x = torch.randn(M, d, generator=gen).half().to(device)
    wg, wu = _w(n, d, torch.float16, device, gen), _w(n, d, torch.float16, device, gen)
    b = torch.randn(n, generator=gen).half().to(device)
    idx = _idx(n, k, device, gen)
    out = poisoned((M, k), torch.float16, device)
    if gated:
        ref = selective_gated_up_reference(x.cpu(), wg.cpu(), wu.cpu(), idx.cpu(), dtype=torch.float64)
    else:
        ref = selective_up_reference(x.cpu(), wu.cpu(), idx.cpu(), b.cpu(), dtype=torch.float64)
    for _ in range(calls):
        if gated:
            selective_gated_up(x, wg, wu, idx, out=out)
        else:
            selective_up(x, wu, idx, b, out=out)
        assert_rel_close(out.cpu(), ref, torch.float16, label)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("M", "d", "n", "k"), [(1, 64, 40, 1), (5, 72, 40, 40), (33, 96, 70, 23)])
@pytest.mark.parametrize("bias", [True, False])
def test_up_relu(dtype, M, d, n, k, bias, device, gen):
    x = torch.randn(M, d, generator=gen).to(dtype).to(device)
    w = _w(n, d, dtype, device, gen)
    b = torch.randn(n, generator=gen).to(dtype).to(device) if bias else None
    idx = _idx(n, k, device, gen)
    out = poisoned((M, k), dtype, device)
    selective_up(x, w, idx, b, out=out)
    b_cpu = None if b is None else b.cpu()
    ref = selective_up_reference(x.cpu(), w.cpu(), idx.cpu(), b_cpu, dtype=torch.float64)
    assert_rel_close(out.cpu(), ref, dtype, "up relu")


def test_up_no_activation(device, gen):
    x = torch.randn(3, 64, generator=gen).half().to(device)
    w, idx = _w(20, 64, torch.float16, device, gen), _idx(20, 7, device, gen)
    out = selective_up(x, w, idx, activation="none")
    ref = selective_up_reference(x.cpu(), w.cpu(), idx.cpu(), activation="none", dtype=torch.float64)
    assert (ref < 0).any()  # the no-activation path really keeps negatives
    assert_rel_close(out.cpu(), ref, torch.float16, "up none")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("M", "d", "n", "k"), [(1, 80, 30, 30), (7, 128, 50, 1), (17, 136, 64, 37)])
def test_gated_up(dtype, M, d, n, k, device, gen):
    x = torch.randn(M, d, generator=gen).to(dtype).to(device)
    wg, wu = _w(n, d, dtype, device, gen), _w(n, d, dtype, device, gen)
    idx = _idx(n, k, device, gen)
    out = poisoned((M, k), dtype, device)
    selective_gated_up(x, wg, wu, idx, out=out)
    ref = selective_gated_up_reference(x.cpu(), wg.cpu(), wu.cpu(), idx.cpu(), dtype=torch.float64)
    assert_rel_close(out.cpu(), ref, dtype, "gated up")


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize(
    "schedule", [{"splits": 1}, {"splits": 3}, {"splits": 1, "stream_k": 1}, {"splits": 1, "stream_k": 5}]
)
def test_split_d_paths(gated, schedule, force_config, device, gen):
    """Split over d (split-d, or stream-K's shares spanning 1-2 tiles): the last program of a tile to
    arrive adds the fp32 partials, bias and activation."""
    force_config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2} | schedule)
    # d not a multiple of BLOCK_K: ragged last chunk; 7 steps per tile
    _check_against_reference(gated, 19, 196, 48, 21, device, gen, str(schedule))


@pytest.mark.parametrize("gated", [False, True])
def test_last_wave_split(gated, force_config, device, gen):
    """Only the tiles of the last, partial wave split over d: the whole waves' programs write their
    tiles directly, the split tiles' last program adds the partials."""
    force_config(
        {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
        | {"splits": 3, "last_wave_split": 1}
    )
    sms = num_sms(torch.device(device))
    M, d, k = 19, 196, (sms // 2 + 3) * 16 - 5  # 2 x (SMs / 2 + 3) tiles: one whole wave and 6 more
    assert whole_wave_tiles(2 * (sms // 2 + 3), sms) == sms
    # twice: the arrival counters are reset for the next call
    _check_against_reference(gated, M, d, k + 9, k, device, gen, "last-wave split", calls=2)


def test_a_last_wave_split_without_programs_is_named(force_config, device, gen):
    force_config(
        {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
        | {"splits": 2, "last_wave_split": -1}
    )
    with pytest.raises(ValueError, match=r"got -\d+ .*'last_wave_split' is programs per SM, >= 1"):
        _check_against_reference(False, 3, 64, 20, 5, device, gen, "never run")


@pytest.mark.parametrize("gated", [False, True])
def test_split_d_repeat_is_deterministic(gated, force_config, device, gen):
    """The in-kernel split reduction resets its arrival counters: repeated calls are bitwise equal."""
    force_config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2, "splits": 4})
    M, d, n, k = 20, 160, 64, 40  # 2 x 3 output tiles, 5 d-chunks -> 4 splits after rounding
    x = torch.randn(M, d, generator=gen).half().to(device)
    wg, wu = _w(n, d, torch.float16, device, gen), _w(n, d, torch.float16, device, gen)
    b = torch.randn(n, generator=gen).half().to(device)
    idx = _idx(n, k, device, gen)
    outs = []
    for _ in range(3):
        out = poisoned((M, k), torch.float16, device)
        if gated:
            selective_gated_up(x, wg, wu, idx, out=out)
        else:
            selective_up(x, wu, idx, b, out=out)
        outs.append(out.cpu())
    if gated:
        ref = selective_gated_up_reference(x.cpu(), wg.cpu(), wu.cpu(), idx.cpu(), dtype=torch.float64)
    else:
        ref = selective_up_reference(x.cpu(), wu.cpu(), idx.cpu(), b.cpu(), dtype=torch.float64)
    assert_rel_close(outs[0], ref, torch.float16, "split repeat")
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_argument_errors(device, gen):
    x = torch.randn(4, 64).half().to(device)
    w = _w(20, 64, torch.float16, device, gen)
    idx = _idx(20, 5, device, gen)
    with pytest.raises(ValueError, match="valid indices are 0..19"):
        selective_up(x, w, idx + 20)
    with pytest.raises(TypeError, match="idx has dtype torch.int16; expected torch.int32 or torch.int64"):
        selective_up(x, w, idx.short())
    with pytest.raises(ValueError, match="second dim must equal x's d=64"):
        selective_up(x, w[:, :32].contiguous(), idx)
    with pytest.raises(TypeError, match="w_up has dtype torch.bfloat16"):
        selective_up(x, w.bfloat16(), idx)
    with pytest.raises(ValueError, match="activation 'gelu'"):
        selective_up(x, w, idx, activation="gelu")
    with pytest.raises(ValueError, match="bias must have shape"):
        selective_up(x, w, idx, torch.zeros(5, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="w_up has 10 neurons"):
        selective_gated_up(x, w, w[:10], idx)
    with pytest.raises(ValueError, match="expected 1..20"):
        selective_up(x, w, torch.zeros(0, dtype=torch.int32, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 16, 64, 256])
@pytest.mark.parametrize(("d", "n", "gated"), [(9216, 36864, False), (4096, 14336, True)])
def test_real_shapes_gpu(dtype, M, d, n, gated):
    dev = torch.device("cuda")
    gen = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(M, d, device=dev, dtype=dtype, generator=gen)
    wu = torch.randn(n, d, device=dev, dtype=dtype, generator=gen) / d**0.5
    idx = torch.randperm(n, device=dev, generator=gen)[: int(0.3 * n)].int()
    out = poisoned((M, idx.numel()), dtype, dev)
    if gated:
        wg = torch.randn(n, d, device=dev, dtype=dtype, generator=gen) / d**0.5
        selective_gated_up(x, wg, wu, idx, out=out)
        ref = selective_gated_up_reference(x, wg, wu, idx)
    else:
        b = torch.randn(n, device=dev, dtype=dtype, generator=gen)
        selective_up(x, wu, idx, b, out=out)
        ref = selective_up_reference(x, wu, idx, b)
    assert_rel_close(out, ref, dtype, "real shape")


@pytest.mark.gpu
@pytest.mark.parametrize("sms", [48, 64, 96])
@pytest.mark.parametrize(("M", "d", "n", "gated"), [(1, 9216, 16384, False), (16, 4096, 14336, True)])
def test_heuristic_planned_for_fewer_sms_gpu(sms, M, d, n, gated, monkeypatch):
    """What the heuristic launches at M <= 16 on a GPU of 48-96 SMs (stream-K programs, the gated
    32-wide tiles' step length), run here on the whole GPU, matches the reference."""
    monkeypatch.setattr(_tuning, "pick", lambda key, device, heuristic, *launch_args: dict(heuristic()))
    dev = torch.device("cuda")
    gen = torch.Generator(device="cuda").manual_seed(6)
    x = torch.randn(M, d, device=dev, dtype=torch.float16, generator=gen)
    wu = torch.randn(n, d, device=dev, dtype=torch.float16, generator=gen) / d**0.5
    idx = torch.randperm(n, device=dev, generator=gen)[: int(0.3 * n)].int()
    out = poisoned((M, idx.numel()), torch.float16, dev)
    with planning_for_sms(sms):
        if gated:
            wg = torch.randn(n, d, device=dev, dtype=torch.float16, generator=gen) / d**0.5
            selective_gated_up(x, wg, wu, idx, out=out)
            ref = selective_gated_up_reference(x, wg, wu, idx)
        else:
            selective_up(x, wu, idx, out=out)
            ref = selective_up_reference(x, wu, idx)
    assert_rel_close(out, ref, torch.float16, f"{sms} SMs")


@pytest.mark.gpu
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize(
    "schedule", [{"splits": 6}, {"splits": 1, "stream_k": 1}, {"splits": 1, "stream_k": 2}]
)
def test_split_schedules_gpu_deterministic_under_graph_replay(gated, schedule, force_config):
    """Split-d and stream-K at a real shape: exact repeatability, eager and replayed in a CUDA graph."""
    force_config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3} | schedule)
    dev = torch.device("cuda")
    gen = torch.Generator(device="cuda").manual_seed(5)
    M, d, n, k = 64, 4096, 14336, 4300
    x = torch.randn(M, d, device=dev, dtype=torch.float16, generator=gen)
    wg, wu = (torch.randn(n, d, device=dev, dtype=torch.float16, generator=gen) / d**0.5 for _ in range(2))
    idx = torch.randperm(n, device=dev, generator=gen)[:k].int()

    def run(out=None):
        if gated:
            return selective_gated_up(x, wg, wu, idx, out=out, validate=out is None)
        return selective_up(x, wu, idx, out=out, validate=out is None)

    first = run()
    ref = selective_gated_up_reference(x, wg, wu, idx) if gated else selective_up_reference(x, wu, idx)
    assert_rel_close(first, ref, torch.float16, str(schedule))
    out = poisoned((M, k), torch.float16, dev)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(out)
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, first)
