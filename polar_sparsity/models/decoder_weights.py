"""Per-family weight mapping for the decoding engine: Hugging Face parameters -> engine tensors.

The engine (``polar_sparsity.decode``) runs its own compact decoder. Everything it needs to know
about a family lives here, beside the family adapter: a :class:`DecoderSpec` read off the Hugging
Face config (norm kind, pre/post norm, positions, biases, tied embeddings, sliding window), the table
from engine tensor names to Hugging Face parameter names, and a random-weight builder at real shape
that never instantiates a Hugging Face model (so shapes of models that do not fit a host still build
directly on the device).

Engine tensor names (``{i}`` is the layer)::

    embed.weight  positions.weight (OPT)  project_in.weight / project_out.weight (OPT-350m)
    final_norm.weight / .bias  lm_head.weight
    layers.{i}.attn_norm.weight / .bias   layers.{i}.q|k|v|o.weight / .bias
    layers.{i}.mlp_norm.weight / .bias    layers.{i}.up|gate|down.weight / .bias

``attn_norm`` is the norm around attention (before it in pre-norm models, after the residual add in
post-norm OPT-350m); ``mlp_norm`` likewise around the MLP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from polar_sparsity.models.families import MlpKind, ModelGeometry, family_for_config

# OPT's learned position table is indexed from 2 (Hugging Face's OPTLearnedPositionalEmbedding).
_OPT_POSITION_OFFSET = 2
# Rope types whose frequencies depend on the current sequence length: not a static table.
_DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")


@dataclass(frozen=True)
class DecoderSpec:
    """Everything the compact decoder needs besides the tensors, read off a Hugging Face config."""

    family: str
    geometry: ModelGeometry
    norm: str  # "layernorm" | "rmsnorm"
    norm_eps: float
    pre_norm: bool  # False: OPT-350m's post-norm layers
    final_norm: bool
    embed_dim: int  # token-embedding width (OPT-350m projects it in/out of hidden_size)
    learned_positions: bool  # OPT: a learned table; else RoPE
    position_offset: int
    max_positions: int
    attn_bias: bool  # q/k/v biases
    out_bias: bool  # attention output projection bias
    mlp_bias: bool
    norm_bias: bool  # LayerNorm has a bias, RMSNorm has none
    tied_embeddings: bool
    sliding_window: int | None
    hf_config: PretrainedConfig  # for the RoPE frequencies (transformers' own rope-init utilities)

    @property
    def q_dim(self) -> int:
        return self.geometry.num_heads * self.geometry.head_dim

    @property
    def kv_dim(self) -> int:
        return self.geometry.num_kv_heads * self.geometry.head_dim


def decoder_spec(config: PretrainedConfig) -> DecoderSpec:
    """The decoder description of a Hugging Face config of a supported family."""
    adapter = family_for_config(config)
    geometry = adapter.geometry(config)
    if adapter.name == "opt":
        return _opt_spec(config, geometry)
    return _llama_style_spec(adapter.name, config, geometry)


def _opt_spec(config: PretrainedConfig, geometry: ModelGeometry) -> DecoderSpec:
    if not getattr(config, "layer_norm_elementwise_affine", True):
        raise ValueError("OPT with layer_norm_elementwise_affine=false is not supported by the engine")
    bias = bool(getattr(config, "enable_bias", True))
    pre_norm = bool(config.do_layer_norm_before)
    return DecoderSpec(
        family="opt",
        geometry=geometry,
        norm="layernorm",
        norm_eps=1e-5,  # torch's LayerNorm default, which Hugging Face's OPT uses
        pre_norm=pre_norm,
        final_norm=pre_norm and not getattr(config, "_remove_final_layer_norm", False),
        embed_dim=config.word_embed_proj_dim,
        learned_positions=True,
        position_offset=_OPT_POSITION_OFFSET,
        max_positions=config.max_position_embeddings,
        attn_bias=bias,
        out_bias=bias,
        mlp_bias=bias,
        norm_bias=True,
        tied_embeddings=bool(config.tie_word_embeddings),
        sliding_window=None,
        hf_config=config,
    )


def _llama_style_spec(family: str, config: PretrainedConfig, geometry: ModelGeometry) -> DecoderSpec:
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type in _DYNAMIC_ROPE_TYPES:
        raise ValueError(
            f"rope_type {rope_type!r} changes with the sequence length; the engine supports static rope "
            f"types (default, linear, llama3, yarn, ...)"
        )
    attention_bias = bool(getattr(config, "attention_bias", False))
    qkv_bias = family == "qwen2" or attention_bias  # Qwen2 always has q/k/v biases, no o_proj bias
    return DecoderSpec(
        family=family,
        geometry=geometry,
        norm="rmsnorm",
        norm_eps=config.rms_norm_eps,
        pre_norm=True,
        final_norm=True,
        embed_dim=config.hidden_size,
        learned_positions=False,
        position_offset=0,
        max_positions=config.max_position_embeddings,
        attn_bias=qkv_bias,
        out_bias=attention_bias and family != "qwen2",
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        norm_bias=False,
        tied_embeddings=bool(config.tie_word_embeddings),
        sliding_window=_sliding_window(family, config),
        hf_config=config,
    )


def _sliding_window(family: str, config: PretrainedConfig) -> int | None:
    """The attention window when some layer uses one (Mistral; Qwen2 with use_sliding_window)."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if family != "mistral" and layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def rope_frequencies(spec: DecoderSpec) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (head_dim / 2,), attention scaling) from transformers' rope-init utilities."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = spec.hf_config
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type == "default":
        # The default rope is a static method on the rotary class in transformers 5 (the same for every
        # Llama-style family): base ** (-2i / head_dim).
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config, None)


