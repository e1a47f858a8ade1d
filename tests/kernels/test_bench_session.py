"""The GPU session's summary reads the benchmark CSVs: baseline rows at the selective op's size
(``cublas, kept rows only``, ``streaming read, same bytes``) are neither an op of the heuristic /
tuned ratio tables nor the sparse path of the never-slower-than-dense checks."""

from __future__ import annotations

import csv
from pathlib import Path

from polar_sparsity.kernels.bench import session

FIELDS = ("shape", "model", "op", "M", "method", "density", "k", "latency_us", "limit_us", "frac_of_limit")


def _gemm_csv(directory: Path, selective_us: float) -> None:
    rows = []
    for op in ("up", "down"):
        shape = f"opt-66b d=9216 n=36864 relu {op} M=64"
        common = dict(shape=shape, model="opt-66b d=9216 n=36864 relu", op=op, M=64)
        rows.append(dict(common, method="cublas dense", density=1.0, k=36864, latency_us=100.0))
        methods = (("selective (ours)", selective_us), ("cublas, kept rows only", 90.0))
        for method, us in (*methods, ("streaming read, same bytes", 25.0)):
            rows.append(
                dict(
                    common,
                    method=method,
                    density=0.3,
                    k=11059,
                    latency_us=us,
                    limit_us=20.0,
                    frac_of_limit=20 / us,
                )
            )
    directory.mkdir()
    with (directory / "gemm.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def test_ratios_count_only_the_selective_ops(tmp_path):
    _gemm_csv(tmp_path / "heuristic", selective_us=44.0)
    _gemm_csv(tmp_path / "tuned", selective_us=40.0)
    ratios = {r["op"]: r for r in session._ratios(tmp_path / "heuristic", tmp_path / "tuned")}
    assert set(ratios) == {"gemm up M64", "gemm down M64"}
    assert all(r["cases"] == 1 and abs(r["worst"] - 1.1) < 1e-9 for r in ratios.values())


def test_fallback_checks_compare_the_selective_mlp_with_dense(tmp_path):
    _gemm_csv(tmp_path / "tuned", selective_us=40.0)
    (check,) = session._fallback_checks(tmp_path / "tuned")
    assert check["kind"] == "mlp (up+down)" and "M=64 density 0.3" in check["case"]
    assert abs(check["sparse_ratio"] - 0.4) < 1e-9  # (40 + 40) / (100 + 100): the kept-rows rows left out


def test_targets_show_the_vendor_at_the_same_size(tmp_path):
    _gemm_csv(tmp_path / "tuned", selective_us=40.0)
    targets = {name: rest for name, *rest in session._targets(tmp_path / "tuned")}
    ours, met, vendor, floor = targets["GEMMs >= 0.85 of limit, M <= 64, density >= 0.3"]
    assert ours.startswith("0.500") and met == "MISSED"  # limit 20 us / 40 us
    assert vendor.startswith("0.222")  # 20 / 90: cuBLAS on the kept rows
    assert floor.startswith("0.800")  # 20 / 25: a plain read of the same bytes
    assert targets["block OPT-66B density 0.3 >= 2.0x dense"] == ["-", "not measured", "-", "-"]
