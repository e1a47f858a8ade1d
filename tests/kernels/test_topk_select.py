"""topk_select against its torch reference (a stable sort) and the selection rule it implements."""

import pytest
import torch

from polar_sparsity.kernels import topk_select, topk_select_reference
from polar_sparsity.kernels.topk_select import BLOCK_MIN
from polar_sparsity.sparsity.selection import topk_indices


def _scores(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "normal":
        return torch.randn(n, generator=gen)
    if kind == "firing sums":  # what the MLP router gives: sums of 64 probabilities, in [0, 64]
        return torch.sigmoid(4 * torch.randn(64, n, generator=gen)).sum(0)
    return torch.randint(-3, 4, (n,), generator=gen).float()  # "ties": seven values only


@pytest.mark.parametrize("kind", ["normal", "firing sums", "ties"])
@pytest.mark.parametrize(
    ("n", "k"),
    [(1, 1), (9, 4), (BLOCK_MIN, 1), (BLOCK_MIN + 1, BLOCK_MIN), (5000, 1500), (9000, 8999), (9000, 9000)],
)
def test_matches_the_reference(kind, n, k, device, gen):
    scores = _scores(kind, n, gen)
    out = topk_select(scores.to(device), k)
    assert out.dtype == torch.int64 and out.shape == (k,)
    torch.testing.assert_close(out.cpu(), topk_select_reference(scores, k), rtol=0, atol=0)


def test_signed_zeros_tie_and_nan_ranks_first(device):
    scores = torch.tensor([0.0, -0.0, 1.0, -0.0, float("nan"), -1.0, float("-inf"), float("inf")])
    out = topk_select(scores.to(device), 5).cpu()
    torch.testing.assert_close(out, torch.tensor([0, 1, 2, 4, 7]))  # NaN, +inf, 1, then the first zeros


def test_a_repeated_call_starts_from_a_clean_workspace(device, gen):
    """The histograms and arrival counters are zeroed by the last program of each pass."""
    for n, k in ((3000, 7), (2500, 2000), (3000, 7)):
        scores = torch.randn(n, generator=gen)
        torch.testing.assert_close(topk_select(scores.to(device), k).cpu(), topk_select_reference(scores, k))


def test_bad_input_is_named(device):
    with pytest.raises(ValueError, match="k=0"):
        topk_select(torch.zeros(5, device=device), 0)
    with pytest.raises(ValueError, match="k=6"):
        topk_select(torch.zeros(5, device=device), 6)
    with pytest.raises(TypeError, match="scores"):
        topk_select(torch.zeros(5, device=device, dtype=torch.float16), 2)
    with pytest.raises(ValueError, match="scores"):
        topk_select(torch.zeros(10, device=device)[::2], 2)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [36864, 49152, 14336 * 4])
def test_real_widths_and_graph_replay(n, gen):
    """OPT-66B / OPT-175B MLP widths and a wide one, eagerly and replayed in a CUDA graph on new scores."""
    scores = torch.sigmoid(4 * torch.randn(64, n, generator=gen)).sum(0).cuda()
    for fraction in (0.1, 0.3, 0.5, 0.9):
        k = int(fraction * n)
        torch.testing.assert_close(topk_select(scores, k).cpu(), topk_select_reference(scores.cpu(), k))
    k = n // 3
    topk_select(scores, k)  # workspace made before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = topk_select(scores, k)
    for _ in range(3):
        scores.copy_(torch.randn(n, generator=gen))
        graph.replay()
        torch.testing.assert_close(out.cpu(), topk_select_reference(scores.cpu(), k))


@pytest.mark.gpu
def test_the_selection_rule_runs_the_kernel_on_the_gpu(gen):
    scores = torch.randn(36864, generator=gen)
    chosen = topk_indices(scores.cuda(), 11059).cpu()
    torch.testing.assert_close(chosen, topk_select_reference(scores, 11059))
    assert set(chosen.tolist()) == set(topk_indices(scores, 11059).tolist())
