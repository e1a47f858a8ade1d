"""selective_head_attention (MHA) against the fp64 torch reference, plus its argument checks."""

import pytest
import torch

from polar_sparsity.kernels import selective_head_attention, selective_head_attention_reference
from polar_sparsity.kernels.testing import assert_rel_close, poisoned, random_rows

DTYPES = (torch.float16, torch.bfloat16)


def _inputs(B, H, N, D, dtype, device, gen, seqlens=None):
    q = torch.randn(B, H, D, generator=gen).to(dtype).to(device)
    k = torch.randn(B, H, N, D, generator=gen).to(dtype).to(device)
    v = torch.randn(B, H, N, D, generator=gen).to(dtype).to(device)
    if seqlens is None:
        seqlens = torch.randint(1, N + 1, (B,), generator=gen)
    return q, k, v, torch.as_tensor(seqlens, dtype=torch.int32).to(device)


def _check(q, k, v, sl, idx, dtype, **kw):
    out = poisoned(q.shape, dtype, q.device)
    selective_head_attention(q, k, v, sl, idx, out=out, **kw)
    ref = selective_head_attention_reference(
        q.cpu(), k.cpu(), v.cpu(), sl.cpu(), idx.cpu(), dtype=torch.float64
    )
    assert_rel_close(out.cpu(), ref, dtype, f"k={idx.shape[1]} seqlens={sl.tolist()}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
def test_head_dims(dtype, head_dim, device, gen):
    q, k, v, sl = _inputs(2, 3, 37, head_dim, dtype, device, gen)
    _check(q, k, v, sl, random_rows(2, 3, 2, device, gen), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k_sel", [1, 5])  # k=1 and k=all heads
def test_k_extremes_and_odd_lengths(dtype, k_sel, device, gen):
    # lengths: empty, 1, not a multiple of any block size, full cache
    q, k, v, sl = _inputs(4, 5, 71, 64, dtype, device, gen, seqlens=[0, 1, 45, 71])
    _check(q, k, v, sl, random_rows(4, 5, k_sel, device, gen), dtype)


@pytest.mark.parametrize("use_dot", [0, 1])
@pytest.mark.parametrize(("splits", "merge_here"), [(1, 0), (3, 0), (3, 1)])
def test_paths(use_dot, splits, merge_here, force_config, device, gen):
    """Register-reduction and tensor-core paths; no split, split + merge kernel, split + in-kernel merge."""
    cfg = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 2, "splits": splits, "use_dot": use_dot}
    force_config(dict(cfg, merge_here=merge_here))
    q, k, v, sl = _inputs(3, 4, 53, 64, torch.float16, device, gen, seqlens=[53, 17, 2])
    _check(q, k, v, sl, random_rows(3, 4, 3, device, gen), torch.float16)


@pytest.mark.parametrize("use_dot", [0, 1])
@pytest.mark.parametrize("programs_per_sm", [1, 3])
def test_stream_k_paths(use_dot, programs_per_sm, force_config, device, gen):
    """Stream-K: shares of 16 blocks over 38-block pairs, so pairs span 3-4 programs and programs span
    pairs; lengths: full, short, empty (programs past a length merge empty partial states)."""
    cfg = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 2, "splits": 1, "use_dot": use_dot, "merge_here": 0}
    force_config(dict(cfg, stream_k=programs_per_sm))
    q, k, v, sl = _inputs(3, 4, 600, 64, torch.float16, device, gen, seqlens=[600, 17, 0])
    _check(q, k, v, sl, random_rows(3, 4, 3, device, gen), torch.float16)


