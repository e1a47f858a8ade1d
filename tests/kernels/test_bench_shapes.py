"""The benchmarks' shape options on the CPU: the registry, model reading, option parsing, the refusals
and the dry run (nothing here launches a kernel or allocates a benchmark tensor)."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from polar_sparsity.kernels.bench import __main__ as bench_main
from polar_sparsity.kernels.bench import cli, shapes
from polar_sparsity.kernels.bench.shapes import ModelShape, ShapeError, build_cases, load_model
from polar_sparsity.models.families import build_hf_config, family_for_config

REPO = Path(__file__).resolve().parents[2]
MODEL_CONFIGS = sorted((REPO / "conf" / "model").glob("*.yaml"))
GIB = 2**30


def _dry_run(capsys, *argv: str) -> str:
    bench_main.main([*argv, "--dry-run"])
    return capsys.readouterr().out


def _usage_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        bench_main.main([*argv, "--dry-run"])
    assert exc.value.code == 2
    return capsys.readouterr().err


def _project_geometry(path: Path) -> ModelShape:
    """The shape the project's family adapter reads off the same model config."""
    doc = yaml.safe_load(path.read_text())
    hf = build_hf_config(doc["family"], doc["architecture"])
    g = family_for_config(hf).geometry(hf)
    return ModelShape(
        doc["name"], g.hidden_size, g.num_heads, g.num_kv_heads, g.head_dim, g.ffn_dim, g.mlp_kind.value
    )


# --- The registry: the paper's tables, unchanged -------------------------------------------------


def test_default_cases_are_the_papers_tables():
    labels = {b: [c.label for c in build_cases(b)] for b in shapes.BENCHES}
    assert labels["attn"] == ["opt-66b B=64 N=1920 72x128", "llama-2-7b B=256 N=4096 32x128"]
    assert labels["gqa"] == ["llama-3-70b B=64 N=8192 64q/8kv x128"]
    assert labels["block"] == ["opt-66b B=64 N=1920", "llama-3-70b B=64 N=8192"]
    assert [c.batch for c in build_cases("gemm")] == [1, 16, 64, 256] * 2
    assert [c.batch for c in build_cases("mlp")] == [16, 64] * 2
    # The MLP benchmarks share one model list (it used to be written twice).
    assert {c.model for c in build_cases("gemm")} == {c.model for c in build_cases("mlp")}


@pytest.mark.parametrize(
    ("paper", "config"),
    [
        ("opt-66b", "opt-66b"),
        ("llama-2-7b", "llama-2-7b"),
        ("llama-3-8b", "llama-3.1-8b"),
        ("llama-3-70b", "llama-3.1-70b"),
    ],
)
def test_paper_models_have_the_project_configs_dimensions(paper, config):
    assert shapes.PAPER_MODELS[paper] == replace(load_model(config, cwd=REPO), name=paper)


def test_default_densities_and_kept_units():
    (opt,) = [c for c in build_cases("attn") if c.model.name == "opt-66b"]
    assert [p.heads for p in opt.points] == [7, 14, 18, 22, 29, 36, 43, 50, 58, 65, 72]
    (gqa,) = build_cases("gqa")
    assert [p.heads for p in gqa.points] == list(range(1, 9))
    opt_block, llama_block = build_cases("block")
    assert [p.neurons for p in opt_block.points][:2] == [3686, 7373]  # ReLU: heads and neurons sparse
    assert all(p.neurons is None for p in llama_block.points)  # SwiGLU: the MLP stays dense


# --- Reading a model's shape --------------------------------------------------------------------------


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.stem)
def test_model_config_matches_the_family_adapter(path):
    assert load_model(path.stem, cwd=REPO) == _project_geometry(path)
    assert load_model(str(path)) == _project_geometry(path)


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.stem)
def test_checkpoint_config_json_matches_the_family_adapter(path, tmp_path):
    doc = yaml.safe_load(path.read_text())
    checkpoint = tmp_path / doc["name"]
    build_hf_config(doc["family"], doc["architecture"]).save_pretrained(checkpoint)
    assert load_model(str(checkpoint)) == _project_geometry(path)


def test_shipped_checkpoints_read():
    tiny = REPO / "polar_sparsity" / "assets" / "models"
    assert load_model(str(tiny / "tiny-llama")) == ModelShape("tiny-llama", 256, 8, 2, 32, 768, "gated")
    assert load_model(str(tiny / "tiny-opt")) == ModelShape("tiny-opt", 256, 8, 8, 32, 1024, "relu")


