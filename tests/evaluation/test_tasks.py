"""The offline task suite: deterministic, shipped up to date, loadable by lm-eval with no network."""

from __future__ import annotations

import json
from pathlib import Path

from polar_sparsity.evaluation import build_tasks
from polar_sparsity.evaluation.harness import resolve_tasks


def test_shipped_data_matches_a_fresh_build(tmp_path: Path) -> None:
    fresh = build_tasks.build(tmp_path)
    for name, path in fresh.items():
        assert path.read_bytes() == (build_tasks.tasks_dir() / "data" / name).read_bytes(), name


def test_multiple_choice_items_are_well_formed() -> None:
    lines = (build_tasks.tasks_dir() / "data" / "continuation.jsonl").read_text().splitlines()
    items = [json.loads(line) for line in lines]
    assert len(items) == build_tasks.MC_ITEMS
    labels = [item["label"] for item in items]
    assert set(labels) == {0, 1, 2, 3}  # the answer is not always in the same slot
    for item in items:
        choices = item["choices"]
        assert len(choices) == 4 and len(set(choices)) == 4
        assert all(len(c.split(" ")) >= build_tasks.CONTINUATION_WORDS for c in choices)
        assert not item["context"].endswith(" ")  # lm-eval adds the " " between context and choice


def test_held_out_documents_only() -> None:
    from polar_sparsity.data.corpus import load_documents

    train = set(load_documents("train"))
    rows = [
        json.loads(x)
        for x in (build_tasks.tasks_dir() / "data" / "perplexity.jsonl").read_text().splitlines()
    ]
    assert rows and not any(row["text"] in train for row in rows)
    contexts = [
        json.loads(x)["context"] for x in (build_tasks.tasks_dir() / "data" / "continuation.jsonl").open()
    ]
    held_out = load_documents("validation") + load_documents("test")
    assert all(any(doc.startswith(c) for doc in held_out) for c in contexts)


def test_lm_eval_loads_the_local_tasks_offline(offline_env: None) -> None:
    tasks = resolve_tasks(["pydocs"])  # the tag covers both tasks
    loaded = tasks.manager.load(["pydocs"])["tasks"]
    mc, ppl = loaded["pydocs_continuation"], loaded["pydocs_perplexity"]
    docs = list(mc.test_docs())
    assert len(docs) == build_tasks.MC_ITEMS
    doc = docs[0]
    assert mc.doc_to_choice(doc) == doc["choices"] and mc.doc_to_target(doc) == doc["label"]
    assert mc.OUTPUT_TYPE == "multiple_choice" and ppl.OUTPUT_TYPE == "loglikelihood_rolling"
    assert len(list(ppl.test_docs())) == build_tasks.PERPLEXITY_DOCS
    assert {m["metric"] for m in ppl.config.metric_list} == {
        "word_perplexity",
        "byte_perplexity",
        "bits_per_byte",
    }
