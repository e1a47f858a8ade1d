"""The config sweep's table pick and argument checks (CPU; the timing itself needs a GPU)."""

from __future__ import annotations

import re

import pytest
import torch

from polar_sparsity.kernels.bench import config_sweep
from polar_sparsity.kernels.testing import assert_rel_close


def _row(key: str, k: int, cfg: dict, ratio: float) -> dict:
    return dict(key=key, model="m", op="down", M=256, context="", k=k, cfg=cfg, ratio_to_best=ratio)


def test_bucket_pick_minimises_the_worst_ratio_over_the_keys_shapes():
    a, b, c = {"BLOCK_D": 64}, {"BLOCK_D": 128}, {"BLOCK_D": 256}
    rows = [
        _row("K8192", 4301, a, 1.00),
        _row("K8192", 4301, b, 1.10),
        _row("K8192", 4301, c, 1.02),
        _row("K8192", 7168, a, 1.30),  # best at one shape, poor at the other
        _row("K8192", 7168, b, 1.00),
        _row("K8192", 7168, c, 1.05),
    ]
    assert config_sweep.bucket_picks(rows) == {"K8192": c}


def test_bucket_pick_skips_configs_that_failed_or_were_not_timed_at_every_shape():
    a, b = {"BLOCK_D": 64}, {"BLOCK_D": 128}
    rows = [
        _row("K4096", 2867, a, 1.00),
        _row("K4096", 2867, b, 1.01),
        _row("K4096", 4096, a, float("nan")),  # did not run at this shape
        _row("K4096", 4096, b, 1.00),
        _row("K2048", 1434, a, float("nan")),  # nothing ran: no pick for the key
    ]
    assert config_sweep.bucket_picks(rows) == {"K4096": b}


def test_a_config_timed_twice_at_one_shape_counts_once_at_its_faster_time():
    a, b = {"BLOCK_D": 64}, {"BLOCK_D": 128}
    rows = [
        _row("K16384", 11059, a, 1.00),  # as a candidate
        _row("K16384", 11059, a, 1.03),  # again as the heuristic's config
        _row("K16384", 11059, b, 1.01),
    ]
    assert config_sweep.bucket_picks(rows) == {"K16384": a}


