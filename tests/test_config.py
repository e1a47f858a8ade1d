"""Configs compose for every model and data source, and bad values fail before anything loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException

from polar_sparsity.config import to_settings
from polar_sparsity.models.families import build_hf_config, get_family
from polar_sparsity.schema import CollectRunConfig

CONF = Path(__file__).resolve().parents[1] / "conf"
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("collect", overrides=["logger=none", *overrides])


def test_every_supported_model_has_a_config() -> None:
    expected = {
        "tiny-opt",
        "tiny-llama",
        "llama-2-7b",
        "llama-2-13b",
        "llama-3.1-8b",
        "llama-3.1-70b",
        "mistral-7b",
        "qwen2.5-7b",
        "qwen2.5-14b",
    }
    expected |= {f"opt-{s}" for s in ("125m", "350m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b")}
    assert expected <= set(MODELS)


@pytest.mark.parametrize("model", MODELS)
def test_model_config_builds_the_real_architecture(model: str) -> None:
    settings = to_settings(_compose(f"model={model}", "model.weights=random"), CollectRunConfig)
    arch = settings.model.architecture
    hf_config = build_hf_config(settings.model.family.value, vars(arch))
    geometry = get_family(settings.model.family.value).geometry(hf_config)
    assert (geometry.num_layers, geometry.num_heads, geometry.num_kv_heads) == (
        arch.num_layers,
        arch.num_heads,
        arch.num_kv_heads,
    )
    assert geometry.hidden_size == arch.hidden_size and geometry.ffn_dim == arch.ffn_dim
    assert geometry.num_heads * geometry.head_dim == arch.num_heads * (
        arch.head_dim or arch.hidden_size // arch.num_heads
    )


@pytest.mark.parametrize("data", ["offline", "wikitext2", "c4"])
def test_data_sources_compose(data: str) -> None:
    settings = to_settings(_compose(f"data={data}"), CollectRunConfig)
    assert settings.data.name in {"python-docs", "wikitext2", "c4"}


def test_unknown_model_lists_valid_choices() -> None:
    with pytest.raises(MissingConfigException, match=r"(?s)model/gpt-5.*tiny-opt"):
        _compose("model=gpt-5")


def test_unknown_data_lists_valid_choices() -> None:
    with pytest.raises(MissingConfigException, match=r"(?s)data/pile.*wikitext2"):
        _compose("data=pile")


def _composition_error(*overrides: str) -> str:
    """Hydra's message plus its cause: what the user sees printed."""
    with pytest.raises(ConfigCompositionException) as error:
        _compose(*overrides)
    return f"{error.value} {error.value.__cause__}"


def test_bad_enum_names_the_valid_values() -> None:
    message = _composition_error("model.weights=randm")
    assert "Invalid value 'randm', expected one of [pretrained, random]" in message


def test_misspelt_key_is_rejected() -> None:
    assert "Key 'sampels' not in 'CollectConfig'" in _composition_error("collect.sampels=3")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("collect.samples=0", "collect.samples=0 must be a positive integer"),
        ("collect.seq_len=-4", "collect.seq_len=-4 must be a positive"),
        ("model.architecture.num_kv_heads=3", "num_heads=8 is not a multiple of num_kv_heads=3"),
    ],
)
def test_bad_values_fail_at_validation(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        to_settings(_compose(override), CollectRunConfig)
