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

Nothing is ever deleted that is not recognisably a store of this project (its identity.json, and no
file a store does not hold). ``overwrite`` builds the new store in a hidden sibling directory and
renames it into place at the end, so a failed or interrupted run leaves the old store as it was.
The arrays' disk blocks are reserved when the store is created, so a disk that fills later cannot
kill a memory-mapped write with a bus error.

One row is one (non-padding) token. bfloat16 has no numpy dtype, so it is stored as its uint16 bits
and viewed back as ``torch.bfloat16`` by the reader.
"""

from __future__ import annotations

import errno
import json
import os
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


# Top-level entries of a store; anything else in a directory means it is not (only) a store.
_STORE_ENTRIES = {IDENTITY, PROGRESS, MANIFEST, "sequence_ids.npy", "positions.npy", "layers"}
_STORE_ENTRIES |= {"summary.csv", "summary.png"}
_LAYER_FILES = {"router_input.npy", "head_norms.npy", "mlp_active.npy"}


class StoreError(RuntimeError):
    """A store that is missing, incomplete, or belongs to another model or data source."""


def read_json(path: Path) -> dict[str, Any]:
    """A store's JSON file; a missing or damaged one is an error that names it."""
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path} is missing: the store is damaged; collect it again") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StoreError(f"{path} cannot be read ({error}): the store is damaged; collect it again") from None
    if not isinstance(payload, dict):
        raise StoreError(f"{path} does not hold a JSON object: the store is damaged; collect it again")
    return payload