# --- names and shapes --------------------------------------------------------------------------------

_OPT_NAMES = {
    "embed.weight": "model.decoder.embed_tokens.weight",
    "positions.weight": "model.decoder.embed_positions.weight",
    "project_in.weight": "model.decoder.project_in.weight",
    "project_out.weight": "model.decoder.project_out.weight",
    "final_norm.weight": "model.decoder.final_layer_norm.weight",
    "final_norm.bias": "model.decoder.final_layer_norm.bias",
    "lm_head.weight": "lm_head.weight",
    "layers.{i}.attn_norm.{p}": "model.decoder.layers.{i}.self_attn_layer_norm.{p}",
    "layers.{i}.q.{p}": "model.decoder.layers.{i}.self_attn.q_proj.{p}",
    "layers.{i}.k.{p}": "model.decoder.layers.{i}.self_attn.k_proj.{p}",
    "layers.{i}.v.{p}": "model.decoder.layers.{i}.self_attn.v_proj.{p}",
    "layers.{i}.o.{p}": "model.decoder.layers.{i}.self_attn.out_proj.{p}",
    "layers.{i}.mlp_norm.{p}": "model.decoder.layers.{i}.final_layer_norm.{p}",
    "layers.{i}.up.{p}": "model.decoder.layers.{i}.fc1.{p}",
    "layers.{i}.down.{p}": "model.decoder.layers.{i}.fc2.{p}",
}

_LLAMA_STYLE_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "layers.{i}.attn_norm.{p}": "model.layers.{i}.input_layernorm.{p}",
    "layers.{i}.q.{p}": "model.layers.{i}.self_attn.q_proj.{p}",
    "layers.{i}.k.{p}": "model.layers.{i}.self_attn.k_proj.{p}",
    "layers.{i}.v.{p}": "model.layers.{i}.self_attn.v_proj.{p}",
    "layers.{i}.o.{p}": "model.layers.{i}.self_attn.o_proj.{p}",
    "layers.{i}.mlp_norm.{p}": "model.layers.{i}.post_attention_layernorm.{p}",
    "layers.{i}.gate.{p}": "model.layers.{i}.mlp.gate_proj.{p}",
    "layers.{i}.up.{p}": "model.layers.{i}.mlp.up_proj.{p}",
    "layers.{i}.down.{p}": "model.layers.{i}.mlp.down_proj.{p}",
}

HF_NAMES: dict[str, dict[str, str]] = {
    "opt": _OPT_NAMES,
    "llama": _LLAMA_STYLE_NAMES,
    "mistral": _LLAMA_STYLE_NAMES,
    "qwen2": _LLAMA_STYLE_NAMES,
}


