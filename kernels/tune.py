"""Pre-tune the kernels for a model's decode shapes: ``python -m polar_sparsity.kernels.tune``.

For every batch size, context length and density asked for, this meets every launch-config key the
decoder will meet (selective up / gated up / down, selective and dense decode attention), tunes the
keys the shipped table and the user cache do not have yet, and measures the sparse-vs-dense
crossovers (:mod:`kernels.dense_fallback`); everything lands in the per-GPU user cache
(``$POLAR_SPARSITY_KERNEL_CACHE`` or ``~/.cache/polar_sparsity/kernels``), where later processes find
it. ``--dry-run`` lists the keys without a GPU.

    python -m polar_sparsity.kernels.tune --model-config conf/model/opt-66b.yaml --batch 16 64 --context 1920
    python -m polar_sparsity.kernels.tune --hidden 4096 --heads 32 --kv-heads 8 --head-dim 128 \\
        --ffn 14336 --mlp gated --batch 1 16 64 --context 4096 8192 --dry-run
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import _tuning, dense_fallback
from ._decode_attention import config_key as attention_config_key
from .selective_mlp_down import config_key as down_config_key
from .selective_mlp_up import config_key as up_config_key


@dataclass(frozen=True)
class Shapes:
    """What the kernels see of a model: widths and head geometry, nothing else."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    gated: bool

    def __post_init__(self) -> None:
        for name in ("hidden", "heads", "kv_heads", "head_dim", "ffn"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} must be a multiple of kv_heads={self.kv_heads}")

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def _mlp_kind(activation: str, source: str) -> bool:
    """True for a gated (SwiGLU) MLP, False for a ReLU one."""
    if activation in ("silu", "swish", "swiglu"):
        return True
    if activation == "relu":
        return False
    raise ValueError(f"{source}: MLP activation {activation!r} is not supported; expected relu or silu")


def shapes_from_config(path: Path) -> Shapes:
    """Shapes from a project model YAML (its ``architecture:`` block) or a Hugging Face config.json."""
    if not path.exists():
        raise ValueError(f"--model-config {path} does not exist")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        doc = yaml.safe_load(path.read_text()) or {}
        arch = doc.get("architecture")
        if not isinstance(arch, dict):
            raise ValueError(f"{path} has no 'architecture:' block (expected a conf/model/*.yaml file)")
        hidden, heads = int(arch["hidden_size"]), int(arch["num_heads"])
        return Shapes(
            hidden=hidden,
            heads=heads,
            kv_heads=int(arch.get("num_kv_heads") or heads),
            head_dim=int(arch.get("head_dim") or hidden // heads),
            ffn=int(arch["ffn_dim"]),
            gated=_mlp_kind(str(arch.get("activation", "relu")), str(path)),
        )
    cfg = json.loads(path.read_text())
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    ffn = cfg.get("intermediate_size") or cfg.get("ffn_dim")
    if ffn is None:
        raise ValueError(f"{path} has neither intermediate_size nor ffn_dim")
    return Shapes(
        hidden=hidden,
        heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        ffn=int(ffn),
        gated=_mlp_kind(str(cfg.get("hidden_act") or cfg.get("activation_function") or "relu"), str(path)),
    )


def _count(density: float, n: int) -> int:
    return max(1, round(density * n))


def enumerate_keys(
    shapes: Shapes, batches: list[int], contexts: list[int], densities: list[float]
) -> list[str]:
    """Every launch-config key the decoder meets at these batch sizes, contexts and densities."""
    keys: list[str] = []
    for M in batches:
        for dens in densities:
            k = _count(dens, shapes.ffn)
            keys += [up_config_key(M, k, shapes.hidden, shapes.gated), down_config_key(M, k, shapes.hidden)]
        for N in contexts:
            for kk in sorted({_count(dens, shapes.kv_heads) for dens in densities} | {shapes.kv_heads}):
                keys.append(attention_config_key(shapes.head_dim, shapes.group, M * kk, N))
    return list(dict.fromkeys(keys))


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, Shapes]:
    p = argparse.ArgumentParser(
        prog="python -m polar_sparsity.kernels.tune", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model-config", type=Path, help="conf/model/<name>.yaml or a Hugging Face config.json")
    p.add_argument("--hidden", type=int, help="model width d")
    p.add_argument("--heads", type=int, help="query heads")
    p.add_argument("--kv-heads", type=int, help="KV heads (default: --heads)")
    p.add_argument("--head-dim", type=int, help="head dim (default: hidden / heads)")
    p.add_argument("--ffn", type=int, help="MLP neurons")
    p.add_argument("--mlp", choices=("relu", "gated"), help="MLP kind")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64], help="decode batch sizes")
    p.add_argument("--context", type=int, nargs="+", default=[2048], help="KV-cache lengths (N_max)")
    p.add_argument("--density", type=float, nargs="+", default=list(dense_fallback.DENSITIES))
    p.add_argument("--ops", nargs="+", choices=("mlp", "attention"), default=["mlp", "attention"])
    p.add_argument(
        "--cache-dir", type=Path, help="tuning cache (default: $POLAR_SPARSITY_KERNEL_CACHE or ~/.cache)"
    )
    p.add_argument("--retune", action="store_true", help="tune every key again, even cached / shipped ones")
    p.add_argument(
        "--export-table", type=Path, help="afterwards, write this GPU's cache as a shippable table"
    )
    p.add_argument("--dry-run", action="store_true", help="list the keys and exit (no GPU needed)")
    args = p.parse_args(argv)
    explicit = [args.hidden, args.heads, args.ffn, args.mlp]
    if args.model_config is not None:
        if any(v is not None for v in explicit):
            p.error(
                "give either --model-config or the explicit dims (--hidden --heads --ffn --mlp), not both"
            )
        try:
            shapes = shapes_from_config(args.model_config)
        except (KeyError, ValueError) as exc:
            p.error(f"cannot read shapes from {args.model_config}: {exc}")
    else:
        missing = [
            n for n, v in zip(("--hidden", "--heads", "--ffn", "--mlp"), explicit, strict=True) if v is None
        ]
        if missing:
            p.error(f"missing {', '.join(missing)} (or give --model-config)")
        try:
            shapes = Shapes(
                hidden=args.hidden,
                heads=args.heads,
                kv_heads=args.kv_heads or args.heads,
                head_dim=args.head_dim or args.hidden // args.heads,
                ffn=args.ffn,
                gated=args.mlp == "gated",
            )
        except ValueError as exc:
            p.error(str(exc))
    for name in ("batch", "context"):
        bad = [v for v in getattr(args, name) if v < 1]
        if bad:
            p.error(f"--{name} values must be >= 1; got {bad}")
    bad = [v for v in args.density if not 0.0 < v <= 1.0]
    if bad:
        p.error(f"--density values must be in (0, 1]; got {bad}")
    return args, shapes