def test_the_fastest_candidates_and_the_heuristic_and_table_configs_are_timed_twice(monkeypatch):
    """Each config's first timing drifts upward with its place in the run; the second pass times the
    three fastest candidates, the heuristic's and the table's config again and keeps the faster."""
    sources = ["candidate"] * 6 + ["heuristic", "table"]
    first = [50.0, 10.0, 30.0, None, 20.0, 40.0, 25.0, 35.0]  # None: does not compile
    timed: list[int] = []

    def fake_time_graph(fns, reps):
        i = fns[0]
        if first[i] is None:
            raise RuntimeError("out of resource: shared memory")
        timed.append(i)
        return first[i] - (5.0 if timed.count(i) == 2 else 0.0)  # the second timing runs 5 us faster

    monkeypatch.setattr(config_sweep, "time_graph", fake_time_graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    configs = [(src, {"id": i}) for i, src in enumerate(sources)]
    sweep = config_sweep.Sweep("up|K8", configs, lambda cfg: [cfg["id"]])
    rows = config_sweep.time_configs(sweep, {"M": 256})
    assert sorted(i for i in set(timed) if timed.count(i) == 2) == [1, 2, 4, 6, 7]
    us = [r["us"] for r in rows]
    assert us[:3] == [50.0, 5.0, 25.0] and us[3] != us[3] and us[4:] == [15.0, 40.0, 20.0, 30.0]
    assert rows[6]["ratio_to_best"] == 4.0 and [r["source"] for r in rows] == sources


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "gpt-5"], "unknown model(s) ['gpt-5']"),
        (["--density", "0,0.5"], "densities [0.0] are outside (0, 1]"),
        (["--batch", "0"], "batch sizes [0] must be >= 1"),
        (["--op", "up,gemv"], "unknown op(s) ['gemv']; choose from ['up', 'down', 'attn']"),
        (["--op", "attn", "--context", "0"], "context lengths [0] must be >= 1"),
        (["--out", "no_such_dir/s.csv"], "output path(s) ['no_such_dir/s.csv'] must name a file"),
        (["--save-table", "."], "output path(s) ['.'] must name a file"),
        (["--sms", "64,0"], "SM counts [0] must be >= 1"),
        (["--sms", "64", "--save-table", "t.json"], "keeps configs for the whole GPU; drop --sms [64]"),
    ],
)
def test_bad_arguments_are_named_before_any_work(argv, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        config_sweep.main(argv)


def test_a_saved_table_is_what_merge_tables_merges(tmp_path, monkeypatch):
    from polar_sparsity.kernels.bench import _harness, merge_tables

    env = {"date": "2026-11-29", "gpu": "NVIDIA H200", "triton": "3.6.0"}
    monkeypatch.setattr(_harness, "env_info", lambda: env)  # the one GPU query; no GPU here
    path = tmp_path / "sweep.json"
    _harness.save_table(
        path, "bench.config_sweep (graph-timed)", {"down|M64": {"BLOCK_D": 64}, "down|M16": {}}
    )
    assert not (tmp_path / "sweep.json.tmp").exists()
    merged = merge_tables.merge(tmp_path / "out.json", [path])
    assert merged["gpu"] == "NVIDIA H200"
    assert list(merged["configs"]) == ["down|M16", "down|M64"]
    assert merged["sources"][0]["source"] == (
        "python -m polar_sparsity.kernels.bench.config_sweep (graph-timed) on NVIDIA H200"
    )


def test_a_sweep_lists_the_heuristic_then_the_candidates_and_launches_every_input():
    calls = []
    out = torch.zeros(2)

    def launch(cfg, x):
        calls.append((cfg["a"], x))

    sweep = config_sweep._sweep("key", [{"a": 1}], {"a": 2}, torch.device("cpu"), launch, [10, 11], out)
    assert [source for source, _ in sweep.configs] == ["heuristic", "candidate"]  # no table on the CPU
    assert sweep.out is out
    for launch in sweep.launches({"a": 3}):
        launch()
    assert calls == [(3, 10), (3, 11)]


def _spy(monkeypatch, module, calls: list) -> None:
    """Record the arguments of ``module._launch`` (the launch the sweep times) and run it."""
    real = module._launch
    monkeypatch.setattr(module, "_launch", lambda *args: (calls.append(args), real(*args)))


@pytest.mark.parametrize("op", ["up", "down"])
def test_the_gemm_sweep_computes_the_op_under_each_config_it_times(op, monkeypatch, gen):
    """Tiny shape, CPU interpreter (or GPU): a launch of the sweep (heuristic config and the last
    candidate) writes the op's result, checked against the torch reference in fp32."""
    from polar_sparsity.kernels import selective_mlp_down, selective_mlp_up
    from polar_sparsity.kernels.bench import shapes

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = shapes.ModelShape("tiny", hidden=64, ffn=128, mlp="relu")
    monkeypatch.setitem(config_sweep.PAPER_MODELS, "tiny", tiny)
    monkeypatch.setattr(config_sweep, "rotations", lambda nbytes: 2)  # sized to L2: needs a GPU
    w = {
        name: torch.randn(*shape, generator=gen).half().to(dev)
        for name, shape in (("w_up", (128, 64)), ("b_up", (128,)), ("w_down_t", (128, 64)), ("b_down", (64,)))
    }
    w["w_gate"] = None
    module = selective_mlp_up if op == "up" else selective_mlp_down
    calls: list = []
    _spy(monkeypatch, module, calls)
    sweep = config_sweep._gemm_sweep(op, 4, 32, "tiny", [w])
    for source, cfg in (sweep.configs[-1], sweep.configs[0]):
        launches = sweep.launches(cfg)
        assert len(launches) == 2, source
        launches[1]()
        if op == "up":
            x, _, w_up, b_up, idx, out, relu, _ = calls[-1]
            assert relu and w_up is w["w_up"]
            ref = selective_mlp_up.selective_up_reference(x, w_up, idx, b_up, activation="relu")
        else:
            a, w_down_t, idx, bias, out, _ = calls[-1]
            ref = selective_mlp_down.selective_down_reference(a, w_down_t, idx, bias)
        assert idx.shape == (32,) and len(set(idx.tolist())) == 32
        assert_rel_close(out, ref, torch.float16, f"{op} {source} {cfg}")


def test_the_attention_sweep_computes_selective_attention(monkeypatch, gen):
    from polar_sparsity.kernels import _decode_attention

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(config_sweep, "rotations", lambda nbytes: 2)
    calls: list = []
    _spy(monkeypatch, _decode_attention, calls)
    shapes = ((2, 8, 64), (2, 2, 32, 64), (2, 2, 32, 64))
    q, k, v = (torch.randn(*s, generator=gen).half().to(dev) for s in shapes)
    sweep = config_sweep._attn_sweep(2, 1, (q, k, v))  # GQA: 2 KV groups of 4 heads, one kept per sequence
    assert sweep.key == _decode_attention.config_key(64, 4, 2, 32)
    sweep.launches(sweep.configs[-1][1])[0]()
    _, _, _, seqlens, idx, out, _, n_sel, group, _, zero_fill = calls[-1]
    assert (n_sel, group, zero_fill) == (1, 4, True)
    ref = _decode_attention.decode_attention_reference(q, k, v, seqlens, idx)
    assert_rel_close(out, ref, torch.float16, "attention")


def test_planning_for_sms_plans_cuda_launches_for_that_many_sms_inside_the_block():
    """What ``--sms`` relies on: heuristics and stream-K grids read the planned count, not the device's."""
    from polar_sparsity.kernels import _common

    cuda = torch.device("cuda", 0)  # only the planned count is read: no GPU needed
    with _common.planning_for_sms(64):
        assert _common.num_sms(cuda) == 64
        with _common.planning_for_sms(32):
            assert _common.num_sms(cuda) == 32
        assert _common.num_sms(cuda) == 64
        assert _common.num_sms(torch.device("cpu")) == 8  # the interpreter's grids stay tiny
    with pytest.raises(RuntimeError, match="inside"), _common.planning_for_sms(16):
        raise RuntimeError("inside")
    assert _common._planned_sms is None


def test_a_config_whose_result_differs_from_the_heuristics_is_timed_as_not_running(monkeypatch):
    """The reference is the first config (the heuristic's); a config that computes something else, or
    leaves part of the output unwritten, gets NaN (never a ratio, never a pick), and the buffer ends as
    it was found."""
    exact = torch.arange(8, dtype=torch.float16)
    out = torch.full((8,), 7.0, dtype=torch.float16)

    def launch(cfg):
        if cfg["id"] == 2:
            out.copy_(exact * 1.5)  # a wrong result
        elif cfg["id"] == 3:
            out[:-1] = exact[:-1]  # the last element never written
        else:
            out.copy_(exact)

    monkeypatch.setattr(config_sweep, "time_graph", lambda fns, reps: (fns[0](), 10.0)[1])
    configs = [("heuristic", {"id": 0}), *(("candidate", {"id": i}) for i in (1, 3, 2))]
    sweep = config_sweep.Sweep("up|K8", configs, lambda cfg: [lambda: launch(cfg)], out)
    with pytest.warns(UserWarning, match="computes a different result") as caught:
        rows = config_sweep.time_configs(sweep, {"model": "tiny", "op": "up", "M": 4, "k": 8})
    assert [r["us"] == r["us"] for r in rows] == [True, True, False, False]  # ids 0, 1 | 3, 2
    named = {str(w.message).split(" for ")[0].removeprefix("kernel config ") for w in caught}
    assert named == {"{'id': 2}", "{'id': 3}"}
    assert torch.equal(out, torch.full((8,), 7.0, dtype=torch.float16))
    assert config_sweep.bucket_picks(rows) == {"up|K8": {"id": 0}}
