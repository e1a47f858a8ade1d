"""generate.py end to end through the CLI, offline on tiny-opt: dense, sparse with a router bundle;
bad input refused before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from polar_sparsity.data.tokenizer import load_tokenizer
from polar_sparsity.decode import runner
from polar_sparsity.routers.bundle import BundleError
from tests.decode.conftest import ROOT, generate_settings
from tests.evaluation.conftest import write_head_bundle

PROMPTS = '["The import statement","Return a new list","A"]'


def _run(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "POLAR_SPARSITY_HOME": str(home),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    command = [sys.executable, "generate.py", "device=cpu", *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def _records(home: Path) -> tuple[list[dict], dict]:
    (jsonl,) = (home / "runs" / "generate").glob("*/generations.jsonl")
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    return records, json.loads((jsonl.parent / "generate_results.json").read_text())


def _check_records(records: list[dict], prompts: list[str], max_new_tokens: int) -> None:
    tokenizer = load_tokenizer()
    assert [r["prompt"] for r in records] == prompts and [r["index"] for r in records] == [0, 1, 2]
    for record in records:
        assert record["prompt_token_ids"][0] == tokenizer.bos_token_id
        assert tokenizer.decode(record["prompt_token_ids"][1:]) == record["prompt"]
        ids = record["token_ids"]
        assert record["completion"] == tokenizer.decode(ids, skip_special_tokens=True)
        if record["finish_reason"] == "length":
            assert len(ids) == max_new_tokens and tokenizer.eos_token_id not in ids
        else:
            assert record["finish_reason"] == "eos" and ids[-1] == tokenizer.eos_token_id
            assert 0 < len(ids) <= max_new_tokens and tokenizer.eos_token_id not in ids[:-1]


def test_dense_run_writes_generations_and_a_summary(tmp_path: Path) -> None:
    result = _run(
        tmp_path, f"prompts={PROMPTS}", "decode.max_new_tokens=12", "decode.batch_size=2", "logger=csv"
    )
    records, payload = _records(tmp_path)
    _check_records(records, ["The import statement", "Return a new list", "A"], 12)
    assert "tiny-opt, mode=dense, torch ops on cpu, batch size <= 2" in result.stdout
    assert "tokens_per_s" in result.stdout and "prefill_s" in result.stdout
    summary = payload["summary"]
    assert summary["prompts"] == 3 and summary["batches"] == 2
    assert summary["new_tokens"] == sum(len(r["token_ids"]) for r in records)
    assert summary["stopped_eos"] + summary["stopped_length"] == 3
    assert (
        payload["mode"] == "dense"
        and payload["backend"] == "torch"
        and payload["config"]["decode"]["top_p"] == 1.0
    )
    metrics = list((tmp_path / "runs" / "generate").glob("*/csv/version_0/metrics.csv"))
    assert metrics and "generate/tokens_per_s" in metrics[0].read_text()


def test_sparse_run_keeps_half_the_heads_after_layer_0(tmp_path: Path) -> None:
    bundle = tmp_path / "routers" / "tiny-opt" / "python-docs"
    write_head_bundle(bundle, "tiny-opt", layers=[1, 2, 3], in_features=256, units=8, topk=0.5)
    result = _run(tmp_path, "mode=sparse", f"prompts={PROMPTS}", "decode.max_new_tokens=8", "logger=none")
    assert "mode=sparse (attn_topk=0.5" in result.stdout and "density per layer" in result.stdout
    records, payload = _records(tmp_path)
    _check_records(records, ["The import statement", "Return a new list", "A"], 8)
    density = {row["layer"]: row["attn_density"] for row in payload["density"]}
    assert density[1] == density[2] == density[3] == 0.5  # 4 of 8 heads
    assert density.get(0, 1.0) == 1.0  # layer 0 attention stays dense
    assert payload["router_bundle"] == str(bundle)


@pytest.mark.parametrize(
    ("overrides", "message", "model_loads"),
    [
        (["prompts_file=does/not/exist.jsonl"], "does not exist", False),
        (["mode=sparse"], "no router bundle at", False),
        (["decode.max_new_tokens=600"], r"lower decode.max_new_tokens to", True),  # needs the tokenizer
    ],
)
def test_bad_input_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides: list[str], message: str, model_loads: bool
) -> None:
    settings, resolved = generate_settings(tmp_path, *overrides)
    if not model_loads:
        monkeypatch.setattr(runner, "load_model", lambda *args, **kwargs: pytest.fail("the model loaded"))
    with pytest.raises((ValueError, FileNotFoundError, BundleError), match=message):
        runner.run_generate(settings, resolved)
    assert not (tmp_path / "run" / "generations.jsonl").exists()
