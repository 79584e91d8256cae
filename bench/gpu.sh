#!/usr/bin/env bash
# GPU benchmark: one GPU, under 8 minutes. Runs bench/perf.py on CUDA (extraction and
# fine-tuning, tlops vs the obvious loop / transformers.Trainer / a plain PyTorch loop) in
# three settings: fp32; bf16 autocast + channels_last CNNs; the same + torch.compile; then
# bench/perf_compile.py on CUDA: features.backend torch-compile and train.compile against eager,
# compile time included (the extraction backend that can pay on a GPU; the int8 / ONNX Runtime /
# OpenVINO backends are CPU backends here: onnxruntime-gpu replaces the onnxruntime package the CPU
# backends use, and TensorRT does not install from the package index on this project's machines).
# Both sides get the same flags; tensors go to the GPU from pinned host memory.
# Results: bench/results/perf-gpu-{fp32,bf16,compile}.md/.json, bench/results/compile-gpu.md/.json
# and a summary on stdout.
#
#   bash bench/gpu.sh                  # or: make gpu-bench
#   GPU_BENCH_BUDGET=300 bash bench/gpu.sh
#   GPU_BENCH_DRY_RUN=1 bash bench/gpu.sh   # every stage on the CPU at --quick sizes into a temp dir:
#                                           # checks the script without a GPU (tests/test_perf_bench.py)
#
# Without a CUDA GPU (and without the dry run) it prints a message and exits 0 (safe in CI and on laptops).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

DEVICE=cuda OUT=bench/results QUICK=()
if [ -n "${GPU_BENCH_DRY_RUN:-}" ]; then
  DEVICE=cpu QUICK=(--quick)
  OUT=$(mktemp -d "${TMPDIR:-/tmp}/tlops-gpu-dry-run.XXXXXX")
  echo "bench/gpu.sh: dry run on the CPU at --quick sizes; results in $OUT"
elif ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() and torch.cuda.device_count() > 0 else 1)' 2>/dev/null; then
  echo "bench/gpu.sh: no CUDA GPU detected (torch.cuda.is_available() is False): skipping the GPU benchmark."
  exit 0
fi

BUDGET=${GPU_BENCH_BUDGET:-450}   # seconds for all four runs (< 8 min incl. start-up)
START=$(date +%s)
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# perf.py turns --device/--amp/--channels-last/--compile into train.device/precision/channels_last/compile
# (the same fields `tlops run --set train.device=cuda --set train.precision=bf16 ...` sets); no environment knobs

stage() {  # stage <name> <share of the budget in %> <command...>: run it under its share of the budget
  local name=$1 share=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  local limit=$(( BUDGET * share / 100 ))
  (( limit > left )) && limit=$left
  if (( limit < 30 )); then echo "== $name: skipped (out of time budget)"; return; fi
  echo "== $name (limit ${limit}s): $*"
  timeout --signal=TERM --kill-after=10 "$limit" "$PY" "$@"
  local rc=$?
  if (( rc == 124 || rc == 137 )); then echo "== $name: stopped at its time limit (${limit}s); partial output above"; fi
}
run() {  # run <name> <share> <perf.py flags...>
  local name=$1 share=$2; shift 2
  stage "$name" "$share" bench/perf.py --device "$DEVICE" --only extract,finetune --out "$OUT/perf-gpu-$name" \
    "${QUICK[@]}" "$@"
}

run fp32 25 --repeats 3
run bf16 25 --repeats 3 --amp bf16 --channels-last
run compile 30 --repeats 2 --amp bf16 --channels-last --compile
stage compile-backend 20 bench/perf_compile.py --device "$DEVICE" --out "$OUT/compile-gpu.md" "${QUICK[@]}"

echo
echo "== summary (headline ratios per setting)"
for f in "$OUT"/perf-gpu-{fp32,bf16,compile}.md; do
  [ -f "$f" ] || continue
  echo "-- $f"
  sed -n '/^### Headline ratios/,$p' "$f"
done
if [ -f "$OUT/compile-gpu.md" ]; then
  echo "-- $OUT/compile-gpu.md"
  grep '^|' "$OUT/compile-gpu.md"
fi
echo "bench/gpu.sh: done in $(( $(date +%s) - START )) s"
