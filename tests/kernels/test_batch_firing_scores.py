"""batch_firing_scores against the float64 reference (and the selection rule it implements)."""

import pytest
import torch

from polar_sparsity.kernels import batch_firing_scores, batch_firing_scores_reference
from polar_sparsity.sparsity.selection import batch_neuron_scores

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "n"), [(1, 7), (5, 513), (17, 1100), (64, 2048)])
def test_matches_the_reference(dtype, batch, n, device, gen):
    logits = (4 * torch.randn(batch, n, generator=gen)).to(dtype)
    out = batch_firing_scores(logits.to(device))
    assert out.dtype == torch.float32 and out.shape == (n,)
    ref = torch.sigmoid(logits.double()).sum(0)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5 * batch)


def test_a_strided_batch_view_and_the_selection_rule(device, gen):
    wide = torch.randn(6, 300, generator=gen).half().to(device)
    logits = wide[::2, :250]  # rows strided, neurons contiguous
    torch.testing.assert_close(batch_firing_scores(logits).cpu(), batch_neuron_scores(logits.cpu()))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="logits"):
        batch_firing_scores(torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="logits"):
        batch_firing_scores(torch.zeros(2, 3, dtype=torch.int32))


@pytest.mark.gpu
def test_the_selection_rule_runs_the_kernel_on_the_gpu(gen):
    logits = torch.randn(64, 36864, generator=gen).half().cuda()
    torch.testing.assert_close(
        batch_neuron_scores(logits), batch_firing_scores_reference(logits), rtol=1e-5, atol=1e-4
    )
