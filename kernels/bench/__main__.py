"""CLI: ``python -m polar_sparsity.kernels.bench {attn,gqa,gemm,mlp,block,all}``.

Options: ``[--out DIR] [--tuning tune|cached|heuristic] [--no-shipped-tables] [--cache-dir D] [--tune]
[--save-table F]`` and the shape options (``--model``, dimensions, ``--batch --context
--density|--kept-heads --active-neurons``, ``--dry-run``, ``--memory-limit``; see ``cli.py`` and
docs/kernels.md); without shape options the paper's tables run. Launch configs come from the
shipped table of this GPU, the user tuning cache, first-use tuning and the heuristic, in that
order (``--tuning`` and ``--no-shipped-tables`` narrow it; ``--tune`` re-tunes every key met).

Writes ``<bench>.csv``, ``<bench>.png`` and ``<bench>_meta.json`` (GPU, versions, measured HBM
bandwidth, shapes) per benchmark into ``--out`` (default ``artifacts/kernels_bench``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from polar_sparsity.reporting import write_csv

from .. import _tuning
from . import _harness as h
from . import cli
from .shapes import BENCHES, Case, ShapeError

TITLES = {
    "attn": "MHA selective head decode attention vs dense (fp16)",
    "gqa": "GQA selective KV-group decode attention vs dense (fp16)",
    "gemm": "selective MLP GEMMs vs cuBLAS dense (fp16)",
    "mlp": "whole MLP incl. router: dense vs sparse (fp16)",
    "block": "whole decode block incl. routers: dense vs sparse (fp16)",
}


def _run_one(name: str, bw: float, cases: list[Case], tune: bool) -> Iterator[list[dict]]:
    """The benchmark's rows, one case at a time."""
    if name in ("attn", "gqa"):
        from . import attention

        return attention.run(name, bw, cases)
    if name == "gemm":
        from . import gemm

        return gemm.run(bw, cases, tune=tune)
    from . import model

    return model.run_mlp(cases) if name == "mlp" else model.run_block(cases)


def _shapes(cases: list[Case]) -> list[dict]:
    """What the meta file records per case: the model's dimensions, batch, context, density points."""
    return [
        {
            "shape": c.label,
            **vars(c.model),
            "batch": c.batch,
            "context": c.context,
            "points": [vars(p) for p in c.points],
        }
        for c in cases
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m polar_sparsity.kernels.bench", description=__doc__)
    p.add_argument("bench", choices=(*BENCHES, "all"))
    p.add_argument("--out", type=Path, default=Path("artifacts/kernels_bench"))
    p.add_argument(
        "--tuning",
        choices=_tuning.MODES,
        help="config sources (default: $POLAR_SPARSITY_KERNEL_TUNING or tune)",
    )
    p.add_argument("--no-shipped-tables", action="store_true", help="ignore the shipped table of this GPU")
    p.add_argument("--cache-dir", type=Path, help="tuning cache directory (default: the user cache)")
    p.add_argument("--tune", action="store_true", help="re-tune every config key met (slow; fills the cache)")
    p.add_argument("--tune-budget-s", type=float, default=1e9, help="stop re-tuning keys after this")
    p.add_argument("--save-table", type=Path, help="write the configs used to this JSON (table format)")
    cli.add_shape_options(p)
    args = p.parse_args(argv)
    try:
        plans = cli.plan(args.bench, args)
    except ShapeError as exc:
        p.error(str(exc))
    free = cli.free_bytes(args.memory_limit)
    l2 = h.l2_bytes() if torch.cuda.is_available() else cli.ASSUMED_L2_BYTES
    if args.dry_run:
        cli.print_plan(plans, l2, free)
        cli.check_memory(plans, l2, free)
        return
    if not torch.cuda.is_available():
        raise SystemExit("kernels.bench needs a CUDA GPU (--dry-run lists the cases without one)")
    cli.check_memory(plans, l2, free)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    _tuning.set_mode("tune" if args.tune else args.tuning)
    if args.no_shipped_tables:
        _tuning.use_shipped_tables(False)
    if args.cache_dir is not None:
        _tuning.set_cache_dir(args.cache_dir)
    _tuning.set_force_tune(args.tune)
    tune = args.tune
    env = h.env_info()
    copy_bw, read_bw = h.hbm_bandwidth(), h.read_bandwidth()
    # The limit line: the faster of the two measured streams (our ops mostly read), so that
    # "fraction of limit" is never flattered by a slow reference stream.
    bw = max(copy_bw, read_bw)
    print(
        f"{env['gpu']}: torch {env['torch']} triton {env['triton']} CUDA {env['cuda']}; copy bandwidth "
        f"{copy_bw / 1e12:.3f} TB/s, read bandwidth {read_bw / 1e12:.3f} TB/s; limit uses "
        f"{bw / 1e12:.3f} TB/s",
        flush=True,
    )
    for name, cases in plans.items():
        tb = time.time()
        rows: list[dict] = []
        for case_rows in _run_one(name, bw, cases, tune):
            # The CSV rewritten after every case: a run stopped early keeps what it timed.
            rows += [{"bench": name, **r} for r in case_rows]
            write_csv(args.out / f"{name}.csv", rows)
        h.write_meta(
            args.out / f"{name}_meta.json",
            dict(
                env,
                bench=name,
                hbm_copy_bandwidth_Bps=copy_bw,
                hbm_read_bandwidth_Bps=read_bw,
                limit_bandwidth_Bps=bw,
                shapes=_shapes(cases),
                dtype="float16",
                timing="CUDA-graph replay, median of 25, rotated inputs (>= 4x L2 per cycle)",
            ),
        )
        title = f"{TITLES[name]}\n{env['gpu']}, limit BW {bw / 1e12:.2f} TB/s"
        h.plot(args.out / f"{name}.png", rows, title)
        print(f"[{name}] {len(rows)} rows in {time.time() - tb:.0f}s", flush=True)
        _print_summary(rows)
        if tune and time.time() - t0 > args.tune_budget_s:
            _tuning.set_force_tune(False)
            tune = False
    if args.save_table:
        if args.tune:  # what the sweeps recorded (the per-process memo is reset when tuning stops)
            cached = _tuning.user_cache(torch.device("cuda")).section("configs")
            configs = {k: v for k, v in cached.items() if k in _tuning.tuned_keys()}
        else:
            configs = _tuning.chosen()
        h.save_table(
            args.save_table, f"bench {args.bench}", configs, triton=env["triton"], tuning=_tuning.mode()
        )


def _print_summary(rows: list[dict]) -> None:
    wanted = (
        "shape",
        "method",
        "density",
        "latency_us",
        "frac_of_limit",
        "speedup_vs_sdpa_cudnn_dense",
        "speedup_vs_cublas_dense",
        "speedup_vs_dense",
        "speedup_vs_dense_sdpa",
    )
    cols = [c for c in wanted if any(c in r for r in rows)]
    print(" | ".join(cols))
    for r in rows:
        vals = []
        for c in cols:
            v = r.get(c, "")
            vals.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        print(" | ".join(vals))


if __name__ == "__main__":
    main()