def main(argv: list[str] | None = None) -> None:
    from tqdm import tqdm

    from polar_sparsity.reporting import format_table

    args, shapes = _parse(argv)
    keys = enumerate_keys(shapes, args.batch, args.context, args.density)
    print(f"{shapes}: {len(keys)} launch-config keys", flush=True)
    if args.dry_run:
        print("\n".join(keys))
        return
    if not torch.cuda.is_available():
        raise SystemExit(
            "kernels.tune times kernels on a CUDA GPU and none is visible; use --dry-run to list keys"
        )
    if args.cache_dir is not None:
        _tuning.set_cache_dir(args.cache_dir)
    _tuning.set_mode("tune")
    _tuning.set_force_tune(args.retune)
    device = torch.device("cuda")
    print(f"cache: {_tuning.user_cache(device).path}", flush=True)
    work = []
    if "mlp" in args.ops:
        work += [("mlp", M, None) for M in args.batch]
    if "attention" in args.ops:
        work += [("attention", M, N) for M in args.batch for N in args.context]
    t0, rows = time.time(), []
    for op, M, N in tqdm(work, desc="tuning", unit="shape"):
        t = time.time()
        if op == "mlp":
            res = dense_fallback.measure_mlp_crossover(
                M, shapes.ffn, shapes.hidden, shapes.gated, device, args.density
            )
        else:
            res = dense_fallback.measure_attention_crossover(
                M, shapes.kv_heads, shapes.group, shapes.head_dim, N, device, args.density
            )
        rows.append(
            dict(
                op=op,
                batch=M,
                context=N if N is not None else "-",
                dense_us=res["dense_us"],
                best_sparse_us=min(res["sparse_us"]),
                crossover=res["crossover"],
                seconds=time.time() - t,
            )
        )
        torch.cuda.empty_cache()
    _tuning.set_force_tune(False)
    print(format_table(rows, title=f"kernels.tune on {torch.cuda.get_device_name(device)}"))
    cache = _tuning.user_cache(device).path
    print(f"tuned {len(_tuning.tuned_keys())} keys in {time.time() - t0:.0f} s; cache {cache}")
    if args.export_table is not None:
        table = _tuning.export_table(
            args.export_table, device, f"python -m polar_sparsity.kernels.tune ({shapes})"
        )
        print(f"wrote {len(table['configs'])} configs to {args.export_table}")


if __name__ == "__main__":
    main()