def test_unknown_model_and_unsupported_config(tmp_path):
    with pytest.raises(ShapeError, match="'nope' is not a model config.*qwen2.5-7b"):
        load_model("nope", cwd=REPO)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 768}))
    with pytest.raises(ShapeError, match="model_type 'gpt2' is not supported; valid: \\['opt', 'llama'"):
        load_model(str(tmp_path))
    with pytest.raises(ShapeError, match="has no config.json"):
        load_model(str(REPO / "conf"))


# --- Option parsing -----------------------------------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("bench")
    cli.add_shape_options(p)
    return p.parse_args(list(argv))


def test_lists_and_sizes_parse():
    args = _args("gemm", "--batch", "1,16,64", "--density", "0.25,0.5", "--memory-limit", "80GiB")
    assert args.batch == [1, 16, 64] and args.density == [0.25, 0.5] and args.memory_limit == 80 * GIB
    assert [cli.parse_bytes(s) for s in ("24G", "1GB", "1000", "0.5GiB")] == [24 * GIB, 10**9, 1000, GIB // 2]
    with pytest.raises(argparse.ArgumentTypeError, match="'12 parsecs' is not a size"):
        cli.parse_bytes("12 parsecs")


def test_explicit_dimensions_describe_or_override_a_model():
    custom = cli.model_from_args(
        _args("block", "--hidden", "2048", "--heads", "16", "--ffn", "8192", "--mlp", "relu")
    )
    assert custom == ModelShape("custom", 2048, 16, 16, 128, 8192, "relu")
    changed = cli.model_from_args(
        _args("gqa", "--model", str(REPO / "conf/model/llama-3.1-8b.yaml"), "--kv-heads", "4")
    )
    assert (changed.name, changed.heads, changed.kv_heads, changed.ffn) == ("llama-3.1-8b", 32, 4, 14336)
    assert cli.model_from_args(_args("attn")) is None  # the paper's tables


def test_counts_become_points():
    model = load_model("qwen2.5-7b", cwd=REPO)
    (case,) = build_cases("block", model, batches=[32], contexts=[4096], kept_heads=[1, 2])
    assert [(p.density, p.heads, p.neurons) for p in case.points] == [(0.25, 1, None), (0.5, 2, None)]
    opt = load_model("opt-13b", cwd=REPO)
    (case,) = build_cases(
        "block", opt, batches=[8], contexts=[512], kept_heads=[10, 20], active_neurons=[2048, 4096]
    )
    assert [(p.heads, p.neurons) for p in case.points] == [(10, 2048), (20, 4096)]
    (case,) = build_cases("gemm", opt, batches=[1], active_neurons=[2048])
    assert (case.points[0].density, case.points[0].neurons) == (0.1, 2048)


# --- Refusals before anything is allocated ------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ("gqa", "--heads", "32", "--kv-heads", "6", "--head-dim", "128"),
            "32 heads are not divisible by 6 KV heads",
        ),
        (("gemm", "--model", "opt-13b", "--density", "1.5"), r"density 1.5 is outside \(0, 1\]"),
        (("gemm", "--model", "opt-13b", "--density", "0"), r"density 0.0 is outside \(0, 1\]"),
        (
            ("gemm", "--model", "opt-13b", "--active-neurons", "30000"),
            "--active-neurons 30000 is not in 1..20480",
        ),
        (("attn", "--model", "opt-13b", "--kept-heads", "41"), "--kept-heads 41 is not in 1..40"),
        (("block", "--model", "llama-3.1-8b", "--kept-heads", "9"), "8 KV groups"),
        (("attn", "--model", "qwen2.5-7b"), "28 heads and 4 KV heads: use gqa"),
        (("gqa", "--model", "opt-13b"), "use attn"),
        (("gemm", "--model", "opt-13b", "--context", "4096"), "gemm has no KV cache"),
        (("gemm", "--model", "opt-13b", "--kept-heads", "4"), "gemm has no attention"),
        (("block", "--model", "qwen2.5-7b", "--active-neurons", "4096"), "keeps dense"),
        (("gemm", "--model", "opt-13b", "--density", "0.5", "--active-neurons", "4"), "not both"),
        (("gemm", "--hidden", "4096", "--ffn", "8192"), "lacks --mlp"),
        (("attn", "--heads", "8", "--head-dim", "68"), "head dim 68 .* multiple of 8 in 16..256"),
        (("gemm", "--model", "opt-13b", "--batch", "0"), r"--batch \[0\] must list positive integers"),
        (("gemm", "--batch", "1,x"), "'1,x' is not a comma-separated list of integers"),
        (("attn", "--density", "0.5", "--kept-heads", "4"), "not allowed with argument"),
    ],
)
def test_invalid_options_fail_with_a_clear_message(capsys, argv, message):
    err = _usage_error(capsys, *argv)
    assert re.search(message, err), err


