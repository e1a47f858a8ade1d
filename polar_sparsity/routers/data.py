"""Training data for one router, streamed from the memory-mapped activation store.

Rows are split by *sequence* (the store's ``sequence_ids()``): every token of a held-out sequence is
in validation and none in training, so validation measures unseen text, not neighbours of training
tokens. Batches are read from the store's memory maps one batch of (sorted) row indices at a time;
a layer is never copied whole into RAM. The batch sampler shards itself over DDP ranks (equal batch
counts per rank), so the Trainer runs with ``use_distributed_sampler=False``.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from polar_sparsity.data.store import ActivationStore, split_by_sequence
from polar_sparsity.routers.targets import RouterTarget
from polar_sparsity.schema import RouterKind

_CHUNK_ROWS = 65536  # rows per read when computing training-set statistics
_MIN_EVAL_BATCH = 2048  # validation has no gradients: read bigger batches


class RowBatchSampler(Sampler[np.ndarray]):
    """Yields sorted arrays of row indices (one per batch), reshuffled each epoch, sharded over ranks."""

    def __init__(self, rows: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0):
        self.rows, self.batch_size, self.shuffle, self.seed = rows, batch_size, shuffle, seed
        self.epoch, self.rank, self.world = 0, 0, 1

    def set_epoch(self, epoch: int) -> None:  # called by Lightning at the start of each epoch
        self.epoch = epoch

    def set_partition(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def _my_rows(self) -> np.ndarray:
        rows = self.rows
        if self.shuffle:
            rows = np.random.default_rng((self.seed, self.epoch)).permutation(rows)
        per_rank = len(rows) // self.world  # equal shares: DDP ranks must run the same number of steps
        return rows[self.rank * per_rank : (self.rank + 1) * per_rank] if self.world > 1 else rows

    def __iter__(self):
        rows = self._my_rows()
        for start in range(0, len(rows), self.batch_size):
            yield np.sort(rows[start : start + self.batch_size])  # sorted: memory-map reads go forward

    def __len__(self) -> int:
        return math.ceil((len(self.rows) // self.world) / self.batch_size)


class RouterDataset(Dataset):
    """One layer's (router input, target) rows; indexed by an array of rows, read from the memory map.

    Targets: head routers get per-unit norms (the labels are their per-row top-k, made on the device);
    MLP routers get 0/1 "neuron fired" labels unpacked from the store's bits.
    """

    def __init__(self, store_root: str | Path, target: RouterTarget):
        self.store_root, self.target = Path(store_root), target
        self._store: ActivationStore | None = None
        self._arrays: dict[str, np.ndarray] = {}

    def _open(self) -> ActivationStore:
        if self._store is None:  # opened lazily, per process (memory maps are not sent to workers)
            self._store = ActivationStore(self.store_root)
        return self._store

    def _array(self, name: str) -> np.ndarray:
        """The layer's memory maps, opened once per process (re-opening costs more than a batch read)."""
        if name not in self._arrays:
            store, layer = self._open(), self.target.layer
            opener = {"x": store.router_inputs, "norms": store.head_norms, "mlp": store.mlp_active_packed}
            self._arrays[name] = opener[name](layer)
        return self._arrays[name]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None, "_arrays": {}}

    def __len__(self) -> int:
        return self._open().num_samples

    def __getitem__(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        store, t = self._open(), self.target
        x = self._array("x")[rows]
        x = (
            store.as_tensor(x).float()
            if store.manifest["dtype"] == "bfloat16"
            else torch.from_numpy(x.astype(np.float32))
        )
        if t.kind == RouterKind.mha:
            norms = torch.from_numpy(np.asarray(self._array("norms")[rows], dtype=np.float32))
            target = t.unit_scores(norms)
        else:
            target = torch.from_numpy(store.unpack_mlp(self._array("mlp")[rows]).astype(np.float32))
        return {"x": x, "target": target}


class RouterDataModule(L.LightningDataModule):
    """Held-out-by-sequence split of the store's first ``samples`` rows, streamed in batches."""

    def __init__(
        self,
        store_root: str | Path,
        target: RouterTarget,
        batch_size: int,
        samples: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        self.dataset = RouterDataset(store_root, target)
        self.target, self.batch_size, self.seed, self.num_workers = target, batch_size, seed, num_workers
        store = self.dataset._open()
        used = store.num_samples if samples is None else samples
        if used > store.num_samples:
            raise ValueError(
                f"train.samples={samples} but the store at {store.root} holds {store.num_samples} rows"
            )
        self.train_rows, self.val_rows = split_by_sequence(
            np.asarray(store.sequence_ids()[:used]), val_fraction, seed
        )

    def _loader(self, rows: np.ndarray, batch_size: int, shuffle: bool, partition: bool) -> DataLoader:
        sampler = RowBatchSampler(rows, batch_size, shuffle=shuffle, seed=self.seed)
        trainer = self.trainer  # None outside a fit (e.g. the baselines' pass)
        if partition and trainer is not None and trainer.world_size > 1:
            sampler.set_partition(trainer.global_rank, trainer.world_size)
        return DataLoader(
            self.dataset,
            sampler=sampler,
            batch_size=None,  # the sampler yields whole batches of row indices
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_rows, self.batch_size, shuffle=True, partition=True)

    def val_dataloader(self, partition: bool = True) -> DataLoader:
        return self._loader(
            self.val_rows, max(self.batch_size, _MIN_EVAL_BATCH), shuffle=False, partition=partition
        )

    def test_dataloader(self) -> DataLoader:
        """The held-out rows again: the test stage re-measures the exported (best) weights on them."""
        return self.val_dataloader()

    def unit_statistics(self) -> torch.Tensor:
        """Per unit over the training rows: mean norm (heads) or firing rate (neurons).

        Ranking units by it is the static baseline: the same units for every token.
        """
        total = torch.zeros(self.target.units, dtype=torch.float64)
        for start in range(0, len(self.train_rows), _CHUNK_ROWS):
            total += self.dataset[self.train_rows[start : start + _CHUNK_ROWS]]["target"].double().sum(0)
        return (total / len(self.train_rows)).float()
