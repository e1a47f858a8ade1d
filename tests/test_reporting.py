"""reporting.write_csv: the one CSV writer of the project (collection, evaluation, benchmarks)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from polar_sparsity.reporting import write_csv


def _read(path: Path) -> list[list[str]]:
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


def test_columns_are_every_key_in_first_seen_order(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", [{"a": 1, "b": 2}, {"a": 3, "c": 4}, {"d": 5}])
    assert _read(path) == [["a", "b", "c", "d"], ["1", "2", "", ""], ["3", "", "4", ""], ["", "", "", "5"]]


def test_a_failed_rewrite_keeps_the_previous_file(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", [{"a": 1}])
    with pytest.raises(ValueError, match="no rows to write to"):
        write_csv(path, [])
    assert _read(path) == [["a"], ["1"]]
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]
