"""Sampling and stopping: seeded reproducibility, top-p truncation, EOS stops and finish reasons."""

from __future__ import annotations

import pytest
import torch

from polar_sparsity.decode import sample
from tests.decode.helpers import PROMPTS, engine_for
from tests.helpers import tiny_model


@pytest.fixture(scope="module")
def engine():
    _, model = tiny_model("llama-gqa")
    return engine_for(model)


def test_seeded_sampling_is_reproducible(engine) -> None:
    first = engine.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=3)
    again = engine.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=3)
    other = engine.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=4)
    greedy = engine.generate(PROMPTS, max_new_tokens=10)
    assert first.new_tokens == again.new_tokens
    assert first.new_tokens != other.new_tokens
    assert first.new_tokens != greedy.new_tokens


def test_top_p_keeps_the_smallest_prefix_reaching_p() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.3, 0.2]])).expand(2000, 4)
    generator = torch.Generator().manual_seed(0)
    drawn = sample(logits, 1.0, 0.6, generator)  # 0.4 + 0.3 reaches 0.6: tokens 1 and 2 only
    assert set(drawn.tolist()) == {1, 2}
    share = (drawn == 1).float().mean().item()
    assert abs(share - 4 / 7) < 0.05  # renormalised over the kept tokens
    assert set(sample(logits, 1.0, 0.05, generator).tolist()) == {1}
    assert set(sample(logits, 1.0, 1.0, generator).tolist()) == {0, 1, 2, 3}


def test_low_temperature_approaches_greedy(engine) -> None:
    cold = engine.generate(PROMPTS, max_new_tokens=6, temperature=1e-4, seed=1)
    assert cold.new_tokens == engine.generate(PROMPTS, max_new_tokens=6).new_tokens


def test_eos_stops_each_sequence(engine) -> None:
    free = engine.generate(PROMPTS, max_new_tokens=8)
    eos = free.new_tokens[0][2]
    stopped = engine.generate(PROMPTS, max_new_tokens=8, eos_token_id=eos)
    for full, cut, reason in zip(free.new_tokens, stopped.new_tokens, stopped.finish_reasons, strict=True):
        if eos in full:
            assert cut == full[: full.index(eos) + 1] and reason == "eos"
        else:
            assert cut == full and reason == "length"
    assert stopped.finish_reasons[0] == "eos"
    assert stopped.prompt_lengths == [len(p) for p in PROMPTS]


def test_generation_stops_when_every_sequence_ended(engine) -> None:
    free = engine.generate([PROMPTS[1]], max_new_tokens=8)
    eos = free.new_tokens[0][1]
    stopped = engine.generate([PROMPTS[1]], max_new_tokens=8, eos_token_id=eos)
    assert stopped.new_tokens[0][-1] == eos and len(stopped.new_tokens[0]) <= 2
    assert stopped.decode_steps == len(stopped.new_tokens[0]) - 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
        ({"max_new_tokens": 4, "temperature": -1.0}, "temperature=-1.0"),
        ({"max_new_tokens": 4, "top_p": 0.0}, "top_p=0.0"),
        ({"max_new_tokens": 40}, "max_seq_len"),
    ],
)
def test_bad_generation_arguments_are_refused(engine, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        engine.generate(PROMPTS, **kwargs)


@pytest.mark.parametrize(
    ("prompts", "message"), [([], "no prompts"), ([[1], []], "prompt 1 is empty"), ([[5, 999]], "999")]
)
def test_bad_prompts_are_refused(engine, prompts, message) -> None:
    with pytest.raises(ValueError, match=message):
        engine.generate(prompts, max_new_tokens=2)


def test_too_many_prompts_are_refused(engine) -> None:
    with pytest.raises(ValueError, match="batch of 5"):
        engine.generate([[1]] * 5, max_new_tokens=2)