def is_activation_store(root: Path) -> bool:
    """Whether ``root`` is a store of this project: its identity.json names a model and a geometry."""
    try:
        identity = json.loads((root / IDENTITY).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(identity, dict) and {"format", "model", "geometry"} <= identity.keys()


def _is_temporary(name: str) -> bool:
    """A temporary file of an atomic write (``.<name>.<pid>.tmp``) interrupted by a crash."""
    return name.startswith(".") and ".tmp" in name


def foreign_entries(root: Path) -> list[str]:
    """Paths under ``root`` (relative) that no store holds: a directory with any is never deleted."""
    foreign = []
    for entry in sorted(root.iterdir()):
        if _is_temporary(entry.name):
            continue
        if entry.name not in _STORE_ENTRIES or (entry.name == "layers") != entry.is_dir():
            foreign.append(entry.name)
        elif entry.name == "layers":
            for layer in sorted(entry.iterdir()):
                if not (layer.is_dir() and len(layer.name) == 3 and layer.name.isdigit()):
                    foreign.append(f"layers/{layer.name}")
                    continue
                extra = [f.name for f in layer.iterdir() if f.name not in _LAYER_FILES]
                foreign += [f"layers/{layer.name}/{name}" for name in extra]
    return foreign


def check_removable(root: Path) -> None:
    """Refuse (naming why) unless ``root`` is a store of this project that holds nothing else."""
    if not is_activation_store(root):
        raise StoreError(
            f"{root} is not an activation store of this project (no readable {IDENTITY}); it is left "
            f"untouched. Choose another paths.store, or remove it yourself."
        )
    foreign = foreign_entries(root)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise StoreError(
            f"{root} holds files that are not part of an activation store ({shown}); it is left "
            f"untouched. Move them away, or choose another paths.store."
        )


def remove_store(root: Path) -> None:
    """Delete a store directory, after making sure it is one and holds nothing else."""
    check_removable(root)
    shutil.rmtree(root)


def staging_dir(root: Path) -> Path:
    """Where an overwrite builds the new store: a hidden sibling, renamed over ``root`` at the end."""
    return root.parent / f".{root.name}.overwrite"


def _swap_in(staging: Path, root: Path) -> None:
    """Replace the store at ``root`` with the finished one at ``staging`` (two renames, then cleanup)."""
    retired = root.parent / f".{root.name}.replaced"
    if retired.exists():
        remove_store(retired)
    if root.exists():
        os.rename(root, retired)
    os.rename(staging, root)
    if retired.exists():
        shutil.rmtree(retired)


def finish_interrupted_swap(root: Path) -> bool:
    """A run killed between ``_swap_in``'s two renames left no store at ``root`` but a finished one
    beside it: move that one into place (and drop the retired copy). True when it did."""
    staging, retired = staging_dir(root), root.parent / f".{root.name}.replaced"
    if root.exists() or not (staging / MANIFEST).exists():
        return False
    os.rename(staging, root)
    if retired.exists():
        remove_store(retired)
    return True


def rows_written(root: Path) -> int:
    """Rows an incomplete store holds (0 when it died before recording any progress)."""
    if not (root / PROGRESS).exists():
        return 0
    return int(read_json(root / PROGRESS).get("rows", 0))


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
    """Appends captured rows to a store; resumable, and refuses to mix models or data sources.

    With ``overwrite`` an existing store is replaced only when the new one is finished: rows go to a
    hidden sibling (``staging_dir``) that ``finish`` renames into place; ``abandon`` drops it.
    """

    def __init__(
        self,
        root: str | Path,
        spec: StoreSpec,
        resume: bool = False,
        overwrite: bool = False,
        checkpoint_seconds: float = 30.0,
    ):
        # Resolved: an overwrite builds and swaps beside the real directory, not beside a symlink to it.
        self.final_root = Path(root).resolve()
        self.root = self.final_root  # where rows are written: the staging sibling while overwriting
        self.spec = spec
        # Flushing memory maps is a disk sync: do it (and record progress) at most this often.
        self.checkpoint_seconds = checkpoint_seconds
        self._last_checkpoint = time.monotonic()
        self._prepare(resume, overwrite)
        check_array_files(self.root, spec)
        progress = read_json(self.root / PROGRESS)
        self.rows, self.sequences = progress["rows"], progress["sequences"]
        mode = "r+"
        self._arrays = {
            name: np.lib.format.open_memmap(self.root / name, mode=mode) for name in _array_specs(spec)
        }

    # -- set-up ---------------------------------------------------------------------------------

    def _prepare(self, resume: bool, overwrite: bool) -> None:
        root = self.final_root
        if root.exists() and not root.is_dir():
            raise StoreError(f"paths.store={root} is a file, not a store directory; choose another path")
        occupied = root.exists() and any(root.iterdir())
        if overwrite and occupied:
            self._stage_replacement()
            return
        if (root / IDENTITY).exists():
            identity = read_json(root / IDENTITY)
            if (root / MANIFEST).exists() or rows_written(root) > 0:
                self._check_existing(identity, resume)
                return
            remove_store(root)  # a run that died before its first checkpoint: nothing to keep
        elif occupied:
            raise StoreError(f"{root} exists and is not an activation store; choose another paths.store")
        check_disk_space(root, self.spec.total_bytes())
        self._create()

    def _stage_replacement(self) -> None:
        """Overwrite: check the old store may be replaced, then build the new one beside it."""
        check_removable(self.final_root)
        self.root = staging_dir(self.final_root)
        if self.root.exists():  # left by an overwrite that was killed: it is ours, start it over
            if is_activation_store(self.root):
                remove_store(self.root)
            else:
                self.root.rmdir()  # died before writing anything; refuses (raises) if not empty
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
            done = rows_written(self.root)
            raise StoreError(
                f"the store at {self.root} is incomplete ({done}/{self.spec.samples} samples). Pass "
                f"collect.resume=true to continue it, or collect.overwrite=true to start over."
            )

    def _create(self) -> None:
        """Identity first (the directory is recognisably a store from then on), arrays, progress last."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            write_json_atomic(self.root / IDENTITY, {**self.spec.as_dict(), "format": STORE_FORMAT})
            for name, (shape, dtype) in _array_specs(self.spec).items():
                (self.root / name).parent.mkdir(parents=True, exist_ok=True)
                np.lib.format.open_memmap(self.root / name, mode="w+", dtype=dtype, shape=shape).flush()
                _reserve_blocks(self.root / name)
            write_json_atomic(self.root / PROGRESS, {"rows": 0, "sequences": 0})
        except BaseException as error:
            for child in self.root.iterdir():  # the directory was empty: everything here is ours
                shutil.rmtree(child) if child.is_dir() else child.unlink()
            if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreError(
                    f"the disk filled while creating the store at {self.root} (it needs about "
                    f"{self.spec.total_bytes() / 2**30:.2f} GiB); nothing was kept. Free space, lower "
                    f"collect.samples, or point paths.store at a larger disk."
                ) from error
            raise

    def abandon(self) -> None:
        """After a failed overwrite: drop the half-built replacement (the old store is untouched)."""
        if self.root != self.final_root and self.root.exists():
            remove_store(self.root)

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
        try:
            write_json_atomic(self.root / PROGRESS, {"rows": self.rows, "sequences": self.sequences})
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise StoreError(
                f"the disk holding {self.root} is full: progress could not be recorded ({error}). The "
                f"store keeps its last checkpoint; free some space, then continue with collect.resume=true"
            ) from error
        self._last_checkpoint = time.monotonic()

    def finish(self, extra: dict[str, Any]) -> Path:
        """Write the manifest, last: from now on the store is complete."""
        self.checkpoint()
        if self.remaining:
            raise StoreError(f"store has {self.rows}/{self.spec.samples} samples; the token stream ran out")
        manifest = {**self.spec.as_dict(), "format": STORE_FORMAT, "rows": self.rows, **extra}
        write_json_atomic(self.root / MANIFEST, manifest)
        if self.root != self.final_root:
            _swap_in(self.root, self.final_root)
            self.root = self.final_root
        return self.root / MANIFEST


def _to_disk(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return tensor.to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16)
    return tensor.to(getattr(torch, dtype)).cpu().numpy()


def _reserve_blocks(path: Path) -> None:
    """Allocate a file's disk blocks now: a full disk fails here, clearly, not as a SIGBUS mid-write."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # else: cannot reserve here
            raise
    finally:
        os.close(fd)


_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def check_array_file(path: Path, shape: tuple[int, ...], dtype: Any) -> None:
    """An array file has the shape and dtype the store's manifest promises, and all of its bytes."""
    try:
        with path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)
            reader = _HEADER_READERS.get(version)
            if reader is None:
                raise ValueError(f"unsupported .npy format version {version}")
            file_shape, _, file_dtype = reader(handle)
            data_offset = handle.tell()
    except FileNotFoundError:
        raise StoreError(f"{path} is missing: the store is damaged; collect it again") from None
    except (OSError, ValueError) as error:
        raise StoreError(f"{path} is not a readable .npy array ({error}); collect the store again") from None
    if tuple(file_shape) != tuple(shape) or np.dtype(file_dtype) != np.dtype(dtype):
        raise StoreError(
            f"{path} holds a {tuple(file_shape)} {np.dtype(file_dtype)} array, but the store's manifest "
            f"says {tuple(shape)} {np.dtype(dtype)}: the store was edited or mixed; collect it again"
        )
    expected = data_offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size < expected:
        raise StoreError(f"{path} is truncated ({size} of {expected} bytes); collect the store again")


