"""How the kernels compile for a GPU architecture, checked on any machine (no GPU needed).

``python -m polar_sparsity.kernels.bench.compiled [--arch 90] [--check]`` compiles each GEMM and
attention kernel at a representative config for the given compute capability, with the argument
specializations a real launch gets (16-byte aligned pointers, sizes divisible by 16), and reports
what its main loop does with memory: tile loads that stay synchronous (the loop waits on them every
step) against asynchronous copies, the pipeline depth (copy groups still in flight when a step
starts) and whether the products run on Hopper's asynchronous tensor cores; then the registers a
thread and the bytes of stack (register spills) the machine code takes, read from the cubin with the
``cuobjdump`` that ships with Triton ("-" where it is missing). A spill shows here on any machine: the
128 x 256 up tiles' split path once spilled 648 bytes under Triton 3.6 (a second full fp32 tile held
beside the accumulator; the partials are now summed 64 columns at a time).

A synchronous tile load in the main loop is a performance bug that no CPU test sees otherwise (the
interpreter runs the same arithmetic): a load whose mask depended on gathered indices once kept
the selective down projection's activation tile out of the pipeline, at 0.1-0.6 of its bandwidth
limit. ``--check`` fails when any loop tile load is synchronous or no copy is in flight.

Triton's JIT must be live (``TRITON_INTERPRET`` unset): the test suite runs this as a subprocess.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from .. import _common as C
from .. import _decode_attention as attn
from .. import selective_mlp_down as down
from .. import selective_mlp_up as up
from .shapes import ModelShape, default_densities, kept_units, paper_cases


@dataclass(frozen=True)
class LoopReport:
    """What the first top-level loop of a compiled kernel does with memory."""

    sync_tile_loads: int  # 2-D loads the loop body waits on
    async_copies: int  # asynchronous global -> shared copies issued in the loop body
    copies_in_flight: int  # most copy groups a step's wait leaves outstanding (0: no overlap)
    async_mma: bool  # Hopper warp-group MMA (wgmma) in the loop


def _specialize(kernel, args: dict, constexprs: dict) -> tuple[dict, dict, dict]:
    """Argument types, constants and hints (parameter index -> 16 for a multiple of 16, 1 for an
    integer equal to 1) as a launch would specialize them."""
    types, consts, hints = {}, dict(constexprs), {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            continue
        value = args[name]
        if isinstance(value, str):  # a pointer ("*fp16") or a float scalar ("fp32")
            types[name] = value
            if value.startswith("*"):
                hints[i] = 16
        else:
            types[name] = "i32"
            if value == 1:
                consts[name], hints[i] = 1, 1
            elif value % 16 == 0:
                hints[i] = 16
    return types, consts, hints


def _source(kernel, args: dict, constexprs: dict):
    """The ``ASTSource`` a launch of ``kernel`` with these arguments compiles, in this Triton's form."""
    from triton.compiler import ASTSource

    types, consts, hints = _specialize(kernel, args, constexprs)
    if "constexprs" in inspect.signature(ASTSource).parameters:  # Triton >= 3.3
        sig = {n: "constexpr" if n in consts else types[n] for n in kernel.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, h in hints.items() if h == 16}
        return ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    try:  # Triton 3.2
        from triton.backends.compiler import AttrsDescriptor

        attrs = AttrsDescriptor.from_hints(hints)
    except ImportError:  # Triton 3.1
        from triton.compiler import AttrsDescriptor

        attrs = AttrsDescriptor(
            tuple(i for i, h in hints.items() if h == 16), tuple(i for i, h in hints.items() if h == 1)
        )
    return ASTSource(kernel, types, consts, attrs)


