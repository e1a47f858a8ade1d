"""Our perplexity against a manual computation; last:N scoring; token budgets."""

from __future__ import annotations

import math

import torch

from polar_sparsity.data.tokenizer import load_tokenizer
from polar_sparsity.evaluation.perplexity import perplexity, scored_targets
from polar_sparsity.models.families import build_hf_config, family_for_config
from polar_sparsity.schema import Mode
from polar_sparsity.sparsity import SparsityPlan, apply_sparsity

TEXTS = ["def f(x):\n    return x + 1\n" * 8, "The quick brown fox jumps over the lazy dog. " * 12]


def _model():
    from transformers import AutoModelForCausalLM

    config = build_hf_config(
        "opt",
        {"vocab_size": 2048, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4,
         "ffn_dim": 64, "activation": "relu", "norm": "layernorm", "max_position_embeddings": 128},
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _manual(model, tokenizer, seq_len: int) -> float:
    ids = []
    for text in TEXTS:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    body = seq_len - 1
    nll, count = 0.0, 0
    for start in range(0, len(ids), body):
        sequence = torch.tensor([[tokenizer.bos_token_id] + ids[start : start + body]])
        with torch.no_grad():
            logits = model(sequence).logits[0, :-1]
        nll += float(torch.nn.functional.cross_entropy(logits, sequence[0, 1:], reduction="sum"))
        count += sequence.shape[1] - 1
    return math.exp(nll / count)


def test_matches_a_manual_computation() -> None:
    model, tokenizer = _model(), load_tokenizer()
    result = perplexity(model, tokenizer, TEXTS, seq_len=32, batch_size=3)
    assert math.isclose(result["perplexity"], _manual(model, tokenizer, 32), rel_tol=1e-5)
    assert result["scored_tokens"] == result["tokens"] - math.ceil(result["tokens"] / 32)


def test_max_tokens_and_last_n_scoring() -> None:
    model, tokenizer = _model(), load_tokenizer()
    capped = perplexity(model, tokenizer, TEXTS, seq_len=32, batch_size=2, max_tokens=50)
    assert capped["tokens"] == 50
    last = perplexity(model, tokenizer, TEXTS, seq_len=32, batch_size=2, last_n=4)
    full, tail = divmod(last["tokens"], 32)
    # N - 1 per row (a row's last position has no target); the stream's tail row may be shorter.
    assert last["scored_tokens"] == 3 * full + max(min(4, tail) - 1, 0)


def test_scored_targets_follow_row_ends() -> None:
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    assert scored_targets(mask, None).sum(-1).tolist() == [5, 2]
    assert scored_targets(mask, 3).tolist() == [
        [False, False, False, True, True],
        [True, True, False, False, False],
    ]


def test_last_n_masking_with_padded_rows_scores_only_masked_positions() -> None:
    # Under last:N the oracle changes exactly the scored predictions; earlier ones stay dense.
    model, tokenizer = _model(), load_tokenizer()
    adapter = family_for_config(model.config)
    geometry = adapter.geometry(model.config)
    dense = perplexity(model, tokenizer, TEXTS, seq_len=32, batch_size=3, last_n=4)
    plan = SparsityPlan(Mode.sparse_attn, attn_topk=0.25, last_n=4)
    with apply_sparsity(model, adapter, geometry, plan) as controller:
        sparse = perplexity(model, tokenizer, TEXTS, seq_len=32, batch_size=3, last_n=4,
                            on_batch=controller.set_lengths)  # fmt: skip
    assert sparse["scored_tokens"] == dense["scored_tokens"]
    assert sparse["perplexity"] != dense["perplexity"]
    assert controller.stats.attn_density() == 0.25


def test_last_n_computes_only_the_logits_it_scores_and_matches_the_full_forward() -> None:
    model, tokenizer = _model(), load_tokenizer()
    last = perplexity(model, tokenizer, TEXTS, seq_len=32, batch_size=3, last_n=4)
    # Reference: full logits for every position, the last:N targets picked afterwards.
    from polar_sparsity.data.tokens import batched, packed_sequences

    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in batched(packed_sequences(TEXTS, tokenizer, 32, 2048), 3, tokenizer.pad_token_id):
            ids, mask = batch["input_ids"], batch["attention_mask"]
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            scored = scored_targets(mask, 4)
            nll, count = nll + float(losses[scored].sum()), count + int(scored.sum())
    assert last["scored_tokens"] == count
    assert math.isclose(last["nll"], nll / count, rel_tol=1e-5)
