# ruff: noqa: B023  (the closures are called inside the iteration that defines them)
"""Graph-timed candidate sweep of the selective GEMMs, per exact shape.

``python -m polar_sparsity.kernels.bench.gemm_sweep [--op down] [--model opt-66b,llama-3-8b]
[--batch 256] [--density 0.1,0.5] [--out gemm_sweep.csv] [--save-table T.json]`` times, at each
(model, op, batch, density), every tuning candidate of the op plus the heuristic's config and the
shipped table's, exactly as ``kernels.bench gemm`` times the op (CUDA-graph replay over rotated
weights and index sets, median). Where ``kernels.bench gemm --tune`` tunes a config key once, at the
first shape that meets it, this shows how each config fares across the shapes a key spans, and how
far the heuristic and the table are from the best: the data behind the heuristics' rules.

``--save-table`` keeps, for each key, the config whose worst ratio to each swept shape's fastest is
smallest (:func:`bucket_picks`), in the format ``kernels.bench.merge_tables`` merges.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from .. import _common as C
from .. import _tuning
from .. import selective_mlp_down as down_mod
from .. import selective_mlp_up as up_mod
from ._harness import l2_bytes, rotations, save_table, time_graph
from .cli import _list_of
from .gemm import _weights, weight_copies
from .shapes import MLP_DENSITIES, PAPER_MODELS, kept_units

OPS = ("up", "down")
FIELDS = ("model", "op", "M", "density", "k", "key", "source", "us", "ratio_to_best", "cfg")


def _configs(op: str, M: int, k: int, d: int, gated: bool, device: torch.device) -> list[tuple[str, dict]]:
    """(source, config): every tuning candidate, then the heuristic's and the shipped table's."""
    sms, smem = C.num_sms(device), C.max_shared_memory(device)
    if op == "up":
        key = up_mod.config_key(M, k, d, gated)
        out = [("candidate", c) for c in up_mod._candidates(M, k, d, sms, gated, smem)]
        out.append(("heuristic", dict(up_mod._heuristic(M, k, d, sms, gated, smem))))
    else:
        key = down_mod.config_key(M, k, d)
        out = [("candidate", c) for c in down_mod._candidates(M, k, d, sms, smem)]
        out.append(("heuristic", dict(down_mod._heuristic(M, k, d, sms, smem))))
    table = _tuning.shipped_config(key, _tuning.gpu_name(device))
    if table is not None:
        out.append(("table", dict(table)))
    return out


def _launchers(op: str, M: int, k: int, d: int, n: int, gated: bool, ws: list[dict]) -> Callable:
    """cfg -> one launch per rotated (weights, index set), as the gemm benchmark rotates them."""
    dtype, dev = ws[0]["w_up"].dtype, ws[0]["w_up"].device
    copies = len(ws)
    rot = max(copies, rotations(k * d * (3 if gated and op == "up" else 2)))
    idx = [torch.randperm(n, device=dev)[:k].int() for _ in range(rot)]
    if op == "up":
        x = torch.randn(M, d, device=dev, dtype=dtype)
        out = torch.empty(M, k, device=dev, dtype=dtype)
        return lambda cfg: [
            lambda w=ws[i % copies], j=idx[i]: up_mod._launch(
                x, w["w_gate"], w["w_up"], w["b_up"], j, out, not gated, cfg
            )
            for i in range(rot)
        ]
    a = torch.randn(M, k, device=dev, dtype=dtype)
    out = torch.empty(M, d, device=dev, dtype=dtype)
    return lambda cfg: [
        lambda w=ws[i % copies], j=idx[i]: down_mod._launch(a, w["w_down_t"], j, w["b_down"], out, cfg)
        for i in range(rot)
    ]


def sweep_shape(model: str, op: str, M: int, density: float, ws: list[dict]) -> list[dict]:
    """Rows of one shape: each config's median microseconds (NaN where it does not run)."""
    shape = PAPER_MODELS[model]
    d, n, gated = shape.hidden, shape.ffn, shape.mlp == "gated"
    k = kept_units(density, n)
    device = ws[0]["w_up"].device
    key = up_mod.config_key(M, k, d, gated) if op == "up" else down_mod.config_key(M, k, d)
    make = _launchers(op, M, k, d, n, gated, ws)
    rows = []
    for source, cfg in _configs(op, M, k, d, gated, device):
        try:
            us = time_graph(make(cfg), reps=10)
        except Exception as exc:  # noqa: BLE001 - a config that does not fit is a recorded result
            torch.cuda.synchronize()
            print(f"[sweep] {key} {cfg}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            us = float("nan")
        rows.append(
            dict(model=model, op=op, M=M, density=density, k=k, key=key, source=source, us=us, cfg=cfg)
        )
    best = min((r["us"] for r in rows if r["us"] == r["us"]), default=float("nan"))
    for r in rows:
        r["ratio_to_best"] = r["us"] / best
    return rows


def bucket_picks(rows: list[dict]) -> dict[str, dict]:
    """Per config key, the config with the smallest worst ratio to the fastest of each swept shape
    of that key (a key spans a power-of-two range of neuron counts; one config serves them all).
    Only configs timed at every shape of the key compete; a config timed twice at one shape (a
    candidate that is also the heuristic's) counts its faster time; ties go to the first listed."""
    ratios: dict[str, dict[str, dict[tuple, float]]] = defaultdict(lambda: defaultdict(dict))
    shapes: dict[str, set] = defaultdict(set)
    for r in rows:
        shape = (r["model"], r["M"], r["k"])
        shapes[r["key"]].add(shape)
        if r["ratio_to_best"] == r["ratio_to_best"]:
            at = ratios[r["key"]][json.dumps(r["cfg"], sort_keys=True)]
            at[shape] = min(at.get(shape, r["ratio_to_best"]), r["ratio_to_best"])
    picks = {}
    for key, by_cfg in ratios.items():
        complete = {c: max(v.values()) for c, v in by_cfg.items() if len(v) == len(shapes[key])}
        if complete:
            picks[key] = json.loads(min(complete, key=complete.get))
    return picks


def _summary(rows: list[dict]) -> None:
    print("| model | op | M | density | k | best, us | heuristic / best | table / best |")
    print("|---|---|---|---|---|---|---|---|")
    by_shape: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by_shape[(r["model"], r["op"], r["M"], r["density"], r["k"])].append(r)
    for (model, op, M, density, k), rs in by_shape.items():
        best = min((r["us"] for r in rs if r["us"] == r["us"]), default=float("nan"))
        ratio = {r["source"]: f"{r['ratio_to_best']:.3f}" for r in rs if r["source"] != "candidate"}
        print(
            f"| {model} | {op} | {M} | {density} | {k} | {best:.1f} | {ratio.get('heuristic', '-')} "
            f"| {ratio.get('table', '-')} |"
        )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m polar_sparsity.kernels.bench.gemm_sweep", description=__doc__)
    p.add_argument("--op", choices=(*OPS, "both"), default="both")
    p.add_argument("--model", type=_list_of(str, "model names"), default=["opt-66b", "llama-3-8b"])
    p.add_argument("--batch", type=_list_of(int, "batch sizes"), default=[256])
    p.add_argument("--density", type=_list_of(float, "densities"), default=list(MLP_DENSITIES))
    p.add_argument("--out", type=Path, default=Path("gemm_sweep.csv"))
    p.add_argument("--save-table", type=Path, help="write each key's bucket pick (table format)")
    return p


def _check(args: argparse.Namespace) -> None:
    unknown = [m for m in args.model if m not in PAPER_MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {sorted(PAPER_MODELS)}")
    bad = [d for d in args.density if not 0 < d <= 1]
    if bad:
        raise SystemExit(f"densities {bad} are outside (0, 1]")
    if any(b < 1 for b in args.batch):
        raise SystemExit(f"batch sizes {args.batch} must be >= 1")
    if not torch.cuda.is_available():
        raise SystemExit("the sweep times kernels on a CUDA GPU; none is visible")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    _check(args)
    ops = OPS if args.op == "both" else (args.op,)
    t0, rows = time.time(), []
    for model in args.model:
        shape = PAPER_MODELS[model]
        d, n, gated = shape.hidden, shape.ffn, shape.mlp == "gated"
        ws = _weights(d, n, gated, weight_copies(d, n, l2_bytes()), torch.float16)
        for op in ops:
            for M in args.batch:
                for density in args.density:
                    rows += sweep_shape(model, op, M, density, ws)
                    print(
                        f"[sweep] {model} {op} M={M} density {density}: {time.time() - t0:.0f} s", flush=True
                    )
        del ws
        torch.cuda.empty_cache()
    tmp = args.out.with_name(args.out.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows({**r, "cfg": json.dumps(r["cfg"], sort_keys=True)} for r in rows)
    tmp.replace(args.out)
    _summary(rows)
    if args.save_table:
        save_table(args.save_table, "bench.gemm_sweep (graph-timed)", bucket_picks(rows))
    print(f"{len(rows)} timings in {time.time() - t0:.0f} s; {args.out}", flush=True)


if __name__ == "__main__":
    main()