def compile_for(kernel, args: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int):
    """Compile ``kernel`` for compute capability ``arch`` (e.g. 80, 90) on this machine."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile

    options = {"num_warps": num_warps, "num_stages": num_stages}
    src = _source(kernel, args, constexprs)
    return compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _first_loop_body(ttgir: str) -> list[str]:
    lines = ttgir.splitlines()
    start = next(i for i, line in enumerate(lines) if " scf.for " in line)
    indent = len(lines[start]) - len(lines[start].lstrip())
    body = []
    for line in lines[start + 1 :]:
        if line.strip().startswith("}") and len(line) - len(line.lstrip()) == indent:
            break
        body.append(line)
    return body


def loop_report(ttgir: str) -> LoopReport:
    # The dialects print as ttg / ttng from Triton 3.3, triton_gpu / triton_nvidia_gpu before.
    body = _first_loop_body(ttgir)
    tile_load = re.compile(r"= tt\.load .*: tensor<\d+x\d+x!tt\.ptr")
    wait = re.compile(r"(ttg|triton_gpu)\.async_wait .*num = (\d+)")
    waits = [int(m.group(2)) for m in map(wait.search, body) if m]
    return LoopReport(
        sync_tile_loads=sum(bool(tile_load.search(line)) for line in body),
        async_copies=sum(
            bool(re.search(r"(ttg|triton_gpu)\.async_copy_global_to_local", line)) for line in body
        ),
        copies_in_flight=max(waits, default=0),
        async_mma=any(re.search(r"(ttng|triton_nvidia_gpu)\.warp_group_dot ", line) for line in body),
    )


ARCHS = (80, 86, 89, 90, 100, 120)  # tensor-core GPUs Triton compiles for (checked on Triton 3.9)

# Representative launches: OPT-66B's MLP (d = 9216, 36,864 neurons, half selected) and attention
# shapes, at the tile shapes the heuristics pick for small and large batches.
_D, _N, _K = 9216, 36864, 18432
_SMS = 132
# Argument types of the pointers (and the one float) that are not fp16 tensors.
_ARGUMENT_TYPES = dict(IDX="*i32", SEQLENS="*i32", CNT="*i32", WS="*fp32", PO="*fp32", PML="*fp32")
_ARGUMENT_TYPES |= dict(qk_scale="fp32")


def _case(plan: C.LaunchPlan, **types: str) -> tuple:
    """``plan``'s (kernel, arguments, constexprs, warps, stages) for :func:`compile_for`: its sizes, and
    every other argument a pointer (fp16 unless :data:`_ARGUMENT_TYPES` or ``types`` says otherwise)."""
    consts = dict(plan.constexprs)
    warps, stages = consts.pop("num_warps"), consts.pop("num_stages")
    args = {
        name: types.get(name, _ARGUMENT_TYPES.get(name, "*fp16"))
        for name in plan.runtime_names()
        if name not in plan.scalars
    }
    return plan.kernel, args | plan.scalars, consts, warps, stages


def _tile(bm: int, bn: int, warps: int, bk: int = 64, stages: int = 4, **schedule: int) -> dict:
    """A GEMM config (``bn``: the up tile's neurons or the down tile's columns; both keys are set)."""
    tile = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return tile | {"splits": 1} | schedule


def _up_case(M: int, cfg: dict, gated: bool = False, k: int = _K, d: int = _D, sms: int = _SMS) -> tuple:
    """The compile case of ``selective_up`` (``selective_gated_up``) launching ``cfg``."""
    plan = up._plan(
        M, k, d, _N, (d, d, d, k), cfg, sms=sms, gated=gated, has_bias=not gated, relu=not gated, upcast=False
    )
    return _case(plan)


def _down_case(
    M: int,
    cfg: dict,
    k: int = _K,
    d: int = _D,
    sms: int = _SMS,
    has_bias: bool = True,
    gpu_has_tma: bool = False,
) -> tuple:
    """The compile case of ``selective_down`` launching ``cfg``. ``k`` may be odd: the activation rows
    are then pitched to 16 elements, as the wrapper does."""
    stride_am = C.cdiv(k, 16) * 16 if M > 1 else 0
    tma = down._uses_tma(cfg, M, gpu_has_tma)
    plan = down._plan(M, k, _N, d, stride_am, d, d, cfg, sms=sms, has_bias=has_bias, tma_a=tma, upcast=False)
    return _case(plan, A_DESC=f"tensordesc<fp16[{cfg['BLOCK_M']}, {cfg['BLOCK_K']}]>" if tma else "*fp16")


def _attn_case(
    group: int,
    cfg: dict,
    batch: int = 64,
    kept: int = 2,
    context: int = 8192,
    head_dim: int = 128,
    kv_heads: int = 8,
    sms: int = _SMS,
) -> tuple:
    """The compile case of selective decode attention over ``kept`` KV heads of contiguous caches."""
    q_heads = kv_heads * group
    strides = dict(stride_qb=q_heads * head_dim, stride_qh=head_dim)
    for t in ("k", "v"):
        strides |= {f"stride_{t}b": kv_heads * context * head_dim, f"stride_{t}h": context * head_dim}
        strides |= {f"stride_{t}n": head_dim}
    strides |= dict(stride_ob=q_heads * head_dim, stride_oh=head_dim, stride_ib=kept)
    attend, _ = attn._plan(
        batch,
        q_heads,
        head_dim,
        kv_heads,
        context,
        kept,
        group,
        strides,
        cfg,
        sms=sms,
        has_idx=True,
        zero_fill=True,
        upcast=False,
    )
    return _case(attend)


def _attn_tile(block_n: int, warps: int, stages: int = 3, **schedule: int) -> dict:
    return dict(BLOCK_N=block_n, num_warps=warps, num_stages=stages, use_dot=1, merge_here=0) | schedule


# Stream-K "whole tiles" cases launch as many programs as tiles: every share is one whole tile.
CASES = {
    "up M=16": _up_case(16, _tile(16, 64, 4)),
    "up M=16, stream-K": _up_case(16, _tile(16, 64, 4, stream_k=1)),
    "up M=256": _up_case(256, _tile(128, 128, 8)),
    "up M=256, 128 x 256 tiles, split": _up_case(
        256, _tile(128, 256, 8, stages=3, splits=2, last_wave_split=1)
    ),
    "up M=128, 128 x 128 tiles, 5 stages": _up_case(128, _tile(128, 128, 8, stages=5)),
    "gated up M=256, 128 x 128 tiles, 4 stages": _up_case(256, _tile(128, 128, 8), gated=True),
    "gated up M=64": _up_case(64, _tile(64, 128, 8), gated=True),
    "up M=64, 128-wide steps": _up_case(64, _tile(64, 128, 4, bk=128)),
    "up M=64, stream-K": _up_case(64, _tile(64, 128, 8, stream_k=1)),
    "up M=64, stream-K, whole tiles": _up_case(64, _tile(64, 128, 8, stream_k=1), sms=_K // 128),
    "down M=16": _down_case(16, _tile(16, 128, 4)),
    "down M=64": _down_case(64, _tile(64, 128, 4)),
    "down M=64, 256-neuron steps": _down_case(64, _tile(64, 64, 4, bk=256, stages=3)),
    "down M=16, 128-neuron steps": _down_case(16, _tile(16, 64, 4, bk=128)),
    "down M=64, odd k": _down_case(64, _tile(64, 128, 4), k=25805),
    "down M=64, split": _down_case(64, _tile(64, 128, 4, splits=2)),
    "down M=256": _down_case(256, _tile(128, 128, 8)),
    "down M=64, stream-K": _down_case(64, _tile(64, 128, 4, stream_k=1)),
    "down M=64, stream-K, whole tiles": _down_case(64, _tile(64, 128, 4, stream_k=1), sms=_D // 128),
    "attention MHA": _attn_case(1, _attn_tile(128, 8, splits=4)),
    "attention GQA 8": _attn_case(8, _attn_tile(64, 4, splits=4)),
    "attention MHA, stream-K": _attn_case(1, _attn_tile(128, 8, stream_k=2)),
}


@dataclass(frozen=True)
class GpuProfile:
    """A GPU as the heuristics see it, from its public specifications."""

    arch: int  # compute capability, e.g. 89
    sms: int
    smem: int  # bytes of shared memory one program may opt into

    def facts(self) -> C.GpuFacts:
        major = self.arch // 10
        return C.GpuFacts(
            self.sms, self.smem, C.tensor_cores_read_registers(major), C.tma_feeds_shared_memory_mma(major)
        )


GPUS = {
    "a100": GpuProfile(80, 108, 163 * 1024),
    "a10": GpuProfile(86, 72, 99 * 1024),
    "rtx-3090": GpuProfile(86, 82, 99 * 1024),
    "l4": GpuProfile(89, 58, 99 * 1024),
    "l40s": GpuProfile(89, 142, 99 * 1024),
    "rtx-4090": GpuProfile(89, 128, 99 * 1024),
    "h100-pcie": GpuProfile(90, 114, 227 * 1024),
    "h100": GpuProfile(90, 132, 227 * 1024),
    "h200": GpuProfile(90, 132, 227 * 1024),
    "b200": GpuProfile(100, 148, 227 * 1024),
    "rtx-5090": GpuProfile(120, 170, 99 * 1024),
}
HEURISTIC_BATCHES = (1, 16, 64, 128, 256)  # the gemm benchmark's batch sizes and M = 128


def _up_launch(M: int, k: int, model: ModelShape, gpu: C.GpuFacts) -> tuple[dict, tuple]:
    """The heuristic's config and compile case of ``selective_up`` (gated for a SwiGLU model)."""
    d, gated = model.hidden, model.mlp == "gated"
    cfg = up._heuristic(M, k, d, gpu.sms, gated, gpu.smem, gpu.operands_in_registers)
    return cfg, _up_case(M, cfg, gated, k, d, gpu.sms)


