"""Damaged, edited or mixed stores are refused naming the file; only stores are ever deleted; one writer."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from polar_sparsity.data import store as store_module
from polar_sparsity.data.store import (
    IDENTITY,
    MANIFEST,
    PROGRESS,
    ActivationStore,
    StoreError,
    StoreWriter,
    remove_store,
)
from polar_sparsity.data.store_lock import StoreBusyError, lock_path, store_lock

from .test_store import _append, _spec


def _finished(root: Path, **changes) -> Path:
    writer = StoreWriter(root, _spec(**changes))
    _append(writer, 10, seed=1, first_sequence=0)
    writer.finish({})
    return root


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": "other"}, r"manifest.json disagrees with .*identity.json \(model: 'other' vs 'm'"),
        ({"weights": "pretrained"}, r"disagrees .*weights: 'pretrained' vs 'random'"),
        ({"rows": 5}, r"disagrees .*rows: 5 vs 10"),
    ],
)
def test_edited_manifest_is_refused(tmp_path: Path, changes: dict, message: str) -> None:
    root = _finished(tmp_path / "s")
    _edit_json(root / MANIFEST, **changes)
    with pytest.raises(StoreError, match=message):
        ActivationStore(root)


def test_manifest_and_identity_edited_alike_still_disagree_with_the_arrays(tmp_path: Path) -> None:
    root = _finished(tmp_path / "s")
    geometry = {**json.loads((root / MANIFEST).read_text())["geometry"], "num_heads": 8}
    _edit_json(root / MANIFEST, geometry=geometry)
    _edit_json(root / IDENTITY, geometry=geometry)
    with pytest.raises(
        StoreError, match=r"head_norms.npy holds a \(10, 4\) float32 array, but .* says \(10, 8\)"
    ):
        ActivationStore(root)


def test_truncated_array_and_damaged_json_name_the_file(tmp_path: Path) -> None:
    root = _finished(tmp_path / "s")
    array = root / "layers" / "001" / "router_input.npy"
    array.write_bytes(array.read_bytes()[:-7])
    with pytest.raises(StoreError, match=r"layers/001/router_input.npy is truncated"):
        ActivationStore(root)
    (root / MANIFEST).write_text('{"model": ')
    with pytest.raises(StoreError, match=r"manifest.json cannot be read"):
        ActivationStore(root)
    (root / IDENTITY).unlink()
    (root / MANIFEST).write_text("{}")
    with pytest.raises(
        StoreError, match=r"identity.json is missing|manifest.json is not a valid store manifest"
    ):
        ActivationStore(root)


def test_resume_of_a_damaged_store_names_the_file(tmp_path: Path) -> None:
    root = tmp_path / "s"
    writer = StoreWriter(root, _spec(), checkpoint_seconds=0)
    _append(writer, 4, seed=1, first_sequence=0)
    del writer
    (root / "positions.npy").write_bytes(b"not an array")
    with pytest.raises(StoreError, match=r"positions.npy is not a readable .npy array"):
        StoreWriter(root, _spec(), resume=True)


def test_only_stores_are_ever_deleted(tmp_path: Path) -> None:
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "f").write_text("x")
    with pytest.raises(StoreError, match="mine is not an activation store of this project .* left untouched"):
        StoreWriter(user_dir, _spec(), overwrite=True)
    with pytest.raises(StoreError, match="mine exists and is not an activation store"):
        StoreWriter(user_dir, _spec())
    with pytest.raises(StoreError, match="not an activation store of this project"):
        remove_store(user_dir)
    # A store that also holds the user's own file is not deleted either.
    root = _finished(tmp_path / "s")
    (root / "layers" / "000" / "notes.txt").write_text("mine")
    with pytest.raises(
        StoreError, match=r"holds files that are not part of an activation store \(layers/000/notes"
    ):
        StoreWriter(root, _spec(model="other"), overwrite=True)
    assert (user_dir / "f").read_text() == "x" and (root / "layers" / "000" / "notes.txt").exists()
    assert ActivationStore(root).num_samples == 10


def test_a_store_without_rows_never_blocks_the_corrected_run(tmp_path: Path) -> None:
    root = tmp_path / "s"
    StoreWriter(root, _spec(seq_len=4096))  # created, then the run failed before any rows
    writer = StoreWriter(root, _spec(seq_len=4))  # the corrected run starts over without asking
    assert writer.rows == 0 and json.loads((root / IDENTITY).read_text())["seq_len"] == 4
    (root / PROGRESS).unlink()  # killed while the arrays were being created
    assert StoreWriter(root, _spec(samples=12)).spec.samples == 12


def test_full_disk_while_creating_is_reported_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module.os, "posix_fallocate", full)
    with pytest.raises(StoreError, match=r"the disk filled while creating the store .* nothing was kept"):
        StoreWriter(tmp_path / "s", _spec())
    assert not list((tmp_path / "s").iterdir())
    monkeypatch.undo()
    assert StoreWriter(tmp_path / "s", _spec()).rows == 0  # space freed: the same run now works


def test_store_blocks_are_reserved_up_front(tmp_path: Path) -> None:
    root = tmp_path / "s"
    StoreWriter(root, _spec(samples=4096))
    array = root / "layers" / "000" / "router_input.npy"
    assert array.stat().st_blocks * 512 >= array.stat().st_size - 4096  # allocated, not a sparse file


def test_a_second_writer_is_told_another_run_holds_the_store(tmp_path: Path) -> None:
    root = tmp_path / "s"
    code = (
        "import sys, time; from polar_sparsity.data.store_lock import store_lock\n"
        f"with store_lock({str(root)!r}):\n    print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(
                StoreBusyError,
                match=rf"another run holds the store at .*s \(lock .*held by process {holder.pid}\)",
            ),
            store_lock(root),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 10
    while True:  # the kernel drops the lock with its holder, even after SIGKILL
        try:
            with store_lock(root):
                break
        except StoreBusyError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert lock_path(root) == tmp_path / ".s.lock"


def test_an_overwrite_killed_between_its_renames_is_finished(tmp_path: Path) -> None:
    root = _finished(tmp_path / "s")
    writer = StoreWriter(root, _spec(model="other"), overwrite=True)
    _append(writer, 10, seed=2, first_sequence=0)
    store_module.write_json_atomic(writer.root / MANIFEST, {**writer.spec.as_dict(), "format": 1, "rows": 10})
    root.rename(tmp_path / ".s.replaced")  # killed after the first rename of the swap
    assert store_module.finish_interrupted_swap(root)
    assert ActivationStore(root).manifest["model"] == "other"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_a_disk_that_fills_during_collect_is_reported_and_resume_still_works(
    tmp_path: Path, monkeypatch
) -> None:
    root = tmp_path / "s"
    writer = StoreWriter(root, _spec(), checkpoint_seconds=0)
    _append(writer, 4, seed=1, first_sequence=0)  # checkpointed: 4 rows

    def full(path, payload):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(store_module, "write_json_atomic", full)
    with pytest.raises(StoreError, match=r"is full: progress could not be recorded .* collect.resume=true"):
        _append(writer, 3, seed=2, first_sequence=1)
    monkeypatch.undo()
    resumed = StoreWriter(root, _spec(), resume=True)
    assert (resumed.rows, resumed.sequences) == (4, 1)
    _append(resumed, 6, seed=3, first_sequence=1)
    resumed.finish({})
    assert ActivationStore(root).num_samples == 10


def test_overwrite_through_a_symlink_replaces_the_real_store(tmp_path: Path) -> None:
    real = _finished(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    writer = StoreWriter(link, _spec(model="other"), overwrite=True)
    _append(writer, 10, seed=2, first_sequence=0)
    writer.finish({})
    assert link.is_symlink() and ActivationStore(link).manifest["model"] == "other"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    assert lock_path(link) == lock_path(real)
