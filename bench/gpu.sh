#!/usr/bin/env bash
# GPU benchmark: one GPU, under 8 minutes. Runs bench/perf.py on CUDA (extraction and
# fine-tuning, tlops vs the obvious loop / transformers.Trainer / a plain PyTorch loop) in
# three settings: fp32; bf16 autocast + channels_last CNNs; the same + torch.compile.
# Both sides get the same flags; tensors go to the GPU from pinned host memory.
# Results: bench/results/perf-gpu-{fp32,bf16,compile}.md/.json and a summary on stdout.
#
#   bash bench/gpu.sh                  # or: make gpu-bench
#   GPU_BENCH_BUDGET=300 bash bench/gpu.sh
#
# Without a CUDA GPU it prints a message and exits 0 (so it is safe in CI and on laptops).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() and torch.cuda.device_count() > 0 else 1)' 2>/dev/null; then
  echo "bench/gpu.sh: no CUDA GPU detected (torch.cuda.is_available() is False): skipping the GPU benchmark."
  exit 0
fi

BUDGET=${GPU_BENCH_BUDGET:-450}   # seconds for all three runs (< 8 min incl. start-up)
START=$(date +%s)
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# perf.py turns --device/--amp/--channels-last/--compile into train.device/precision/channels_last/compile
# (the same fields `tlops run --set train.device=cuda --set train.precision=bf16 ...` sets); no environment knobs

run() {  # run <name> <share of the budget in %> <perf.py flags...>
  local name=$1 share=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  local limit=$(( BUDGET * share / 100 ))
  (( limit > left )) && limit=$left
  if (( limit < 30 )); then echo "== $name: skipped (out of time budget)"; return; fi
  echo "== $name (limit ${limit}s): perf.py --device cuda $*"
  timeout --signal=TERM --kill-after=10 "$limit" "$PY" bench/perf.py --device cuda --only extract,finetune \
    --out "bench/results/perf-gpu-$name" "$@"
  local rc=$?
  if (( rc == 124 || rc == 137 )); then echo "== $name: stopped at its time limit (${limit}s); partial output above"; fi
}

run fp32 30 --repeats 3
run bf16 30 --repeats 3 --amp bf16 --channels-last
run compile 40 --repeats 2 --amp bf16 --channels-last --compile

echo
echo "== summary (headline ratios per setting)"
for f in bench/results/perf-gpu-{fp32,bf16,compile}.md; do
  [ -f "$f" ] || continue
  echo "-- $f"
  sed -n '/^### Headline ratios/,$p' "$f"
done
echo "bench/gpu.sh: done in $(( $(date +%s) - START )) s"