def _down_launch(M: int, k: int, model: ModelShape, gpu: C.GpuFacts) -> tuple[dict, tuple]:
    """The heuristic's config and compile case of ``selective_down``."""
    d = model.hidden
    cfg = down._heuristic(M, k, d, gpu.sms, gpu.smem, gpu.operands_in_registers, gpu.tma)
    return cfg, _down_case(M, cfg, k, d, gpu.sms, has_bias=model.mlp != "gated", gpu_has_tma=gpu.tma)


def _attn_launch(
    batch: int, kept: int, context: int, model: ModelShape, gpu: C.GpuFacts
) -> tuple[dict, tuple]:
    """The heuristic's config and compile case of selective decode attention over ``kept`` KV heads."""
    group = model.heads // model.kv_heads
    cfg = attn._heuristic(group, batch * kept, context, gpu.sms, model.head_dim, gpu.smem)
    case = _attn_case(group, cfg, batch, kept, context, model.head_dim, model.kv_heads, gpu.sms)
    return cfg, case


def heuristic_cases(gpu: GpuProfile) -> dict[str, tuple[dict, tuple, int]]:
    """Each distinct kernel the heuristics launch at the benchmark shapes on ``gpu`` (GEMMs at
    :data:`HEURISTIC_BATCHES`, attention at its paper cases, every density point): its first shape's
    name -> (config, compile case, how many shapes launch it)."""
    facts, launches = gpu.facts(), []
    for model, _, _ in paper_cases("gemm"):
        for M, density in itertools.product(HEURISTIC_BATCHES, default_densities("gemm", model)):
            k = kept_units(density, model.ffn)
            op = "gated up" if model.mlp == "gated" else "up"
            launches.append((f"{op} {model.name} M={M} k={k}", *_up_launch(M, k, model, facts)))
            launches.append((f"down {model.name} M={M} k={k}", *_down_launch(M, k, model, facts)))
    for bench in ("attn", "gqa"):
        for model, batches, contexts in paper_cases(bench):
            for B, N, density in itertools.product(batches, contexts, default_densities(bench, model)):
                kept = kept_units(density, model.attention_units)
                name = f"{bench} {model.name} B={B} N={N} kept={kept}"
                launches.append((name, *_attn_launch(B, kept, N, model, facts)))
    distinct: dict[tuple, list] = {}
    for name, cfg, (kernel, args, consts, warps, stages) in launches:
        key = (kernel.__name__, tuple(sorted(consts.items())), warps, stages)
        distinct.setdefault(key, [name, cfg, (kernel, args, consts, warps, stages), 0])[3] += 1
    return {name: (cfg, case, count) for name, cfg, case, count in distinct.values()}


