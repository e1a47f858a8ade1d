"""One per-layer table (+ CSV and PNG) for a sweep of router trainings.

Each job writes ``router_result.json`` into its job dir; ``refresh(sweep_dir)`` gathers every job's
record into ``<sweep_dir>/summary.csv`` and ``summary.png`` (failed jobs included, with their error).
Jobs refresh it as they finish (under a file lock: joblib/submitit jobs run concurrently), and the
``SweepSummary`` Hydra callback prints and logs the final table when the multirun ends.

    python -m polar_sparsity.routers.summary artifacts/multirun/train/<time>   # rebuild by hand
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from pathlib import Path
from typing import Any

from polar_sparsity.reporting import format_table, locked, save_figure, subplots, write_csv

RESULT_FILE = "router_result.json"
SUMMARY_CSV = "summary.csv"
SUMMARY_PNG = "summary.png"

# Per kind: (metric, better) pairs shown with their baselines.
_COLUMNS = {
    "mha": (("topk_recall", "max"), ("norm_recall", "max")),
    "mlp": (("k99", "min"), ("topk_recall", "max")),
}
_EXTRA = {"mha": (), "mlp": ("density", "recall", "precision", "f1")}


def title_of(result: dict[str, Any]) -> str:
    return f"{result.get('model')} on {result.get('data')}"


def vs_static(result: dict[str, Any]) -> str | None:
    """'worse' when a trained router does not beat the static baseline on its kind's primary metric.

    A router that loses to "always the same units" is exported (evaluation may still compare it) but
    flagged, so it is never mistaken for a good one. None for failed jobs or missing metrics.
    """
    if result.get("status") != "ok":
        return None
    metric, better = _COLUMNS[result["kind"]][0]
    ours = result.get("metrics", {}).get(metric)
    static = result.get("baselines", {}).get("static", {}).get(metric)
    if ours is None or static is None:
        return None
    beats = ours > static if better == "max" else ours < static
    return "better" if beats else "worse"


def result_row(result: dict[str, Any]) -> dict[str, Any]:
    """One table row: the router's metrics next to the static and random baselines."""
    kind = result["kind"]
    row: dict[str, Any] = {
        "kind": kind,
        "topk": result.get("topk"),
        # What the fraction keeps per token ("2 of 3"): with few units a fraction hides it.
        "kept": f"{result['k']} of {result['units']}" if result.get("k") is not None else None,
        "layer": result["layer"],
        "status": result["status"],
        "vs_static": vs_static(result),
    }
    metrics, baselines = result.get("metrics", {}), result.get("baselines", {})
    for name, _ in _COLUMNS[kind]:
        row[name] = metrics.get(name)
        row[f"{name}_static"] = baselines.get("static", {}).get(name)
        row[f"{name}_random"] = baselines.get("random", {}).get(name)
    for name in _EXTRA[kind]:
        row[name] = metrics.get(name)
    row["epochs"] = result.get("epochs")
    row["seconds"] = result.get("seconds")
    row["error"] = result.get("error")
    return row


