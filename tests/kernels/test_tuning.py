"""Config selection: bucketed keys, shipped tables by exact GPU name, the per-GPU user cache, modes.

The selection logic (`_tuning.resolve`) runs here on the CPU with a tuner that returns a fixed config
and counts its calls (timing candidates needs a GPU; `test_first_use_tuning_on_gpu` times real ones).
"""

import itertools
import json
import multiprocessing
import warnings

import pytest
import torch

from polar_sparsity.kernels import _common, _tuning, testing

GPU = "NVIDIA Test GPU"
TUNED = {"BLOCK_N": 128, "num_warps": 8}
HEURISTIC = {"BLOCK_N": 16, "num_warps": 4}


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """Empty per-process state and a private cache directory."""
    monkeypatch.setattr(_tuning, "_CHOSEN", {})
    monkeypatch.setattr(_tuning, "_HEURISTIC_KEYS", {})
    monkeypatch.setattr(_tuning, "_TUNED", set())
    monkeypatch.setattr(_tuning, "_SETTINGS", {"cache_dir": str(tmp_path), "mode": "tune"})
    return tmp_path


class Tuner:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return dict(TUNED)


def _resolve(key, cache, tuner, capturing=False):
    return _tuning.resolve(key, GPU, cache, lambda: dict(HEURISTIC), tuner, capturing=capturing)


def test_bucket_is_next_power_of_two():
    assert [_common.bucket(n) for n in (1, 2, 3, 1000, 1024, 1025)] == [1, 2, 4, 1024, 1024, 2048]


def test_first_use_tunes_once_persists_and_a_new_process_reuses(fresh, monkeypatch):
    cache = _tuning.TuningCache(fresh, GPU, "3.6.0")
    tuner = Tuner()
    for _ in range(3):  # e.g. k = 700, 800, 900: one bucket, one decision
        assert _resolve("up|K1024", cache, tuner) == TUNED
    assert tuner.calls == 1
    assert json.loads(cache.path.read_text())["configs"]["up|K1024"] == TUNED
    monkeypatch.setattr(_tuning, "_CHOSEN", {})  # a later process: the cache answers, no tuning
    assert _resolve("up|K1024", cache, tuner) == TUNED
    assert tuner.calls == 1


def test_shipped_table_comes_first_by_exact_gpu_name(fresh):
    table = _tuning.shipped_tables()["NVIDIA H200"]
    key, cfg = next(iter(table["configs"].items()))
    cache = _tuning.TuningCache(fresh, "NVIDIA H200", "3.6.0")
    cache.put({key: {"BLOCK_N": 1}})
    tuner = Tuner()
    assert _tuning.resolve(key, "NVIDIA H200", cache, lambda: dict(HEURISTIC), tuner) == cfg
    assert tuner.calls == 0
    # A GPU whose name only contains the table's (another H200 variant) does not get it.
    assert _tuning.shipped_config(key, "NVIDIA H200 NVL") is None
    assert _tuning.shipped_config(key, "H200") is None


def test_shipped_tables_can_be_switched_off(fresh):
    key = next(iter(_tuning.shipped_tables()["NVIDIA H200"]["configs"]))
    _tuning.use_shipped_tables(False)
    assert _tuning.shipped_config(key, "NVIDIA H200") is None


@pytest.mark.parametrize("name", ["NVIDIA H100 80GB HBM3", "NVIDIA H200"])
@pytest.mark.parametrize("prefix", ["attn|", "up|", "down|"])
def test_shipped_tables_are_well_formed(name, prefix):
    table = _tuning.shipped_tables()[name]
    assert table["gpu"] == name
    entries = {k: v for k, v in table["configs"].items() if k.startswith(prefix)}
    assert entries, f"no shipped configs for {prefix} on {name}"
    for key, cfg in entries.items():
        assert all(isinstance(v, int) and v >= 0 for v in cfg.values()), key
        assert cfg["num_warps"] in (4, 8) and cfg["splits"] >= 1, key


def test_tuning_off_uses_cache_then_heuristic(fresh):
    cache = _tuning.TuningCache(fresh, GPU, "3.6.0")
    cache.put({"known": dict(TUNED)})
    _tuning.set_mode("cached")
    tuner = Tuner()
    assert _resolve("known", cache, tuner) == TUNED
    assert _resolve("unknown", cache, tuner) == HEURISTIC
    _tuning.set_mode("heuristic")
    assert _resolve("known", cache, tuner) == HEURISTIC
    assert tuner.calls == 0


