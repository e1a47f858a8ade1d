"""The decoding engine: compact model + static KV cache + decode plan + op backend + CUDA graphs."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from polar_sparsity.decode.generate import CudaGraphDecoder, Generation, decode_one_token, generate, prefill
from polar_sparsity.decode.kv_cache import StaticKVCache
from polar_sparsity.decode.model import CompactDecoder
from polar_sparsity.decode.ops import DecodeOps, resolve_backend
from polar_sparsity.decode.plan import DecodePlan
from polar_sparsity.models.decoder_weights import (
    DecoderSpec,
    decoder_spec,
    hf_decoder_tensors,
    random_decoder_tensors,
)
from polar_sparsity.models.loading import LoadedModel


class DecodeEngine:
    """Batched dense or sparse decoding of one model (build with :meth:`from_hf` or :meth:`random`).

    The constructor takes the engine tensors of ``models.decoder_weights`` and consumes the layer
    tensors from that dict as it builds the model.
    """

    def __init__(
        self,
        spec: DecoderSpec,
        tensors: dict[str, torch.Tensor],
        plan: DecodePlan,
        *,
        max_batch_size: int,
        max_seq_len: int,
        backend: str = "auto",
        cuda_graphs: bool = True,
    ) -> None:
        plan.check(spec.geometry)
        _check_length(spec, max_seq_len)
        embed = tensors["embed.weight"]
        self.device, self.dtype = embed.device, embed.dtype
        _check_router_devices(plan, self.device)
        self.spec, self.plan = spec, plan
        self.backend = resolve_backend(backend, self.device, self.dtype)
        self.ops = DecodeOps(self.backend)
        self.model = CompactDecoder(spec, tensors, plan, self.ops, max_seq_len)
        g = spec.geometry
        self.cache = StaticKVCache(
            g.num_layers, max_batch_size, g.num_kv_heads, max_seq_len, g.head_dim, self.dtype, self.device
        )
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs = CudaGraphDecoder(self.model, self.cache) if self.cuda_graphs else None

    @classmethod
    def from_hf(
        cls,
        loaded: LoadedModel,
        plan: DecodePlan,
        *,
        max_batch_size: int,
        max_seq_len: int,
        backend: str = "auto",
        cuda_graphs: bool = True,
    ) -> DecodeEngine:
        """An engine on the weights of an unmodified Hugging Face model (shared where the layout allows)."""
        spec = decoder_spec(loaded.model.config)
        plan.check(spec.geometry)
        devices = {p.device for p in loaded.model.parameters()}
        if len(devices) > 1:
            raise ValueError(
                f"the model is spread over {sorted(map(str, devices))}; the engine runs on one device "
                f"(load it with model.device_map=null)"
            )
        tensors = hf_decoder_tensors(loaded.model, spec)
        return cls(
            spec,
            tensors,
            plan,
            max_batch_size=max_batch_size,
            max_seq_len=max_seq_len,
            backend=backend,
            cuda_graphs=cuda_graphs,
        )

    @classmethod
    def random(
        cls,
        hf_config: PretrainedConfig,
        plan: DecodePlan,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        seed: int = 0,
        max_batch_size: int,
        max_seq_len: int,
        backend: str = "auto",
        cuda_graphs: bool = True,
    ) -> DecodeEngine:
        """An engine at a config's real shapes with small random weights made on ``device`` (no HF model)."""
        spec = decoder_spec(hf_config)
        plan.check(spec.geometry)
        _check_length(spec, max_seq_len)
        tensors = random_decoder_tensors(spec, dtype, torch.device(device), seed)
        return cls(
            spec,
            tensors,
            plan,
            max_batch_size=max_batch_size,
            max_seq_len=max_seq_len,
            backend=backend,
            cuda_graphs=cuda_graphs,
        )

    # --- steps -----------------------------------------------------------------------------------

    def prefill(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Right-padded prompts (B, T) and their lengths (B,) -> (B, vocab) logits of the last real token."""
        batch, length = input_ids.shape
        self.cache.check_room(batch, length)
        if lengths.shape != (batch,) or int(lengths.min()) < 1 or int(lengths.max()) > length:
            raise ValueError(
                f"lengths {lengths.tolist()} must hold one length in 1..{length} per row of input_ids"
            )
        return prefill(self.model, self.cache, input_ids.to(self.device), lengths.to(self.device))

    def decode_one_token(self, tokens: torch.Tensor) -> torch.Tensor:
        """One step for the whole batch, tokens (B,) -> (B, vocab); a CUDA-graph replay when enabled."""
        tokens = tokens.to(device=self.device, dtype=torch.long)
        if self._graphs is not None:
            return self._graphs(tokens)
        return decode_one_token(self.model, self.cache, tokens)

    def set_synthetic_context(self, batch_size: int, context_len: int, seed: int = 0) -> None:
        """Random K/V for ``context_len`` tokens of ``batch_size`` sequences: time decode without prefill."""
        self.cache.fill_random(batch_size, context_len, seed)

    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        eos_token_id: int | None = None,
        progress: bool = False,
    ) -> Generation:
        """Generate for a batch of token-id prompts (greedy at temperature 0, else seeded sampling)."""
        return generate(
            self.model,
            self.cache,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            eos_token_id=eos_token_id,
            progress=progress,
            decode_step=self.decode_one_token,
        )


def _check_length(spec: DecoderSpec, max_seq_len: int) -> None:
    """Refuse a cache longer than the positions the model has (or than Mistral's attention window)."""
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len={max_seq_len} must be >= 1")
    if spec.learned_positions and max_seq_len > spec.max_positions:
        raise ValueError(
            f"max_seq_len={max_seq_len} exceeds the {spec.max_positions} learned positions of this "
            f"{spec.family} model"
        )
    if spec.sliding_window is not None and max_seq_len > spec.sliding_window:
        raise ValueError(
            f"max_seq_len={max_seq_len} exceeds this model's sliding attention window "
            f"({spec.sliding_window}); the engine attends over the whole cache, which equals the "
            f"window only up to that length: use max_seq_len <= {spec.sliding_window}"
        )


def _check_router_devices(plan: DecodePlan, device: torch.device) -> None:
    """Routers must run where the model runs (their indices feed the kernels, inside CUDA graphs)."""
    for kind, routers in (("head", plan.head_routers), ("MLP", plan.mlp_routers)):
        for layer, router in routers.items():
            net = getattr(router, "net", None)
            param = next(net.parameters(), None) if isinstance(net, torch.nn.Module) else None
            if param is not None and param.device.type != device.type:
                raise ValueError(
                    f"the {kind} router of layer {layer} is on {param.device} but the engine runs on "
                    f"{device}; load the routers with device={device} (build_plan does)"
                )
