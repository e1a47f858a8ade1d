"""Plain-text tables and CSV files for the summaries every entry point ends with."""

from __future__ import annotations

import csv
import fcntl
import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], title: str | None = None) -> str:
    """Rows of equal keys as an aligned text table."""
    if not rows:
        return f"{title}\n(no rows)" if title else "(no rows)"
    columns = list(rows[0])
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def subplots(nrows: int, ncols: int, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """A matplotlib figure and its 2-D axes grid, drawn off-screen (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=figsize, squeeze=False)


def save_figure(fig: Any, path: str | Path, title: str) -> Path:
    """Title, lay out and write a figure through a temporary name, then close it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return Path(path)


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """An exclusive lock on ``.<name>.lock`` beside ``path``: parallel sweep jobs update it one at a time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_name(f".{path.name}.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; renamed onto ``path`` when the block succeeds.

    A reader never sees half a file, and a failed write leaves no temporary behind. The temporary
    keeps the suffix (writers such as matplotlib pick the format from it) and the process id (parallel
    sweep jobs never share one).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, payload: dict[str, Any]) -> Path:
    """JSON through a temporary name and a rename: a reader never sees half a file."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n")
    return Path(path)


def _json_default(value: Any) -> Any:
    if hasattr(value, "value"):  # enums
        return value.value
    return str(value)


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write rows to CSV, the columns every key of any row in first-seen order (a row without one
    leaves its cell empty); a reader never sees a partial file."""
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def write_jsonl(path: str | Path, records: Sequence[dict[str, Any]]) -> Path:
    """One JSON object per line; a reader never sees a partial file."""
    with atomic_path(path) as tmp, tmp.open("w") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False, default=_json_default) + "\n")
    return Path(path)
