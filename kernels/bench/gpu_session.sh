#!/usr/bin/env bash
# One device session: GPU tests, then benchmarks; logs, CSV/PNG and tables bundled into
# $OUT/results.tar.gz (the device tool returns at most 8 files).
# Usage: OUT=dir bash kernels/bench/gpu_session.sh [tune]
#   tune: attn/gqa/gemm tune every config key they meet; the tables are merged into this checkout's
#   kernels/tuned_h100.json before mlp/block run, and a copy lands in the results.
# Per-step time limits (s): TEST_S, T_attn, T_gqa, T_gemm, T_mlp, T_block (default BENCH_S=170).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-artifacts/gpu_session}
R=$OUT/results; mkdir -p "$R"
MODE=${1:-plain}
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv;
  python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; } \
  2>&1 | tee "$R/env.txt"
timeout "${TEST_S:-170}" python3 -m pytest tests/kernels -m gpu -q -p no:cacheprovider 2>&1 | tee "$R/gpu_tests.log"
run_bench() {
  local b=$1; shift
  local t_var="T_$b"
  timeout "${!t_var:-${BENCH_S:-170}}" python3 -m polar_sparsity.kernels.bench "$b" --out "$R" "$@" 2>&1 \
    | grep -v -e "UserWarning" -e "return F.scaled" -e "^  " | tee "$R/bench_$b.log"
}
for b in attn gqa gemm; do
  if [ "$MODE" = tune ]; then run_bench "$b" --tune --save-table "$R/table_$b.json"; else run_bench "$b"; fi
done
if [ "$MODE" = tune ]; then
  python3 -m polar_sparsity.kernels.bench.merge_tables kernels/tuned_h100.json kernels/tuned_h100.json "$R"/table_attn.json "$R"/table_gqa.json \
    "$R"/table_gemm.json && cp kernels/tuned_h100.json "$R/tuned_h100.json"
fi
for b in mlp block; do run_bench "$b"; done
tar -czf "$OUT/results.tar.gz" -C "$OUT" results && rm -rf "$R"
