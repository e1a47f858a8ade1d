"""Graph-timed sweep of every tuning candidate, per exact shape, for the selective GEMMs and attention.

``python -m polar_sparsity.kernels.bench.config_sweep [--op up,down,attn] [--model opt-66b,llama-3-8b]
[--batch 256] [--density 0.1,0.5] [--context 8192] [--sms 64,96] [--out sweep.csv]
[--save-table T.json]`` times,
at each (model, op, batch, density[, context]), every tuning candidate of the op plus the
heuristic's config and the shipped table's, exactly as ``kernels.bench gemm|attn|gqa`` time the op
(CUDA-graph replay over rotated weights or index sets, median); a config whose result differs from
the heuristic config's is recorded as not running (NaN), with a warning. Tuning meets a config key once, at
the first shape in its power-of-two bucket, and that config then serves the whole bucket; this shows
how each config fares across the shapes a key spans, and how far the heuristic and the table are
from the best: the data behind the heuristics' rules. Density is the kept fraction of MLP neurons
(``up``, ``down``) or of KV heads / groups (``attn``; MHA or GQA by the model).

``--sms`` repeats the sweep on part of the GPU, a CUDA green context of that many SMs, with every
heuristic, wave count and stream-K launch planned for it (:func:`_common.planning_for_sms`): how the
heuristics fare on a GPU with fewer SMs and more bandwidth per SM than this one (shared memory,
registers and instruction set stay this GPU's).

``--save-table`` keeps, for each key, the config whose worst ratio to each swept shape's fastest is
smallest (:func:`bucket_picks`), in the format ``kernels.bench.merge_tables`` merges.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

from polar_sparsity.reporting import write_csv

from .. import _common as C
from .. import _decode_attention as attn_mod
from .. import _tuning
from .. import selective_mlp_down as down_mod
from .. import selective_mlp_up as up_mod
from ._harness import l2_bytes, rotations, save_table, time_graph
from .cli import _list_of
from .gemm import _weights, weight_copies
from .shapes import MLP_DENSITIES, PAPER_MODELS, kept_units

OPS = ("up", "down", "attn")
FIELDS = ("sms", "model", "op", "M", "context", "density", "k", "key", "source", "us", "ratio_to_best", "cfg")
Launches = Callable[[dict], list[Callable[[], None]]]  # config -> one launch per rotated input set


@dataclass(frozen=True)
class Sweep:
    """One shape's config key, its (source, config) list, how to launch a config there and the
    buffer the launches write (each config's result is checked against the first's; None: not)."""

    key: str
    configs: list[tuple[str, dict]]
    launches: Launches
    out: torch.Tensor | None = None


def _sweep(key: str, candidates, heuristic, device, launch: Callable, inputs: list, out) -> Sweep:
    """The heuristic's config (the reference the others' results are checked against), every tuning
    candidate, then the shipped table's config (sources ``heuristic`` / ``candidate`` / ``table``);
    ``launch(cfg, one_of_inputs)`` runs a config once, writing ``out``."""
    configs = [("heuristic", dict(heuristic))] + [("candidate", dict(c)) for c in candidates]
    table = _tuning.shipped_config(key, _tuning.gpu_name(device))
    configs += [("table", dict(table))] if table is not None else []
    return Sweep(key, configs, lambda cfg: [lambda x=x: launch(cfg, x) for x in inputs], out)


def _gemm_sweep(op: str, M: int, k: int, model: str, ws: list[dict]) -> Sweep:
    """The selective up (or gated up) or down projection of ``k`` neurons, rotating weight copies and
    random index sets: as ``kernels.bench gemm``."""
    shape = PAPER_MODELS[model]
    d, n, gated = shape.hidden, shape.ffn, shape.mlp == "gated"
    dtype, dev = ws[0]["w_up"].dtype, ws[0]["w_up"].device
    gpu = C.gpu_facts(dev)
    sms, smem = gpu.sms, gpu.smem
    rot = max(len(ws), rotations(k * d * (3 if gated and op == "up" else 2)))
    inputs = [(ws[i % len(ws)], torch.randperm(n, device=dev)[:k].int()) for i in range(rot)]
    if op == "up":
        x = torch.randn(M, d, device=dev, dtype=dtype)
        out = torch.empty(M, k, device=dev, dtype=dtype)
        return _sweep(
            up_mod.config_key(M, k, d, gated),
            up_mod._candidates(M, k, d, sms, gated, smem),
            up_mod._heuristic(M, k, d, sms, gated, smem, gpu.operands_in_registers),
            dev,
            lambda cfg, wj: up_mod._launch(
                x, wj[0]["w_gate"], wj[0]["w_up"], wj[0]["b_up"], wj[1], out, not gated, cfg
            ),
            inputs,
            out,
        )
    a = torch.randn(M, k, device=dev, dtype=dtype)
    out = torch.empty(M, d, device=dev, dtype=dtype)
    return _sweep(
        down_mod.config_key(M, k, d),
        down_mod._candidates(M, k, d, sms, smem, gpu.tma),
        down_mod._heuristic(M, k, d, sms, smem, gpu.operands_in_registers, gpu.tma),
        dev,
        lambda cfg, wj: down_mod._launch(a, wj[0]["w_down_t"], wj[1], wj[0]["b_down"], out, cfg),
        inputs,
        out,
    )


def _attn_sweep(B: int, kept: int, kv: tuple[torch.Tensor, ...]) -> Sweep:
    """Selective decode attention over ``kept`` of the KV heads per sequence (random sets, rotated),
    full-length sequences, unselected heads zero-filled: as ``kernels.bench attn|gqa``."""
    q, k_cache, v_cache = kv
    _, Hq, D = q.shape
    Hkv, N = k_cache.shape[1], k_cache.shape[2]
    group, programs, dev = Hq // Hkv, B * kept, q.device
    sms, smem = C.num_sms(dev), C.max_shared_memory(dev)
    seqlens = torch.full((B,), N, device=dev, dtype=torch.int32)
    rot = rotations(B * kept * N * D * 4)
    idx = torch.rand(rot, B, Hkv, device=dev).argsort(-1)[..., :kept].int().contiguous()
    out = torch.empty_like(q)
    scale = attn_mod.LOG2E / math.sqrt(D)
    return _sweep(
        attn_mod.config_key(D, group, programs, N),
        attn_mod._candidates(group, programs, N, sms, D, smem),
        attn_mod._heuristic(group, programs, N, sms, D, smem),
        dev,
        lambda cfg, j: attn_mod._launch(q, k_cache, v_cache, seqlens, j, out, scale, kept, group, cfg, True),
        list(idx),
        out,
    )


FINALISTS = 3  # fastest candidates re-timed beside the heuristic's and the table's config


def _time(sweep: Sweep, cfg: dict, check: _tuning.OutputCheck) -> float:
    """Median microseconds of one config at this shape; NaN where it does not compile or launch, or
    computes a result other than the first config's (``check``)."""
    check.before()
    try:
        us = time_graph(sweep.launches(cfg), reps=10)
    except Exception as exc:  # noqa: BLE001 - a config that does not fit is a recorded result
        torch.cuda.synchronize()
        print(f"[sweep] {sweep.key} {cfg}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        return float("nan")
    if (diff := check.difference()) is not None:
        _tuning.warn_wrong_result(sweep.key, cfg, diff)
        return float("nan")
    return us


def time_configs(sweep: Sweep, shape: dict) -> list[dict]:
    """Rows of one shape: each config's median microseconds (NaN where it does not run or its result
    is not the heuristic config's) and its ratio to the fastest config at this shape.

    Timings drift over a long run of one shape's configs (H200, M = 256: one config took 113.8 / 114.0
    / 129.0 us as candidate, heuristic and table config, in that order).
    So the fastest candidates and the heuristic's and table's configs, the timings the ratios compare,
    are timed a second time back to back, and each keeps its faster figure."""
    with _tuning.OutputCheck(sweep.out) as check:
        us = [_time(sweep, cfg, check) for _, cfg in sweep.configs]
        ran = sorted((i for i, t in enumerate(us) if t == t), key=us.__getitem__)
        fastest = [i for i in ran if sweep.configs[i][0] == "candidate"][:FINALISTS]
        for i in fastest + [i for i in ran if sweep.configs[i][0] != "candidate"]:
            us[i] = min(us[i], _time(sweep, sweep.configs[i][1], check))
    rows = [
        dict(shape, key=sweep.key, source=src, us=t, cfg=cfg)
        for (src, cfg), t in zip(sweep.configs, us, strict=True)
    ]
    best = min((r["us"] for r in rows if r["us"] == r["us"]), default=float("nan"))
    for r in rows:
        r["ratio_to_best"] = r["us"] / best
    return rows


def bucket_picks(rows: list[dict]) -> dict[str, dict]:
    """Per config key, the config with the smallest worst ratio to the fastest of each swept shape
    of that key (a key spans a power-of-two range of unit counts; one config serves them all).
    Only configs timed at every shape of the key compete; a config timed twice at one shape (a
    candidate that is also the heuristic's) counts its faster time; ties go to the first listed."""
    ratios: dict[str, dict[str, dict[tuple, float]]] = defaultdict(lambda: defaultdict(dict))
    shapes: dict[str, set] = defaultdict(set)
    for r in rows:
        shape = (r["model"], r["op"], r["M"], r.get("context"), r["k"])
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


def _model_rows(model: str, args: argparse.Namespace, t0: float, sms: int) -> Iterator[list[dict]]:
    """One model's swept shapes, the rows of each as soon as it is timed."""
    shape = PAPER_MODELS[model]
    gemm_ops = [op for op in args.op if op != "attn"]
    if gemm_ops:
        d, n, gated = shape.hidden, shape.ffn, shape.mlp == "gated"
        ws = _weights(d, n, gated, weight_copies(d, n, l2_bytes()), torch.float16)
        for op in gemm_ops:
            for M in args.batch:
                for density in args.density:
                    k = kept_units(density, n)
                    point = dict(sms=sms, model=model, op=op, M=M, context="", density=density, k=k)
                    yield time_configs(_gemm_sweep(op, M, k, model, ws), point)
                    print(
                        f"[sweep] {sms} SMs {model} {op} M={M} density {density}: {time.time() - t0:.0f} s",
                        flush=True,
                    )
        del ws
    if "attn" in args.op:
        g = torch.Generator(device="cuda").manual_seed(0)
        for B in args.batch:
            for N in args.context:
                dims = ((B, shape.heads, shape.head_dim),) + ((B, shape.kv_heads, N, shape.head_dim),) * 2
                kv = tuple(torch.randn(*s, device="cuda", dtype=torch.float16, generator=g) for s in dims)
                for density in args.density:
                    kept = kept_units(density, shape.kv_heads)
                    point = dict(sms=sms, model=model, op="attn", M=B, context=N, density=density, k=kept)
                    yield time_configs(_attn_sweep(B, kept, kv), point)
                    print(
                        f"[sweep] {sms} SMs {model} attn B={B} N={N} density {density}: "
                        f"{time.time() - t0:.0f} s"
                    )
                del kv
    torch.cuda.empty_cache()


def _write(path: Path, rows: list[dict]) -> None:
    """All rows so far, in :data:`FIELDS` order (through a temporary name: a sweep cut short keeps what
    it timed)."""
    write_csv(
        path, [{f: json.dumps(r[f], sort_keys=True) if f == "cfg" else r[f] for f in FIELDS} for r in rows]
    )


def _summary(rows: list[dict]) -> None:
    print("| SMs | model | op | M | context | density | k | best, us | heuristic / best | table / best |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    by_shape: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by_shape[tuple(r[f] for f in FIELDS[:7])].append(r)
    for (sms, model, op, M, context, density, k), rs in by_shape.items():
        best = min((r["us"] for r in rs if r["us"] == r["us"]), default=float("nan"))
        ratio = {r["source"]: f"{r['ratio_to_best']:.3f}" for r in rs if r["source"] != "candidate"}
        print(
            f"| {sms} | {model} | {op} | {M} | {context or '-'} | {density} | {k} | {best:.1f} "
            f"| {ratio.get('heuristic', '-')} | {ratio.get('table', '-')} |"
        )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m polar_sparsity.kernels.bench.config_sweep", description=__doc__
    )
    p.add_argument("--op", type=_list_of(str, "ops"), default=["up", "down"], help=f"any of {', '.join(OPS)}")
    p.add_argument("--model", type=_list_of(str, "model names"), default=["opt-66b", "llama-3-8b"])
    p.add_argument("--batch", type=_list_of(int, "batch sizes"), default=[256])
    p.add_argument("--density", type=_list_of(float, "densities"), default=list(MLP_DENSITIES))
    p.add_argument("--context", type=_list_of(int, "context lengths"), default=[8192], help="attn only")
    p.add_argument(
        "--sms",
        type=_list_of(int, "SM counts"),
        default=[],
        help="also sweep on green contexts of these many SMs (default: the whole GPU only)",
    )
    p.add_argument("--out", type=Path, default=Path("config_sweep.csv"))
    p.add_argument("--save-table", type=Path, help="write each key's bucket pick (table format)")
    return p


def _check(args: argparse.Namespace) -> None:
    checks = [
        ([op for op in args.op if op not in OPS], f"unknown op(s) {{}}; choose from {list(OPS)}"),
        (
            [m for m in args.model if m not in PAPER_MODELS],
            f"unknown model(s) {{}}; choose from {sorted(PAPER_MODELS)}",
        ),
        ([d for d in args.density if not 0 < d <= 1], "densities {} are outside (0, 1]"),
        ([b for b in args.batch if b < 1], "batch sizes {} must be >= 1"),
        ([n for n in args.context if n < 1], "context lengths {} must be >= 1"),
        ([n for n in args.sms if n < 1], "SM counts {} must be >= 1"),
        (args.sms if args.save_table else [], "--save-table keeps configs for the whole GPU; drop --sms {}"),
        (
            [str(p) for p in (args.out, args.save_table) if p and (p.is_dir() or not p.parent.is_dir())],
            "output path(s) {} must name a file in an existing directory (rewritten after each shape)",
        ),
    ]
    for bad, message in checks:
        if bad:
            raise SystemExit(message.format(bad))
    if not torch.cuda.is_available():
        raise SystemExit("the sweep times kernels on a CUDA GPU; none is visible")
    if args.sms:
        total = C.num_sms(torch.device("cuda"))
        if too_many := [n for n in args.sms if n > total]:
            raise SystemExit(f"SM counts {too_many} exceed this GPU's {total} SMs")


@triton.jit
def _record_sm_kernel(OUT, spin):
    """Each program writes the SM it ran on, after ``spin`` steps that keep it there a while."""
    sm = tl.inline_asm_elementwise(
        "mov.u32 $0, %smid;", "=r,r", [tl.program_id(0)], dtype=tl.int32, is_pure=False, pack=1
    )
    x = tl.program_id(0).to(tl.float32)
    for _ in range(spin):
        x = x * 0.5 + 1.0
    tl.store(OUT + tl.program_id(0), tl.where(x > 0.0, sm, -1))


def _sms_in_use() -> int:
    """How many SMs the current stream's kernels run on (counted, not assumed: a green context's SM
    count is rounded to the driver's partition granularity)."""
    out = torch.full((64 * C.num_sms(torch.device("cuda")),), -1, device="cuda", dtype=torch.int32)
    _record_sm_kernel[(out.numel(),)](out, 20_000)
    return len(set(out.tolist()) - {-1})


def _green_context(sms: int) -> tuple[object, torch.cuda.Stream]:
    """A CUDA green context of ``sms`` SMs and a stream of it (kernels launched there run on those SMs
    only), the count checked. The context must outlive every use of its stream."""
    try:
        context = torch.cuda.green_contexts.GreenContext.create(
            num_sms=sms, device_id=torch.cuda.current_device()
        )
        stream = context.Stream()
    except (AttributeError, RuntimeError, TypeError) as exc:
        raise SystemExit(f"--sms {sms} needs a CUDA green context, which failed here: {exc}") from None
    with torch.cuda.stream(stream):
        if (used := _sms_in_use()) != sms:
            raise SystemExit(f"--sms {sms}: the driver's green context holds {used} SMs; ask for {used}")
    return context, stream


@contextmanager
def _on_sms(sms: int | None, stream: torch.cuda.Stream | None) -> Iterator[int]:
    """Run the block on a green context's stream with launches planned for its ``sms`` SMs, or on the
    whole GPU when ``sms`` is None; yields the SM count."""
    if sms is None:
        yield C.num_sms(torch.device("cuda"))
        return
    with torch.cuda.stream(stream), C.planning_for_sms(sms):
        yield sms


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    _check(args)
    # Created (and their SM counts checked) before any work: a bad count stops the run here.
    contexts = {sms: _green_context(sms) for sms in args.sms}
    t0, rows = time.time(), []
    for part in [None, *args.sms]:
        with _on_sms(part, contexts[part][1] if part else None) as sms:
            for model in args.model:
                for shape_rows in _model_rows(model, args, t0, sms):
                    rows += shape_rows
                    _write(args.out, rows)
    _summary(rows)
    if args.save_table:
        save_table(args.save_table, "bench.config_sweep (graph-timed)", bucket_picks(rows))
    print(f"{len(rows)} timings in {time.time() - t0:.0f} s; {args.out}", flush=True)


if __name__ == "__main__":
    main()
