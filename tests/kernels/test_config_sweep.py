"""The config sweep's table pick and argument checks (CPU; the timing itself needs a GPU)."""

from __future__ import annotations

import re

import pytest

from polar_sparsity.kernels.bench import config_sweep


def _row(key: str, k: int, cfg: dict, ratio: float) -> dict:
    return dict(key=key, model="m", op="down", M=256, context="", k=k, cfg=cfg, ratio_to_best=ratio)


def test_bucket_pick_minimises_the_worst_ratio_over_the_keys_shapes():
    a, b, c = {"BLOCK_D": 64}, {"BLOCK_D": 128}, {"BLOCK_D": 256}
    rows = [
        _row("K8192", 4301, a, 1.00),
        _row("K8192", 4301, b, 1.10),
        _row("K8192", 4301, c, 1.02),
        _row("K8192", 7168, a, 1.30),  # best at one shape, poor at the other
        _row("K8192", 7168, b, 1.00),
        _row("K8192", 7168, c, 1.05),
    ]
    assert config_sweep.bucket_picks(rows) == {"K8192": c}


def test_bucket_pick_skips_configs_that_failed_or_were_not_timed_at_every_shape():
    a, b = {"BLOCK_D": 64}, {"BLOCK_D": 128}
    rows = [
        _row("K4096", 2867, a, 1.00),
        _row("K4096", 2867, b, 1.01),
        _row("K4096", 4096, a, float("nan")),  # did not run at this shape
        _row("K4096", 4096, b, 1.00),
        _row("K2048", 1434, a, float("nan")),  # nothing ran: no pick for the key
    ]
    assert config_sweep.bucket_picks(rows) == {"K4096": b}


def test_a_config_timed_twice_at_one_shape_counts_once_at_its_faster_time():
    a, b = {"BLOCK_D": 64}, {"BLOCK_D": 128}
    rows = [
        _row("K16384", 11059, a, 1.00),  # as a candidate
        _row("K16384", 11059, a, 1.03),  # again as the heuristic's config
        _row("K16384", 11059, b, 1.01),
    ]
    assert config_sweep.bucket_picks(rows) == {"K16384": a}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "gpt-5"], "unknown model(s) ['gpt-5']"),
        (["--density", "0,0.5"], "densities [0.0] are outside (0, 1]"),
        (["--batch", "0"], "batch sizes [0] must be >= 1"),
        (["--op", "up,gemv"], "unknown op(s) ['gemv']; choose from ['up', 'down', 'attn']"),
        (["--op", "attn", "--context", "0"], "context lengths [0] must be >= 1"),
    ],
)
def test_bad_arguments_are_named_before_any_work(argv, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        config_sweep.main(argv)


def test_a_saved_table_is_what_merge_tables_merges(tmp_path, monkeypatch):
    from polar_sparsity.kernels.bench import _harness, merge_tables

    env = {"date": "2026-11-29", "gpu": "NVIDIA H200", "triton": "3.6.0"}
    monkeypatch.setattr(_harness, "env_info", lambda: env)  # the one GPU query; no GPU here
    path = tmp_path / "sweep.json"
    _harness.save_table(
        path, "bench.config_sweep (graph-timed)", {"down|M64": {"BLOCK_D": 64}, "down|M16": {}}
    )
    assert not (tmp_path / "sweep.json.tmp").exists()
    merged = merge_tables.merge(tmp_path / "out.json", [path])
    assert merged["gpu"] == "NVIDIA H200"
    assert list(merged["configs"]) == ["down|M16", "down|M64"]
    assert merged["sources"][0]["source"] == (
        "python -m polar_sparsity.kernels.bench.config_sweep (graph-timed) on NVIDIA H200"
    )
