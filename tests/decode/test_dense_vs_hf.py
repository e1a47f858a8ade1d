"""The dense engine reproduces the Hugging Face model's logits at prefill and at every decode step."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from polar_sparsity.models.families import build_hf_config
from polar_sparsity.models.loading import load_model
from tests.decode.helpers import PROMPTS, engine_for, hf_last_logits, right_padded
from tests.evaluation.conftest import evaluate_settings
from tests.helpers import TINY_ARCHITECTURES, tiny_model

STEPS = 6
ATOL = 1e-4


def _check_against_hf(model) -> None:
    engine = engine_for(model)
    ids, lengths = right_padded(PROMPTS)
    logits = engine.prefill(ids, lengths)
    sequences = [list(p) for p in PROMPTS]
    torch.testing.assert_close(logits, hf_last_logits(model, sequences), atol=ATOL, rtol=0)
    for _ in range(STEPS):
        tokens = logits.argmax(-1)
        for seq, token in zip(sequences, tokens.tolist(), strict=True):
            seq.append(token)
        logits = engine.decode_one_token(tokens)
        torch.testing.assert_close(logits, hf_last_logits(model, sequences), atol=ATOL, rtol=0)
    assert engine.cache.lengths[: len(PROMPTS)].tolist() == [len(s) for s in sequences]


@pytest.mark.parametrize("name", list(TINY_ARCHITECTURES))
def test_tiny_random_model_of_every_family(name: str) -> None:
    _, model = tiny_model(name)
    _check_against_hf(model)


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama"])
def test_shipped_tiny_models(name: str, tmp_path) -> None:
    settings, _ = evaluate_settings(tmp_path, f"model={name}")
    loaded = load_model(settings.model, device="cpu")
    _check_against_hf(loaded.model)


def test_generate_greedy_matches_hf_generate() -> None:
    _, model = tiny_model("llama-gqa")
    engine = engine_for(model)
    out = engine.generate([PROMPTS[0]], max_new_tokens=8)
    reference = model.generate(
        torch.tensor([PROMPTS[0]]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert out.new_tokens[0] == reference[0, len(PROMPTS[0]) :].tolist()
    assert out.finish_reasons == ["length"]
    assert out.decode_steps == 7


def test_llama3_scaled_rope() -> None:
    """RoPE frequencies come from transformers' rope-init utilities, scaled variants included."""
    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    arch = {
        "vocab_size": 97,
        "hidden_size": 64,
        "num_layers": 2,
        "max_position_embeddings": 64,
        "ffn_dim": 96,
        "num_heads": 8,
        "num_kv_heads": 2,
        "activation": "silu",
        "norm": "rmsnorm",
        "rope_theta": 500000.0,
        "rope_scaling": rope,
    }
    config = build_hf_config("llama", arch)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _check_against_hf(model)
