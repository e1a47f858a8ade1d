"""Activation store: round trips, packed bits, resume, and refusals that lose nothing."""

from __future__ import annotations

import json
from collections import namedtuple

import numpy as np
import pytest
import torch

from polar_sparsity.data import store as store_module
from polar_sparsity.data.store import MANIFEST, ActivationStore, StoreError, StoreSpec, StoreWriter

GEOMETRY = {
    "num_layers": 2,
    "hidden_size": 6,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 3,
    "ffn_dim": 13,
    "mlp_kind": "relu",
    "vocab_size": 50,
}


def _spec(samples: int = 10, dtype: str = "float16", **changes) -> StoreSpec:
    fields = dict(
        model="m",
        weights="random",
        data="d",
        split="train",
        seq_len=4,
        samples=samples,
        dtype=dtype,
        geometry=GEOMETRY,
    )
    return StoreSpec(**{**fields, **changes})


def _batch(rows: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    router = [torch.randn(rows, 6, generator=gen) for _ in range(2)]
    norms = [torch.rand(rows, 4, generator=gen) for _ in range(2)]
    mlp = [torch.rand(rows, 13, generator=gen) > 0.7 for _ in range(2)]
    return router, norms, mlp


def _append(writer: StoreWriter, rows: int, seed: int, first_sequence: int):
    router, norms, mlp = _batch(rows, seed)
    ids = np.full(rows, first_sequence, dtype=np.int32)
    positions = np.arange(rows, dtype=np.int32)
    writer.append(ids, positions, router, norms, mlp, sequences_done=first_sequence + 1)
    return router, norms, mlp


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_round_trip_and_truncation(tmp_path, dtype) -> None:
    writer = StoreWriter(tmp_path / "s", _spec(samples=10, dtype=dtype))
    first = _append(writer, 6, seed=1, first_sequence=0)
    second = _append(writer, 6, seed=2, first_sequence=1)  # only 4 of these fit
    assert writer.rows == 10
    writer.finish({"note": "test"})

    store = ActivationStore(tmp_path / "s")
    assert store.num_samples == 10 and store.manifest["note"] == "test"
    for layer in range(2):
        expected = torch.cat([first[0][layer], second[0][layer][:4]]).to(getattr(torch, dtype))
        assert torch.equal(store.as_tensor(store.router_inputs(layer)[:]), expected)
        norms = np.concatenate([first[1][layer].numpy(), second[1][layer][:4].numpy()])
        np.testing.assert_array_equal(store.head_norms(layer)[:], norms)
        active = np.concatenate([first[2][layer].numpy(), second[2][layer][:4].numpy()])
        np.testing.assert_array_equal(store.unpack_mlp(store.mlp_active_packed(layer)[:]), active)
    np.testing.assert_array_equal(store.sequence_ids()[:], [0] * 6 + [1] * 4)
    # 13 neurons take 2 bytes per row, not 13 x 16 bits.
    assert store.mlp_active_packed(0).shape == (10, 2)


def test_incomplete_store_is_refused_then_resumed(tmp_path) -> None:
    root = tmp_path / "s"
    writer = StoreWriter(root, _spec(samples=10), checkpoint_seconds=0)
    _append(writer, 6, seed=1, first_sequence=0)
    del writer  # interrupted: no manifest

    with pytest.raises(StoreError, match="incomplete .*6 samples"):
        ActivationStore(root)
    with pytest.raises(StoreError, match=r"incomplete \(6/10 samples\).*collect.resume=true"):
        StoreWriter(root, _spec(samples=10))

    resumed = StoreWriter(root, _spec(samples=10), resume=True)
    assert (resumed.rows, resumed.sequences) == (6, 1)
    _append(resumed, 4, seed=3, first_sequence=1)
    resumed.finish({})
    store = ActivationStore(root)
    np.testing.assert_array_equal(store.sequence_ids()[:], [0] * 6 + [1] * 4)


def test_other_model_or_data_is_refused_and_nothing_is_lost(tmp_path) -> None:
    root = tmp_path / "s"
    writer = StoreWriter(root, _spec())
    _append(writer, 10, seed=1, first_sequence=0)
    writer.finish({})
    before = (root / MANIFEST).read_text()
    with pytest.raises(StoreError, match="model: store has 'm', this run 'other'"):
        StoreWriter(root, _spec(model="other"), resume=True)
    with pytest.raises(StoreError, match="data: store has 'd', this run 'wiki'"):
        StoreWriter(root, _spec(data="wiki"))
    with pytest.raises(StoreError, match="already complete"):
        StoreWriter(root, _spec())
    assert (root / MANIFEST).read_text() == before
    assert ActivationStore(root).num_samples == 10


def test_overwrite_starts_over_and_replaces_the_old_store_only_when_done(tmp_path) -> None:
    root = tmp_path / "s"
    writer = StoreWriter(root, _spec())
    _append(writer, 10, seed=1, first_sequence=0)
    writer.finish({})
    fresh = StoreWriter(root, _spec(model="other"), overwrite=True)
    assert fresh.rows == 0
    # Until the new store is finished, the old one is complete and readable where it was.
    assert ActivationStore(root).manifest["model"] == "m"
    _append(fresh, 10, seed=2, first_sequence=0)
    fresh.finish({})
    assert ActivationStore(root).manifest["model"] == "other"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no staging or retired copy left


def test_refuses_when_disk_is_too_small(tmp_path, monkeypatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(store_module.shutil, "disk_usage", lambda path: usage(100, 90, 10))
    with pytest.raises(StoreError, match=r"needs about .* GiB but .* has 0\.00 GiB free"):
        StoreWriter(tmp_path / "s", _spec(samples=1000))
    assert not (tmp_path / "s").exists()


def test_reader_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(StoreError, match="no activation store.*python collect.py"):
        ActivationStore(tmp_path / "missing")
    writer = StoreWriter(tmp_path / "s", _spec(geometry={**GEOMETRY, "mlp_kind": "gated"}))
    router, norms, _ = _batch(10, seed=0)
    writer.append(
        np.zeros(10, np.int32), np.arange(10, dtype=np.int32), router, norms, None, sequences_done=1
    )
    writer.finish({})
    store = ActivationStore(tmp_path / "s")
    with pytest.raises(StoreError, match="gated MLP: no MLP activity"):
        store.mlp_active_packed(0)
    with pytest.raises(ValueError, match=r"layer 5 is outside .*layers 0\.\.1"):
        store.head_norms(5)
    identity = json.loads((tmp_path / "s" / "identity.json").read_text())
    assert identity["geometry"]["mlp_kind"] == "gated"