def _check_gpu(name: str, check: bool) -> int:
    """Compile the heuristics' kernels for GPU ``name`` and report each: loop, shared memory, registers."""
    gpu = GPUS[name]
    print(
        f"| kernel ({name}, sm_{gpu.arch}, {gpu.sms} SMs, {gpu.smem // 1024} KB) | shapes | config "
        "| shared KB | registers / thread | stack bytes | spills in the main loop | sync tile loads "
        "| copies in flight |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    failed = []
    for label, (cfg, (kernel, kargs, consts, warps, stages), count) in heuristic_cases(gpu).items():
        compiled = compile_for(kernel, kargs, consts, gpu.arch, warps, stages)
        report = loop_report(compiled.asm["ttgir"])
        regs, stack = resources(compiled.asm["cubin"]) or ("-", "-")
        spills = loop_spills(compiled.asm["cubin"])
        shared = compiled.metadata.shared
        shown = " ".join(f"{k}={v}" for k, v in sorted(cfg.items()))
        print(
            f"| {label} | {count} | {shown} | {shared / 1024:.0f} | {regs} | {stack} "
            f"| {'-' if spills is None else spills} | {report.sync_tile_loads} | {report.copies_in_flight} |",
            flush=True,
        )
        if spills or shared > gpu.smem or report.sync_tile_loads or not report.async_copies:
            failed.append(label)
    if failed:
        print(
            f"kernels that spill in their main loop, overflow shared memory or wait on a tile load: "
            f"{', '.join(failed)}",
            file=sys.stderr,
        )
    return 1 if check and failed else 0


def _cuobjdump() -> str | None:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.isfile(bundled) else shutil.which("cuobjdump")


def _dump(cubin: bytes, flag: str) -> str | None:
    """``cuobjdump <flag>`` of a cubin, or None without the tool."""
    tool = _cuobjdump()
    if tool is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([tool, flag, path], capture_output=True, text=True).stdout


def resources(cubin: bytes) -> tuple[int, int] | None:
    """(registers a thread, stack bytes) of a compiled kernel, or None without ``cuobjdump``."""
    usage = _dump(cubin, "-res-usage")
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage or "")
    return (int(found.group(1)), int(found.group(2))) if found else None


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_INNER_LOOP_BYTES = 16 * 16  # a loop of >= 16 instructions (16 bytes each) is more than a spin-wait
_TENSOR_CORE_OP = re.compile(r"\b(HMMA|HGMMA|UTC\w*MMA)\b")  # mma.sync, wgmma, tcgen05


