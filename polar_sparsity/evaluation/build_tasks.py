"""Build the offline lm-eval task suite from the offline corpus's held-out splits.

    python -m polar_sparsity.evaluation.build_tasks           # rewrite the shipped data files
    python -m polar_sparsity.evaluation.build_tasks --check   # verify they are up to date

Two tasks (lm-eval YAML in ``polar_sparsity/assets/tasks/``, data in ``.../tasks/data/``), both tagged
``pydocs``:

* ``pydocs_continuation`` (multiple choice, acc and acc_norm): a passage of a documentation text and
  four candidate continuations of the same number of words; the true one and three spans of other
  documents. Contexts come from the validation and test splits (never seen in pretraining or by the
  routers, which read the train split).
* ``pydocs_perplexity`` (loglikelihood_rolling: word_perplexity, byte_perplexity, bits_per_byte):
  the first documents of the validation split.

Both are small on purpose: the whole suite runs in seconds for a tiny model on a laptop CPU.

Everything is derived from the frozen corpus with a fixed seed, so rebuilding gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path
from typing import Any

from polar_sparsity.data.corpus import load_documents

SEED = 20250520  # the paper's arXiv month; any fixed value works
# Sizes keep the whole suite at about 25k tokens: seconds for a tiny model on a 2-core CPU.
CONTINUATION_WORDS = 4  # words per candidate continuation
MIN_CONTEXT_WORDS = 8
MAX_CONTEXT_WORDS = 12  # about 25 tokens per request
MC_ITEMS = 160
PERPLEXITY_DOCS = 50  # validation documents in the rolling-perplexity task (about 5k tokens)
CHOICES = 4
# A cut point: a single space between two non-space characters (never inside indentation).
_CUT = re.compile(r"(?<=\S) (?=\S)")


def tasks_dir() -> Path:
    """The shipped task suite (YAML, loader, data)."""
    return Path(__file__).resolve().parent.parent / "assets" / "tasks"


def _cuts(text: str) -> list[int]:
    return [m.start() for m in _CUT.finditer(text)]


def _span(text: str, cuts: list[int], index: int, words: int) -> str:
    """The ``words`` words after cut ``index`` (a cut is the space before a word)."""
    end = cuts[index + words] if index + words < len(cuts) else None
    return text[cuts[index] + 1 : end] if end is not None else ""


def continuation_items(documents: list[str], rng: random.Random) -> list[dict[str, Any]]:
    """Multiple-choice items from ``MC_ITEMS`` long enough documents (distractors: other documents' spans)."""
    cut_lists = [_cuts(doc) for doc in documents]
    eligible = [i for i, cuts in enumerate(cut_lists) if len(cuts) > MIN_CONTEXT_WORDS + CONTINUATION_WORDS]
    items = []
    for doc_index in sorted(rng.sample(eligible, min(MC_ITEMS, len(eligible)))):
        text, cuts = documents[doc_index], cut_lists[doc_index]
        # Context: the document's start, half of it within [MIN, MAX] words, leaving room for the answer.
        half = max(MIN_CONTEXT_WORDS, len(cuts) // 2)
        cut = min(half, MAX_CONTEXT_WORDS, len(cuts) - CONTINUATION_WORDS - 1)
        answer = _span(text, cuts, cut, CONTINUATION_WORDS)
        distractors: list[str] = []
        while len(distractors) < CHOICES - 1:
            other = rng.choice(eligible)
            other_cuts = cut_lists[other]
            start = rng.randrange(MIN_CONTEXT_WORDS // 2, len(other_cuts) - CONTINUATION_WORDS)
            span = _span(documents[other], other_cuts, start, CONTINUATION_WORDS)
            if other != doc_index and span and span != answer and span not in distractors:
                distractors.append(span)
        label = rng.randrange(CHOICES)
        choices = distractors[:label] + [answer] + distractors[label:]
        items.append({"id": len(items), "context": text[: cuts[cut]], "choices": choices, "label": label})
    return items


def build(out_dir: Path | None = None) -> dict[str, Path]:
    """Write the data files; returns {file name: path}."""
    data_dir = (out_dir or tasks_dir()) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    held_out = load_documents("validation") + load_documents("test")
    files = {
        "continuation.jsonl": continuation_items(held_out, rng),
        "perplexity.jsonl": [
            {"id": i, "text": t} for i, t in enumerate(load_documents("validation")[:PERPLEXITY_DOCS])
        ],
    }
    written = {}
    for name, rows in files.items():
        path = data_dir / name
        path.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))
        written[name] = path
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only verify the shipped files are up to date")
    parser.add_argument("--out", type=Path, default=None, help="task dir to write (default: the package)")
    args = parser.parse_args(argv)
    if args.check:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            fresh = build(Path(tmp))
            stale = [n for n, p in fresh.items() if p.read_bytes() != (tasks_dir() / "data" / n).read_bytes()]
        if stale:
            raise SystemExit(f"stale task data: {stale}; run python -m polar_sparsity.evaluation.build_tasks")
        print("task data up to date")
        return
    for name, path in build(args.out).items():
        print(f"{name}: {sum(1 for _ in path.open())} items -> {path}")


if __name__ == "__main__":
    main()
