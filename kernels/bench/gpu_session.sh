#!/usr/bin/env bash
# One device session for the kernels (GPU tests, heuristic / first-use tuned / shipped-table benchmarks,
# summary): see kernels/bench/session.py. Runs from a plain checkout without installing: the package
# polar_sparsity.kernels is the top-level kernels/ folder, so a small link tree maps it into the package,
# and everything runs from there (the checkout's own polar_sparsity/ has no kernels/ inside).
# Usage: OUT=dir bash kernels/bench/gpu_session.sh [--budget-s S] [--only STEP ...]
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SHIM=$(mktemp -d)
mkdir -p "$SHIM/polar_sparsity"
for f in "$ROOT"/polar_sparsity/*; do ln -s "$f" "$SHIM/polar_sparsity/"; done
ln -s "$ROOT/kernels" "$SHIM/polar_sparsity/kernels"
OUT_DIR=${OUT:-$ROOT/artifacts/gpu_session}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
export PYTHONPATH="$SHIM" PYTHONUNBUFFERED=1
cd "$SHIM" && exec "${PYTHON:-python3}" -m polar_sparsity.kernels.bench.session --out "$OUT_DIR" "$@"
