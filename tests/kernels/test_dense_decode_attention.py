"""dense_decode_attention (all heads, MHA and GQA) against the fp64 reference and SDPA."""

import pytest
import torch

from polar_sparsity.kernels import dense_decode_attention, dense_decode_attention_reference
from polar_sparsity.kernels.testing import assert_rel_close, poisoned

DTYPES = (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("Hq", "Hkv", "head_dim"), [(3, 3, 64), (4, 4, 80), (6, 2, 96), (8, 1, 128)])
def test_dense_matches_reference(dtype, Hq, Hkv, head_dim, device, gen):
    B, N = 3, 41
    q = torch.randn(B, Hq, head_dim, generator=gen).to(dtype).to(device)
    k = torch.randn(B, Hkv, N, head_dim, generator=gen).to(dtype).to(device)
    v = torch.randn(B, Hkv, N, head_dim, generator=gen).to(dtype).to(device)
    sl = torch.tensor([41, 9, 1], dtype=torch.int32, device=device)
    out = poisoned(q.shape, dtype, device)
    dense_decode_attention(q, k, v, sl, out=out)
    ref = dense_decode_attention_reference(q.cpu(), k.cpu(), v.cpu(), sl.cpu(), dtype=torch.float64)
    assert_rel_close(out.cpu(), ref, dtype, "dense")


def test_custom_scale(device, gen):
    q = torch.randn(2, 2, 64, generator=gen).half().to(device)
    k = torch.randn(2, 2, 10, 64, generator=gen).half().to(device)
    v = torch.randn(2, 2, 10, 64, generator=gen).half().to(device)
    sl = torch.tensor([10, 3], dtype=torch.int32, device=device)
    out = dense_decode_attention(q, k, v, sl, sm_scale=0.3)
    ref = dense_decode_attention_reference(
        q.cpu(), k.cpu(), v.cpu(), sl.cpu(), sm_scale=0.3, dtype=torch.float64
    )
    assert_rel_close(out.cpu(), ref, torch.float16, "sm_scale")


def test_seqlens_must_be_int32_on_same_device(device, gen):
    q = torch.randn(1, 2, 64).half().to(device)
    k = torch.randn(1, 2, 8, 64).half().to(device)
    with pytest.raises(TypeError, match="seqlens has dtype torch.int64"):
        dense_decode_attention(q, k, k, torch.tensor([8], device=device))


@pytest.mark.gpu
@pytest.mark.parametrize(("B", "Hq", "Hkv", "N"), [(64, 72, 72, 1920), (64, 64, 8, 8192)])
def test_dense_matches_sdpa_gpu(B, Hq, Hkv, N):
    dev = torch.device("cuda")
    q = torch.randn(B, Hq, 128, device=dev, dtype=torch.float16)
    k = torch.randn(B, Hkv, N, 128, device=dev, dtype=torch.float16)
    v = torch.randn(B, Hkv, N, 128, device=dev, dtype=torch.float16)
    sl = torch.full((B,), N, device=dev, dtype=torch.int32)
    out = poisoned(q.shape, torch.float16, dev)
    dense_decode_attention(q, k, v, sl, out=out)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.float().unsqueeze(2), k.float(), v.float(), enable_gqa=Hq != Hkv
    ).squeeze(2)
    assert_rel_close(out, sdpa, torch.float16, "vs SDPA fp32")
