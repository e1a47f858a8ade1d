"""Result files and tables: atomic JSON, the dense-result cache, the comparison table, sweep rows."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from polar_sparsity.reporting import locked, write_csv, write_json_atomic

# Metrics shown in the comparison table, in this order; any other numeric metric follows them.
_PREFERRED = ("acc", "acc_norm", "word_perplexity", "byte_perplexity", "bits_per_byte")
_AVERAGED = ("acc", "acc_norm")  # averaged over tasks in the table's "average" rows
SWEEP_CSV = "eval_sweep.csv"  # in the sweep dir (or the run dir of a single run)
_VERSIONED = ("torch", "transformers", "lm_eval", "datasets", "numpy", "safetensors", "polar-sparsity")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def files_digest(paths: list[Path]) -> str:
    """One short digest of several files' names and contents (order matters)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(file_digest(path).encode())
    return digest.hexdigest()[:16]


# --- dense cache -----------------------------------------------------------------------------------


def cache_file(cache_dir: str | Path, model_name: str, key: dict[str, Any]) -> Path:
    """One file per (model, weights, tasks, few-shot, limit, data, ...) key: a hash of the key."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{model_name}-{digest}.json"


def read_cache(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """Cached dense results for exactly ``key`` (None when absent, unreadable or another key)."""
    try:
        payload = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if json.loads(json.dumps(key, default=str)) != payload.get("key"):
        return None
    return payload.get("results")


def write_cache(path: Path, key: dict[str, Any], results: dict[str, Any]) -> Path:
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return write_json_atomic(path, {"key": key, "results": results, "created": created})


# --- comparison table ------------------------------------------------------------------------------


def _metric_order(metrics: dict[str, float]) -> list[str]:
    names = [m for m in metrics if not m.endswith("_stderr")]
    return [m for m in _PREFERRED if m in names] + sorted(m for m in names if m not in _PREFERRED)


def comparison_rows(dense: dict[str, Any], sparse: dict[str, Any], label: str) -> list[dict[str, Any]]:
    """Dense vs ``label`` per task and metric, absolute deltas, then averages and our perplexity."""
    if label == "dense":  # mode=dense: the column must not overwrite the baseline's
        label = "dense (this run)"
    rows = []
    dense_tasks, sparse_tasks = dense.get("lm_eval", {}), sparse.get("lm_eval", {})
    for task in sorted(sparse_tasks):
        for metric in _metric_order(sparse_tasks[task]):
            d, s = dense_tasks.get(task, {}).get(metric), sparse_tasks[task][metric]
            stderr = sparse_tasks[task].get(f"{metric}_stderr")
            rows.append(_row(task, metric, d, s, stderr, label))
    for metric in _AVERAGED:
        tasks = [t for t in sparse_tasks if metric in sparse_tasks[t] and metric in dense_tasks.get(t, {})]
        if tasks:
            d = sum(dense_tasks[t][metric] for t in tasks) / len(tasks)
            s = sum(sparse_tasks[t][metric] for t in tasks) / len(tasks)
            name = f"average ({len(tasks)} task{'s' if len(tasks) > 1 else ''})"
            rows.append(_row(name, metric, d, s, None, label))
    if "perplexity" in sparse:
        name = f"perplexity: {sparse['perplexity']['data']} {sparse['perplexity']['split']}"
        d = dense.get("perplexity", {}).get("perplexity")
        rows.append(_row(name, "token_perplexity", d, sparse["perplexity"]["perplexity"], None, label))
    return rows


def _row(task: str, metric: str, dense: float | None, value: float, stderr: float | None, label: str):
    delta = value - dense if dense is not None else None
    return {"task": task, "metric": metric, "dense": dense, label: value, "delta": delta, "stderr": stderr}


def average(results: dict[str, Any], metric: str) -> float | None:
    values = [m[metric] for m in results.get("lm_eval", {}).values() if metric in m]
    return sum(values) / len(values) if values else None


# --- sweep rows ------------------------------------------------------------------------------------


def flat_metrics(results: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """One column per task metric (stderr included), the averages, and our perplexity."""
    row: dict[str, float] = {}
    for task, metrics in sorted(results.get("lm_eval", {}).items()):
        for metric, value in metrics.items():
            row[f"{prefix}{task}/{metric}"] = value
    for metric in _AVERAGED:
        value = average(results, metric)
        if value is not None:
            row[f"{prefix}average/{metric}"] = value
    if "perplexity" in results:
        row[f"{prefix}perplexity"] = results["perplexity"]["perplexity"]
    return row


def read_csv_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def _parse(text: str | None) -> Any:
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def append_row(path: str | Path, row: dict[str, Any]) -> Path:
    """Append a row to a CSV shared by a sweep's jobs (columns are the union; rewritten atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path):
        rows = [*read_csv_rows(path), row]
        write_csv(path, [{c: _cell(v) for c, v in r.items()} for r in rows])
    return path


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value
