"""Local checkpoints as users have them: tiny random models of every family, with geometries no shipped
config has, saved with save_pretrained and run through collect / train / evaluate with no model config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

from polar_sparsity.collect.runner import run_collect
from polar_sparsity.config import checkpoint_model, resolved_config, to_settings
from polar_sparsity.data.store import MANIFEST, ActivationStore
from polar_sparsity.data.tokenizer import tokenizer_path
from polar_sparsity.evaluation.runner import run_evaluate
from polar_sparsity.models import load_hf_config, load_model
from polar_sparsity.models.families import build_hf_config
from polar_sparsity.routers.task import run_train
from polar_sparsity.schema import CollectRunConfig, EvaluateRunConfig, TrainRunConfig

ROOT = Path(__file__).resolve().parents[2]
_COMMON = {"vocab_size": 2048, "max_position_embeddings": 128}  # the shipped tokenizer has 2048 tokens
# family -> architecture: odd head counts, 3 KV groups, head_dim != hidden / heads, more layers.
ODD = {
    "opt": {"hidden_size": 48, "num_layers": 5, "num_heads": 6, "num_kv_heads": 6, "ffn_dim": 80,
            "activation": "relu", "norm": "layernorm"},
    "llama": {"hidden_size": 45, "num_layers": 7, "num_heads": 9, "num_kv_heads": 3, "head_dim": 8,
              "ffn_dim": 64, "activation": "silu", "norm": "rmsnorm"},
    "mistral": {"hidden_size": 50, "num_layers": 5, "num_heads": 10, "num_kv_heads": 5, "head_dim": 6,
                "ffn_dim": 72, "activation": "silu", "norm": "rmsnorm", "extra": {"sliding_window": 32}},
    "qwen2": {"hidden_size": 36, "num_layers": 6, "num_heads": 12, "num_kv_heads": 3, "head_dim": 4,
              "ffn_dim": 60, "activation": "silu", "norm": "rmsnorm"},
}  # fmt: skip
SMALL_COLLECT = ["collect.samples=384", "collect.seq_len=64", "collect.batch_size=4"]


def save_checkpoint(directory: Path, family: str, architecture: dict) -> Path:
    """A random-weight checkpoint of ``family`` with the shipped tokenizer, as save_pretrained writes it."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_hf_config(family, {**_COMMON, **architecture}))
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(str(tokenizer_path())).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=sorted(ODD))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    family = request.param
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / f"my-{family}", family, ODD[family])


def settings(entry: str, schema: type, artifacts: Path, *overrides: str):
    """What the entry point does with a command line: compose, let the checkpoint describe itself, check."""
    given = [f"paths.artifacts={artifacts}", "logger=none", *overrides]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(entry, overrides=given)
    checkpoint_model(cfg, given)
    return to_settings(cfg, schema), resolved_config(cfg)


def test_collect_train_evaluate_with_only_model_path(checkpoint: Path, tmp_path: Path) -> None:
    family = checkpoint.name.removeprefix("my-")
    arch = ODD[family]
    collect, resolved = settings(
        "collect", CollectRunConfig, tmp_path, f"model.path={checkpoint}", *SMALL_COLLECT
    )
    assert collect.model.name == checkpoint.name and collect.model.architecture is None
    assert collect.paths.store == f"{tmp_path}/stores/{checkpoint.name}/python-docs"
    run_collect(collect, resolved)
    store = ActivationStore(collect.paths.store)
    assert store.geometry.num_layers == arch["num_layers"]
    assert (store.geometry.num_heads, store.geometry.num_kv_heads) == (
        arch["num_heads"],
        arch["num_kv_heads"],
    )
    manifest = json.loads((Path(collect.paths.store) / MANIFEST).read_text())
    assert manifest["config"]["model"]["architecture"] is None  # nothing borrowed

    last = arch["num_layers"] - 1
    train, resolved = settings(
        "train", TrainRunConfig, tmp_path, f"model.path={checkpoint}", f"layer={last}", "router=mha",
        "router.max_epochs=1", "trainer.enable_progress_bar=false", f"output_dir={tmp_path / 'train'}",
    )  # fmt: skip
    result = run_train(train, resolved)
    assert result["model"] == checkpoint.name and result["units"] == arch["num_kv_heads"]
    everything, resolved = settings(
        "train", TrainRunConfig, tmp_path, f"model.path={checkpoint}", f"layer={last}", "router.topk=0.99",
        f"output_dir={tmp_path / 'train-all'}",
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"router.topk=0.99 keeps all (\d+) of \1 .*nothing to learn"):
        run_train(everything, resolved)

    evaluate, resolved = settings(
        "evaluate", EvaluateRunConfig, tmp_path, f"model.path={checkpoint}", "mode=sparse", "device=cpu",
        "sparsity.attn_keep=2", f"sparsity.sparse_attn_layers=[{last}]", "eval.tasks=[]",
        "eval.perplexity.seq_len=64", "eval.perplexity.max_tokens=256",
        f"output_dir={tmp_path / 'eval'}", f"sweep_dir={tmp_path / 'sweep'}",
    )  # fmt: skip
    payload = run_evaluate(evaluate, resolved)
    unit = "KV groups" if arch["num_heads"] != arch["num_kv_heads"] else "heads"
    assert payload["sparsity"]["attn_kept"] == f"2 of {arch['num_kv_heads']} {unit}"
    assert payload["sparsity"]["masked_attn_layers"] == [last]
    assert payload["results"]["measured_density"]["attn"] == pytest.approx(2 / arch["num_kv_heads"])
    assert "2 of" in (tmp_path / "sweep" / "eval_sweep.csv").read_text()