def gather(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every job's record under a sweep dir, sorted by kind, top-k and layer."""
    results = []
    for path in sorted(Path(sweep_dir).glob(f"**/{RESULT_FILE}")):
        with contextlib.suppress(json.JSONDecodeError):  # a record mid-write is picked up next time
            results.append(json.loads(path.read_text()))
    return sorted(results, key=lambda r: (r["kind"], r.get("topk") or 0.0, r["layer"]))


def _uniform(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with the union of all keys (a sweep may mix head and MLP routers); missing shown as '-'."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    columns = [c for c in columns if any(row.get(c) is not None for row in rows)]
    return [{c: row.get(c) for c in columns} for row in rows]


def refresh(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Rewrite the sweep's summary.csv / summary.png from the job records present now."""
    sweep_dir = Path(sweep_dir)
    with locked(sweep_dir / SUMMARY_CSV):
        results = gather(sweep_dir)
        if not results:
            return []
        rows = _uniform([result_row(r) for r in results])
        write_csv(sweep_dir / SUMMARY_CSV, rows)
        plot(rows, title_of(results[0]), sweep_dir / SUMMARY_PNG)
    return rows


def plot(rows: list[dict[str, Any]], title: str, path: Path) -> Path:
    """Per kind, the primary metric per layer: router (one line per top-k) against the baselines."""
    kinds = sorted({r["kind"] for r in rows})
    fig, axes = subplots(1, len(kinds), figsize=(6 * len(kinds), 3.8))
    for ax, kind in zip(axes[0], kinds, strict=True):
        metric, better = _COLUMNS[kind][0]
        ok = [r for r in rows if r["kind"] == kind and r["status"] == "ok"]
        for topk in sorted({r.get("topk") or 0.0 for r in ok}):
            series = sorted((r for r in ok if (r.get("topk") or 0.0) == topk), key=lambda r: r["layer"])
            label = f" k={topk}" if kind == "mha" else ""
            layers = [r["layer"] for r in series]
            ax.plot(layers, [r[metric] for r in series], "o-", label=f"router{label}")
            ax.plot(layers, [r[f"{metric}_static"] for r in series], "s--", label=f"static{label}")
            ax.plot(layers, [r[f"{metric}_random"] for r in series], "x:", label=f"random{label}")
        failed = [r["layer"] for r in rows if r["kind"] == kind and r["status"] != "ok"]
        note = f" (failed layers: {failed})" if failed else ""
        arrow = "higher" if better == "max" else "lower"
        ax.set(title=f"{kind} routers: {metric} ({arrow} is better){note}", xlabel="layer", ylabel=metric)
        ax.set_xticks(sorted({r["layer"] for r in ok}) or [0])
        ax.grid(alpha=0.3)
        if ok:
            ax.legend(fontsize=8)
    return save_figure(fig, path, title)


def print_summary(sweep_dir: str | Path, rows: list[dict[str, Any]]) -> None:
    shown = [{k: v for k, v in r.items() if k != "error"} for r in rows]
    print(format_table(shown, title=f"Router sweep summary ({len(rows)} jobs)"))
    for r in rows:
        if r["status"] != "ok":
            print(f"  {r['kind']} layer {r['layer']} failed: {r.get('error')}")
        elif r.get("vs_static") == "worse":
            print(f"  {r['kind']} layer {r['layer']}: the router does not beat the static baseline")
    print(f"summary: {Path(sweep_dir) / SUMMARY_CSV}\nplot: {Path(sweep_dir) / SUMMARY_PNG}")


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - Hydra is a dependency; the bundle path never imports this
    Callback = object  # type: ignore[assignment,misc]


class SweepSummary(Callback):  # type: ignore[misc,valid-type]
    """Hydra callback: at the end of a multirun, print the sweep's table and log it to the logger.

    Hydra skips ``on_multirun_end`` when a job failed; the table files are still there (jobs refresh
    them as they end) and list the failure.
    """

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = refresh(sweep_dir)
        if not rows:
            return
        print_summary(sweep_dir, rows)
        _log_summary(config, sweep_dir, rows)


def _log_summary(config: Any, sweep_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Log the table and plot as one more run of the sweep's group (W&B) or a CSV in the sweep dir."""
    from polar_sparsity.tracking import close_logger, log_image, log_rows, sweep_logger

    logger = sweep_logger(config, sweep_dir, "train-summary")
    if logger is None:
        return
    numeric = [
        {k: (v if not (isinstance(v, float) and math.isnan(v)) else None) for k, v in r.items()} for r in rows
    ]
    for kind in sorted({r["kind"] for r in numeric}):
        kind_rows = [r for r in numeric if r["kind"] == kind and r["status"] == "ok"]
        log_rows(logger, f"routers/{kind}", kind_rows, step_key="layer")
    log_image(logger, "routers/summary", sweep_dir / SUMMARY_PNG)
    close_logger(logger, failed=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Gather a router-training sweep into one per-layer table.")
    parser.add_argument("sweep_dir", type=Path, help="a multirun dir (artifacts/multirun/train/<time>)")
    args = parser.parse_args(argv)
    rows = refresh(args.sweep_dir)
    if not rows:
        raise SystemExit(f"no {RESULT_FILE} under {args.sweep_dir}")
    print_summary(args.sweep_dir, rows)


if __name__ == "__main__":
    main()
