"""The offline corpus: a frozen snapshot, split deterministically and disjointly."""

import pytest

from polar_sparsity.data.corpus import (
    CORPUS_NAME,
    SPLITS,
    corpus_path,
    load_documents,
    read_records,
    split_of,
)


def test_snapshot_is_shipped_and_small() -> None:
    path = corpus_path()
    assert path.name == f"{CORPUS_NAME}.jsonl.xz"
    assert 0 < path.stat().st_size <= 3_200_000


def test_records_are_well_formed_unique_and_sorted() -> None:
    records = read_records()
    ids = [r["id"] for r in records]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert {r["source"] for r in records} == {"topics", "docstring"}
    assert len({r["text"] for r in records}) == len(records)  # deduplicated


def test_splits_are_deterministic_and_disjoint() -> None:
    splits = {name: load_documents(name) for name in SPLITS}
    assert load_documents("validation") == splits["validation"]
    texts = [set(docs) for docs in splits.values()]
    assert all(not (a & b) for i, a in enumerate(texts) for b in texts[i + 1 :])
    assert sum(map(len, splits.values())) == len(read_records())
    assert 0.85 < len(splits["train"]) / len(read_records()) < 0.95


def test_split_of_depends_on_the_id_only() -> None:
    assert split_of("docstring:json.dumps") == split_of("docstring:json.dumps")
    assert {split_of(f"doc-{i}") for i in range(200)} == set(SPLITS)


def test_bad_split_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid: \\['train', 'validation', 'test'\\]"):
        load_documents("valid")
