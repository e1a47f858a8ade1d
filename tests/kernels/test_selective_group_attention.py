"""selective_group_attention (GQA, packed query heads) against the fp64 reference, plus checks."""

import pytest
import torch

from polar_sparsity.kernels import selective_group_attention, selective_group_attention_reference
from polar_sparsity.kernels.testing import assert_rel_close, poisoned, random_rows

DTYPES = (torch.float16, torch.bfloat16)


def _inputs(B, Hq, Hkv, N, D, dtype, device, gen, seqlens=None):
    q = torch.randn(B, Hq, D, generator=gen).to(dtype).to(device)
    k = torch.randn(B, Hkv, N, D, generator=gen).to(dtype).to(device)
    v = torch.randn(B, Hkv, N, D, generator=gen).to(dtype).to(device)
    if seqlens is None:
        seqlens = torch.randint(1, N + 1, (B,), generator=gen)
    return q, k, v, torch.as_tensor(seqlens, dtype=torch.int32).to(device)


def _check(q, k, v, sl, idx, dtype):
    out = poisoned(q.shape, dtype, q.device)
    selective_group_attention(q, k, v, sl, idx, out=out)
    ref = selective_group_attention_reference(
        q.cpu(), k.cpu(), v.cpu(), sl.cpu(), idx.cpu(), dtype=torch.float64
    )
    assert_rel_close(out.cpu(), ref, dtype, f"groups={idx.tolist()} seqlens={sl.tolist()}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("group", "head_dim"), [(2, 64), (4, 80), (8, 96), (3, 128)])
def test_group_sizes_and_head_dims(dtype, group, head_dim, device, gen):
    q, k, v, sl = _inputs(2, 3 * group, 3, 29, head_dim, dtype, device, gen)
    _check(q, k, v, sl, random_rows(2, 3, 2, device, gen), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k_sel", [1, 4])  # one group, all groups
def test_k_extremes_and_odd_lengths(dtype, k_sel, device, gen):
    q, k, v, sl = _inputs(3, 16, 4, 67, 64, dtype, device, gen, seqlens=[67, 1, 33])
    _check(q, k, v, sl, random_rows(3, 4, k_sel, device, gen), dtype)


@pytest.mark.parametrize(("splits", "merge_here"), [(1, 0), (4, 0), (4, 1)])
def test_split_paths(splits, merge_here, force_config, device, gen):
    cfg = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 2, "splits": splits, "use_dot": 1}
    force_config(dict(cfg, merge_here=merge_here))
    q, k, v, sl = _inputs(2, 8, 2, 90, 64, torch.bfloat16, device, gen, seqlens=[90, 20])
    _check(q, k, v, sl, random_rows(2, 2, 1, device, gen), torch.bfloat16)


@pytest.mark.parametrize("programs_per_sm", [1, 2])
def test_stream_k_paths(programs_per_sm, force_config, device, gen):
    """Stream-K over 38-block pairs in shares of 16 blocks: pairs span several programs."""
    cfg = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 2, "splits": 1, "use_dot": 1, "merge_here": 0}
    force_config(dict(cfg, stream_k=programs_per_sm))
    q, k, v, sl = _inputs(2, 8, 2, 600, 64, torch.bfloat16, device, gen, seqlens=[600, 250])
    _check(q, k, v, sl, random_rows(2, 2, 1, device, gen), torch.bfloat16)


def test_query_heads_of_unselected_groups_untouched(device, gen):
    q, k, v, sl = _inputs(2, 8, 4, 20, 64, torch.float16, device, gen)
    idx = random_rows(2, 4, 2, device, gen)
    out = poisoned(q.shape, q.dtype, device)
    selective_group_attention(q, k, v, sl, idx, out=out, zero_unselected=False)
    sel = torch.zeros(2, 4, dtype=torch.bool)
    sel.scatter_(1, idx.cpu().long(), True)
    sel_heads = sel.repeat_interleave(2, dim=1)  # query head h belongs to group h // G
    assert torch.isnan(out.cpu()[~sel_heads]).all()
    assert not torch.isnan(out.cpu()[sel_heads]).any()


