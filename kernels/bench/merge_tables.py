"""Merge tuning tables.

``python -m polar_sparsity.kernels.bench.merge_tables OUT.json IN.json [IN.json ...]``.

Later inputs override earlier ones key by key; used to turn the ``--save-table`` files of a tuning
session into a shipped ``kernels/tuned_<gpu>.json``. All inputs must name the same GPU (their ``gpu``
field, or the GPU of their ``env``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def merge(out: Path, inputs: list[Path]) -> dict:
    table: dict = {"gpu": "", "sources": [], "configs": {}}
    for path in inputs:
        part = json.loads(path.read_text())
        gpu = part.get("env", {}).get("gpu") or part.get("gpu", "")
        if table["gpu"] and gpu != table["gpu"]:
            raise SystemExit(f"{path} is for GPU {gpu!r} but earlier inputs are for {table['gpu']!r}")
        table["gpu"] = gpu
        table["configs"].update(part.get("configs", {}))
        if "note" in part:  # a shipped table's description of where its configs came from
            table["note"] = part["note"]
        if "sources" in part:  # an already merged table: keep its provenance
            table["sources"] += [src for src in part["sources"] if src not in table["sources"]]
        else:
            table["sources"].append(
                {"file": path.name, "source": part.get("source", ""), "env": part.get("env", {})}
            )
    table["configs"] = dict(sorted(table["configs"].items()))
    out.write_text(json.dumps(table, indent=1) + "\n")
    return table


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    t = merge(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
    print(f"{sys.argv[1]}: {len(t['configs'])} configs")