def test_memory_refusal_names_the_bytes(capsys):
    argv = ("block", "--model", "qwen2.5-7b", "--batch", "128", "--context", "4096,32768", "--density", "0.5")
    with pytest.raises(SystemExit) as exc:
        bench_main.main([*argv, "--dry-run", "--memory-limit", "8GiB"])
    message = str(exc.value.code)
    assert "refused" in message and "qwen2.5-7b B=128 N=32768: needs 8.62 GiB" in message
    assert "N=4096" not in message  # the case that fits is not refused
    out = capsys.readouterr().out
    assert "| yes" in out and "| NO" in out


def test_block_bytes_count_the_kv_cache_and_weights():
    model = load_model("qwen2.5-7b", cwd=REPO)
    (short,) = build_cases("block", model, batches=[128], contexts=[4096], densities=[0.5])
    (long,) = build_cases("block", model, batches=[128], contexts=[32768], densities=[0.5])
    kv_growth = 2 * 128 * 4 * (32768 - 4096) * 128 * 2  # K and V, fp16
    assert cli.bytes_needed(long, 0) - cli.bytes_needed(short, 0) == kv_growth
    weights = (3 * 18944 * 3584 + 1024 * (3584 + 18944)) * 2
    assert cli.bytes_needed(short, 0) > weights + 2 * 128 * 4 * 4096 * 128 * 2


# --- The dry run ---------------------------------------------------------------------------------------


def test_dry_run_lists_the_cases_and_their_memory(capsys):
    out = _dry_run(
        capsys,
        "block",
        "--model",
        "qwen2.5-7b",
        "--batch",
        "32,128",
        "--context",
        "4096",
        "--density",
        "0.25,0.5",
    )
    rows = [line for line in out.splitlines() if line.startswith("block |")]
    assert [r.split(" | ")[1] for r in rows] == ["qwen2.5-7b B=32 N=4096", "qwen2.5-7b B=128 N=4096"]
    assert all(r.split(" | ")[5] == "1,2" for r in rows)  # 25% and 50% of 4 KV groups
    out = _dry_run(capsys, "gemm", "--model", "opt-13b", "--batch", "1,16,64", "--memory-limit", "80GiB")
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("gemm |")]
    assert [r[2] for r in rows] == ["1", "16", "64"] and all(r[-1] == "yes" for r in rows)


def test_dry_run_all_picks_the_matching_attention_benchmark(capsys):
    out = _dry_run(capsys, "all", "--model", "llama-3.1-8b", "--context", "1024")
    benches = {
        line.split(" | ")[0] for line in out.splitlines() if " | " in line and not line.startswith("bench")
    }
    assert benches == {"gqa", "gemm", "mlp", "block"}


def test_all_passes_each_option_where_it_applies(capsys):
    out = _dry_run(capsys, "all", "--model", "llama-3.1-8b", "--active-neurons", "2048")
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith(("gemm |", "block |"))]
    assert {r[6] for r in rows if r[0] == "gemm"} == {"2048"}
    assert [r[6] for r in rows if r[0] == "block"] == ["-"]  # the SwiGLU block keeps its MLP dense


# --- On a GPU: every benchmark end to end at a small user shape ---------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("bench", "kv_heads"), [("all", "2"), ("attn", "8")], ids=["all-gqa-relu", "attn-mha"]
)
def test_benchmarks_run_at_a_user_shape(tmp_path, bench, kv_heads):
    import csv
    import math

    dims = ["--hidden", "1024", "--heads", "8", "--kv-heads", kv_heads, "--head-dim", "128"]
    dims += ["--ffn", "4096", "--mlp", "relu", "--batch", "4", "--density", "0.5,1"]
    if bench != "attn":
        dims += ["--context", "256"]
    bench_main.main([bench, *dims, "--out", str(tmp_path)])
    ran = ["attn"] if bench == "attn" else ["gqa", "gemm", "mlp", "block"]
    for name in ran:
        rows = list(csv.DictReader((tmp_path / f"{name}.csv").open()))
        assert rows and (tmp_path / f"{name}.png").is_file(), name
        ours = [r for r in rows if "ours" in r["method"] or "sparse" in r["method"]]
        assert ours and all(math.isfinite(float(r["latency_us"])) for r in ours), name
        meta = json.loads((tmp_path / f"{name}_meta.json").read_text())
        assert meta["shapes"][0]["hidden"] == 1024 and meta["shapes"][0]["batch"] == 4
