"""The shipped tiny models are real, small, offline language models; their pretraining script runs."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

import polar_sparsity
from tools import pretrain_tiny
from tools.pretrain_tiny import (
    MAX_CHECKPOINT_BYTES,
    checkpoint_bytes,
    eval_chunks,
    mean_nll,
    structure_hooks,
    token_stream,
)

MODELS_DIR = Path(polar_sparsity.__file__).resolve().parent / "assets" / "models"
NAMES = ["tiny-opt", "tiny-llama"]


@pytest.fixture(scope="module", params=NAMES)
def shipped(request: pytest.FixtureRequest) -> tuple[Path, PreTrainedModel, object]:
    path = MODELS_DIR / request.param
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return path, model, AutoTokenizer.from_pretrained(str(path))


def test_checkpoint_loads_offline_with_its_tokenizer(shipped) -> None:
    path, model, tok = shipped
    assert model.config.vocab_size == len(tok) == 2048
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 0, 1)
    assert json.loads((path / "config.json").read_text())["dtype"] == "float16"
    assert model.config.num_attention_heads >= 8


def test_checkpoint_fits_the_size_budget(shipped) -> None:
    path, _, _ = shipped
    assert checkpoint_bytes(path) <= MAX_CHECKPOINT_BYTES
    assert json.loads((path / "metrics.json").read_text())["checkpoint_bytes"] == checkpoint_bytes(path)


def test_it_is_a_language_model_with_structure(shipped) -> None:
    path, model, tok = shipped
    recorded = json.loads((path / "metrics.json").read_text())["metrics"]
    chunks = eval_chunks(token_stream(tok, "validation"), 256)[:8]
    with structure_hooks(model) as stats:
        ppl = math.exp(mean_nll(model, chunks, torch.device("cpu"), amp=False))
    # "Several times lower" than the unigram baseline, not merely lower.
    assert ppl < recorded["unigram_val_perplexity"] / 4
    assert recorded["val_perplexity"] < recorded["unigram_val_perplexity"] / 4
    shares = [sum(s) / len(s) for s in stats["head_top_half_share"]]
    assert all(share > 0.55 for share in shares)  # uniform heads would give exactly 0.5
    if model.config.model_type == "opt":
        assert all(sum(d) / len(d) < 0.5 for d in stats["density"])


def test_pretrain_smoke_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    pretrain_tiny.main(
        ["--model", "tiny-opt", "--device", "cpu", "--out", str(out), "--steps", "4", "--batch-size", "2",
         "--seq-len", "32", "--warmup", "2", "--eval-every", "2",
         "--set", "hidden_size=32", "num_layers=1", "ffn_dim=64", "num_heads=4", "num_kv_heads=4"]
    )  # fmt: skip
    report = json.loads((out / "metrics.json").read_text())
    assert report["training"]["steps"] == 4 and len(report["history"]) == 2
    assert math.isfinite(report["metrics"]["val_perplexity"])
    assert len(report["metrics"]["relu_density_per_layer"]) == 1
    assert (out / "README.md").exists() and (out / "model.safetensors").exists()
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.hidden_size == 32
