"""Comparison table, sweep CSV and the dense cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from polar_sparsity.evaluation.results import (
    append_row,
    cache_file,
    comparison_rows,
    flat_metrics,
    read_cache,
    read_csv_rows,
    write_cache,
)

DENSE = {
    "lm_eval": {
        "a": {"acc": 0.6, "acc_stderr": 0.02, "acc_norm": 0.5},
        "b": {"acc": 0.8, "word_perplexity": 10.0},
    },
    "perplexity": {"perplexity": 20.0, "data": "d", "split": "test"},
}
SPARSE = {
    "lm_eval": {
        "a": {"acc": 0.5, "acc_stderr": 0.03, "acc_norm": 0.45},
        "b": {"acc": 0.7, "word_perplexity": 12.5},
    },
    "perplexity": {"perplexity": 22.0, "data": "d", "split": "test"},
}


def test_comparison_has_deltas_per_task_and_the_average() -> None:
    rows = {(r["task"], r["metric"]): r for r in comparison_rows(DENSE, SPARSE, "sparse")}
    assert rows[("a", "acc")]["delta"] == pytest.approx(-0.1) and rows[("a", "acc")]["stderr"] == 0.03
    assert rows[("b", "word_perplexity")]["delta"] == pytest.approx(2.5)
    assert rows[("average (2 tasks)", "acc")]["dense"] == pytest.approx(0.7)
    assert rows[("average (2 tasks)", "acc")]["delta"] == pytest.approx(-0.1)
    assert rows[("average (1 task)", "acc_norm")]["delta"] == pytest.approx(-0.05)
    assert rows[("perplexity: d test", "token_perplexity")]["delta"] == pytest.approx(2.0)
    assert not any(metric.endswith("_stderr") for _, metric in rows)


def test_dense_mode_keeps_both_columns() -> None:
    (row, *_) = comparison_rows(DENSE, DENSE, "dense")
    assert row["dense"] == row["dense (this run)"] == 0.6 and row["delta"] == 0


def test_sweep_csv_appends_with_a_column_union(tmp_path: Path) -> None:
    path = tmp_path / "sweep.csv"
    append_row(path, {"mode": "sparse", "attn_topk": 0.5, **flat_metrics(SPARSE)})
    append_row(path, {"mode": "random_attn", "attn_topk": 0.3, "extra": "x"})
    rows = read_csv_rows(path)
    assert [r["mode"] for r in rows] == ["sparse", "random_attn"]
    assert rows[0]["a/acc"] == 0.5 and rows[1]["a/acc"] is None and rows[1]["extra"] == "x"
    assert rows[0]["average/acc"] == pytest.approx(0.6) and rows[0]["perplexity"] == 22.0


def test_dense_cache_is_keyed(tmp_path: Path) -> None:
    key = {"model": "m", "tasks": ["a"], "limit": None}
    path = cache_file(tmp_path, "m", key)
    assert read_cache(path, key) is None
    write_cache(path, key, DENSE)
    assert read_cache(path, key) == DENSE
    other = key | {"limit": 10}
    assert cache_file(tmp_path, "m", other) != path
    path.write_text(json.dumps({"key": other, "results": DENSE}))  # a file under the wrong name
    assert read_cache(path, key) is None
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temporaries
