"""Every op wrapper checks the strides its kernel assumes, for every tensor argument (issue 9 §6).

Each case hands one argument as a view whose innermost stride is not 1 (``t[..., ::2]``, e.g. a bias
``b[::2]``) and expects a ``ValueError`` naming that argument before any launch. Row-strided views
(unit innermost stride) are supported and must give the reference result.
"""

import pytest
import torch

from polar_sparsity.kernels import (
    dense_decode_attention,
    selective_down,
    selective_down_reference,
    selective_gated_up,
    selective_group_attention,
    selective_head_attention,
    selective_up,
    selective_up_reference,
)
from polar_sparsity.kernels.testing import assert_rel_close

F16 = torch.float16


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` with stride 2 along the last dim."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def _mlp_args(device):
    M, d, n, k = 4, 32, 48, 16
    return dict(
        x=torch.randn(M, d, dtype=F16, device=device),
        w_up=torch.randn(n, d, dtype=F16, device=device),
        w_gate=torch.randn(n, d, dtype=F16, device=device),
        bias=torch.randn(n, dtype=F16, device=device),
        idx=torch.randperm(n)[:k].int().to(device),
        out=torch.empty(M, k, dtype=F16, device=device),
        a=torch.randn(M, k, dtype=F16, device=device),
        w_down_t=torch.randn(n, d, dtype=F16, device=device),
        b_down=torch.randn(d, dtype=F16, device=device),
        out_down=torch.empty(M, d, dtype=F16, device=device),
    )


def _up(t):
    return selective_up(t["x"], t["w_up"], t["idx"], t["bias"], out=t["out"])


def _gated(t):
    return selective_gated_up(t["x"], t["w_gate"], t["w_up"], t["idx"], out=t["out"])


def _down(t):
    return selective_down(t["a"], t["w_down_t"], t["idx"], t["b_down"], out=t["out_down"])


MLP_CASES = [
    (_up, "x", "x"),
    (_up, "w_up", "w_up"),
    (_up, "bias", "bias"),
    (_up, "idx", "idx"),
    (_up, "out", "out"),
    (_gated, "x", "x"),
    (_gated, "w_gate", "w_gate"),
    (_gated, "w_up", "w_up"),
    (_gated, "idx", "idx"),
    (_gated, "out", "out"),
    (_down, "a", "a"),
    (_down, "w_down_t", "w_down_t"),
    (_down, "idx", "idx"),
    (_down, "b_down", "bias"),
    (_down, "out_down", "out"),
]


@pytest.mark.parametrize(("op", "arg", "name"), MLP_CASES, ids=[f"{c[0].__name__}-{c[1]}" for c in MLP_CASES])
def test_mlp_ops_reject_strided_arguments(op, arg, name, device):
    t = _mlp_args(device)
    t[arg] = _strided(t[arg])
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        op(t)


def _attn_args(device, heads=4, kv_heads=4):
    B, N, D = 2, 24, 16
    return dict(
        q=torch.randn(B, heads, D, dtype=F16, device=device),
        k=torch.randn(B, kv_heads, N, D, dtype=F16, device=device),
        v=torch.randn(B, kv_heads, N, D, dtype=F16, device=device),
        seqlens=torch.tensor([N, N - 5], dtype=torch.int32, device=device),
        idx=torch.tensor([[0, 2], [3, 1]], dtype=torch.int32, device=device),
        out=torch.empty(B, heads, D, dtype=F16, device=device),
    )


def _mha(t):
    return selective_head_attention(t["q"], t["k"], t["v"], t["seqlens"], t["idx"], out=t["out"])


def _gqa(t):
    return selective_group_attention(t["q"], t["k"], t["v"], t["seqlens"], t["idx"], out=t["out"])


def _dense(t):
    return dense_decode_attention(t["q"], t["k"], t["v"], t["seqlens"], out=t["out"])


ATTN_ARGS = {
    "q": "q",
    "k": "k_cache",
    "v": "v_cache",
    "seqlens": "seqlens",
    "idx": "head/group",
    "out": "out",
}
ATTN_CASES = [
    (op, arg, ATTN_ARGS[arg], kv)
    for op, kv in ((_mha, 4), (_gqa, 2), (_dense, 2))
    for arg in ATTN_ARGS
    if not (op is _dense and arg == "idx")
]


@pytest.mark.parametrize(
    ("op", "arg", "name", "kv_heads"), ATTN_CASES, ids=[f"{c[0].__name__}-{c[1]}" for c in ATTN_CASES]
)
def test_attention_ops_reject_strided_arguments(op, arg, name, kv_heads, device):
    t = _attn_args(device, kv_heads=kv_heads)
    if op is _gqa:
        t["idx"] = t["idx"] % kv_heads
        t["idx"][:, 1] = 1 - t["idx"][:, 0]
    t[arg] = _strided(t[arg])
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        op(t)


def test_row_strided_views_are_supported(device, gen):
    """Views with a larger row pitch but unit innermost stride are read correctly."""
    M, d, n, k = 5, 64, 40, 24
    x = torch.randn(M, 2 * d, generator=gen).to(F16).to(device)[:, :d]
    w = torch.randn(n, d + 16, generator=gen).to(F16).to(device)[:, :d]
    idx = torch.randperm(n, generator=gen)[:k].int().to(device)
    out = torch.empty(M, k + 8, dtype=F16, device=device)[:, :k]
    selective_up(x, w, idx, out=out)
    ref = selective_up_reference(x.cpu(), w.cpu(), idx.cpu(), dtype=torch.float64)
    assert_rel_close(out.cpu(), ref, F16, "row-strided up")
    a = torch.randn(M, k + 8, generator=gen).to(F16).to(device)[:, :k]
    down = selective_down(a, w, idx)
    ref = selective_down_reference(a.cpu(), w.cpu(), idx.cpu(), dtype=torch.float64)
    assert_rel_close(down.cpu(), ref, F16, "row-strided down")
