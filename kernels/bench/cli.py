"""The benchmarks' shape options: argparse flags, the cases they select, the memory check, the dry run.

The flags mirror the project's names: ``--model`` takes what ``model=`` takes elsewhere (a
``conf/model`` name) or a YAML file or a checkpoint directory; explicit dimensions replace the
model's (or, without ``--model``, describe one). Every check runs before anything is allocated.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

import torch

from .shapes import (
    ATTENTION_BENCHES,
    BENCHES,
    MLP_BENCHES,
    MLP_KINDS,
    Case,
    ModelShape,
    build_cases,
    load_model,
    with_overrides,
)

GIB = 2**30
# Allocator, cuBLAS / cuDNN workspaces, split-K partials and CUDA-graph bookkeeping come on top of
# the tensors a case allocates; refuse a case unless this much stays free besides them.
HEADROOM_BYTES = 1 * GIB
ASSUMED_L2_BYTES = 50 * 2**20  # without a GPU (dry run): an H100's L2, for the GEMM's weight copies
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update(
    {"k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": GIB, "gib": GIB, "t": 2**40, "tib": 2**40}
)


def _list_of(kind: Callable[[str], int | float], what: str) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r} is empty; give a comma-separated list of {what}")
        return values

    return parse


def parse_bytes(text: str) -> int:
    """``80GiB``, ``80G`` (binary), ``80GB`` (decimal) or a plain byte count."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; e.g. 80GiB, 80GB, 24G or 1000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def add_shape_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "shapes (default: the paper's tables)",
        "A model from --model and/or explicit dimensions (which replace the model's), plus lists.",
    )
    g.add_argument(
        "--model",
        help="a conf/model name (e.g. llama-3.1-8b), a model YAML file, or a checkpoint dir (config.json)",
    )
    g.add_argument("--hidden", type=int, help="hidden size d")
    g.add_argument("--heads", type=int, help="query heads")
    g.add_argument("--kv-heads", type=int, help="KV heads (default: --heads, i.e. MHA)")
    g.add_argument("--head-dim", type=int, help="head dim (default: hidden / heads)")
    g.add_argument("--ffn", type=int, help="FFN width (MLP neurons)")
    g.add_argument("--mlp", choices=MLP_KINDS, help="relu (sparse neurons) or gated (SwiGLU)")
    g.add_argument(
        "--batch", type=_list_of(int, "integers"), metavar="LIST", help="batch sizes, e.g. 1,16,64"
    )
    g.add_argument(
        "--context", type=_list_of(int, "integers"), metavar="LIST", help="context lengths, e.g. 512,4096"
    )
    d = g.add_mutually_exclusive_group()
    d.add_argument(
        "--density",
        type=_list_of(float, "fractions"),
        metavar="LIST",
        help="kept fractions in (0, 1], e.g. 0.25,0.5",
    )
    d.add_argument(
        "--kept-heads",
        type=_list_of(int, "integers"),
        metavar="LIST",
        help="kept heads (KV groups for GQA models), e.g. 8,16",
    )
    g.add_argument(
        "--active-neurons",
        type=_list_of(int, "integers"),
        metavar="LIST",
        help="active MLP neurons, e.g. 2048,4096 (in the block: paired with --kept-heads)",
    )
    m = parser.add_argument_group("memory")
    m.add_argument(
        "--dry-run", action="store_true", help="print the cases and the memory each needs; run nothing"
    )
    m.add_argument(
        "--memory-limit",
        type=parse_bytes,
        metavar="SIZE",
        help="check the cases against this many free bytes instead of the GPU's (e.g. 24GiB)",
    )


def model_from_args(args: argparse.Namespace) -> ModelShape | None:
    """The user's model shape, or None for the paper's tables."""
    dims = {
        "hidden": args.hidden,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "ffn": args.ffn,
        "mlp": args.mlp,
    }
    if args.model is None and all(v is None for v in dims.values()):
        return None
    base = load_model(args.model) if args.model is not None else ModelShape("custom")
    return with_overrides(base, **dims)


