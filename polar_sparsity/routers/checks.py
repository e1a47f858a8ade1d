"""Non-finite values never reach a router: the training rows are scanned, and so is what is exported."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from polar_sparsity.data.store import ActivationStore, StoreError

_CHUNK_ROWS = 65536  # rows read at a time: a layer is never loaded whole into memory


def _non_finite_rows(values: np.ndarray, start: int) -> np.ndarray:
    return start + np.flatnonzero(~np.isfinite(values).all(axis=-1))


def check_layer_finite(store: ActivationStore, layer: int, kind: str, samples: int | None = None) -> None:
    """Refuse a layer whose router inputs (or head norms, for head routers) hold NaN or Inf rows."""
    rows = store.num_samples if samples is None else min(samples, store.num_samples)
    names = [("router_input.npy", store.router_inputs(layer))]
    if kind == "mha":
        names.append(("head_norms.npy", store.head_norms(layer)))
    for name, array in names:
        for start in range(0, rows, _CHUNK_ROWS):
            chunk = np.asarray(array[start : min(rows, start + _CHUNK_ROWS)])
            if name == "router_input.npy" and store.manifest["dtype"] == "bfloat16":
                chunk = store.as_tensor(chunk).float().numpy()
            bad = _non_finite_rows(chunk, start)
            if len(bad):
                path = store.root / "layers" / f"{layer:03d}" / name
                raise StoreError(
                    f"{path} holds NaN or Inf in {len(bad)} row(s) (first: row {int(bad[0])}): the store is "
                    f"damaged, or the model overflowed in {store.manifest['dtype']}; collect it again "
                    f"(collect.store_dtype=float32 or model.dtype=float32 if it overflowed)"
                )


def check_row_provenance(store: ActivationStore, samples: int | None = None) -> None:
    """Sequence ids never decrease and positions lie inside a sequence (the validation split and
    its held-out sequences rely on both)."""
    rows = store.num_samples if samples is None else min(samples, store.num_samples)
    sequence_ids = np.asarray(store.sequence_ids()[:rows])
    positions = np.asarray(store.positions()[:rows])
    seq_len = int(store.manifest["seq_len"])
    backwards = np.flatnonzero(np.diff(sequence_ids) < 0)
    if len(backwards):
        raise StoreError(
            f"{store.root / 'sequence_ids.npy'} goes backwards at row {int(backwards[0]) + 1}: "
            f"the store is damaged; collect it again"
        )
    outside = np.flatnonzero((positions < 0) | (positions >= seq_len))
    if len(outside):
        raise StoreError(
            f"{store.root / 'positions.npy'} holds position {int(positions[outside[0]])} at row "
            f"{int(outside[0])}, outside 0..{seq_len - 1}: the store is damaged; collect it again"
        )


def check_finite_net(net: nn.Module, path: str | Path) -> None:
    """Refuse to export a router whose weights are not finite (it would score every unit NaN)."""
    bad = [name for name, tensor in net.state_dict().items() if not tensor.isfinite().all()]
    if bad:
        raise FloatingPointError(
            f"the trained router has non-finite weights ({', '.join(bad)}); {path} was not written. "
            f"Training diverged: lower router.lr"
        )
