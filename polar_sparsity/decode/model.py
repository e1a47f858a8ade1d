"""The compact decoder: one forward for prefill (dense, SDPA) and one for a decode step (sparse-aware).

Built from the engine tensors of ``polar_sparsity.models.decoder_weights`` (Hugging Face weights or
random ones at real shape). Covers every family the adapters support: OPT (learned positions with
their offset, LayerNorm, pre-norm and OPT-350m's post-norm with project_in/out, ReLU MLP) and
Llama-style decoders (RoPE incl. scaled variants, RMSNorm, GQA, Qwen2's q/k/v biases, gated MLP).

A decode step takes everything from device tensors (the cache's lengths, the router outputs), so
it can be captured in a CUDA graph: the host decides nothing that depends on the data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polar_sparsity.decode.kv_cache import StaticKVCache
from polar_sparsity.decode.ops import DecodeOps
from polar_sparsity.decode.plan import DecodePlan, head_indices, neuron_indices
from polar_sparsity.models.decoder_weights import DecoderSpec, rope_frequencies


class Norm(nn.Module):
    """LayerNorm (with bias) or RMSNorm (Hugging Face's: normalised in fp32, scaled in the input dtype)."""

    def __init__(self, kind: str, eps: float, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.kind, self.eps = kind, eps
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype)


class DecoderLayer(nn.Module):
    """One decoder layer's tensors, with Q/K/V fused into one projection.

    Takes (pops) its tensors out of ``tensors``: random weights are freed as each layer is fused, so
    building peaks at the model plus one layer, not twice the model.
    """

    def __init__(
        self, spec: DecoderSpec, tensors: dict[str, torch.Tensor], layer: int, ops: DecodeOps
    ) -> None:
        super().__init__()
        p = f"layers.{layer}."
        self.layer = layer
        self.attn_norm = Norm(
            spec.norm,
            spec.norm_eps,
            tensors.pop(p + "attn_norm.weight"),
            tensors.pop(p + "attn_norm.bias", None),
        )
        self.mlp_norm = Norm(
            spec.norm,
            spec.norm_eps,
            tensors.pop(p + "mlp_norm.weight"),
            tensors.pop(p + "mlp_norm.bias", None),
        )
        self.register_buffer("w_qkv", torch.cat([tensors.pop(p + n + ".weight") for n in "qkv"]))
        biases = [tensors.pop(p + n + ".bias", None) for n in "qkv"]
        self.register_buffer("b_qkv", torch.cat(biases) if biases[0] is not None else None)
        self.register_buffer("w_o", tensors.pop(p + "o.weight"))
        self.register_buffer("b_o", tensors.pop(p + "o.bias", None))
        self.gated = p + "gate.weight" in tensors
        if self.gated:
            # Gated MLPs: gate and up fused into one (2 * ffn, d) GEMM, split after.
            self.register_buffer(
                "w_up", torch.cat([tensors.pop(p + "gate.weight"), tensors.pop(p + "up.weight")])
            )
            biases = [tensors.pop(p + n + ".bias", None) for n in ("gate", "up")]
            self.register_buffer("b_up", torch.cat(biases) if biases[0] is not None else None)
        else:
            self.register_buffer("w_up", tensors.pop(p + "up.weight"))
            self.register_buffer("b_up", tensors.pop(p + "up.bias", None))
        # The down projection in the selective kernel's (n, d) layout; a dense step uses it as is.
        self.register_buffer("w_down_t", ops.prepare_down_weight(tensors.pop(p + "down.weight")))
        self.register_buffer("b_down", tensors.pop(p + "down.bias", None))

    def mlp_dense(self, x: torch.Tensor) -> torch.Tensor:
        up = F.linear(x, self.w_up, self.b_up)
        if self.gated:
            gate, up = up.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        else:
            hidden = torch.relu(up)
        out = hidden @ self.w_down_t
        return out + self.b_down if self.b_down is not None else out


class CompactDecoder(nn.Module):
    """The engine's model: embeddings, decoder layers, final norm, lm head; prefill and decode steps."""

    def __init__(
        self,
        spec: DecoderSpec,
        tensors: dict[str, torch.Tensor],
        plan: DecodePlan,
        ops: DecodeOps,
        max_seq_len: int,
    ) -> None:
        super().__init__()
        self.spec, self.plan, self.ops = spec, plan, ops
        g = spec.geometry
        self.geometry = g
        self.register_buffer("embed", tensors["embed.weight"])
        self.register_buffer("lm_head", tensors["lm_head.weight"])
        self.register_buffer("positions", tensors.get("positions.weight"))
        self.register_buffer("project_in", tensors.get("project_in.weight"))
        self.register_buffer("project_out", tensors.get("project_out.weight"))
        self.final_norm = (
            Norm(spec.norm, spec.norm_eps, tensors["final_norm.weight"], tensors.get("final_norm.bias"))
            if spec.final_norm
            else None
        )
        self.layers = nn.ModuleList(DecoderLayer(spec, tensors, i, ops) for i in range(g.num_layers))
        cos, sin = self._rope_tables(max_seq_len) if not spec.learned_positions else (None, None)
        self.register_buffer("rope_cos", cos)
        self.register_buffer("rope_sin", sin)
        self.sparse_attn = frozenset(plan.sparse_attn_layers(g))
        self.sparse_mlp = frozenset(plan.sparse_mlp_layers(g))
        self.attn_keep = plan.attn_keep(g)

    def _rope_tables(self, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos / sin (max_seq_len, head_dim) in the model dtype, computed as transformers does (fp32)."""
        inv_freq, scaling = rope_frequencies(self.spec)
        device = self.embed.device
        position = torch.arange(max_seq_len, device=device, dtype=torch.float32)
        freqs = position[:, None] * inv_freq.to(device=device, dtype=torch.float32)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scaling).to(self.embed.dtype), (emb.sin() * scaling).to(self.embed.dtype)

    # --- shared pieces ---------------------------------------------------------------------------

    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = F.embedding(tokens, self.embed)
        if self.project_in is not None:
            h = F.linear(h, self.project_in)
        if self.positions is not None:
            h = h + F.embedding(positions + self.spec.position_offset, self.positions)
        return h

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.final_norm is not None:
            h = self.final_norm(h)
        if self.project_out is not None:
            h = F.linear(h, self.project_out)
        return F.linear(h, self.lm_head)

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """RoPE on (..., heads, D) with positions broadcasting over the heads' leading dims."""
        if self.rope_cos is None:
            return x
        cos = self.rope_cos[positions].unsqueeze(-2)
        sin = self.rope_sin[positions].unsqueeze(-2)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _qkv(self, layer: DecoderLayer, x: torch.Tensor, positions: torch.Tensor):
        g = self.geometry
        qkv = F.linear(x, layer.w_qkv, layer.b_qkv)
        q, k, v = qkv.split([self.spec.q_dim, self.spec.kv_dim, self.spec.kv_dim], dim=-1)
        q = q.unflatten(-1, (g.num_heads, g.head_dim))
        k = k.unflatten(-1, (g.num_kv_heads, g.head_dim))
        v = v.unflatten(-1, (g.num_kv_heads, g.head_dim))
        return self._rotate(q, positions), self._rotate(k, positions), v

    # --- prefill ---------------------------------------------------------------------------------

    def prefill(self, input_ids: torch.Tensor, lengths: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """Dense forward of right-padded prompts (B, T); K/V of every head to the cache; (B, vocab) logits.

        Row b's real tokens are ``input_ids[b, :lengths[b]]``. With right padding the causal mask alone
        keeps every real position from seeing padding (padding only follows real tokens), so the real
        positions' outputs are exact; the padded positions' K/V land in slots the lengths never expose.
        """
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device).expand(batch, length)
        h = self._embed(input_ids, positions)
        for layer in self.layers:
            h = self._prefill_layer(layer, h, positions, cache)
        last = (lengths.to(torch.long) - 1).clamp(min=0)
        h_last = h[torch.arange(batch, device=h.device), last]
        cache.lengths[:batch].copy_(lengths.to(torch.int32))
        return self._logits(h_last)

    def _prefill_layer(
        self, layer: DecoderLayer, h: torch.Tensor, positions: torch.Tensor, cache: StaticKVCache
    ):
        x = layer.attn_norm(h) if self.spec.pre_norm else h
        q, k, v = self._qkv(layer, x, positions)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D)
        cache.write_prompt(layer.layer, k, v)
        attn = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.geometry.group_size > 1
        )
        h = h + F.linear(attn.transpose(1, 2).flatten(2), layer.w_o, layer.b_o)
        return self._mlp_block(layer, h, layer.mlp_dense)

    def _mlp_block(self, layer: DecoderLayer, h: torch.Tensor, mlp) -> torch.Tensor:
        if not self.spec.pre_norm:
            h = layer.attn_norm(h)
            return layer.mlp_norm(h + mlp(h))
        return h + mlp(layer.mlp_norm(h))

    # --- decode ----------------------------------------------------------------------------------

    def decode(self, tokens: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """One new token per sequence (B,) at slot ``cache.lengths[b]``; returns (B, vocab) logits.

        Writes every head's K/V, attends over lengths + 1 slots (the sparse layers only over the kept
        heads / KV groups) and bumps the lengths in place. No host synchronisation.
        """
        batch = tokens.shape[0]
        slots = cache.lengths[:batch].to(torch.long).clamp(max=cache.max_seq_len - 1)
        seqlens = (slots + 1).to(torch.int32)
        h = self._embed(tokens, slots)
        for layer in self.layers:
            h = self._decode_layer(layer, h, slots, seqlens, cache)
        cache.lengths[:batch].copy_(seqlens)
        return self._logits(h)

    def _decode_layer(
        self,
        layer: DecoderLayer,
        h: torch.Tensor,
        slots: torch.Tensor,
        seqlens: torch.Tensor,
        cache: StaticKVCache,
    ) -> torch.Tensor:
        # The router input is the attention's input: the attention-norm output in pre-norm models, the
        # layer input in post-norm OPT (what the evaluation hooks hand the routers).
        x = layer.attn_norm(h) if self.spec.pre_norm else h
        q, k, v = self._qkv(layer, x, slots)
        cache.write_step(layer.layer, k, v, slots)
        k_cache, v_cache = cache.layer(layer.layer, h.shape[0])
        kv_idx = None
        if layer.layer in self.sparse_attn:
            kv_idx = head_indices(self.plan.head_routers[layer.layer], x, self.attn_keep)
        attn = self.ops.attention(q.contiguous(), k_cache, v_cache, seqlens, kv_idx)
        h = h + F.linear(attn.flatten(1), layer.w_o, layer.b_o)
        if layer.layer in self.sparse_mlp:
            keep = self.plan.neurons_kept(layer.layer, h.shape[0], self.geometry)
            idx = neuron_indices(self.plan.mlp_routers[layer.layer], x, keep)
            return self._mlp_block(layer, h, lambda m: self._mlp_sparse(layer, m, idx))
        return self._mlp_block(layer, h, layer.mlp_dense)

    def _mlp_sparse(self, layer: DecoderLayer, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        active = self.ops.relu_up(x, layer.w_up, layer.b_up, idx)
        return self.ops.down(active, layer.w_down_t, layer.b_down, idx)