def loop_spills(cubin: bytes) -> int | None:
    """Local-memory accesses (register spills and their reloads) inside the innermost loops that issue
    tensor-core products, read from the machine code; None without ``cuobjdump``. A spill there costs
    every step; one in the epilogue (a few values kept across a split's partial sums) costs once a tile."""
    sass = _dump(cubin, "-sass")
    return None if sass is None else main_loop_spills(sass)


def main_loop_spills(sass: str) -> int:
    """:func:`loop_spills` of a kernel's SASS text (``cuobjdump -sass``)."""
    code = [(int(addr, 16), text) for addr, text in _SASS_LINE.findall(sass)]
    loops = []  # (start, end) address ranges closed by a backward branch
    for addr, text in code:
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    # A range that holds another loop of its own (not a few-instruction wait on a barrier) is an outer
    # loop, e.g. stream-K's loop over tiles with the partial step and the partials' sum, whose blocks
    # may be laid out after its main loop's.
    inner = [r for r in loops if r[1] - r[0] >= _INNER_LOOP_BYTES]
    innermost = [r for r in loops if not any(o != r and r[0] <= o[0] and o[1] <= r[1] for o in inner)]
    innermost = [
        r for r in innermost if any(r[0] <= a <= r[1] and _TENSOR_CORE_OP.search(t) for a, t in code)
    ]
    return sum(
        1
        for a, t in code
        if re.match(r"(@!?P\d\s+)?(LDL|STL)\b", t) and any(lo <= a <= hi for lo, hi in innermost)
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m polar_sparsity.kernels.bench.compiled", description=__doc__)
    p.add_argument(
        "--arch",
        type=int,
        default=90,
        choices=ARCHS,
        help="compute capability to compile for: 80 (A100), 86 / 89 (RTX 30xx / 40xx, L40S), 90 (H100, "
        "H200), 100 / 120 (Blackwell)",
    )
    p.add_argument(
        "--gpu",
        choices=sorted(GPUS),
        help="instead of the fixed cases: compile what the heuristics pick on this GPU at the benchmark "
        "shapes (its compute capability, SMs and shared memory), and check that none spills registers in "
        "its main loop, overflows shared memory or waits on a tile load",
    )
    p.add_argument("--check", action="store_true", help="exit 1 when a main loop waits on a tile load")
    args = p.parse_args(argv)
    if args.gpu:
        return _check_gpu(args.gpu, args.check)
    failed = []
    print(
        f"| kernel (sm_{args.arch}) | sync tile loads | async copies | copies in flight | wgmma "
        "| registers / thread | spilled (stack bytes) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, (kernel, kargs, consts, warps, stages) in CASES.items():
        compiled = compile_for(kernel, kargs, consts, args.arch, warps, stages)
        report = loop_report(compiled.asm["ttgir"])
        regs, stack = resources(compiled.asm["cubin"]) or ("-", "-")
        print(
            f"| {name} | {report.sync_tile_loads} | {report.async_copies} | {report.copies_in_flight} "
            f"| {'yes' if report.async_mma else 'no'} | {regs} | {stack} |",
            flush=True,
        )
        if report.sync_tile_loads or not report.async_copies or not report.copies_in_flight:
            failed.append(name)
    if failed:
        print(f"main loops not fully pipelined: {', '.join(failed)}", file=sys.stderr)
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