def test_the_heuristic_sees_each_calls_exact_shape(fresh, monkeypatch):
    """A tuned config serves its key's whole bucket; without one, each shape gets its own heuristic
    config (not the first shape's), and a config recorded later for the key takes over."""
    monkeypatch.setattr(_tuning, "gpu_name", lambda device: GPU)
    device = torch.device("cuda")
    _tuning.set_mode("heuristic")
    picks = [
        _tuning.pick("down|K16384", device, lambda n=n: {"splits": n // 4096}, lambda: [], None, None)
        for n in (10035, 14336, 10035)
    ]
    assert picks == [{"splits": 2}, {"splits": 3}, {"splits": 2}]
    assert _tuning.chosen() == {"down|K16384": {"splits": 2}}  # reported: the first shape's
    _tuning.set_mode("cached")
    _tuning.record("down|K16384", dict(TUNED), device)
    assert _tuning.pick("down|K16384", device, lambda: {"splits": 9}, lambda: [], None, None) == TUNED


def test_mode_from_environment_is_validated(fresh, monkeypatch):
    fresh_settings = {"cache_dir": str(fresh)}
    monkeypatch.setattr(_tuning, "_SETTINGS", fresh_settings)
    monkeypatch.setenv(_tuning.MODE_ENV, "heuristic")
    assert _tuning.mode() == "heuristic"
    monkeypatch.setenv(_tuning.MODE_ENV, "fast")
    with pytest.raises(ValueError, match="'fast'.*tune.*cached.*heuristic"):
        _tuning.mode()
    with pytest.raises(ValueError, match="not one of"):
        _tuning.set_mode("always")


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setattr(_tuning, "_SETTINGS", {})
    monkeypatch.setenv(_tuning.CACHE_ENV, str(tmp_path / "c"))
    assert _tuning.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(_tuning.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _tuning.cache_dir() == tmp_path / "xdg" / "polar_sparsity" / "kernels"


def test_during_capture_never_tunes_and_does_not_memoise(fresh):
    cache = _tuning.TuningCache(fresh, GPU, "3.6.0")
    tuner = Tuner()
    assert _resolve("k", cache, tuner, capturing=True) == HEURISTIC
    assert tuner.calls == 0 and not cache.path.exists()
    assert _resolve("k", cache, tuner) == TUNED  # the next eager call tunes it
    assert tuner.calls == 1


def test_corrupt_cache_file_warns_and_is_retuned(fresh):
    cache = _tuning.TuningCache(fresh, GPU, "3.6.0")
    cache.path.parent.mkdir(parents=True, exist_ok=True)
    cache.path.write_text('{"gpu": "NVIDIA Test GPU", "configs": {"k": ')  # a torn write
    tuner = Tuner()
    with pytest.warns(UserWarning, match="unreadable"):
        assert _resolve("k", cache, tuner) == TUNED
    assert tuner.calls == 1
    data = json.loads(cache.path.read_text())  # replaced by a valid file holding the new entry
    assert data["configs"] == {"k": TUNED}


def test_other_gpu_and_triton_entries_are_ignored(fresh):
    other = _tuning.TuningCache(fresh, "NVIDIA Other GPU", "3.6.0")
    other.put({"k": {"BLOCK_N": 1}})
    mine = _tuning.TuningCache(fresh, GPU, "3.6.0")
    assert mine.get("k") is None
    # A file copied from another GPU (or written by another Triton) under this GPU's name.
    mine.path.write_text(other.path.read_text())
    assert mine.get("k") is None
    tuner = Tuner()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _resolve("k", mine, tuner) == TUNED
    assert tuner.calls == 1
    assert _tuning.TuningCache(fresh, GPU, "3.7.0").get("k") is None
    assert other.get("k") == {"BLOCK_N": 1}


def _writer(directory: str, worker: int, n: int) -> None:
    cache = _tuning.TuningCache(directory, GPU, "3.6.0")
    for i in range(n):
        cache.put({f"w{worker}|k{i}": {"BLOCK_N": i}})
    cache.put({f"w{worker}": 0.5}, section="crossovers")


def test_concurrent_writers_keep_every_entry(fresh):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(fresh), w, 15)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    cache = _tuning.TuningCache(fresh, GPU, "3.6.0")
    configs = cache.section("configs")
    assert set(configs) == {f"w{w}|k{i}" for w in range(4) for i in range(15)}
    assert cache.section("crossovers") == {f"w{w}": 0.5 for w in range(4)}


def test_warm_up_runs_each_call_once():
    seen = []
    _tuning.warm_up([lambda: seen.append(1), lambda: seen.append(2)])
    assert seen == [1, 2]


def test_heuristic_schedules_at_the_measured_shapes():
    """The H200 sweeps' findings, on any SM count: gated up at small batch with half a wave of
    32-wide tiles runs whole tiles (no split, no stream-K); the down projection of a large batch with
    long reductions (>= 96 steps) and a third of a wave of 256 x 128 tiles takes the whole batch per tile
    under stream-K; with fewer columns it splits 128 x 64 tiles to fill the resident slots."""
    from polar_sparsity.kernels import selective_mlp_down, selective_mlp_up

    smem = 228 * 1024
    for sms in (84, 108, 132, 170):
        for n_sel in (sms * 16, sms * 32, 14336):
            cfg = selective_mlp_up._heuristic(16, n_sel, 4096, sms, True, smem)
            assert cfg["splits"] == 1 and "stream_k" not in cfg, (sms, n_sel, cfg)
        whole_batch = sms / 3 <= 9216 // 128
        for n_sel in (96 * 64, 18432):
            big = selective_mlp_down._heuristic(256, n_sel, 9216, sms, smem)
            assert (big["BLOCK_M"], big.get("stream_k")) == ((256, 1) if whole_batch else (128, None)), sms
        short = selective_mlp_down._heuristic(256, 96 * 64 - 1, 9216, sms, smem)
        assert short["BLOCK_M"] == 128 and "stream_k" not in short, sms
    for n_sel, splits in ((2867, 2), (7168, 3), (14336, 3)):  # Llama-3-8B: 128 tiles of 128 x 64, 3 per SM
        few_columns = selective_mlp_down._heuristic(256, n_sel, 4096, 132, smem)
        assert (few_columns["BLOCK_M"], few_columns["BLOCK_D"], few_columns["splits"]) == (128, 64, splits)
        assert "stream_k" not in few_columns


def test_large_batch_deep_tiles_only_where_they_fill_their_waves():
    """Up at M > 64 takes a one-program-per-SM tile with a deep pipeline (128 x 256 with four stages, or
    128 x 128 with five, four when gated), whichever fills its waves better (the wider on a tie), where
    that is >= 50% of the slots at M <= 128 and >= 70% beyond, and three stages fit (gated 128 x 256
    never does). The down projection of a wide model at 64 < M <= 128 takes 128 x 128 tiles with 8
    warps."""
    from polar_sparsity.kernels import selective_mlp_down, selective_mlp_up

    def tile(cfg: dict) -> tuple[int, int, int, int]:
        return cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"]

    smem = 228 * 1024
    for sms in (108, 132):
        for M in (100, 128, 200, 256):
            rows = -(-M // 128)
            wide = 256 * int(0.8 * sms) // rows  # 0.8 of a wave of 128 x 256 programs (and of 128 x 128)
            assert tile(selective_mlp_up._heuristic(M, wide, 9216, sms, False, smem)) == (128, 256, 8, 4)
            narrow = 128 * int(0.8 * sms) // rows  # 0.8 of a wave of 128 x 128, 0.4 of 128 x 256
            assert tile(selective_mlp_up._heuristic(M, narrow, 9216, sms, False, smem)) == (128, 128, 8, 5)
            assert tile(selective_mlp_up._heuristic(M, wide, 9216, sms, True, smem)) == (128, 128, 8, 4)
        idle = 128 * (sms + sms // 5) // 2  # 128 x 128: 60% of two waves; 128 x 256: 1.2 waves at M <= 128
        assert selective_mlp_up._heuristic(256, idle, 9216, sms, True, smem)["BLOCK_N"] == 64
        assert selective_mlp_up._heuristic(128, idle, 9216, sms, False, smem)["BLOCK_N"] == 128
    a100 = selective_mlp_up._heuristic(128, 256 * 80, 9216, 108, False, 163 * 1024)
    assert tile(a100) == (128, 256, 8, 3)  # four stages do not fit; three do
    assert selective_mlp_up._heuristic(256, 128 * 100, 9216, 132, False, 99 * 1024)["BLOCK_N"] == 64
    for M, d, expected in ((128, 9216, (128, 128, 8)), (256, 9216, (128, 64, 4)), (128, 4096, (128, 64, 4))):
        cfg = selective_mlp_down._heuristic(M, 3686, d, 132, 228 * 1024)
        assert (cfg["BLOCK_M"], cfg["BLOCK_D"], cfg["num_warps"]) == expected, (M, d, cfg)


def test_large_batch_up_halves_a_last_wave_at_most_half_full():
    """Ungated up at M > 128: 128 x 128 tiles with five stages where their last wave holds at most
    half the slots, that wave's tiles split over d in two (the whole waves run unsplit); not where
    the waves are whole, the last one more than half full, everything fits one wave, the model is
    gated, or the five stages do not fit."""
    from polar_sparsity.kernels import selective_mlp_up

    smem = 228 * 1024
    for sms in (108, 132):
        for M, row_tiles in ((200, 2), (256, 2), (512, 4)):
            for waves, tail in ((1, 0.3), (2, 0.1), (3, 0.4)):
                n_sel = 128 * int((waves + tail) * sms) // row_tiles
                cfg = selective_mlp_up._heuristic(M, n_sel, 9216, sms, False, smem)
                assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_stages"]) == (128, 128, 5), (M, n_sel, cfg)
                assert (cfg["splits"], cfg["last_wave_split"]) == (2, 1)
                assert cfg in selective_mlp_up._candidates(M, n_sel, 9216, sms, False, smem)
                assert "last_wave_split" not in selective_mlp_up._heuristic(M, n_sel, 9216, sms, True, smem)
            for n_tiles in (2 * sms, sms + 3 * sms // 4, sms - 4):  # whole waves; 3/4 full; one wave
                cfg = selective_mlp_up._heuristic(256, 128 * n_tiles // 2, 9216, sms, False, smem)
                assert "last_wave_split" not in cfg, (n_tiles, cfg)
        assert "last_wave_split" not in selective_mlp_up._heuristic(
            128, 128 * (sms + 10), 9216, sms, False, smem
        )
    assert "last_wave_split" not in selective_mlp_up._heuristic(256, 128 * 140, 9216, 132, False, 99 * 1024)


def test_large_batch_up_splits_only_tiles_short_of_half_a_wave():
    """Beyond 64 rows the up projection splits d only where even 64-row tiles give fewer than half a
    wave of programs (H200 sweep, Llama-3-8B gated up at M = 128 and 10% of the neurons: two splits
    16.1 us against 21.9 us whole); 128-row and wide tiles that fill half a wave stay whole, but for the
    tiles of a last wave at most half full (the test above)."""
    from polar_sparsity.kernels import selective_mlp_up

    smem = 228 * 1024
    few = selective_mlp_up._heuristic(128, 1434, 4096, 132, True, smem)  # 2 x 23 programs
    assert (few["BLOCK_M"], few["splits"]) == (64, 2)
    assert selective_mlp_up._heuristic(128, 2867, 4096, 132, True, smem)["splits"] == 1  # 2 x 45
    for M in (128, 256):
        for k in (1434, 3686, 11059, 36864):
            cfg = selective_mlp_up._heuristic(M, k, 9216, 132, False, smem)
            assert cfg["splits"] == 1 or cfg["BLOCK_M"] == 64 or cfg.get("last_wave_split"), (M, k, cfg)


def test_gemm_candidates_fit_shared_memory():
    """Candidates take as many of their stages as fit the GPU's shared memory (the gated 128 x 256
    tile needs 240 KB for three: an H200 sweep spent compiles on it failing), never one, and no
    config twice."""
    from polar_sparsity.kernels import selective_mlp_down, selective_mlp_up

    def stage_bytes(cfg: dict, gated: bool) -> int:
        if "BLOCK_D" in cfg:
            return selective_mlp_down._stage_bytes(cfg["BLOCK_M"], cfg["BLOCK_D"], cfg["BLOCK_K"])
        return selective_mlp_up._stage_bytes(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], gated)

    for smem in (99 * 1024, 163 * 1024, 227 * 1024):
        for M in (16, 64, 256):
            for gated, candidates in (
                (False, selective_mlp_down._candidates(M, 4096, 4096, 132, smem)),
                (False, selective_mlp_up._candidates(M, 4096, 4096, 132, False, smem)),
                (True, selective_mlp_up._candidates(M, 4096, 4096, 132, True, smem)),
            ):
                assert len({json.dumps(c, sort_keys=True) for c in candidates}) == len(candidates)
                for cfg in candidates:
                    stages = cfg["num_stages"]
                    assert stages >= 2 and stages * stage_bytes(cfg, gated) <= smem - 8192, (smem, cfg)
    gated_wide = selective_mlp_up._candidates(256, 4096, 4096, 132, True, 227 * 1024)
    assert {c["num_stages"] for c in gated_wide if (c["BLOCK_M"], c["BLOCK_N"]) == (128, 256)} == {2}


def test_heuristic_stages_fit_shared_memory():
    from polar_sparsity.kernels import _decode_attention, selective_mlp_down, selective_mlp_up

    small = 99 * 1024  # consumer GPUs (sm_86 / sm_89)
    up = selective_mlp_up._heuristic(256, 4096, 4096, 84, True, small)
    stage = selective_mlp_up._stage_bytes(up["BLOCK_M"], up["BLOCK_N"], up["BLOCK_K"], True)
    assert up["num_stages"] * stage <= small
    down = selective_mlp_down._heuristic(256, 4096, 4096, 84, small)
    assert down["num_stages"] * (down["BLOCK_M"] + down["BLOCK_D"]) * down["BLOCK_K"] * 2 <= small
    for group in (1, 8):
        attn = _decode_attention._heuristic(group, 64, 2048, 84, 128, small)
        assert attn["num_stages"] * attn["BLOCK_N"] * 128 * 4 <= small, group


def test_attention_heuristic_balances_pairs_with_stream_k_under_four_waves():
    """The H200 sweeps' finding (every candidate at 1-8 of 8 GQA groups, and MHA at 7 of 72 heads):
    stream-K came within 1.04x of each shape's best, where the grid left a partial last wave; one
    program per resident slot (two of the 64-token tiles on a Hopper SM). Four or more waves of pairs
    keep the grid."""
    from polar_sparsity.kernels import _decode_attention

    smem = 227 * 1024
    for sms in (64, 108, 132):
        for group, pairs in ((8, 64), (8, 2 * sms + sms // 2), (8, 4 * sms - 1), (1, 3 * sms + sms // 2)):
            cfg = _decode_attention._heuristic(group, pairs, 8192, sms, 128, smem)
            assert (cfg["BLOCK_N"], cfg["num_warps"], cfg["splits"], cfg.get("stream_k")) == (64, 4, 1, 2), (
                group,
                pairs,
            )
        for group in (1, 8):
            assert "stream_k" not in _decode_attention._heuristic(group, 4 * sms, 8192, sms, 128, smem)


@pytest.mark.parametrize(
    ("head_dim", "smem", "tile"),
    [
        (128, 227 * 1024, (64, 4, 3)),  # Hopper: two programs of three stages per SM
        (128, 163 * 1024, (64, 4, 2)),  # A100: two programs of two stages beat one of three
        (128, 99 * 1024, (64, 4, 2)),  # consumer GPUs: two stages fit
        (256, 99 * 1024, (32, 4, 2)),  # wide heads there: shorter tiles keep a pipeline
        (64, 99 * 1024, (64, 4, 3)),
    ],
)
def test_attention_heuristic_tile_keeps_the_most_kv_bytes_in_flight(head_dim, smem, tile):
    """64-token tiles of 4 warps, with the stages that keep the most K/V bytes in flight per SM (an H200
    cut to 64-132 SMs by green contexts: within 1.15x of each shape's best, where 128-token tiles of 8
    warps took up to 1.53x at 64 SMs)."""
    from polar_sparsity.kernels import _decode_attention

    assert _decode_attention._heuristic_tile(head_dim, smem) == tile


def test_small_batch_heuristics_take_longer_steps_where_the_sweeps_found_them_faster():
    """H200 sweeps at M = 16 and 64: the down projection of a narrow model (d / 128 at most half a wave)
    takes, at 16 < M <= 64, the one-program-per-SM tile that fills one wave the most (64 columns of
    256-neuron steps or 128 x 128 of 128-neuron steps; fewer splits on a tie), and at M <= 16 64-column
    tiles of 256-neuron steps (128 under 4096 neurons) split to two waves; the ungated up projection whose
    128-wide tiles fit one wave takes 128-wide steps, 4 warps. Elsewhere the earlier rules hold."""
    from polar_sparsity.kernels import selective_mlp_down, selective_mlp_up

    smem = 227 * 1024
    # SMs -> (BLOCK_D, BLOCK_K, splits), Llama-3-8B at M = 64: 64 columns x splits or 32 x splits <= SMs
    fullest = {64: (64, 256, 1), 80: (64, 256, 1), 96: (128, 128, 3), 108: (128, 128, 3), 132: (64, 256, 2)}
    for sms, tile in fullest.items():
        for n_sel in (4301, 7168, 14336):  # Llama-3-8B
            down = selective_mlp_down._heuristic(64, n_sel, 4096, sms, smem)
            assert (down["BLOCK_D"], down["BLOCK_K"], down["splits"]) == tile, (sms, n_sel)
            assert down["num_stages"] * (64 + down["BLOCK_D"]) * down["BLOCK_K"] * 2 <= smem
    for n_sel, splits in ((1434, 1), (2867, 2)):  # under 4096 too; each split >= 4 steps
        short = selective_mlp_down._heuristic(64, n_sel, 4096, 132, smem)
        assert (short["BLOCK_D"], short["BLOCK_K"], short["num_stages"], short["splits"]) == (
            64,
            256,
            3,
            splits,
        )
    assert selective_mlp_down._heuristic(16, 2867, 4096, 132, smem)["BLOCK_K"] == 128  # M <= 16: 128 there
    for sms in (108, 132):
        assert selective_mlp_down._heuristic(64, 11059, 9216, sms, smem)["BLOCK_K"] == 64  # wide model
        for n_sel in (4301, 7168, 14336):  # M = 16: the same steps, split to two waves
            down = selective_mlp_down._heuristic(16, n_sel, 4096, sms, smem)
            assert (down["BLOCK_D"], down["BLOCK_K"], down["splits"]) == (
                64,
                256,
                min(2 * sms // 64, n_sel // 1024),
            )
        assert selective_mlp_down._heuristic(16, 11059, 9216, sms, smem)["BLOCK_K"] == 128  # wide model
        up = selective_mlp_up._heuristic(64, 11059, 9216, sms, False, smem)  # OPT-66B, 87 tiles of 128
        assert (up["BLOCK_N"], up["BLOCK_K"], up["num_warps"], up["splits"]) == (128, 128, 4, 1)
        more = selective_mlp_up._heuristic(64, 18432, 9216, sms, False, smem)  # 144 tiles: over one wave
        assert (more["BLOCK_N"], more["BLOCK_K"], more["num_warps"]) == (128, 64, 8)
        gated = selective_mlp_up._heuristic(64, 11059, 4096, sms, True, smem)
        assert (gated["BLOCK_K"], gated["num_warps"]) == (64, 8)


def test_longer_steps_only_where_shared_memory_holds_their_stages():
    """A100 (163 KB): 128-neuron steps with 4 stages in place of 256 with 3; consumer GPUs (99 KB):
    the 64-step rule at M = 64 and 128-neuron steps at M = 16; the one-wave up rule needs 196 KB."""
    from polar_sparsity.kernels import selective_mlp_down, selective_mlp_up

    a100, consumer = 166912, 101376
    assert selective_mlp_down._long_steps(64, 7168, a100, True) == (128, 4)
    down = selective_mlp_down._heuristic(64, 7168, 4096, 128, a100)  # 64 columns of 128 x 2 splits
    assert (down["BLOCK_D"], down["BLOCK_K"], down["num_stages"], down["splits"]) == (64, 128, 4, 2)
    down = selective_mlp_down._heuristic(64, 7168, 4096, 128, consumer)  # RTX 4090-class: 128 SMs
    assert (down["BLOCK_K"], down["num_stages"]) == (64, 4)
    down = selective_mlp_down._heuristic(16, 7168, 4096, 128, consumer)
    assert (down["BLOCK_D"], down["BLOCK_K"], down["num_stages"]) == (64, 128, 4)
    for smem in (a100, consumer):
        up = selective_mlp_up._heuristic(64, 11059, 9216, 128, False, smem)
        assert up["BLOCK_K"] == 64 and up["num_stages"] >= 2


@pytest.mark.gpu
def test_first_use_tuning_on_gpu(tmp_path, monkeypatch):
    """On a GPU: a new key is timed, persisted in the cache and reused without timing again."""
    from polar_sparsity.kernels import selective_down, selective_mlp_down

    monkeypatch.setattr(_tuning, "_CHOSEN", {})
    monkeypatch.setattr(_tuning, "_HEURISTIC_KEYS", {})
    monkeypatch.setattr(_tuning, "_TUNED", set())
    monkeypatch.setattr(_tuning, "_SETTINGS", {"cache_dir": str(tmp_path), "mode": "tune", "shipped": False})
    # Three candidates keep the test short; what is tested is timing, persisting and reuse.
    few = selective_mlp_down._candidates(8, 1000, 512, 132, 228 * 1024)[:3]
    monkeypatch.setattr(selective_mlp_down, "_candidates", lambda *args: few)
    dev = torch.device("cuda")
    a = torch.randn(8, 1000, device=dev, dtype=torch.float16)
    w_t = torch.randn(3000, 512, device=dev, dtype=torch.float16)
    idx = torch.randperm(3000, device=dev)[:1000].int()
    selective_down(a, w_t, idx)
    key = selective_mlp_down.config_key(8, 1000, 512)
    assert key in _tuning.tuned_keys()
    cfg = _tuning.user_cache(dev).get(key)
    gpu = _common.gpu_facts(dev)
    heuristic = selective_mlp_down._heuristic(
        8, 1000, 512, gpu.sms, gpu.smem, gpu.operands_in_registers, gpu.tma
    )
    assert cfg in [heuristic, *few]  # timed first
    monkeypatch.setattr(_tuning, "_CHOSEN", {})  # a new process: read from the cache, not timed again
    monkeypatch.setattr(_tuning, "_TUNED", set())
    selective_down(a, w_t, idx)
    assert _tuning.chosen()[key] == cfg and not _tuning.tuned_keys()


@pytest.mark.gpu
def test_first_use_tuning_never_keeps_a_config_with_a_wrong_result_on_gpu(tmp_path, monkeypatch):
    """On a GPU, the real op: a candidate whose launch negates the result is timed, named in a warning
    and never kept, and the call still returns the right result."""
    from polar_sparsity.kernels import selective_down, selective_mlp_down
    from polar_sparsity.kernels.selective_mlp_down import selective_down_reference

    monkeypatch.setattr(_tuning, "_CHOSEN", {})
    monkeypatch.setattr(_tuning, "_HEURISTIC_KEYS", {})
    monkeypatch.setattr(_tuning, "_TUNED", set())
    monkeypatch.setattr(_tuning, "_SETTINGS", {"cache_dir": str(tmp_path), "mode": "tune", "shipped": False})
    real_launch = selective_mlp_down._launch

    def launch(a, w_t, idx, bias, out, cfg):
        real_launch(a, w_t, idx, bias, out, {k: v for k, v in cfg.items() if k != "negate"})
        if cfg.get("negate"):
            out.neg_()

    monkeypatch.setattr(selective_mlp_down, "_launch", launch)
    few = selective_mlp_down._candidates(8, 1000, 512, 132, 228 * 1024)[:2]
    monkeypatch.setattr(selective_mlp_down, "_candidates", lambda *args: [*few, dict(few[0], negate=1)])
    dev = torch.device("cuda")
    a = torch.randn(8, 1000, device=dev, dtype=torch.float16)
    w_t = torch.randn(3000, 512, device=dev, dtype=torch.float16)
    idx = torch.randperm(3000, device=dev)[:1000].int()
    with pytest.warns(UserWarning, match="negate"):
        out = selective_down(a, w_t, idx)
    key = selective_mlp_down.config_key(8, 1000, 512)
    assert "negate" not in _tuning.user_cache(dev).get(key)
    testing.assert_rel_close(out, selective_down_reference(a, w_t, idx, None), torch.float16, "tuned call")


def test_merged_tables_keep_later_configs_and_the_note(tmp_path):
    """merge_tables: later inputs override key by key; a shipped table's note survives a re-merge."""
    from polar_sparsity.kernels.bench.merge_tables import merge

    shipped = {"gpu": "GPU X", "sources": [{"file": "a.json"}], "configs": {"k1": {"v": 1}, "k2": {"v": 1}}}
    shipped["note"] = "how these were picked"
    swept = {"gpu": "GPU X", "source": "sweep", "env": {"gpu": "GPU X"}, "configs": {"k2": {"v": 2}}}
    paths = [tmp_path / "shipped.json", tmp_path / "swept.json"]
    for path, table in zip(paths, (shipped, swept), strict=True):
        path.write_text(json.dumps(table))
    out = merge(tmp_path / "out.json", paths)
    assert out["configs"] == {"k1": {"v": 1}, "k2": {"v": 2}}
    assert out["note"] == "how these were picked"
    assert [s["file"] for s in out["sources"]] == ["a.json", "swept.json"]


def test_the_tuning_log_appends_every_timed_candidate(tmp_path, monkeypatch):
    log = tmp_path / "tune.csv"
    _tuning.log_candidates(GPU, "up|K1024", [({"BLOCK_N": 64}, 12.5)])  # no log asked for: nothing
    assert not log.exists()
    monkeypatch.setenv(_tuning.TUNE_LOG_ENV, str(log))
    _tuning.log_candidates(GPU, "up|K1024", [({"BLOCK_N": 64}, 12.5), ({"BLOCK_N": 32, "stream_k": 1}, 11.0)])
    _tuning.log_candidates(GPU, "down|K1024", [({"BLOCK_D": 128}, 30.0)])
    rows = log.read_text().splitlines()
    assert rows[0] == "gpu,key,schedule,us,config"
    assert [r.split(",")[1:4] for r in rows[1:]] == [
        ["up|K1024", "grid", "12.50"],
        ["up|K1024", "stream-K", "11.00"],
        ["down|K1024", "grid", "30.00"],
    ]


@pytest.mark.parametrize("where", ["a directory", "a missing directory"])
def test_a_bad_tuning_log_path_is_named_before_timing(tmp_path, monkeypatch, where):
    bad = tmp_path if where == "a directory" else tmp_path / "missing" / "t.csv"
    monkeypatch.setenv(_tuning.TUNE_LOG_ENV, str(bad))
    timed = []
    with pytest.raises(ValueError, match=_tuning.TUNE_LOG_ENV):
        _tuning.tune("up|K1024", [{"BLOCK_N": 64}], timed.append, torch.device("cpu"), None)
    assert not timed  # nothing launched


def test_tuning_keeps_the_fastest_config_whose_result_is_the_first_configs(monkeypatch):
    """A wrong config is often the fastest one: the result of each timed config is compared with the
    first's (the heuristic's), and one that differs, or leaves an element unwritten, is never kept, is
    named in a warning and left out of the tuning log. The output buffer ends as it was found."""
    exact = torch.randn(4, 8, dtype=torch.float16)
    out = torch.zeros(4, 8, dtype=torch.float16)
    times = {"heuristic": 5.0, "wrong": 1.0, "rounded": 3.0, "unwritten": 2.0, "slow": 4.0}
    monkeypatch.setattr(_tuning, "log_candidates", lambda gpu, key, timed: logged.extend(timed))
    logged: list = []

    def run(cfg):
        name = cfg["name"]
        if name == "wrong":
            out.copy_(exact * 1.01)  # 1% off: more than fp16 rounding explains
        elif name == "unwritten":
            out[:, :-1] = exact[:, :-1]
        elif name == "rounded":  # another fp32 summation order: last-bit differences only
            out.copy_((exact.float() * (1 + 1e-4)).half())
        else:
            out.copy_(exact)
        return times[name]

    configs = [{"name": name} for name in times]
    with pytest.warns(UserWarning, match="computes a different result") as caught:
        best = _tuning.tune("down|K1024", configs, run, torch.device("cpu"), out)
    assert best == {"name": "rounded"}
    assert sorted(str(w.message).split("'")[3] for w in caught) == ["unwritten", "wrong"]
    assert [cfg["name"] for cfg, _ in logged] == ["heuristic", "rounded", "slow"]
    assert torch.equal(out, torch.zeros(4, 8, dtype=torch.float16))


def test_configs_agree_within_twice_the_kernels_tolerance():
    ref = torch.randn(1000, dtype=torch.float64)
    for dtype in (torch.float16, torch.bfloat16):
        tol = testing.agreement_tol(dtype)
        assert tol == 2 * testing.REL_TOL[dtype]
        assert testing.rel_error(ref * (1 + 0.9 * tol), ref) <= tol
        assert testing.rel_error(ref * (1 + 1.1 * tol), ref) > tol
    unwritten = ref.clone()
    unwritten[3] = float("nan")
    assert testing.rel_error(unwritten, unwritten.clone()) == 0.0  # unwritten by both: not compared
    assert testing.rel_error(unwritten, ref) == float("inf") == testing.rel_error(ref, unwritten)


def test_tuning_logs_report_the_fastest_config_of_each_schedule():
    timed = [({"splits": 2}, 3.0), ({"splits": 1, "stream_k": 1}, 2.0), ({"splits": 4}, 1.5)]
    assert _tuning.best_by_schedule(timed) == "grid 1.5 us, stream-K 2.0 us"


def test_short_shared_memory_halves_the_steps_before_it_drops_stages():
    def stage(bk):
        return (64 + 32) * bk * 2  # a 64-row tile and a 32-neuron weight tile per step

    assert _common.fit_steps(256, 4, stage, 227 * 1024) == (256, 4)  # all four 48 KB stages fit
    assert _common.fit_steps(256, 4, stage, 99 * 1024) == (128, 3)  # not 1 stage of 256
    assert _common.fit_steps(64, 2, stage, 99 * 1024) == (64, 2)  # two wanted, two kept
    assert _common.fit_steps(32, 4, lambda bk: 200 * 1024, 99 * 1024) == (32, 1)  # nothing shorter


def test_register_fit_only_where_tensor_cores_read_registers():
    assert _common.fit_registers(128, 64, 256, 4, 2, operands_in_registers=False) == (256, 4)
    assert _common.fit_registers(128, 64, 256, 4, 2, operands_in_registers=True) == (128, 8)
    assert _common.fit_registers(64, 64, 64, 4, 1, operands_in_registers=True) == (64, 4)
    assert not _common.accumulators_fit(256, 128, 8)  # 128 fp32 a thread
    assert not _common.operands_in_registers(torch.device("cpu"))


@pytest.mark.parametrize("smem", [99 * 1024, 163 * 1024])
def test_gemm_heuristics_on_mma_sync_gpus_keep_pipelines_and_registers(smem):
    """Ada / consumer Blackwell (99 KB) and A100 (163 KB) shapes: every heuristic tile keeps >= 3
    stages, steps of at most 128 and at most 64 accumulators a thread; the same shapes on a GPU
    whose tensor cores read shared memory keep the tiles tuned on the H200 (256-neuron steps)."""
    from polar_sparsity.kernels import selective_mlp_down, selective_mlp_up

    for (d, n, gated), M, density in itertools.product(
        ((9216, 36864, False), (4096, 14336, True)), (1, 16, 64, 128, 256), (0.1, 0.3, 0.5, 1.0)
    ):
        k = round(density * n)
        up = selective_mlp_up._heuristic(M, k, d, 128, gated, smem, True)
        down = selective_mlp_down._heuristic(M, k, d, 128, smem, True)
        for cfg, bn, accs in ((up, up.get("BLOCK_N"), 2 if gated else 1), (down, down.get("BLOCK_D"), 1)):
            shape = (cfg["BLOCK_M"], bn, cfg["BLOCK_K"], cfg["num_warps"])
            assert cfg["num_stages"] >= 3 and shape[2] <= _common.REGISTER_STEP, (M, k, d, cfg)
            assert _common.accumulators_fit(shape[0], shape[1], shape[3], accs), (M, k, d, cfg)
    assert selective_mlp_up._heuristic(64, 1434, 4096, 128, True, 227 * 1024)["BLOCK_K"] == 256


def test_tuning_times_the_heuristic_and_known_configs_before_the_candidates():
    """A tuning run can then never keep a config slower than the heuristic's (on a GPU whose fitted
    heuristic tile is not among the candidates) or a known one; each config is timed once."""
    candidates = [{"BLOCK_N": 64}, {"BLOCK_N": 128}]
    assert _tuning.with_first([HEURISTIC], candidates) == [HEURISTIC, *candidates]
    assert _tuning.with_first([None, {"BLOCK_N": 128}], candidates) == [{"BLOCK_N": 128}, {"BLOCK_N": 64}]


def test_down_activation_tile_by_tma_for_64_and_256_row_tiles():
    """The H200 A/B's rule: 64-row tiles (M = 33-64) and whole-batch 256-row tiles load the activation
    tile by TMA on a GPU with TMA; 16- and 128-row tiles, and GPUs without TMA, keep per-thread copies."""
    from polar_sparsity.kernels import selective_mlp_down

    smem = 227 * 1024
    for M, rows in ((16, 16), (64, 64), (128, 128), (200, 256), (256, 256)):
        cfg = selective_mlp_down._heuristic(M, 18432, 9216, 132, smem, False, True)
        assert cfg["BLOCK_M"] == rows and ("tma_a" in cfg) == (rows in (64, 256)), (M, cfg)
        assert "tma_a" not in selective_mlp_down._heuristic(M, 18432, 9216, 132, smem, False, False)
    for cfg in selective_mlp_down._candidates(256, 18432, 9216, 132, smem, True):
        assert ("tma_a" in cfg) == (cfg["BLOCK_M"] in (64, 256)), cfg
    descriptors = _common.TensorDescriptor is not None  # Triton >= 3.4
    assert _common.has_tma(torch.device("cpu")) == descriptors  # the interpreter runs the TMA path too
    hopper_and_b200 = [False, descriptors, descriptors, False]
    assert [_common.tma_feeds_shared_memory_mma(m) for m in (8, 9, 10, 12)] == hopper_and_b200


def test_ungated_up_at_small_batches_runs_stream_k_at_any_count_of_tiles():
    """H200 cut to 96-132 SMs, OPT-66B at M = 1, 5-20% of the neurons (2026-11-30): the ungated up
    projection at M <= 16 takes 64-wide tiles under stream-K even with fewer tiles than SMs (split-d to
    one wave took up to 1.23x the best, 32-wide tiles of few neurons 1.23x; this 1.00-1.12x). The gated
    one keeps its split rule for few neurons."""
    from polar_sparsity.kernels import selective_mlp_up

    smem = 227 * 1024
    for sms, k in ((132, 1843), (96, 3686), (112, 3686), (132, 7373)):
        cfg = selective_mlp_up._heuristic(1, k, 9216, sms, False, smem)
        assert (cfg["BLOCK_N"], cfg["splits"], cfg.get("stream_k")) == (64, 1, 2), (sms, k, cfg)
    gated = selective_mlp_up._heuristic(1, 1434, 4096, 132, True, smem)
    assert "stream_k" not in gated and gated["splits"] > 1, gated


def test_a_narrow_models_whole_batch_takes_the_down_tile_whose_busiest_sm_streams_less():
    """At M > 128 on a narrow model (d / 128 under half a wave), short of the whole-batch tile, the down
    projection takes 128 x 128 tiles of 8 warps where their busiest SM streams fewer weight bytes than
    with 128 x 64 tiles, and 128 x 64 on a tie (H200 cut to 112-132 SMs, Llama-3-8B at M = 200 and 256,
    2026-11-30: 128 x 128 took 1.00-1.11x the best from 4,301 neurons at 112 SMs, where 128 x 64 took up
    to 1.32x; 128 x 64 1.00-1.06x below 4,301 neurons, where 128 x 128 took up to 1.27x)."""
    from polar_sparsity.kernels import selective_mlp_down

    smem = 227 * 1024

    def tile(M: int, k: int, sms: int) -> tuple[int, int]:
        cfg = selective_mlp_down._heuristic(M, k, 4096, sms, smem)
        return cfg["BLOCK_D"], cfg["splits"]

    for M, k in itertools.product((200, 256), (8602, 14336)):
        assert tile(M, k, 112) == (128, 3), (M, k)
    for sms in (96, 112):
        assert tile(256, 1434, sms)[0] == tile(256, 2867, sms)[0] == 64, sms
        assert tile(128, 14336, sms)[0] == 64, sms  # M <= 128: the batch-tile rule as before
    assert all(tile(256, k, 132)[0] == 64 for k in (1434, 4301, 8602, 14336))  # ties on 132 SMs


def test_the_whole_batch_down_tile_from_a_third_of_a_wave_of_columns():
    """The whole-batch 256 x 128 down tile (stream-K) serves long reductions once its 128-column tiles
    fill a third of a wave: Llama-3-70B (64 of them) on the whole H200 took 1.22-1.45x the best at M =
    200 / 256 and 30-100% of the neurons with split 128-row tiles, 1.01-1.06x with this tile; Llama-3-8B
    (32) takes it on 96 SMs, not on 112 or 132 (H200 and green contexts, 2026-11-30)."""
    from polar_sparsity.kernels import selective_mlp_down

    smem = 227 * 1024

    def whole_batch(d: int, k: int, sms: int) -> bool:
        cfg = selective_mlp_down._heuristic(256, k, d, sms, smem)
        return (cfg["BLOCK_M"], cfg.get("stream_k")) == (256, 1)

    assert whole_batch(8192, 8602, 132) and whole_batch(8192, 28672, 132)
    assert not whole_batch(8192, 2867, 132)  # short reductions (under 96 steps of 64) keep split tiles
    assert whole_batch(4096, 14336, 96) and not whole_batch(4096, 14336, 112)


def test_small_batch_splits_on_gpus_with_fewer_sms_than_tiles():
    """H200 cut to 48-112 SMs (green contexts, 2026-11-30): where a model's 128-column tiles outnumber
    the SMs, the down projection at M <= 16 multiplies its three waves by tiles / SMs rounded up (OPT-66B
    at 64 SMs: 5 splits, where 2 took 1.12-1.25x the best), and at 16 < M <= 64 takes the split count of
    the large-batch wave cost over its resident programs, splits of >= 16 steps; gated up at M <= 16
    takes 32-wide tiles of 256-neuron steps only where all of them run at once (Llama-3-8B at 64 SMs,
    30%: 1.28-1.32x otherwise)."""
    from polar_sparsity.kernels import selective_mlp_down, selective_mlp_up

    smem = 227 * 1024
    assert selective_mlp_down._heuristic(16, 11059, 9216, 64, smem)["splits"] == 5  # 72 tiles, 3 x 2 waves
    assert selective_mlp_down._heuristic(16, 11059, 9216, 48, smem)["splits"] == 4
    assert selective_mlp_down._heuristic(16, 11059, 9216, 132, smem)["splits"] == 5  # 72 < 132: as before
    for sms in (48, 64, 132):  # 128-neuron steps, 3 stages (64-neuron steps took up to 1.24x at 48 SMs)
        down = selective_mlp_down._heuristic(16, 36864, 9216, sms, smem)
        assert (down["BLOCK_D"], down["BLOCK_K"], down["num_stages"]) == (128, 128, 3), sms
    for sms in (48, 64):
        down = selective_mlp_down._heuristic(64, 22118, 9216, sms, smem)
        slots = 2 * sms  # 64 x 128 tiles of 4 stages: two resident per SM
        assert down["splits"] == selective_mlp_down._large_batch_splits(72, slots, 64, 22118, 64, 16), sms
    assert selective_mlp_down._heuristic(64, 22118, 9216, 48, smem)["splits"] == 4  # three whole waves
    assert selective_mlp_down._heuristic(64, 3686, 9216, 48, smem)["splits"] == 1  # splits of >= 16 steps
    assert selective_mlp_down._heuristic(64, 11059, 9216, 132, smem)["splits"] == 3  # one wave, as before
    for sms, n_sel, tile in ((64, 4301, (32, 128)), (132, 2867, (32, 256)), (132, 10035, (32, 128))):
        up = selective_mlp_up._heuristic(16, n_sel, 4096, sms, True, smem)
        assert (up["BLOCK_N"], up["BLOCK_K"], up["splits"]) == (*tile, 1), (sms, n_sel)
