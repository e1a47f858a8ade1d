"""Family adapters: everything model-specific, in one small table per family.

Capture and masking are forward hooks on modules of the unmodified Hugging Face model. An adapter
names those modules (by attribute path, relative to one decoder layer) and turns the project's
family-neutral architecture description (``conf/model/*.yaml``, key ``architecture``) into the
family's Hugging Face config, so ``model.weights=random`` builds the real architecture offline.

Hook points, per decoder layer:

* router input: the ``hidden_states`` argument of the attention module. In pre-norm models this is
  exactly the pre-attention norm output; in post-norm models (OPT-350m) it is the layer input, which
  is what the attention block reads there. Hooking the attention module's input covers both.
* per-head outputs: the input of the attention output projection, viewed as (..., heads, head_dim).
* MLP activations: the input of the MLP down projection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from transformers import LlamaConfig, MistralConfig, OPTConfig, PretrainedConfig, PreTrainedModel, Qwen2Config

from polar_sparsity.schema import Family


class MlpKind(str, Enum):
    """How the MLP turns its input into the down projection's input."""

    relu = "relu"  # act(x W_up): activation > 0 marks an active neuron
    gated = "gated"  # silu(x W_gate) * (x W_up): SwiGLU, no exact zeros


@dataclass(frozen=True)
class ModelGeometry:
    """Shapes that routers, stores and kernels need; read off a Hugging Face config."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_dim: int
    mlp_kind: MlpKind
    vocab_size: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for MHA)."""
        return self.num_heads // self.num_kv_heads

    def as_dict(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "ffn_dim": self.ffn_dim,
            "mlp_kind": self.mlp_kind.value,
            "vocab_size": self.vocab_size,
        }


