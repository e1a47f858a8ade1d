"""MLP latency cost tables for ``calibrate.objective=latency``.

A cost table holds, per decode batch size M and kept neurons k, the measured latency of the sparse MLP
(selective up + down) and of the dense MLP at that M. The latency objective keeps, per layer and batch
size, the largest k on the granularity grid whose sparse latency is at most ``budget`` x the dense one.

CSV format (one row per (batch_size, k)): ``batch_size,k,latency_us,dense_us``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from polar_sparsity.reporting import atomic_path

COST_TABLE_CSV = "cost_table.csv"  # beside calibration.json when measured at calibration time
COST_COLUMNS = ("batch_size", "k", "latency_us", "dense_us")


class CostTableError(ValueError):
    """A cost table that is missing, malformed, or does not cover what the calibration needs."""


@dataclass(frozen=True)
class CostTable:
    """Sparse latency {batch size: {k: us}}, dense latency {batch size: us}, and where they came from."""

    sparse_us: dict[int, dict[int, float]]
    dense_us: dict[int, float]
    source: str

    def check_covers(self, batch_sizes: list[int] | tuple[int, ...], ks: list[int]) -> None:
        """Raise unless every (batch size, k) the calibration asks about has a measured latency."""
        for batch_size in batch_sizes:
            have = self.sparse_us.get(int(batch_size), {})
            missing = [int(k) for k in ks if int(k) not in have]
            if missing:
                raise CostTableError(
                    f"cost table {self.source} has no latency for batch_size={batch_size} at k={missing[:8]}"
                    f"{'...' if len(missing) > 8 else ''}; measure it on a GPU for this model's MLP shape "
                    f"and calibrate.granularity"
                )

    def pick_k(self, batch_size: int, ks: list[int], budget: float) -> tuple[int, float, bool]:
        """The largest k in ``ks`` whose latency <= budget x dense; (k, latency_us, over_budget).

        If even the smallest k exceeds the budget, it is returned with ``over_budget=True``.
        """
        costs = self.sparse_us[int(batch_size)]
        limit = budget * self.dense_us[int(batch_size)]
        ordered = sorted(int(k) for k in ks)
        fitting = [k for k in ordered if costs[k] <= limit]
        k = fitting[-1] if fitting else ordered[0]
        return k, costs[k], not fitting


def read_cost_table(path: str | Path) -> CostTable:
    """Read a cost-table CSV (columns ``batch_size,k,latency_us,dense_us``); clear errors on bad files."""
    path = Path(path)
    if not path.is_file():
        raise CostTableError(f"calibrate.cost_table={str(path)!r} does not exist (a CSV with {COST_COLUMNS})")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in COST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise CostTableError(
                f"cost table {path} lacks columns {missing} (has {reader.fieldnames}; needs {COST_COLUMNS})"
            )
        sparse: dict[int, dict[int, float]] = {}
        dense: dict[int, float] = {}
        for line, row in enumerate(reader, start=2):
            try:
                batch_size, k = int(row["batch_size"]), int(row["k"])
                latency, dense_latency = float(row["latency_us"]), float(row["dense_us"])
            except (TypeError, ValueError) as err:
                raise CostTableError(f"cost table {path} line {line}: {err}") from err
            if latency <= 0 or dense_latency <= 0:
                raise CostTableError(f"cost table {path} line {line}: latencies must be positive")
            sparse.setdefault(batch_size, {})[k] = latency
            dense[batch_size] = dense_latency
    if not sparse:
        raise CostTableError(f"cost table {path} has no rows")
    return CostTable(sparse_us=sparse, dense_us=dense, source=str(path))


def write_cost_table(table: CostTable, path: str | Path) -> Path:
    """Write ``table`` as CSV (atomically), readable by ``read_cost_table``."""
    lines = [",".join(COST_COLUMNS)]
    for batch_size in sorted(table.sparse_us):
        for k in sorted(table.sparse_us[batch_size]):
            lines.append(f"{batch_size},{k},{table.sparse_us[batch_size][k]},{table.dense_us[batch_size]}")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return Path(path)


def measure_cost_table(
    batch_sizes: list[int] | tuple[int, ...],
    ks: list[int],
    ffn_dim: int,
    hidden_size: int,
    device: torch.device,
) -> CostTable:
    """Time the ReLU MLP on random fp16 weights of (ffn_dim, hidden_size) on a CUDA device: the dense
    cuBLAS MLP and the sparse one (``selective_up`` + ``selective_down``) keeping each k, per batch size.

    Same timer and kernels as ``polar_sparsity.kernels.dense_fallback.measure_mlp_crossover``.
    """
    from polar_sparsity.kernels import _tuning  # noqa: PLC0415  (Triton: imported only when measuring)
    from polar_sparsity.kernels.selective_mlp_down import selective_down  # noqa: PLC0415
    from polar_sparsity.kernels.selective_mlp_up import selective_up  # noqa: PLC0415

    if device.type != "cuda":
        raise CostTableError(
            f"measuring a cost table needs a CUDA device (got {device}); pass calibrate.cost_table=PATH"
        )
    dt = torch.float16
    w_up = torch.randn(ffn_dim, hidden_size, device=device, dtype=dt) / math.sqrt(hidden_size)
    b_up = torch.randn(ffn_dim, device=device, dtype=dt)
    w_down_t = torch.randn(ffn_dim, hidden_size, device=device, dtype=dt) / math.sqrt(ffn_dim)
    timer = _tuning.GraphTimer(device)
    sparse: dict[int, dict[int, float]] = {}
    dense: dict[int, float] = {}
    for batch_size in batch_sizes:
        x = torch.randn(int(batch_size), hidden_size, device=device, dtype=dt)
        dense[int(batch_size)] = timer(lambda x=x: torch.mm(torch.relu(F.linear(x, w_up, b_up)), w_down_t))
        sparse[int(batch_size)] = {}
        for k in ks:
            idx = torch.randperm(ffn_dim, device=device)[: int(k)].int()

            def run(x: torch.Tensor = x, idx: torch.Tensor = idx) -> torch.Tensor:
                return selective_down(
                    selective_up(x, w_up, idx, b_up, validate=False), w_down_t, idx, validate=False
                )

            run()  # eager first: tunes (or looks up) this k's kernel configuration before timing
            sparse[int(batch_size)][int(k)] = timer(run)
    return CostTable(
        sparse_us=sparse, dense_us=dense, source=f"measured on {torch.cuda.get_device_name(device)}"
    )
