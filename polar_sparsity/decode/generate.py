"""Prefill, decode steps, sampling and the generation loop (gpt-fast style free functions).

``prefill`` and ``decode_one_token`` are the two forwards of the compact model over the static KV
cache; ``CudaGraphDecoder`` captures the decode step once per batch size and replays it (static
token and logits buffers, the cache's lengths bumped in place inside the graph); ``generate`` runs
prompts to completion with greedy or seeded sampling and per-sequence stops.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from polar_sparsity.decode.kv_cache import StaticKVCache
from polar_sparsity.decode.model import CompactDecoder

DecodeStep = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Generation:
    """New tokens per prompt and how the run went (times in seconds; densities per layer, 1.0 = dense)."""

    new_tokens: list[list[int]]
    finish_reasons: list[str]  # "eos" | "length"
    prompt_lengths: list[int]
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    attn_density: dict[int, float]
    mlp_density: dict[int, float]

    @property
    def generated_tokens(self) -> int:
        return sum(len(tokens) for tokens in self.new_tokens)

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens produced by decode steps (all but each sequence's first) per decode second."""
        produced = self.generated_tokens - len(self.new_tokens)
        return produced / self.decode_seconds if self.decode_seconds > 0 else 0.0


@torch.no_grad()
def prefill(
    model: CompactDecoder, cache: StaticKVCache, input_ids: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """Dense forward of right-padded prompts (B, T) with real lengths (B,): last real position's logits."""
    return model.prefill(input_ids, lengths, cache)


@torch.no_grad()
def decode_one_token(model: CompactDecoder, cache: StaticKVCache, tokens: torch.Tensor) -> torch.Tensor:
    """One decode step for the whole batch: tokens (B,) -> logits (B, vocab); eager (no graph)."""
    return model.decode(tokens, cache)


class CudaGraphDecoder:
    """Decode steps replayed from one CUDA graph per batch size.

    Capture happens on the first step of a batch size: two eager warm-up steps first (so Triton
    compiles and tunes its launch configs outside the capture), with the cache lengths restored
    after each so the warm-up leaves no trace (its K/V writes land in slots the next real step
    overwrites). The graph reads the static token buffer and writes the static logits buffer.
    """

    def __init__(self, model: CompactDecoder, cache: StaticKVCache) -> None:
        self.model, self.cache = model, cache
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._pool = None

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        batch = tokens.shape[0]
        if batch not in self._graphs:
            self._graphs[batch] = self._capture(batch, tokens.device)
        graph, static_tokens, static_logits = self._graphs[batch]
        static_tokens.copy_(tokens)
        graph.replay()
        return static_logits.clone()

    def _capture(self, batch: int, device: torch.device):
        static_tokens = torch.zeros(batch, dtype=torch.long, device=device)
        saved = self.cache.lengths.clone()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.model.decode(static_tokens, self.cache)
                self.cache.lengths.copy_(saved)
        torch.cuda.current_stream(device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_logits = self.model.decode(static_tokens, self.cache)
        self.cache.lengths.copy_(saved)
        return graph, static_tokens, static_logits


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Next tokens (B,): argmax at temperature 0, else a draw from the (top-p truncated) softmax."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: a token goes when the mass before it does.
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (1 keeps the whole distribution)")


def pad_prompts(
    prompts: list[list[int]], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids and (B,) lengths, after checking every prompt."""
    if not prompts:
        raise ValueError("no prompts: pass at least one list of token ids")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        bad = [t for t in prompt if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary 0..{vocab_size - 1}")
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int32)
    return ids.to(device), lengths.to(device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(
    model: CompactDecoder,
    cache: StaticKVCache,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_id: int | None = None,
    progress: bool = False,
    decode_step: DecodeStep | None = None,
) -> Generation:
    """Generate up to ``max_new_tokens`` per prompt; a sequence stops at its first ``eos_token_id``.

    ``decode_step`` runs one batch step (default: eager ``decode_one_token``; the engine passes its
    CUDA-graph replayer). Finished sequences ride along until the whole batch is done; their extra
    tokens are dropped.
    """
    check_sampling(max_new_tokens, temperature, top_p)
    device = model.embed.device
    input_ids, lengths = pad_prompts(prompts, model.geometry.vocab_size, device)
    prompt_lengths = [len(p) for p in prompts]
    # The last new token is never fed back, so it needs no cache slot.
    cache.check_room(len(prompts), max(prompt_lengths) + max_new_tokens - 1)
    step = decode_step or (lambda tokens: decode_one_token(model, cache, tokens))
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None

    _synchronize(device)
    start = time.perf_counter()
    token = sample(prefill(model, cache, input_ids, lengths), temperature, top_p, generator)
    _synchronize(device)
    prefill_seconds = time.perf_counter() - start

    produced = [token]
    done = token == eos_token_id if eos_token_id is not None else None
    steps = 0
    start = time.perf_counter()
    for _ in tqdm(range(max_new_tokens - 1), desc="decode", disable=not progress, leave=False):
        if done is not None and bool(done.all()):
            break
        token = sample(step(token), temperature, top_p, generator)
        produced.append(token)
        steps += 1
        if done is not None:
            done |= token == eos_token_id
    _synchronize(device)
    decode_seconds = time.perf_counter() - start

    new_tokens, reasons = _cut_at_eos(torch.stack(produced, dim=1).tolist(), eos_token_id)
    return Generation(
        new_tokens=new_tokens,
        finish_reasons=reasons,
        prompt_lengths=prompt_lengths,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        decode_steps=steps,
        attn_density=model.plan.attn_density(model.geometry),
        mlp_density=model.plan.mlp_density(model.geometry, len(prompts)),
    )


def _cut_at_eos(rows: list[list[int]], eos_token_id: int | None) -> tuple[list[list[int]], list[str]]:
    """Each row up to and including its first EOS ("eos"), else whole ("length")."""
    tokens, reasons = [], []
    for row in rows:
        if eos_token_id is not None and eos_token_id in row:
            tokens.append(row[: row.index(eos_token_id) + 1])
            reasons.append("eos")
        else:
            tokens.append(row)
            reasons.append("length")
    return tokens, reasons
