"""The offline default corpus: English documentation that ships with CPython.

The text comes from ``pydoc_data.topics`` (the language reference topics behind ``help()``) and the
docstrings of the standard library (modules, classes, functions, methods). Those differ between Python
versions, so the corpus is a FROZEN snapshot committed inside the package
(``polar_sparsity/assets/corpus/python-docs.jsonl.xz``): every machine and Python version reads the same
documents. ``python -m polar_sparsity.data.corpus --build`` rebuilds the snapshot from the running
interpreter; nobody needs to, except to refresh it on purpose.

This module uses the standard library only, so it imports on machines without Hydra.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import io
import json
import lzma
import pkgutil
import sys
import warnings
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import ModuleType

from polar_sparsity.resources import ASSETS_DIR

CORPUS_NAME = "python-docs"
SPLITS = ("train", "validation", "test")

# Out of every 1000 hash buckets: train gets [0, 900), validation [900, 950), test [950, 1000).
_SPLIT_BOUNDS = {"train": (0, 900), "validation": (900, 950), "test": (950, 1000)}
_MIN_DOC_CHARS = 80  # one-line docstrings ("Return self+value.") teach a language model little
# Modules with import side effects (a browser, printing, a GUI), platform-only or deprecated shims that
# write files, and the test suite.
_SKIP_MODULES = frozenset(
    {
        "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "distutils",
        "test", "ensurepip", "pydoc_data", "msilib", "msvcrt", "winreg", "winsound", "nt",
    }
)  # fmt: skip
_SKIP_SUBPACKAGE_PARTS = frozenset({"test", "tests", "idle_test"})


def corpus_path() -> Path:
    """The committed snapshot (xz-compressed JSON lines)."""
    return ASSETS_DIR / "corpus" / f"{CORPUS_NAME}.jsonl.xz"


def split_of(doc_id: str) -> str:
    """The split a document belongs to: a stable hash of its id, so splits never depend on order."""
    bucket = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") % 1000
    return next(name for name, (lo, hi) in _SPLIT_BOUNDS.items() if lo <= bucket < hi)


def read_records(path: Path | None = None) -> list[dict[str, str]]:
    """All records of the snapshot, in stored (sorted-by-id) order."""
    with lzma.open(path or corpus_path(), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_documents(split: str) -> list[str]:
    """The texts of one split (``train``, ``validation`` or ``test``), in a deterministic order."""
    if split not in _SPLIT_BOUNDS:
        raise ValueError(f"unknown split {split!r}; valid: {list(SPLITS)}")
    return [r["text"] for r in read_records() if split_of(r["id"]) == split]


# --- building the snapshot ----------------------------------------------------------------------


def _stdlib_module_names() -> list[str]:
    """Standard-library modules (C accelerators like ``_pickle`` too) and their public submodules, sorted."""
    names: set[str] = set()
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("__") or top in _SKIP_MODULES:  # __main__, __phello__ run code on import
            continue
        module = _quiet_import(top)
        if module is None:
            continue
        names.add(top)
        for info in pkgutil.walk_packages(getattr(module, "__path__", []), prefix=f"{top}.", onerror=_ignore):
            parts = info.name.split(".")
            # Private submodules include package __main__ scripts (unittest.__main__ runs tests on import).
            if not any(p.startswith("_") or p in _SKIP_SUBPACKAGE_PARTS for p in parts):
                names.add(info.name)
    return sorted(names)


def _ignore(_name: str) -> None:
    """walk_packages calls this for subpackages that fail to import; those are skipped."""


def _quiet_import(name: str) -> ModuleType | None:
    """Import a module with its warnings and output swallowed; None where it cannot be imported here."""
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except (Exception, SystemExit):  # a missing C extension, a platform module, a script: skip it
            return None


def _own_doc(obj: object) -> str | None:
    """The object's own docstring, dedented; not one inherited from a base class."""
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else None


def _module_docstrings(name: str) -> Iterator[tuple[str, str]]:
    """(id, docstring) for a module, its classes and functions, and the classes' methods."""
    module = _quiet_import(name)
    if module is None:
        return
    yield name, _own_doc(module) or ""
    for attr, obj in sorted(vars(module).items()):
        if getattr(obj, "__module__", None) != name:  # defined here, not imported from elsewhere
            continue
        if inspect.isclass(obj):
            yield f"{name}.{attr}", _own_doc(obj) or ""
            for member_name, member in sorted(vars(obj).items()):
                if inspect.isroutine(member) or isinstance(member, (property, classmethod, staticmethod)):
                    yield f"{name}.{attr}.{member_name}", _own_doc(member) or ""
        elif inspect.isroutine(obj):
            yield f"{name}.{attr}", _own_doc(obj) or ""


def build_records() -> list[dict[str, str]]:
    """Documents from the running interpreter: pydoc topics, then docstrings; deduplicated, sorted by id."""
    from pydoc_data.topics import topics

    candidates = [(f"topics:{key}", "topics", text.strip()) for key, text in sorted(topics.items())]
    for name in _stdlib_module_names():
        candidates += [(f"docstring:{i}", "docstring", t) for i, t in _module_docstrings(name)]
    seen: set[str] = set()
    records = []
    for doc_id, source, text in candidates:
        if len(text) >= _MIN_DOC_CHARS and text not in seen:  # first occurrence wins: topics, then sorted
            seen.add(text)
            records.append({"id": doc_id, "source": source, "text": text})
    return sorted(records, key=lambda r: r["id"])


def write_snapshot(records: list[dict[str, str]], path: Path) -> None:
    """xz-compressed JSON lines; a fixed preset so rebuilding the same records gives the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    path.write_bytes(lzma.compress(payload.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true", help="rebuild the snapshot from this interpreter")
    parser.add_argument("--out", type=Path, default=None, help="where to write it (default: the package)")
    args = parser.parse_args(argv)
    if args.build:
        records = build_records()
        out = args.out or corpus_path()
        write_snapshot(records, out)
        print(f"wrote {len(records)} documents to {out} ({out.stat().st_size} bytes)")
    path = args.out or corpus_path()
    for split in SPLITS:
        docs = [r["text"] for r in read_records(path) if split_of(r["id"]) == split]
        print(f"{split}: {len(docs)} documents, {sum(map(len, docs))} characters")


if __name__ == "__main__":
    main()