def tensor_shapes(spec: DecoderSpec) -> dict[str, tuple[int, ...]]:
    """Every engine tensor of this decoder and its shape (the lm head included even when tied)."""
    g = spec.geometry
    d, e = g.hidden_size, spec.embed_dim
    shapes: dict[str, tuple[int, ...]] = {
        "embed.weight": (g.vocab_size, e),
        "lm_head.weight": (g.vocab_size, e),
    }
    if spec.learned_positions:
        shapes["positions.weight"] = (spec.max_positions + spec.position_offset, d)
    if e != d:
        shapes["project_in.weight"] = (d, e)
        shapes["project_out.weight"] = (e, d)
    if spec.final_norm:
        shapes.update(_norm_shapes("final_norm", spec))
    for i in range(g.num_layers):
        layer = f"layers.{i}"
        shapes.update(_norm_shapes(f"{layer}.attn_norm", spec))
        shapes.update(_norm_shapes(f"{layer}.mlp_norm", spec))
        projections = {
            "q": (spec.q_dim, d, spec.attn_bias),
            "k": (spec.kv_dim, d, spec.attn_bias),
            "v": (spec.kv_dim, d, spec.attn_bias),
            "o": (d, spec.q_dim, spec.out_bias),
            "up": (g.ffn_dim, d, spec.mlp_bias),
            "down": (d, g.ffn_dim, spec.mlp_bias),
        }
        if g.mlp_kind == MlpKind.gated:
            projections["gate"] = (g.ffn_dim, d, spec.mlp_bias)
        for name, (rows, cols, bias) in projections.items():
            shapes[f"{layer}.{name}.weight"] = (rows, cols)
            if bias:
                shapes[f"{layer}.{name}.bias"] = (rows,)
    return shapes


def _norm_shapes(prefix: str, spec: DecoderSpec) -> dict[str, tuple[int, ...]]:
    shapes = {f"{prefix}.weight": (spec.geometry.hidden_size,)}
    if spec.norm_bias:
        shapes[f"{prefix}.bias"] = (spec.geometry.hidden_size,)
    return shapes


def hf_name(spec: DecoderSpec, name: str) -> str:
    """The Hugging Face parameter name of an engine tensor name."""
    table = HF_NAMES[spec.family]
    if name in table:
        return table[name]
    _, layer, module, param = name.split(".")
    return table[f"layers.{{i}}.{module}.{{p}}"].format(i=layer, p=param)


# --- building the tensors ----------------------------------------------------------------------------


def hf_decoder_tensors(model: PreTrainedModel, spec: DecoderSpec) -> dict[str, torch.Tensor]:
    """The engine tensors of an unmodified Hugging Face model (views of its parameters, no copies).

    A tied lm head is the embedding tensor itself. A missing parameter or a shape that does not match
    the config is an error naming both.
    """
    params: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers(remove_duplicate=False)))
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in tensor_shapes(spec).items():
        source = hf_name(spec, name)
        if name == "lm_head.weight" and spec.tied_embeddings:
            tensors[name] = tensors["embed.weight"]
            continue
        if source not in params:
            raise ValueError(
                f"the {spec.family} model has no parameter {source!r} (engine tensor {name!r}); "
                f"is the checkpoint of another family?"
            )
        tensor = params[source].detach()
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{source} has shape {tuple(tensor.shape)}; the config implies {shape}")
        tensors[name] = tensor
    return tensors


def random_decoder_tensors(
    spec: DecoderSpec, dtype: torch.dtype, device: torch.device | str, seed: int = 0, std: float = 0.02
) -> dict[str, torch.Tensor]:
    """Random engine tensors at real shape, built on ``device``: matrices ~ N(0, std), biases 0, norms 1.

    Small weights keep fp16 activations finite through many layers (speed work, not quality).
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in tensor_shapes(spec).items():
        if name == "lm_head.weight" and spec.tied_embeddings:
            tensors[name] = tensors["embed.weight"]
        elif "norm" in name.split(".")[-2] and name.endswith(".weight"):
            tensors[name] = torch.ones(shape, dtype=dtype, device=device)
        elif name.endswith(".bias"):
            tensors[name] = torch.zeros(shape, dtype=dtype, device=device)
        else:
            tensor = torch.empty(shape, dtype=dtype, device=device)
            tensors[name] = tensor.normal_(0.0, std, generator=generator)
    return tensors


def describe(spec: DecoderSpec) -> dict[str, Any]:
    """A short, JSON-friendly summary of the decoder (for logs and reports)."""
    return {
        "family": spec.family,
        **spec.geometry.as_dict(),
        "norm": spec.norm,
        "pre_norm": spec.pre_norm,
        "positions": "learned" if spec.learned_positions else "rope",
        "sliding_window": spec.sliding_window,
    }