def _cli(tmp_path: Path, script: str, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "POLAR_SPARSITY_HOME": str(tmp_path / "home")}
    command = [sys.executable, script, "logger=none", *overrides]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_cli_collect_with_only_model_path(tmp_path: Path) -> None:
    checkpoint = save_checkpoint(tmp_path / "ckpts" / "odd-llama", "llama", ODD["llama"])
    result = _cli(tmp_path, "collect.py", f"model.path={checkpoint}", *SMALL_COLLECT)
    assert "Per-layer summary (odd-llama on python-docs: 384 tokens)" in result.stdout
    manifest = json.loads((tmp_path / "home" / "stores" / "odd-llama" / "python-docs" / MANIFEST).read_text())
    assert manifest["geometry"]["num_layers"] == 7 and manifest["geometry"]["num_kv_heads"] == 3


@pytest.mark.slow
def test_cli_train_sweep_job_dirs_do_not_nest_the_checkpoint_path(tmp_path: Path) -> None:
    checkpoint = save_checkpoint(tmp_path / "ckpts" / "odd-llama", "llama", ODD["llama"])
    _cli(tmp_path, "collect.py", f"model.path={checkpoint}", *SMALL_COLLECT)
    _cli(tmp_path, "train.py", f"model.path={checkpoint}", "layer=1,2", "router.max_epochs=1", "-m")
    (sweep,) = (tmp_path / "home" / "multirun" / "train").iterdir()
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["layer=1,logger=none,router.max_epochs=1", "layer=2,logger=none,router.max_epochs=1"]
    assert len(list((tmp_path / "home" / "routers" / "odd-llama").rglob("*.safetensors"))) == 2


def test_unsupported_family_fails_before_weights_load(tmp_path: Path) -> None:
    GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=2048).save_pretrained(tmp_path / "gpt2ish")
    collect, _ = settings("collect", CollectRunConfig, tmp_path, f"model.path={tmp_path / 'gpt2ish'}")
    # No weight files exist: the error can only come from reading config.json.
    with pytest.raises(
        ValueError, match=r"'gpt2' model.*supported families: \['llama', 'mistral', 'opt', 'qwen2'\]"
    ):
        run_collect(collect, {})
    assert not (tmp_path / "stores").exists()


def test_unknown_model_type_names_the_supported_families(tmp_path: Path) -> None:
    (tmp_path / "alien").mkdir()
    (tmp_path / "alien" / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    collect, _ = settings("collect", CollectRunConfig, tmp_path, f"model.path={tmp_path / 'alien'}")
    with pytest.raises(
        ValueError,
        match=r"'no-such-model' model, which is not supported; supported families: \['llama'",
    ):
        load_hf_config(collect.model)


def test_a_chosen_model_config_is_checked_against_the_checkpoint(tmp_path: Path) -> None:
    checkpoint = save_checkpoint(tmp_path / "odd-llama", "llama", ODD["llama"])
    collect, _ = settings(
        "collect", CollectRunConfig, tmp_path, "model=tiny-llama", f"model.path={checkpoint}"
    )
    assert collect.model.name == "tiny-llama"  # the user chose that config: it names the run
    with pytest.raises(
        ValueError, match=r"does not match the checkpoint.*num_layers: config 4, checkpoint 7"
    ):
        load_hf_config(collect.model)
    wrong_family, _ = settings(
        "collect", CollectRunConfig, tmp_path, "model=tiny-opt", f"model.path={checkpoint}"
    )
    with pytest.raises(ValueError, match="configured as family 'opt' but its checkpoint .* is 'llama'"):
        load_hf_config(wrong_family.model)


def test_checkpoint_overrides_keep_what_the_command_line_sets(tmp_path: Path) -> None:
    checkpoint = save_checkpoint(tmp_path / "odd-qwen", "qwen2", ODD["qwen2"])
    named, _ = settings(
        "collect",
        CollectRunConfig,
        tmp_path,
        f"model.path={checkpoint}",
        "model.name=mine",
        "model.family=qwen2",
    )
    assert named.model.name == "mine" and named.model.family.value == "qwen2"
    assert named.paths.store.endswith("stores/mine/python-docs")
    hub, _ = settings("collect", CollectRunConfig, tmp_path, "model.hf_id=someone/Some-Model-1B")
    # The default config's own checkpoint directory must not win over the hub id the user named.
    assert hub.model.path is None and hub.model.name == "Some-Model-1B"
    default, _ = settings("collect", CollectRunConfig, tmp_path)
    assert default.model.name == "tiny-opt" and default.model.architecture.num_layers == 4


def test_a_home_relative_path_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    checkpoint = save_checkpoint(tmp_path / "models" / "odd-opt", "opt", ODD["opt"])
    collect, _ = settings("collect", CollectRunConfig, tmp_path, "model.path='~/models/odd-opt'")
    assert collect.model.path == str(checkpoint) and collect.model.name == "odd-opt"
    assert load_hf_config(collect.model).num_attention_heads == 6


def test_random_weights_take_architecture_and_tokenizer_from_the_checkpoint(tmp_path: Path) -> None:
    checkpoint = save_checkpoint(tmp_path / "odd-mistral", "mistral", ODD["mistral"])
    collect, _ = settings(
        "collect", CollectRunConfig, tmp_path, f"model.path={checkpoint}", "model.weights=random"
    )
    loaded = load_model(collect.model, device="cpu", seed=3)
    assert loaded.weights_source == "random weights (seed 3)" and loaded.tokenizer_source == str(checkpoint)
    assert (loaded.geometry.num_heads, loaded.geometry.num_kv_heads, loaded.geometry.head_dim) == (10, 5, 6)
