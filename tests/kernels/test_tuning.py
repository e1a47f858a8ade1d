"""Config selection: bucketed keys, memoisation, and the shipped H100 table."""

import json

import pytest

from polar_sparsity.kernels import _common, _tuning


def test_bucket_is_next_power_of_two():
    assert [_common.bucket(n) for n in (1, 2, 3, 1000, 1024, 1025)] == [1, 2, 4, 1024, 1024, 2048]


def test_pick_is_memoised_per_key_and_never_retunes(monkeypatch):
    monkeypatch.setattr(_tuning, "_CHOSEN", {})
    calls = []

    def heuristic():
        calls.append(1)
        return {"BLOCK_N": 64}

    cpu = _common.torch.device("cpu")
    for _ in range(3):  # e.g. k = 700, 800, 900: one bucket, one decision
        assert _tuning.pick("test|K1024", cpu, heuristic, lambda: [], lambda cfg: None) == {"BLOCK_N": 64}
    assert len(calls) == 1


@pytest.mark.parametrize("prefix", ["attn|", "up|", "down|"])
def test_shipped_table_is_well_formed(prefix):
    table = json.loads(_tuning.TABLE_PATH.read_text())
    assert table["gpu"] == "H100"
    entries = {k: v for k, v in table["configs"].items() if k.startswith(prefix)}
    assert entries, f"no shipped configs for {prefix}"
    for key, cfg in entries.items():
        assert all(isinstance(v, int) and v >= 0 for v in cfg.values()), key
        assert cfg["num_warps"] in (4, 8) and cfg["splits"] >= 1, key
