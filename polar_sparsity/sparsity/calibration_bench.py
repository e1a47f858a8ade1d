"""Time one layer of the MLP top-k calibration at a real model's shape, and extrapolate to a model.

python -m polar_sparsity.sparsity.calibration_bench                       # OPT-6.7B shape, on the CPU
python -m polar_sparsity.sparsity.calibration_bench --device cuda --rows 40000

Synthetic rows (random router weights, random inputs and active bits at ``--density``) go through
the same code as ``calibrate.py``: the router scores the rows once, then every batch size is fitted
and checked. Every cost grows linearly with the held-out rows: the batch counts grow with them, and
the batch count bounds (``calibrate.batches``, ``max_batches``) are scaled down by the same factor, so the
measured time times (store rows / timed rows) times the layers estimates a real model.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from polar_sparsity.reporting import format_table
from polar_sparsity.routers.bundle import LoadedRouter
from polar_sparsity.routers.nets import MlpRouter
from polar_sparsity.sparsity.calibration import (
    CalibrationSettings,
    LayerBatches,
    calibrate_layer,
    plan_batches,
    split_fit_check,
)


def time_layer(
    hidden_size: int,
    ffn_dim: int,
    rows: int,
    seq_len: int,
    density: float,
    device: str,
    min_batches: int = 128,
    max_batches: int = 4096,
    seed: int = 0,
) -> dict[str, float]:
    """Seconds to score ``rows`` held-out rows and to fit + check every paper batch size on them."""
    generator = torch.Generator().manual_seed(seed)
    router = LoadedRouter(0, MlpRouter(hidden_size, ffn_dim).to(device).eval(), {"num_outputs": ffn_dim})
    x = torch.randn(rows, hidden_size, generator=generator)
    active = torch.rand(rows, ffn_dim, generator=generator) < density
    packed = np.packbits(active.numpy(), axis=-1, bitorder="little")
    sequence_ids = np.arange(rows) // seq_len
    settings = CalibrationSettings(batches=min_batches, max_batches=max_batches)
    fit_rows, check_rows = split_fit_check(np.arange(rows), sequence_ids, settings.check_fraction, seed)
    fit, check = plan_batches(fit_rows, check_rows, sequence_ids, settings, layer=0)

    started, cpu_started = time.perf_counter(), time.process_time()
    logits = torch.cat([router.scores(x[i : i + 8192].to(device)).half() for i in range(0, rows, 8192)])
    _sync(device)
    scored = time.perf_counter()

    def unpack(bits: np.ndarray) -> np.ndarray:
        return np.unpackbits(bits, axis=-1, count=ffn_dim, bitorder="little").astype(bool)

    calibrate_layer(
        LayerBatches(np.arange(rows), logits, packed, unpack), 0, fit, check, settings, hidden_size
    )
    _sync(device)
    return {
        "score_s": scored - started,
        "sweep_s": time.perf_counter() - scored,
        "cpu_s": time.process_time() - cpu_started,  # this process's CPU time: wall minus waiting
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=4096, help="model width (OPT-6.7B: 4096)")
    parser.add_argument("--ffn-dim", type=int, default=16384, help="MLP neurons (OPT-6.7B: 16384)")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (OPT-6.7B: 32)")
    parser.add_argument("--rows", type=int, default=4096, help="held-out rows timed here")
    parser.add_argument(
        "--store-rows", type=int, default=40000, help="held-out rows of the real store (paper: 10%% of 400k)"
    )
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--density", type=float, default=0.05, help="share of neurons active per token")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.rows <= 0 or args.store_rows <= 0:
        parser.error("--rows and --store-rows must be positive")
    scale = args.store_rows / args.rows
    defaults = CalibrationSettings()
    min_batches = max(1, round(defaults.batches / scale))
    max_batches = max(min_batches, round(defaults.max_batches / scale))
    measured = time_layer(
        args.hidden_size,
        args.ffn_dim,
        args.rows,
        args.seq_len,
        args.density,
        args.device,
        min_batches,
        max_batches,
    )
    per_layer = (measured["score_s"] + measured["sweep_s"]) * scale
    device = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    row = {
        "device": device,
        "d": args.hidden_size,
        "F": args.ffn_dim,
        "rows timed": args.rows,
        "score s": measured["score_s"],
        "fit+check s": measured["sweep_s"],
        "store rows": args.store_rows,
        "process cpu s": measured["cpu_s"],
        "est. s/layer": per_layer,
        "est. min (all layers)": per_layer * args.layers / 60,
    }
    print(format_table([row], title=f"MLP top-k calibration cost ({math.ceil(scale)}x extrapolation)"))


if __name__ == "__main__":
    main()
