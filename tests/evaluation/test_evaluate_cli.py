"""evaluate.py end to end through the CLI, offline: a run, the dense cache, a sweep with its plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from polar_sparsity.evaluation.results import read_csv_rows
from tests.evaluation.conftest import ROOT

# Small but real: every task runs, on a slice of its data.
QUICK = ["eval.limit=24", "eval.perplexity.max_tokens=2048", "device=cpu"]


def _run(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
           "POLAR_SPARSITY_HOME": str(home)}  # fmt: skip
    command = [sys.executable, "evaluate.py", *QUICK, *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def test_single_run_writes_results_and_reuses_the_dense_cache(tmp_path: Path) -> None:
    first = _run(tmp_path, "mode=sparse_attn", "sparsity.attn_topk=0.25", "logger=csv")
    assert "tiny-opt on python-docs: dense vs sparse_attn (attn_topk=0.25" in first.stdout
    assert "average (1 task)" in first.stdout and "token_perplexity" in first.stdout
    assert "dense baseline: computed in this run" in first.stdout
    (results_path,) = (tmp_path / "runs" / "evaluate").glob("*/eval_results.json")
    payload = json.loads(results_path.read_text())
    mc = payload["results"]["lm_eval"]["pydocs_continuation"]
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(mc)
    assert {"word_perplexity", "byte_perplexity", "bits_per_byte"} <= set(
        payload["results"]["lm_eval"]["pydocs_perplexity"]
    )
    assert payload["results"]["lm_eval_info"]["n_samples"]["pydocs_continuation"]["effective"] == 24
    assert payload["config"]["sparsity"]["attn_topk"] == 0.25 and payload["config"]["mode"] == "sparse_attn"
    assert payload["versions"]["lm_eval"] and payload["versions"]["torch"]
    assert payload["sparsity"]["masked_attn_layers"] == [1, 2, 3]
    assert payload["results"]["measured_density"]["attn"] == 0.25
    # Dropping 3 of 4 heads in 3 of 4 layers costs perplexity.
    assert payload["results"]["perplexity"]["perplexity"] > payload["dense"]["perplexity"]["perplexity"]
    assert (results_path.parent / "eval_sweep.csv").exists()
    metrics = list(results_path.parent.glob("csv/version_0/metrics.csv"))
    assert metrics and "evaluate/perplexity" in metrics[0].read_text()

    second = _run(tmp_path, "mode=random_attn", "sparsity.attn_topk=0.25", "logger=none")
    assert "dense baseline: cache" in second.stdout
    assert len(list((tmp_path / "eval" / "dense-cache").glob("*.json"))) == 1


def test_sweep_ends_with_a_table_and_a_plot(tmp_path: Path) -> None:
    result = _run(
        tmp_path, "mode=sparse_attn,random_attn", "sparsity.attn_topk=0.25,1.0", "logger=none", "-m"
    )
    assert "Evaluation sweep (4 runs), deltas against dense" in result.stdout
    (sweep_dir,) = (tmp_path / "multirun" / "evaluate").iterdir()
    assert (sweep_dir / "eval_sweep.png").stat().st_size > 0
    rows = read_csv_rows(sweep_dir / "eval_sweep.csv")
    assert sorted((r["mode"], r["attn_topk"]) for r in rows) == [
        ("random_attn", 0.25), ("random_attn", 1.0), ("sparse_attn", 0.25), ("sparse_attn", 1.0),
    ]  # fmt: skip
    for row in rows:
        metrics = [c for c in row if c.startswith(("pydocs", "average", "perplexity"))]
        assert metrics
        if row["attn_topk"] == 1.0:  # every head kept: exactly dense
            assert all(row[c] == row[f"dense:{c}"] for c in metrics)
        else:
            assert row["perplexity"] > row["dense:perplexity"]


def test_bad_input_fails_before_evaluation(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "POLAR_SPARSITY_HOME": str(tmp_path)}
    command = [sys.executable, "evaluate.py", "mode=sparse", "logger=none"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "no router bundle at" in result.stderr and "Running loglikelihood" not in result.stderr
    assert not (tmp_path / "eval").exists()  # nothing was evaluated, not even dense