def test_argument_errors(device, gen):
    q, k, v, sl = _inputs(2, 6, 4, 16, 64, torch.float16, device, gen)
    with pytest.raises(ValueError, match="multiple of kv heads 4"):
        selective_group_attention(q, k, v, sl, random_rows(2, 4, 1, device, gen))
    q, k, v, sl = _inputs(2, 8, 4, 16, 64, torch.float16, device, gen)
    with pytest.raises(ValueError, match="valid indices are 0..3"):
        selective_group_attention(q, k, v, sl, torch.full((2, 1), 4, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match=r"expected \(batch=2, k\)"):
        selective_group_attention(q, k, v, sl, random_rows(1, 4, 1, device, gen))
    with pytest.raises(ValueError, match="head_dim 60 is unsupported"):
        q60, k60, v60 = (t[..., :60].contiguous() for t in (q, k, v))
        selective_group_attention(q60, k60, v60, sl, random_rows(2, 4, 1, device, gen))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "schedule",
    [{"splits": s, "merge_here": mh} for s, mh in ((1, 0), (2, 1), (4, 1), (2, 0))]
    + [{"splits": 1, "merge_here": 0, "stream_k": r} for r in (1, 2)],
)
def test_low_density_configs_gpu(schedule, force_config):
    """Llama-3-70B-like at one group of eight: the split / merge / stream-K variants low-density
    configs use."""
    force_config({"BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "use_dot": 1} | schedule)
    dev = torch.device("cuda")
    gen = torch.Generator(device="cuda").manual_seed(4)
    B, Hq, Hkv, N, D = 64, 64, 8, 8192, 128
    q = torch.randn(B, Hq, D, device=dev, dtype=torch.float16, generator=gen)
    k = torch.randn(B, Hkv, N, D, device=dev, dtype=torch.float16, generator=gen)
    v = torch.randn(B, Hkv, N, D, device=dev, dtype=torch.float16, generator=gen)
    sl = torch.randint(1, N + 1, (B,), device=dev, dtype=torch.int32, generator=gen)
    idx = torch.rand(B, Hkv, device=dev, generator=gen).argsort(-1)[:, :1].int().contiguous()
    out = poisoned(q.shape, torch.float16, dev)
    selective_group_attention(q, k, v, sl, idx, out=out)
    ref = selective_group_attention_reference(q, k, v, sl, idx)
    assert_rel_close(out, ref, torch.float16, "k=1")
    again = poisoned(q.shape, torch.float16, dev)
    selective_group_attention(q, k, v, sl, idx, out=again)
    assert torch.equal(out, again), "not bitwise repeatable"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k_sel", [1, 2, 8])
def test_real_shape_gpu(dtype, k_sel):
    """Llama-3-70B-like: B=64, N=8192, 64 query / 8 KV heads x 128."""
    dev = torch.device("cuda")
    gen = torch.Generator(device="cuda").manual_seed(2)
    B, Hq, Hkv, N, D = 64, 64, 8, 8192, 128
    q = torch.randn(B, Hq, D, device=dev, dtype=dtype, generator=gen)
    k = torch.randn(B, Hkv, N, D, device=dev, dtype=dtype, generator=gen)
    v = torch.randn(B, Hkv, N, D, device=dev, dtype=dtype, generator=gen)
    sl = torch.randint(1, N + 1, (B,), device=dev, dtype=torch.int32, generator=gen)
    idx = torch.rand(B, Hkv, device=dev, generator=gen).argsort(-1)[:, :k_sel].int().contiguous()
    out = poisoned(q.shape, dtype, dev)
    selective_group_attention(q, k, v, sl, idx, out=out)
    assert_rel_close(out, selective_group_attention_reference(q, k, v, sl, idx), dtype, "real shape")


def test_top_k_int64_indices_need_no_conversion(device, gen):
    q, k, v, sl = _inputs(2, 8, 4, 40, 64, torch.float16, device, gen)
    idx = random_rows(2, 4, 2, device, gen)
    torch.testing.assert_close(
        selective_group_attention(q, k, v, sl, idx.long()), selective_group_attention(q, k, v, sl, idx)
    )
