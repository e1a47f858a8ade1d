"""Per-layer summary of a store: how sparse the MLP is and how concentrated the head norms are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from polar_sparsity.data.store import ActivationStore
from polar_sparsity.reporting import save_figure, subplots

_CHUNK_ROWS = 65536  # rows read at a time: summaries never load a whole layer into memory


def top_half_share(norms: np.ndarray) -> np.ndarray:
    """Per row: share of the total head norm held by the top 50% of heads (uniform heads give 0.5)."""
    keep = (norms.shape[-1] + 1) // 2
    top = -np.sort(-norms, axis=-1)[:, :keep].sum(-1)
    return top / np.maximum(norms.sum(-1), 1e-12)


def store_summary(store: ActivationStore) -> list[dict[str, Any]]:
    """One row per layer: mean MLP density (ReLU models) and mean top-50%-heads norm share."""
    rows = []
    for layer in range(store.geometry.num_layers):
        share_sum, density_sum, count = 0.0, 0.0, 0
        for start in range(0, store.num_samples, _CHUNK_ROWS):
            chunk = slice(start, start + _CHUNK_ROWS)
            norms = np.asarray(store.head_norms(layer)[chunk], dtype=np.float64)
            share_sum += float(top_half_share(norms).sum())
            if store.has_mlp:
                density_sum += float(store.unpack_mlp(store.mlp_active_packed(layer)[chunk]).mean(-1).sum())
            count += len(norms)
        rows.append(
            {
                "layer": layer,
                "mlp_density": density_sum / count if store.has_mlp else float("nan"),
                "head_top50_share": share_sum / count,
            }
        )
    return rows


def plot_summary(rows: list[dict[str, Any]], title: str, path: Path) -> Path:
    """Bar plot of MLP density and head-norm concentration per layer."""
    from matplotlib.ticker import MaxNLocator

    layers = [r["layer"] for r in rows]
    fig, grid = subplots(1, 2, figsize=(10, 3.6))
    axes = grid[0]
    density = [r["mlp_density"] for r in rows]
    axes[0].bar(layers, np.nan_to_num(density))
    axes[0].set(title="MLP activation density", xlabel="layer", ylabel="fraction of neurons > 0", ylim=(0, 1))
    if all(np.isnan(density)):
        axes[0].text(0.5, 0.5, "gated MLP: not collected", ha="center", transform=axes[0].transAxes)
    axes[1].bar(layers, [r["head_top50_share"] for r in rows], color="tab:orange")
    axes[1].axhline(0.5, color="gray", linestyle="--", label="uniform heads")
    axes[1].set(title="Head output norm: top-50% heads' share", xlabel="layer", ylim=(0, 1))
    axes[1].legend(loc="lower right")
    for axis in axes:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    return save_figure(fig, path, title)
