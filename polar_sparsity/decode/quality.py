"""Generation quality of sparse decoding: what log-likelihood tasks do not see.

``python -m polar_sparsity.decode.quality [overrides ...]`` takes ``generate.py``'s overrides (model,
sparsity, paths.routers, prompts, decode.max_new_tokens; default 64 new tokens, greedy) and reports,
for the same prompts decoded greedily by the dense and the sparse engine:

- **teacher-forced agreement**: the sparse engine is fed the dense continuation; the share of steps
  where its next token is the dense one (per-step fidelity, not compounded by earlier divergence);
- **free-running agreement** and the **first divergence**: position-wise equality of the two greedy
  continuations, and the first position where they differ (mean over prompts);
- **dense perplexity** of each continuation: how likely the unmodified model finds the sparse model's
  text, next to its own (its own is the floor: greedy decoding maximises each step's likelihood).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch

from polar_sparsity.decode.prompts import encode_prompts, resolve_prompts
from polar_sparsity.models.loading import LoadedModel


@torch.no_grad()
def teacher_forced_agreement(engine: Any, prompts: list[list[int]], continuation: list[list[int]]) -> float:
    """Share of steps where the engine, fed ``continuation``, predicts its next token (greedy)."""
    from polar_sparsity.decode.generate import pad_prompts

    steps = min(len(tokens) for tokens in continuation)
    ids, lengths = pad_prompts(prompts, engine.spec.geometry.vocab_size, engine.device)
    target = torch.tensor([tokens[:steps] for tokens in continuation], device=engine.device)
    predicted = [engine.prefill(ids, lengths).argmax(-1)]
    for step in range(steps - 1):
        predicted.append(engine.decode_one_token(target[:, step]).argmax(-1))
    return float((torch.stack(predicted, dim=1) == target).float().mean())


def free_running_agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """(position-wise agreement, mean first divergence) of two sets of continuations."""
    agree, first = [], []
    for x, y in zip(a, b, strict=True):
        n = min(len(x), len(y))
        same = [x[i] == y[i] for i in range(n)]
        agree.append(sum(same) / max(n, 1))
        first.append(same.index(False) if False in same else n)
    return sum(agree) / len(agree), sum(first) / len(first)


@torch.no_grad()
def dense_perplexity(loaded: LoadedModel, prompts: list[list[int]], continuation: list[list[int]]) -> float:
    """Perplexity the unmodified Hugging Face model assigns to the continuations given their prompts."""
    nll, count = 0.0, 0
    for prompt, tokens in zip(prompts, continuation, strict=True):
        ids = torch.tensor([prompt + tokens], device=loaded.input_device)
        logits = loaded.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, len(prompt) :], reduction="sum"))
        count += len(tokens)
    return math.exp(nll / count)


def measure(overrides: list[str]) -> dict[str, Any]:
    """Dense and sparse engines on the same loaded model and prompts: the four figures above."""
    from polar_sparsity.decode import DecodeEngine
    from polar_sparsity.decode.api import compose_settings
    from polar_sparsity.decode.runner import generation_plan
    from polar_sparsity.models.loading import load_model, resolve_device

    settings = compose_settings(mode="sparse", overrides=["decode.max_new_tokens=64", *overrides])
    device = resolve_device(settings.device)
    plan = generation_plan(settings, device)
    loaded = load_model(settings.model, device=str(device), seed=settings.seed)
    prompts = encode_prompts(loaded.tokenizer, resolve_prompts(settings.prompts, settings.prompts_file))
    new_tokens = settings.decode.max_new_tokens
    size = dict(max_batch_size=len(prompts), max_seq_len=max(map(len, prompts)) + new_tokens)
    dense_engine = DecodeEngine.from_hf(loaded, type(plan)(), **size)
    sparse_engine = DecodeEngine.from_hf(loaded, plan, **size)
    # No EOS stop: both continuations keep their full length, so positions line up.
    dense = dense_engine.generate(prompts, max_new_tokens=new_tokens).new_tokens
    sparse = sparse_engine.generate(prompts, max_new_tokens=new_tokens).new_tokens
    agreement, first_divergence = free_running_agreement(dense, sparse)
    return {
        "model": settings.model.name,
        "attn_topk": settings.sparsity.attn_topk,
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "teacher_forced_agreement": teacher_forced_agreement(sparse_engine, prompts, dense),
        "free_running_agreement": agreement,
        "first_divergence": first_divergence,
        "dense_ppl_of_dense_text": dense_perplexity(loaded, prompts, dense),
        "dense_ppl_of_sparse_text": dense_perplexity(loaded, prompts, sparse),
    }


def main(argv: list[str] | None = None) -> None:
    result = measure(list(sys.argv[1:] if argv is None else argv))
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
