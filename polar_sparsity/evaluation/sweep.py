"""The end of an evaluation sweep: one table and a plot of accuracy and perplexity vs density.

Every evaluate job appends its row to ``<sweep dir>/eval_sweep.csv`` (under a file lock); the Hydra
callback ``SweepSummary`` (``hydra.callbacks`` in ``conf/evaluate.yaml``) reads it when the multirun
ends. ``python -m polar_sparsity.evaluation.sweep DIR`` redoes it for any sweep dir.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from polar_sparsity.evaluation.results import SWEEP_CSV, read_csv_rows
from polar_sparsity.reporting import format_table, save_figure, subplots

SWEEP_PNG = "eval_sweep.png"
# Panels of the plot, when present: (column, y label). Perplexity spans orders of magnitude between
# heavy and light sparsity: on a linear axis the worst point flattens all the others.
_LOG_PANELS = ("perplexity",)
_PANELS = (
    ("average/acc", "accuracy (average over tasks)"),
    ("average/acc_norm", "acc_norm (average over tasks)"),
    ("perplexity", "token perplexity (held-out split)"),
)


def _series_key(row: dict[str, Any]) -> tuple:
    return (row["model"], row["mode"], row.get("mlp_topk"), row.get("positions"), row.get("mlp_batch_size"))


def _label(key: tuple) -> str:
    model, mode, mlp_topk, positions, mlp_batch_size = key
    extras = [
        f"mlp_topk={mlp_topk}" if mlp_topk not in (None, "") else "",
        f"mlp_batch_size={mlp_batch_size}" if mlp_batch_size not in (None, "") else "",
        "" if positions == "all" else positions,
    ]
    return " ".join([model, mode, *filter(None, extras)])


def summary_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per job: density, the headline metrics and their deltas against dense."""
    table = []
    for row in sorted(rows, key=lambda r: (*map(str, _series_key(r)), float(r["attn_topk"]))):
        line = {"model": row["model"], "mode": row["mode"], "attn_topk": row["attn_topk"],
                "attn_kept": row.get("attn_kept"), "mlp_topk": row.get("mlp_topk"),
                "mlp_batch_size": row.get("mlp_batch_size"),
                "positions": row.get("positions"),
                "measured_attn": row.get("measured_attn_density")}  # fmt: skip
        for column, _ in _PANELS:
            value, dense = row.get(column), row.get(f"dense:{column}")
            if value is None:
                continue
            line[column] = value
            line[f"{column} delta"] = value - dense if dense is not None else None
        table.append(line)
    return table


def plot_sweep(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Metric vs attention density, a line per (model, mode, ...), dense as a dashed horizontal line."""
    panels = [(c, label) for c, label in _PANELS if any(r.get(c) is not None for r in rows)]
    fig, axes = subplots(1, len(panels), figsize=(5.2 * len(panels), 4))
    series: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        series.setdefault(_series_key(row), []).append(row)
    for ax, (column, ylabel) in zip(axes[0], panels, strict=True):
        for key, members in sorted(series.items(), key=lambda kv: tuple(map(str, kv[0]))):
            points = sorted((float(r["attn_topk"]), r[column]) for r in members if r.get(column) is not None)
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=_label(key))
        for model in sorted({r["model"] for r in rows}):
            dense = [r[f"dense:{column}"] for r in rows if r["model"] == model and r.get(f"dense:{column}")]
            if dense:
                ax.axhline(dense[0], color="black", linestyle="--", linewidth=1, label=f"{model} dense")
        ax.set(xlabel="attention density (fraction of heads / KV groups kept)", ylabel=ylabel, xlim=(0, 1.05))
        if column in _LOG_PANELS:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, path, title)


def summarise(sweep_dir: Path) -> tuple[list[dict[str, Any]], Path] | None:
    """Print the sweep table and write the plot; None when the sweep has no rows."""
    rows = read_csv_rows(sweep_dir / SWEEP_CSV)
    if not rows:
        return None
    table = summary_rows(rows)
    png = plot_sweep(rows, sweep_dir / SWEEP_PNG, f"evaluate sweep {sweep_dir.name}")
    print(format_table(table, title=f"Evaluation sweep ({len(rows)} runs), deltas against dense"))
    print(f"sweep table: {sweep_dir / SWEEP_CSV}\nplot: {png}")
    return table, png


class SweepSummary(Callback):  # type: ignore[misc,valid-type]
    """Hydra callback: at the end of a multirun, the sweep's table and plot (logged to the logger)."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        summary = summarise(sweep_dir)
        if summary is not None:
            _log_summary(config, sweep_dir, *summary)


def _log_summary(config: Any, sweep_dir: Path, table: list[dict[str, Any]], png: Path) -> None:
    """One more run in the sweep's group: the table (W&B table / CSV metrics) and the plot."""
    from polar_sparsity.tracking import close_logger, log_image, log_table, sweep_logger

    logger = sweep_logger(config, sweep_dir, "evaluate-sweep")
    if logger is None:
        return
    log_table(logger, "evaluate/sweep", table)
    for step, row in enumerate(table):
        numeric = {f"sweep/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and v is not None}
        logger.log_metrics(numeric, step=step)
    log_image(logger, "evaluate/sweep_plot", png)
    close_logger(logger, failed=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Table and plot of an evaluation sweep.")
    parser.add_argument("sweep_dir", type=Path, help="a multirun dir (artifacts/multirun/evaluate/<time>)")
    args = parser.parse_args(argv)
    if summarise(args.sweep_dir) is None:
        raise SystemExit(f"no {SWEEP_CSV} under {args.sweep_dir}")


if __name__ == "__main__":
    main()