@pytest.mark.parametrize(
    "schedule",
    [{"splits": 1, "merge_here": 0}, {"splits": 4, "merge_here": 0}, {"splits": 4, "merge_here": 1}]
    + [{"splits": 1, "merge_here": 0, "stream_k": 1}],
)
def test_out_of_range_indices_skipped_and_others_zeroed(schedule, force_config, device, gen):
    """validate=False: a bad index writes nothing; every head not validly selected is zeroed in-kernel."""
    force_config({"BLOCK_N": 16, "num_warps": 4, "num_stages": 2, "use_dot": 1} | schedule)
    q, k, v, sl = _inputs(2, 5, 300, 64, torch.float16, device, gen)
    idx = torch.tensor([[4, 7], [-1, 0]], dtype=torch.int32, device=device)
    out = poisoned(q.shape, q.dtype, device)
    selective_head_attention(q, k, v, sl, idx, out=out, validate=False)
    good = torch.tensor([[4], [0]], dtype=torch.int32)
    ref = selective_head_attention_reference(q.cpu(), k.cpu(), v.cpu(), sl.cpu(), good, dtype=torch.float64)
    assert_rel_close(out.cpu(), ref, torch.float16, "bad indices")
    assert (out.cpu()[0, :4] == 0).all() and (out.cpu()[1, 1:] == 0).all()


def test_in_kernel_merge_is_deterministic_and_resets_counters(force_config, device, gen):
    force_config({"BLOCK_N": 16, "num_warps": 4, "num_stages": 2, "splits": 4, "use_dot": 0, "merge_here": 1})
    q, k, v, sl = _inputs(3, 4, 64, 64, torch.float16, device, gen)
    idx = random_rows(3, 4, 2, device, gen)
    first = selective_head_attention(q, k, v, sl, idx)
    for _ in range(2):  # counters must be back at 0 after each launch, or the merge would misfire
        assert torch.equal(selective_head_attention(q, k, v, sl, idx), first)


def test_unselected_left_untouched(device, gen):
    q, k, v, sl = _inputs(2, 4, 20, 64, torch.float16, device, gen)
    idx = random_rows(2, 4, 2, device, gen)
    out = poisoned(q.shape, q.dtype, device)
    selective_head_attention(q, k, v, sl, idx, out=out, zero_unselected=False)
    sel = torch.zeros(2, 4, dtype=torch.bool)
    sel.scatter_(1, idx.cpu().long(), True)
    assert torch.isnan(out.cpu()[~sel]).all(), "unselected heads must not be written"
    assert not torch.isnan(out.cpu()[sel]).any()