def plan(bench: str, args: argparse.Namespace) -> dict[str, list[Case]]:
    """The cases per benchmark (``all``: every benchmark the options apply to)."""
    model = model_from_args(args)
    if bench != "all":
        return {bench: _cases(bench, model, args)}
    plans = {}
    for name in BENCHES:
        if model is not None and name in ("attn", "gqa") and (name == "gqa") != model.gqa:
            continue  # the other attention benchmark serves this model
        plans[name] = _cases(
            name,
            model,
            args,
            contexts=args.context if name in ATTENTION_BENCHES else None,
            kept_heads=args.kept_heads if name in ATTENTION_BENCHES else None,
            active_neurons=args.active_neurons if _takes_neuron_counts(name, model) else None,
        )
    return plans


def _takes_neuron_counts(bench: str, model: ModelShape | None) -> bool:
    """In ``all``: the MLP benchmarks, and the block only for a ReLU model (it keeps SwiGLU dense)."""
    if bench == "block":
        return model is not None and model.mlp == "relu"
    return bench in MLP_BENCHES


def _cases(bench: str, model: ModelShape | None, args: argparse.Namespace, **lists) -> list[Case]:
    options = {"contexts": args.context, "kept_heads": args.kept_heads, "active_neurons": args.active_neurons}
    options.update(lists)
    return build_cases(bench, model, batches=args.batch, densities=args.density, **options)


def bytes_needed(case: Case, l2: int) -> int:
    """Device bytes the benchmark allocates for one case (see each benchmark's ``bytes_needed``)."""
    if case.bench in ("attn", "gqa"):
        from . import attention

        return attention.bytes_needed(case, l2)
    if case.bench == "gemm":
        from . import gemm

        return gemm.bytes_needed(case, l2)
    from . import model

    return model.mlp_bytes_needed(case) if case.bench == "mlp" else model.block_bytes_needed(case)


def free_bytes(memory_limit: int | None) -> int | None:
    """``--memory-limit`` if given, else the GPU's free memory now, else None (no GPU: unknown)."""
    if memory_limit is not None:
        return memory_limit
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    return None


def refusals(plans: dict[str, list[Case]], l2: int, free: int | None) -> list[str]:
    """One line per case that would not fit in ``free`` bytes (with the headroom), naming its bytes."""
    if free is None:
        return []
    return [
        f"{c.bench} {c.label}: needs {need / GIB:.2f} GiB + {HEADROOM_BYTES / GIB:.0f} GiB headroom, "
        f"{free / GIB:.2f} GiB free"
        for cases in plans.values()
        for c in cases
        if (need := bytes_needed(c, l2)) + HEADROOM_BYTES > free
    ]


def check_memory(plans: dict[str, list[Case]], l2: int, free: int | None) -> None:
    """Refuse the run up front when a case does not fit (raises SystemExit listing each such case)."""
    refused = refusals(plans, l2, free)
    if refused:
        raise SystemExit(
            "refused: these cases do not fit in memory (drop them, or lower --batch / --context):\n  "
            + "\n  ".join(refused)
        )


def print_plan(plans: dict[str, list[Case]], l2: int, free: int | None) -> None:
    """The dry run's table: every case, its density points (kept units) and the memory it needs."""
    where = "no GPU: pass --memory-limit to check" if free is None else f"{free / GIB:.2f} GiB free"
    print(f"dry run (fp16; memory: {where}; headroom {HEADROOM_BYTES / GIB:.0f} GiB; nothing runs)")
    print("bench | shape | batch | context | densities | kept heads | active neurons | GiB needed | fits")
    for cases in plans.values():
        for c in cases:
            need = bytes_needed(c, l2)
            fits = "?" if free is None else ("yes" if need + HEADROOM_BYTES <= free else "NO")
            cells = [
                c.bench,
                c.label,
                str(c.batch),
                "-" if c.context is None else str(c.context),
                ",".join(f"{p.density:.3g}" for p in c.points),
                _counts([p.heads for p in c.points]),
                _counts([p.neurons for p in c.points]),
                f"{need / GIB:.2f}",
                fits,
            ]
            print(" | ".join(cells))


def _counts(values: list[int | None]) -> str:
    return "-" if all(v is None for v in values) else ",".join(str(v) for v in values)