def check_array_files(root: Path, spec: StoreSpec) -> None:
    for name, (shape, dtype) in _array_specs(spec).items():
        check_array_file(root / name, shape, dtype)


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


def _checked_spec(root: Path, manifest: dict[str, Any], identity: dict[str, Any]) -> StoreSpec:
    """The store's spec, after checking that its manifest and identity.json describe the same store."""
    try:
        spec = StoreSpec(**{name: manifest[name] for name in StoreSpec.__dataclass_fields__})
        geometry = dict(spec.geometry)
        ModelGeometry(**{**geometry, "mlp_kind": MlpKind(geometry["mlp_kind"])})
    except (KeyError, TypeError, ValueError) as error:
        raise StoreError(
            f"{root / MANIFEST} is not a valid store manifest ({type(error).__name__}: {error}); "
            f"collect the store again"
        ) from None
    differences = spec.mismatches(identity)
    if manifest.get("rows") != spec.samples:
        differences["rows"] = (spec.samples, manifest.get("rows"))
    if differences:
        details = ", ".join(f"{k}: {new!r} vs {old!r}" for k, (old, new) in differences.items())
        raise StoreError(
            f"{root / MANIFEST} disagrees with {root / IDENTITY} ({details}; manifest vs identity, "
            f"rows vs samples): the store was edited or mixed; collect it again"
        )
    return spec


class ActivationStore:
    """Read-only view of a complete store; arrays are memory-mapped, never copied whole into RAM."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if not manifest_path.exists():
            if (self.root / IDENTITY).exists():
                done = rows_written(self.root)
                raise StoreError(
                    f"the store at {self.root} is incomplete ({done} samples written, no manifest); "
                    f"finish it with `python collect.py collect.resume=true ...`"
                )
            raise StoreError(
                f"no activation store at {self.root}; run `python collect.py` for this model first"
            )
        self.manifest: dict[str, Any] = read_json(manifest_path)
        self.spec = _checked_spec(self.root, self.manifest, read_json(self.root / IDENTITY))
        check_array_files(self.root, self.spec)
        geometry = self.manifest["geometry"]
        self.geometry = ModelGeometry(**{**geometry, "mlp_kind": MlpKind(geometry["mlp_kind"])})

    @property
    def num_samples(self) -> int:
        return int(self.manifest["rows"])

    def provenance(self) -> dict[str, Any]:
        """Which store this is, as router records and calibration tables record it."""
        keys = ("model", "data", "rows", "weights", "dtype")
        return {"path": str(self.root.resolve()), **{key: self.manifest.get(key) for key in keys}}

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
