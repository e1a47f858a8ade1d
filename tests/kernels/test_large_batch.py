"""Large batches (M > 64): the 128-row tensor-core configs of the selective GEMMs, against the reference."""

import pytest
import torch

from polar_sparsity.kernels import (
    selective_down,
    selective_down_reference,
    selective_gated_up,
    selective_gated_up_reference,
    selective_mlp_down,
    selective_mlp_up,
    selective_up,
    selective_up_reference,
)
from polar_sparsity.kernels.testing import assert_rel_close, poisoned

F16 = torch.float16


def _inputs(M, d, n, k, device, gen):
    x = torch.randn(M, d, generator=gen).to(F16).to(device)
    w_gate = (torch.randn(n, d, generator=gen) / d**0.5).to(F16).to(device)
    w_up = (torch.randn(n, d, generator=gen) / d**0.5).to(F16).to(device)
    b = torch.randn(n, generator=gen).to(F16).to(device)
    idx = torch.randperm(n, generator=gen)[:k].int().to(device)
    return x, w_gate, w_up, b, idx


def test_large_batches_get_tensor_core_tiles_and_whole_batch_candidates():
    for gated in (False, True):
        assert selective_mlp_up._heuristic(256, 4096, 4096, 132, gated, 228 * 1024)["BLOCK_M"] >= 64
    assert selective_mlp_down._heuristic(256, 4096, 4096, 132, 228 * 1024)["BLOCK_M"] >= 64
    for candidates in (
        selective_mlp_up._candidates(256, 4096, 4096, 132, True, 228 * 1024),
        selective_mlp_down._candidates(256, 4096, 4096, 132, 228 * 1024),
    ):
        assert {128, 256} <= {c["BLOCK_M"] for c in candidates}
    assert max(c["BLOCK_M"] for c in selective_mlp_down._candidates(128, 4096, 4096, 132, 228 * 1024)) == 128


@pytest.mark.parametrize("M", [130])
def test_up_and_down_with_the_large_batch_heuristic(M, device, gen):
    d, n, k = 160, 300, 150
    x, w_gate, w_up, b, idx = _inputs(M, d, n, k, device, gen)
    out = poisoned((M, k), F16, device)
    selective_up(x, w_up, idx, b, out=out)
    ref = selective_up_reference(x.cpu(), w_up.cpu(), idx.cpu(), b.cpu(), dtype=torch.float64)
    assert_rel_close(out.cpu(), ref, F16, "up M>64")
    gated = selective_gated_up(x, w_gate, w_up, idx)
    ref_g = selective_gated_up_reference(x.cpu(), w_gate.cpu(), w_up.cpu(), idx.cpu(), dtype=torch.float64)
    assert_rel_close(gated.cpu(), ref_g, F16, "gated up M>64")
    a = gated
    down = poisoned((M, d), F16, device)
    selective_down(a, w_up, idx, b[:d].contiguous(), out=down)
    ref_d = selective_down_reference(a.cpu(), w_up.cpu(), idx.cpu(), b[:d].cpu(), dtype=torch.float64)
    assert_rel_close(down.cpu(), ref_d, F16, "down M>64")


def test_split_paths_with_128_row_tiles(force_config, device, gen):
    M, d, n, k = 140, 256, 200, 160
    x, _, w_up, b, idx = _inputs(M, d, n, k, device, gen)
    force_config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3, "splits": 2})
    out = selective_up(x, w_up, idx, b)
    ref = selective_up_reference(x.cpu(), w_up.cpu(), idx.cpu(), b.cpu(), dtype=torch.float64)
    assert_rel_close(out.cpu(), ref, F16, "up BM128 split 2")
    force_config(
        {"BLOCK_M": 128, "BLOCK_D": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3, "splits": 3}
    )
    a = torch.randn(M, k, generator=gen).to(F16).to(device)
    down = selective_down(a, w_up, idx)
    ref_d = selective_down_reference(a.cpu(), w_up.cpu(), idx.cpu(), dtype=torch.float64)
    assert_rel_close(down.cpu(), ref_d, F16, "down BM128 split 3")


@pytest.mark.parametrize("splits", [1, 2])
def test_whole_batch_256_row_tiles_with_an_odd_neuron_count(splits, force_config, device, gen):
    """256-row tiles over a 200-row batch; k = 157 leaves a partial last step in every split."""
    M, d, n, k = 200, 128, 300, 157
    x, w_gate, w_up, b, idx = _inputs(M, d, n, k, device, gen)
    cfg = {"BLOCK_M": 256, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3, "splits": splits}
    force_config(cfg)
    gated = selective_gated_up(x, w_gate, w_up, idx)
    ref_g = selective_gated_up_reference(x.cpu(), w_gate.cpu(), w_up.cpu(), idx.cpu(), dtype=torch.float64)
    assert_rel_close(gated.cpu(), ref_g, F16, "gated up BM256")
    force_config({**cfg, "BLOCK_D": 64, "BLOCK_K": 32})
    down = selective_down(gated, w_up, idx, b[:d].contiguous())
    ref_d = selective_down_reference(gated.cpu(), w_up.cpu(), idx.cpu(), b[:d].cpu(), dtype=torch.float64)
    assert_rel_close(down.cpu(), ref_d, F16, "down BM256")


def test_large_batch_split_count_fills_whole_waves():
    split = selective_mlp_down._large_batch_splits
    # 32 tiles, one program per SM on 132 SMs: 4 splits fill one wave; 5 would start a second.
    assert split(32, 132, 128, 14336, 64) == 4
    # Few neurons: the fp32 partials outweigh the waves they would fill.
    assert split(288, 396, 128, 3686, 64) == 1
    assert split(1, 132, 128, 200, 64) == 1  # 200 neurons: no room for two splits of >= 2 steps


@pytest.mark.parametrize(
    "tile, schedule",
    [((128, 256), {"splits": 3}), ((256, 128), {"splits": 2}), ((128, 128), {"splits": 1, "stream_k": 1})],
)
@pytest.mark.parametrize("gated", [False, True])
def test_wide_tiles_finish_split_sums_piece_by_piece(tile, schedule, gated, force_config, device, gen):
    """Tiles of more than 128 x 128 sums (gated 128 x 128 too) add their split partials 64 columns at
    a time, smaller ones whole: every piece, the padded last columns of the tile and the padded rows
    beyond M must come out right (k = 230 is not a multiple of 64)."""
    M, d, n, k = 150, 192, 400, 230
    x, w_gate, w_up, b, idx = _inputs(M, d, n, k, device, gen)
    bm, bn = tile
    cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2} | schedule
    force_config(cfg)
    if gated:
        out = selective_gated_up(x, w_gate, w_up, idx, out=poisoned((M, k), F16, device))
        ref = selective_gated_up_reference(x.cpu(), w_gate.cpu(), w_up.cpu(), idx.cpu(), dtype=torch.float64)
    else:
        out = selective_up(x, w_up, idx, b, out=poisoned((M, k), F16, device))
        ref = selective_up_reference(x.cpu(), w_up.cpu(), idx.cpu(), b.cpu(), dtype=torch.float64)
    assert_rel_close(out.cpu(), ref, F16, f"{'gated ' if gated else ''}up {bm} x {bn} {schedule}")
