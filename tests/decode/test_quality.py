"""The generation-quality report: agreement and dense perplexity of sparse continuations."""

from __future__ import annotations

import pytest

from polar_sparsity.decode import quality


def test_free_running_agreement_and_first_divergence() -> None:
    agreement, first = quality.free_running_agreement([[1, 2, 3, 4], [5, 6]], [[1, 2, 0, 4], [5, 6]])
    assert agreement == pytest.approx((3 / 4 + 1) / 2)
    assert first == pytest.approx((2 + 2) / 2)


def test_keeping_every_head_reproduces_dense(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At top-k 1.0 the sparse engine is the dense one: full agreement, the same perplexity."""
    monkeypatch.setenv("POLAR_SPARSITY_HOME", str(tmp_path))
    result = quality.measure(["sparsity.attn_topk=1.0", "device=cpu", "decode.max_new_tokens=8"])
    assert result["teacher_forced_agreement"] == 1.0
    assert result["free_running_agreement"] == 1.0
    assert result["dense_ppl_of_sparse_text"] == pytest.approx(result["dense_ppl_of_dense_text"])