@dataclass(frozen=True)
class FamilyAdapter:
    """Where the hook points live in one family's Hugging Face modules, and how to build its config."""

    name: str
    model_types: tuple[str, ...]  # Hugging Face ``config.model_type`` values this adapter serves
    layers_path: str  # from the CausalLM model to its nn.ModuleList of decoder layers
    attention_path: str  # from a decoder layer to its attention module
    attn_out_proj_path: str  # from a decoder layer to the attention output projection
    mlp_down_proj_path: str  # from a decoder layer to the MLP down projection
    config_class: type[PretrainedConfig]
    to_hf_config: Callable[[dict[str, Any]], dict[str, Any]]
    geometry: Callable[[PretrainedConfig], ModelGeometry]

    def layers(self, model: PreTrainedModel) -> torch.nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def attention(self, model: PreTrainedModel, layer: int) -> torch.nn.Module:
        return self.layers(model)[layer].get_submodule(self.attention_path)

    @staticmethod
    def attention_input(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        """The router input from a with_kwargs pre-hook on the attention module.

        Hugging Face decoder layers pass ``hidden_states`` by keyword, older ones positionally first.
        """
        return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def attn_out_proj(self, model: PreTrainedModel, layer: int) -> torch.nn.Module:
        return self.layers(model)[layer].get_submodule(self.attn_out_proj_path)

    def mlp_down_proj(self, model: PreTrainedModel, layer: int) -> torch.nn.Module:
        return self.layers(model)[layer].get_submodule(self.mlp_down_proj_path)

    def build_config(self, architecture: dict[str, Any]) -> PretrainedConfig:
        """The Hugging Face config for a family-neutral architecture description."""
        return self.config_class(**self.to_hf_config(dict(architecture)))


# --- OPT ----------------------------------------------------------------------------------------

_OPT_ACTIVATIONS = {"relu": MlpKind.relu}


def _opt_hf_config(arch: dict[str, Any]) -> dict[str, Any]:
    extra = dict(arch.pop("extra", None) or {})
    _check_norm(arch, "layernorm")
    if arch.get("num_kv_heads", arch["num_heads"]) != arch["num_heads"]:
        raise ValueError("OPT has no grouped-query attention: num_kv_heads must equal num_heads")
    return {
        "vocab_size": arch["vocab_size"],
        "hidden_size": arch["hidden_size"],
        "num_hidden_layers": arch["num_layers"],
        "num_attention_heads": arch["num_heads"],
        "ffn_dim": arch["ffn_dim"],
        "activation_function": arch["activation"],
        "max_position_embeddings": arch["max_position_embeddings"],
        "word_embed_proj_dim": extra.pop("word_embed_proj_dim", arch["hidden_size"]),
        "do_layer_norm_before": extra.pop("do_layer_norm_before", True),
        "tie_word_embeddings": arch.get("tie_word_embeddings", True),
        "bos_token_id": arch.get("bos_token_id"),
        "eos_token_id": arch.get("eos_token_id"),
        "pad_token_id": arch.get("pad_token_id"),
        "dropout": 0.0,
        "attention_dropout": 0.0,
        **extra,
    }


def _opt_geometry(config: PretrainedConfig) -> ModelGeometry:
    activation = config.activation_function
    if activation not in _OPT_ACTIVATIONS:
        raise ValueError(f"OPT activation {activation!r} is not supported; valid: {sorted(_OPT_ACTIVATIONS)}")
    return ModelGeometry(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_attention_heads,
        head_dim=config.hidden_size // config.num_attention_heads,
        ffn_dim=config.ffn_dim,
        mlp_kind=_OPT_ACTIVATIONS[activation],
        vocab_size=config.vocab_size,
    )


# --- Llama-style decoders (Llama-2 MHA, Llama-3 GQA, Mistral, Qwen2) ---------------------------


def _llama_style_hf_config(arch: dict[str, Any]) -> dict[str, Any]:
    extra = dict(arch.pop("extra", None) or {})
    _check_norm(arch, "rmsnorm")
    rope = {"rope_type": "default", "rope_theta": float(arch.get("rope_theta", 10000.0))}
    if arch.get("rope_scaling"):
        rope.update(dict(arch["rope_scaling"]))
    hf = {
        "vocab_size": arch["vocab_size"],
        "hidden_size": arch["hidden_size"],
        "num_hidden_layers": arch["num_layers"],
        "num_attention_heads": arch["num_heads"],
        "num_key_value_heads": arch.get("num_kv_heads", arch["num_heads"]),
        "intermediate_size": arch["ffn_dim"],
        "hidden_act": arch["activation"],
        "max_position_embeddings": arch["max_position_embeddings"],
        "rms_norm_eps": arch.get("norm_eps", 1e-6),
        "rope_parameters": rope,
        "tie_word_embeddings": arch.get("tie_word_embeddings", False),
        "bos_token_id": arch.get("bos_token_id"),
        "eos_token_id": arch.get("eos_token_id"),
        "pad_token_id": arch.get("pad_token_id"),
    }
    if arch.get("head_dim"):
        hf["head_dim"] = arch["head_dim"]
    hf.update(extra)
    return hf


def _llama_style_geometry(config: PretrainedConfig) -> ModelGeometry:
    if config.hidden_act not in ("silu", "swish"):
        raise ValueError(f"gated MLP activation {config.hidden_act!r} is not supported; valid: ['silu']")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelGeometry(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        ffn_dim=config.intermediate_size,
        mlp_kind=MlpKind.gated,
        vocab_size=config.vocab_size,
    )


def _check_norm(arch: dict[str, Any], expected: str) -> None:
    norm = arch.pop("norm", expected)
    if norm != expected:
        raise ValueError(f"norm {norm!r} does not match this family; it uses {expected!r}")


def _llama_style(
    name: str, model_types: tuple[str, ...], config_class: type[PretrainedConfig]
) -> FamilyAdapter:
    return FamilyAdapter(
        name=name,
        model_types=model_types,
        layers_path="model.layers",
        attention_path="self_attn",
        attn_out_proj_path="self_attn.o_proj",
        mlp_down_proj_path="mlp.down_proj",
        config_class=config_class,
        to_hf_config=_llama_style_hf_config,
        geometry=_llama_style_geometry,
    )


# One adapter per ``schema.Family`` (the list of family names a config may give).
FAMILIES: dict[Family, FamilyAdapter] = {
    Family.opt: FamilyAdapter(
        name=Family.opt.value,
        model_types=("opt",),
        layers_path="model.decoder.layers",
        attention_path="self_attn",
        attn_out_proj_path="self_attn.out_proj",
        mlp_down_proj_path="fc2",
        config_class=OPTConfig,
        to_hf_config=_opt_hf_config,
        geometry=_opt_geometry,
    ),
    Family.llama: _llama_style(Family.llama.value, ("llama",), LlamaConfig),
    Family.mistral: _llama_style(Family.mistral.value, ("mistral",), MistralConfig),
    Family.qwen2: _llama_style(Family.qwen2.value, ("qwen2",), Qwen2Config),
}


def get_family(name: str | Family) -> FamilyAdapter:
    """The adapter for a family name, with the valid names in the error."""
    try:
        return FAMILIES[Family(name)]
    except ValueError:
        raise ValueError(
            f"unknown model family {name!r}; valid: {sorted(f.value for f in FAMILIES)}"
        ) from None


def family_for_config(config: PretrainedConfig) -> FamilyAdapter:
    """The adapter serving a Hugging Face config's ``model_type``."""
    for adapter in FAMILIES.values():
        if config.model_type in adapter.model_types:
            return adapter
    served = sorted(t for a in FAMILIES.values() for t in a.model_types)
    raise ValueError(f"model_type {config.model_type!r} has no family adapter; supported: {served}")


def build_hf_config(family: str, architecture: dict[str, Any]) -> PretrainedConfig:
    """The Hugging Face config of a family-neutral architecture (see ``conf/model/*.yaml``)."""
    return get_family(family).build_config(architecture)