def test_default_zeroes_unselected(device, gen):
    q, k, v, sl = _inputs(2, 4, 20, 64, torch.float16, device, gen)
    idx = random_rows(2, 4, 1, device, gen)
    out = selective_head_attention(q, k, v, sl, idx)
    sel = torch.zeros(2, 4, dtype=torch.bool)
    sel.scatter_(1, idx.cpu().long(), True)
    assert (out.cpu()[~sel] == 0).all()


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a: a.update(idx=a["idx"].short()), TypeError, "int32 or torch.int64"),
        (lambda a: a.update(idx=a["idx"] + 4), ValueError, "valid indices are 0..3"),
        (lambda a: a.update(idx=torch.zeros(2, 5, dtype=torch.int32)), ValueError, "1 <= k <= 4"),
        (lambda a: a.update(sl=a["sl"] + 100), ValueError, "seqlens holds index"),
        (lambda a: a.update(sl=a["sl"][:1]), ValueError, "seqlens must have shape"),
        (lambda a: a.update(q=a["q"].float()), TypeError, "q has dtype torch.float32"),
        (
            lambda a: a.update(k=a["k"].to(torch.bfloat16), v=a["v"].to(torch.bfloat16)),
            TypeError,
            "k_cache has dtype",
        ),
        (lambda a: a.update(v=a["v"][:, :, :8]), ValueError, "v_cache must have shape"),
        (lambda a: a.update(q=a["q"][:, :2]), ValueError, "as many query heads as KV heads"),
        (
            lambda a: a.update(
                k=a["k"].transpose(2, 3).contiguous().transpose(2, 3),
                v=a["v"].transpose(2, 3).contiguous().transpose(2, 3),
            ),
            ValueError,
            "unit stride",
        ),
    ],
)
def test_argument_errors(change, error, match, device, gen):
    q, k, v, sl = _inputs(2, 4, 16, 64, torch.float16, device, gen)
    a = dict(q=q, k=k, v=v, sl=sl, idx=random_rows(2, 4, 2, device, gen))
    change(a)
    with pytest.raises(error, match=match):
        selective_head_attention(a["q"], a["k"], a["v"], a["sl"], a["idx"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("B", "H", "N", "density"), [(64, 72, 1920, 0.5), (256, 32, 4096, 0.25)])
def test_real_shapes_gpu(dtype, B, H, N, density):
    gen = torch.Generator(device="cuda").manual_seed(1)
    dev = torch.device("cuda")
    q = torch.randn(B, H, 128, device=dev, dtype=dtype, generator=gen)
    k = torch.randn(B, H, N, 128, device=dev, dtype=dtype, generator=gen)
    v = torch.randn(B, H, N, 128, device=dev, dtype=dtype, generator=gen)
    sl = torch.randint(1, N + 1, (B,), device=dev, dtype=torch.int32, generator=gen)
    idx = torch.rand(B, H, device=dev, generator=gen).argsort(-1)[:, : int(density * H)].int().contiguous()
    out = poisoned(q.shape, dtype, dev)
    selective_head_attention(q, k, v, sl, idx, out=out)
    ref = selective_head_attention_reference(q, k, v, sl, idx)
    assert_rel_close(out, ref, dtype, "real shape")


@pytest.mark.gpu
def test_cuda_graph_replay_reads_lengths_on_device():
    """Captured once, replayed after the lengths and indices change in place: still correct."""
    dev = torch.device("cuda")
    B, H, N, D = 8, 16, 1000, 128
    q = torch.randn(B, H, D, device=dev, dtype=torch.float16)
    k = torch.randn(B, H, N, D, device=dev, dtype=torch.float16)
    v = torch.randn(B, H, N, D, device=dev, dtype=torch.float16)
    sl = torch.full((B,), N, device=dev, dtype=torch.int32)
    idx = torch.rand(B, H, device=dev).argsort(-1)[:, :4].int().contiguous()
    out = torch.empty_like(q)
    selective_head_attention(q, k, v, sl, idx, out=out)  # warm-up: compile + config choice
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        selective_head_attention(q, k, v, sl, idx, out=out)
    for _ in range(2):
        sl.copy_(torch.randint(1, N + 1, (B,), device=dev, dtype=torch.int32))
        idx.copy_(torch.rand(B, H, device=dev).argsort(-1)[:, :4].int())
        out.fill_(float("nan"))
        graph.replay()
        assert_rel_close(out, selective_head_attention_reference(q, k, v, sl, idx), torch.float16, "graph")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "schedule",
    [{"splits": s, "merge_here": mh} for s, mh in ((1, 0), (2, 1), (4, 1), (4, 0))]
    + [{"splits": 1, "merge_here": 0, "stream_k": r} for r in (1, 2)],
)
def test_low_density_configs_gpu(schedule, force_config):
    """OPT-66B at density 0.1 (k=7): the split / merge / stream-K variants low-density configs use."""
    force_config({"BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "use_dot": 1} | schedule)
    gen = torch.Generator(device="cuda").manual_seed(3)
    dev = torch.device("cuda")
    B, H, N = 64, 72, 1920
    q = torch.randn(B, H, 128, device=dev, dtype=torch.float16, generator=gen)
    k = torch.randn(B, H, N, 128, device=dev, dtype=torch.float16, generator=gen)
    v = torch.randn(B, H, N, 128, device=dev, dtype=torch.float16, generator=gen)
    sl = torch.randint(1, N + 1, (B,), device=dev, dtype=torch.int32, generator=gen)
    idx = torch.rand(B, H, device=dev, generator=gen).argsort(-1)[:, :7].int().contiguous()
    out = poisoned(q.shape, torch.float16, dev)
    selective_head_attention(q, k, v, sl, idx, out=out)
    assert_rel_close(out, selective_head_attention_reference(q, k, v, sl, idx), torch.float16, "k=7")
    again = poisoned(q.shape, torch.float16, dev)
    selective_head_attention(q, k, v, sl, idx, out=again)
    assert torch.equal(out, again), "not bitwise repeatable"


def test_top_k_int64_indices_need_no_conversion(device, gen):
    q, k, v, sl = _inputs(2, 4, 40, 64, torch.float16, device, gen)
    idx = random_rows(2, 4, 2, device, gen)
    torch.testing.assert_close(
        selective_head_attention(q, k, v, sl, idx.long()), selective_head_attention(q, k, v, sl, idx)
    )
