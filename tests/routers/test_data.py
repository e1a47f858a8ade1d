"""The DataModule: held-out-by-sequence split, rank sharding, batches read from the memory map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from polar_sparsity.data.store import ActivationStore
from polar_sparsity.routers.data import RouterDataModule, RowBatchSampler, split_by_sequence
from polar_sparsity.routers.targets import RouterTarget
from polar_sparsity.sparsity.selection import group_scores


def test_split_holds_out_whole_sequences() -> None:
    sequence_ids = np.repeat(np.arange(50), 7)
    train, val = split_by_sequence(sequence_ids, 0.2, seed=3)
    assert set(sequence_ids[train]).isdisjoint(sequence_ids[val])
    assert len(np.unique(sequence_ids[val])) == 10 and len(train) + len(val) == len(sequence_ids)
    again, _ = split_by_sequence(sequence_ids, 0.2, seed=3)
    np.testing.assert_array_equal(train, again)


def test_split_needs_two_sequences() -> None:
    with pytest.raises(ValueError, match="needs at least 2"):
        split_by_sequence(np.zeros(10, dtype=np.int32), 0.1, seed=0)


def test_sampler_shards_ranks_equally_and_reshuffles_per_epoch() -> None:
    rows = np.arange(103)
    shards = []
    for rank in range(2):
        sampler = RowBatchSampler(rows, batch_size=10, shuffle=True, seed=0)
        sampler.set_partition(rank, 2)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 6 and all(np.all(np.diff(b) > 0) for b in batches)
        shards.append(np.concatenate(batches))
    assert len(shards[0]) == len(shards[1]) == 51 and not set(shards[0]) & set(shards[1])
    sampler = RowBatchSampler(rows, batch_size=103, shuffle=True, seed=0)
    first = next(iter(sampler))
    sampler.set_epoch(1)
    np.testing.assert_array_equal(np.sort(first), np.sort(next(iter(sampler))))  # same rows, new batches
    small = RowBatchSampler(rows, batch_size=10, shuffle=True, seed=0)
    order = [b.tolist() for b in small]
    small.set_epoch(1)
    assert order != [b.tolist() for b in small]


def test_batches_are_the_store_rows_and_layers_stay_memory_mapped(opt_store: Path) -> None:
    store = ActivationStore(opt_store)
    target = RouterTarget("mha", 2, units=8, k=4, num_heads=8, num_kv_heads=8, group_reduce="max")
    data = RouterDataModule(opt_store, target, batch_size=32, samples=5000, val_fraction=0.2)
    assert data.train_rows.max() < 5000 and data.val_rows.max() < 5000
    batch_rows = next(iter(data.train_dataloader().sampler))
    batch = data.dataset[batch_rows]
    expected = torch.from_numpy(store.router_inputs(2)[batch_rows].astype(np.float32))
    torch.testing.assert_close(batch["x"], expected)
    torch.testing.assert_close(batch["target"], torch.from_numpy(store.head_norms(2)[batch_rows]))
    assert all(isinstance(a, np.memmap) for a in data.dataset._arrays.values())


def test_gqa_targets_are_group_norms(llama_store: Path) -> None:
    store = ActivationStore(llama_store)
    target = RouterTarget("mha", 1, units=2, k=1, num_heads=8, num_kv_heads=2, group_reduce="max")
    data = RouterDataModule(llama_store, target, batch_size=16)
    rows = np.arange(16)
    expected = group_scores(torch.from_numpy(np.asarray(store.head_norms(1)[rows])), 4, "max")
    torch.testing.assert_close(data.dataset[rows]["target"], expected)
