"""The activation store: per-layer memory-mapped arrays written by collect, read by router training.

Layout of a store directory::

    identity.json              what the store is for (model, data, geometry, samples); written first
    progress.json              rows and sequences written so far (for collect.resume)
    sequence_ids.npy           (N,) int32   index of the sequence each row (token) came from
    positions.npy              (N,) int32   position of the token inside its sequence
    layers/LLL/router_input.npy  (N, d)      pre-attention norm output (float16, float32, or bfloat16 bits)
    layers/LLL/head_norms.npy    (N, H)      float32 L2 norm of each query head's attention output
    layers/LLL/mlp_active.npy    (N, ceil(F/8)) uint8, ReLU models only: activation > 0, 1 bit per neuron
    summary.csv, summary.png   per-layer MLP density and head-norm concentration
    manifest.json              written last: a store without it is incomplete

One row is one (non-padding) token. bfloat16 has no numpy dtype, so it is stored as its uint16 bits
and viewed back as ``torch.bfloat16`` by the reader.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polar_sparsity.models.families import MlpKind, ModelGeometry
from polar_sparsity.reporting import write_json_atomic

MANIFEST = "manifest.json"
IDENTITY = "identity.json"
PROGRESS = "progress.json"
STORE_FORMAT = 1

# How each router-input dtype lands on disk.
_DISK_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}


class StoreError(RuntimeError):
    """A store that is missing, incomplete, or belongs to another model or data source."""


def _layer_dir(root: Path, layer: int) -> Path:
    return root / "layers" / f"{layer:03d}"


@dataclass(frozen=True)
class StoreSpec:
    """Everything that fixes the store's shapes; two runs may share a store only if these agree."""

    model: str
    weights: str
    data: str
    split: str
    seq_len: int
    samples: int
    dtype: str
    geometry: dict[str, Any]

    @property
    def stores_mlp(self) -> bool:
        return self.geometry["mlp_kind"] == MlpKind.relu.value

    def row_bytes(self) -> int:
        g = self.geometry
        per_layer = g["hidden_size"] * np.dtype(_DISK_DTYPES[self.dtype]).itemsize + 4 * g["num_heads"]
        if self.stores_mlp:
            per_layer += (g["ffn_dim"] + 7) // 8
        return g["num_layers"] * per_layer + 8  # + sequence id and position

    def total_bytes(self) -> int:
        return self.samples * self.row_bytes()

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def mismatches(self, identity: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Fields where a store's ``identity.json`` differs from this spec: name -> (store's, ours)."""
        return {k: (identity.get(k), v) for k, v in self.as_dict().items() if identity.get(k) != v}


def _array_specs(spec: StoreSpec) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Relative path -> (shape, numpy dtype) of every array in the store."""
    g, n = spec.geometry, spec.samples
    arrays: dict[str, tuple[tuple[int, ...], Any]] = {
        "sequence_ids.npy": ((n,), np.int32),
        "positions.npy": ((n,), np.int32),
    }
    for layer in range(g["num_layers"]):
        prefix = f"layers/{layer:03d}/"
        arrays[prefix + "router_input.npy"] = ((n, g["hidden_size"]), _DISK_DTYPES[spec.dtype])
        arrays[prefix + "head_norms.npy"] = ((n, g["num_heads"]), np.float32)
        if spec.stores_mlp:
            arrays[prefix + "mlp_active.npy"] = ((n, (g["ffn_dim"] + 7) // 8), np.uint8)
    return arrays


class StoreWriter:
    """Appends captured rows to a store; resumable, and refuses to mix models or data sources."""

    def __init__(
        self,
        root: str | Path,
        spec: StoreSpec,
        resume: bool = False,
        overwrite: bool = False,
        checkpoint_seconds: float = 30.0,
    ):
        self.root = Path(root)
        self.spec = spec
        # Flushing memory maps is a disk sync: do it (and record progress) at most this often.
        self.checkpoint_seconds = checkpoint_seconds
        self._last_checkpoint = time.monotonic()
        self._prepare(resume, overwrite)
        progress = json.loads((self.root / PROGRESS).read_text())
        self.rows, self.sequences = progress["rows"], progress["sequences"]
        mode = "r+"
        self._arrays = {
            name: np.lib.format.open_memmap(self.root / name, mode=mode) for name in _array_specs(spec)
        }

    # -- set-up ---------------------------------------------------------------------------------

    def _prepare(self, resume: bool, overwrite: bool) -> None:
        if overwrite and self.root.exists():
            shutil.rmtree(self.root)
        identity_path = self.root / IDENTITY
        if identity_path.exists():
            self._check_existing(json.loads(identity_path.read_text()), resume)
            return
        if self.root.exists() and any(self.root.iterdir()):
            raise StoreError(f"{self.root} exists and is not an activation store; choose another paths.store")
        check_disk_space(self.root, self.spec.total_bytes())
        self._create()

    def _check_existing(self, identity: dict[str, Any], resume: bool) -> None:
        mismatched = self.spec.mismatches(identity)
        if mismatched:
            details = ", ".join(
                f"{k}: store has {old!r}, this run {new!r}" for k, (old, new) in mismatched.items()
            )
            raise StoreError(
                f"the store at {self.root} was collected for something else ({details}). Use another "
                f"paths.store, or collect.overwrite=true to replace it."
            )
        if (self.root / MANIFEST).exists():
            raise StoreError(
                f"the store at {self.root} is already complete; collect.overwrite=true replaces it"
            )
        if not resume:
            done = json.loads((self.root / PROGRESS).read_text())["rows"]
            raise StoreError(
                f"the store at {self.root} is incomplete ({done}/{self.spec.samples} samples). Pass "
                f"collect.resume=true to continue it, or collect.overwrite=true to start over."
            )

    def _create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for name, (shape, dtype) in _array_specs(self.spec).items():
            (self.root / name).parent.mkdir(parents=True, exist_ok=True)
            np.lib.format.open_memmap(self.root / name, mode="w+", dtype=dtype, shape=shape).flush()
        write_json_atomic(self.root / PROGRESS, {"rows": 0, "sequences": 0})
        write_json_atomic(self.root / IDENTITY, {**self.spec.as_dict(), "format": STORE_FORMAT})

    # -- writing --------------------------------------------------------------------------------

    @property
    def remaining(self) -> int:
        return self.spec.samples - self.rows

    def append(
        self,
        sequence_ids: np.ndarray,
        positions: np.ndarray,
        router_inputs: list[torch.Tensor],
        head_norms: list[torch.Tensor],
        mlp_active: list[torch.Tensor] | None,
        sequences_done: int,
    ) -> int:
        """Write rows (already stripped of padding) for every layer; returns how many were kept.

        Rows past ``samples`` are dropped. ``sequences_done`` is the stream position after this batch,
        checkpointed with the row count so an interrupted run resumes at a batch boundary.
        """
        count = min(len(sequence_ids), self.remaining)
        rows = slice(self.rows, self.rows + count)
        self._arrays["sequence_ids.npy"][rows] = sequence_ids[:count]
        self._arrays["positions.npy"][rows] = positions[:count]
        for layer in range(self.spec.geometry["num_layers"]):
            prefix = f"layers/{layer:03d}/"
            self._arrays[prefix + "router_input.npy"][rows] = _to_disk(
                router_inputs[layer][:count], self.spec.dtype
            )
            self._arrays[prefix + "head_norms.npy"][rows] = head_norms[layer][:count].float().cpu().numpy()
            if mlp_active is not None:
                bits = np.packbits(mlp_active[layer][:count].cpu().numpy(), axis=-1, bitorder="little")
                self._arrays[prefix + "mlp_active.npy"][rows] = bits
        self.rows += count
        self.sequences = sequences_done
        if time.monotonic() - self._last_checkpoint >= self.checkpoint_seconds:
            self.checkpoint()
        return count

    def checkpoint(self) -> None:
        """Make the rows so far durable, then record them: progress never claims unflushed rows."""
        for array in self._arrays.values():
            array.flush()
        write_json_atomic(self.root / PROGRESS, {"rows": self.rows, "sequences": self.sequences})
        self._last_checkpoint = time.monotonic()

    def finish(self, extra: dict[str, Any]) -> Path:
        """Write the manifest, last: from now on the store is complete."""
        self.checkpoint()
        if self.remaining:
            raise StoreError(f"store has {self.rows}/{self.spec.samples} samples; the token stream ran out")
        manifest = {**self.spec.as_dict(), "format": STORE_FORMAT, "rows": self.rows, **extra}
        write_json_atomic(self.root / MANIFEST, manifest)
        return self.root / MANIFEST


def _to_disk(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return tensor.to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16)
    return tensor.to(getattr(torch, dtype)).cpu().numpy()


def check_disk_space(root: Path, needed: int, margin: float = 1.05) -> None:
    """Refuse, with the numbers, when the store would not fit on its disk."""
    existing = root
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed * margin > free:
        raise StoreError(
            f"the store needs about {needed / 2**30:.2f} GiB but {existing} has {free / 2**30:.2f} GiB free; "
            f"lower collect.samples or point paths.store at a larger disk"
        )


class ActivationStore:
    """Read-only view of a complete store; arrays are memory-mapped, never copied whole into RAM."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if not manifest_path.exists():
            if (self.root / IDENTITY).exists():
                done = json.loads((self.root / PROGRESS).read_text())["rows"]
                raise StoreError(
                    f"the store at {self.root} is incomplete ({done} samples written, no manifest); "
                    f"finish it with `python collect.py collect.resume=true ...`"
                )
            raise StoreError(
                f"no activation store at {self.root}; run `python collect.py` for this model first"
            )
        self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        self.geometry = ModelGeometry(
            **{**self.manifest["geometry"], "mlp_kind": MlpKind(self.manifest["geometry"]["mlp_kind"])}
        )

    @property
    def num_samples(self) -> int:
        return int(self.manifest["rows"])

    @property
    def has_mlp(self) -> bool:
        return self.geometry.mlp_kind == MlpKind.relu

    def _load(self, name: str) -> np.ndarray:
        return np.load(self.root / name, mmap_mode="r")

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.geometry.num_layers:
            raise ValueError(
                f"layer {layer} is outside the store's model (layers 0..{self.geometry.num_layers - 1})"
            )

    def sequence_ids(self) -> np.ndarray:
        return self._load("sequence_ids.npy")

    def positions(self) -> np.ndarray:
        return self._load("positions.npy")

    def router_inputs(self, layer: int) -> np.ndarray:
        """(N, d) memory map; bfloat16 stores hold uint16 bits (use ``as_tensor``)."""
        self._check_layer(layer)
        return self._load(f"layers/{layer:03d}/router_input.npy")

    def head_norms(self, layer: int) -> np.ndarray:
        self._check_layer(layer)
        return self._load(f"layers/{layer:03d}/head_norms.npy")

    def mlp_active_packed(self, layer: int) -> np.ndarray:
        """(N, ceil(F/8)) packed bits; ``unpack_mlp`` turns rows into booleans."""
        self._check_layer(layer)
        if not self.has_mlp:
            raise StoreError(
                f"the store's model has a {self.geometry.mlp_kind.value} MLP: no MLP activity is stored "
                f"(MLP routers need a ReLU model such as OPT)"
            )
        return self._load(f"layers/{layer:03d}/mlp_active.npy")

    def unpack_mlp(self, packed_rows: np.ndarray) -> np.ndarray:
        return np.unpackbits(packed_rows, axis=-1, count=self.geometry.ffn_dim, bitorder="little").astype(
            bool
        )

    def as_tensor(self, rows: np.ndarray) -> torch.Tensor:
        """Router-input rows as a tensor in the store's dtype."""
        tensor = torch.from_numpy(np.array(rows))  # a writable copy of just these rows
        return tensor.view(torch.bfloat16) if self.manifest["dtype"] == "bfloat16" else tensor


def split_by_sequence(
    sequence_ids: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, validation): a seeded ``val_fraction`` of whole sequences is held out."""
    sequences = np.unique(sequence_ids)
    if len(sequences) < 2:
        raise ValueError(
            f"the rows used hold {len(sequences)} sequence(s); a held-out-by-sequence validation split "
            f"needs at least 2 (raise train.samples, or collect more)"
        )
    n_val = min(len(sequences) - 1, max(1, round(val_fraction * len(sequences))))
    held_out = np.random.default_rng(seed).choice(sequences, size=n_val, replace=False)
    is_val = np.isin(sequence_ids, held_out)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)
