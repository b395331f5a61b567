#!/usr/bin/env bash
# One command for a CUDA machine (torch 2.11 / triton 3.6 or newer):
#   1. the whole test suite, which then also runs every test on device "cuda" (the compiled
#      Triton kernels against the plain-PyTorch reference, forward and every gradient);
#   2. every benchmark script in BENCHMARKS below.
# Everything runs within TOTAL_BUDGET_S (8 minutes); outputs go to benchmarks/results/gpu/.
# Usage: bash benchmarks/gpu_check.sh        (from anywhere; exit status != 0 if a step failed)
set -uo pipefail

# Benchmark scripts under benchmarks/, run in this order. Add yours here; each must accept
# `--out-dir DIR` and write its results (jsonl + md) there.
BENCHMARKS=(
  bench_quantize.py
  bench_binary.py
)
TOTAL_BUDGET_S=480   # 8 minutes for everything
TEST_BUDGET_S=240    # at most this much of it for the tests

cd "$(dirname "$0")/.."
OUT=benchmarks/results/gpu
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
START=$(date +%s)
STATUS=0

log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
remaining() { echo $(( TOTAL_BUDGET_S - ($(date +%s) - START) )); }

: > "$LOG"
log "host $(hostname); $(python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>&1)"
if ! python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  log "no CUDA device visible: this script is for a GPU machine"; exit 2
fi

# The interpreter must be off so the Triton kernels compile for the GPU.
unset TRITON_INTERPRET
export GDNSQ_BACKEND=auto

log "pytest -q tests (budget ${TEST_BUDGET_S}s)"
timeout "$TEST_BUDGET_S" python -m pytest -q tests -rs --junitxml="$OUT/pytest.xml" > "$OUT/pytest.txt" 2>&1
rc=$?
tail -n 5 "$OUT/pytest.txt" | tee -a "$LOG"
if [ $rc -ne 0 ]; then log "pytest FAILED (rc=$rc; 124 = timeout); see $OUT/pytest.txt"; STATUS=1; fi

for bench in "${BENCHMARKS[@]}"; do
  left=$(remaining)
  if [ "$left" -le 10 ]; then log "out of time before $bench"; STATUS=1; break; fi
  name="${bench%.py}"
  log "$bench (up to ${left}s) -> $OUT/${name}.txt"
  timeout "$left" python "benchmarks/$bench" --out-dir "$OUT" > "$OUT/${name}.txt" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then log "$bench FAILED (rc=$rc; 124 = timeout)"; tail -n 5 "$OUT/${name}.txt" | tee -a "$LOG"; STATUS=1; fi
done

log "done in $(( $(date +%s) - START ))s, status $STATUS; results in $OUT/"
exit $STATUS
