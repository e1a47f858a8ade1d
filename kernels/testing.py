"""Helpers for checking the kernels against their references (tests/kernels), and one config's result
against another's (tuning, :class:`kernels._tuning.OutputCheck`)."""

from __future__ import annotations

import torch

# Relative-error bounds ||out - ref|| / ||ref|| against an fp32/fp64 reference, by input dtype:
# fp16 keeps 11 significant bits, bf16 8; the kernels accumulate in fp32.
REL_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 over the elements finite in ``ref``; inf where ``out`` is not
    finite at exactly those elements (a NaN ``out`` never passes a finite ``ref``)."""
    o, r = out.double(), ref.double()
    written = torch.isfinite(r)
    if not torch.equal(torch.isfinite(o), written):
        return float("inf")
    o, r = o[written], r[written]
    denom = r.norm().item()
    return (o - r).norm().item() / (denom if denom > 0 else 1.0)


def agreement_tol(dtype: torch.dtype) -> float:
    """Largest relative difference between two kernel results that each meet ``REL_TOL`` against the
    exact result (the triangle inequality): what tuning allows between configs of one op."""
    return 2 * REL_TOL[dtype]


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    err, tol = rel_error(out, ref), REL_TOL[dtype]
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} ({dtype})"


def poisoned(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An output buffer full of NaN, so any element a kernel fails to write shows up."""
    return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)


def random_rows(batch: int, n: int, k: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch, k) int32 duplicate-free random indices in [0, n) per row."""
    return torch.rand(batch, n, generator=generator).argsort(-1)[:, :k].int().contiguous().to(device)
