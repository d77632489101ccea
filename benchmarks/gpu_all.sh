#!/usr/bin/env bash
# Every GPU benchmark of litlab, in one go, in under 5 minutes on one H100/H200:
#   ResNet-18 (CIFAR stem, 32x32 synthetic images, batch 512, bf16, channels_last) with tracking on and off,
#   GPT-2 small (86M parameters, 16 x 1024 byte tokens, bf16, fused AdamW + clipping) eager and compiled,
#   and the start-up times (`litlab --help`, `litlab models`, `litlab run` to its first step).
# Each figure is litlab against a hand-written loop on the same model and data, in the same process.
#
#   bash benchmarks/gpu_all.sh [OUT_DIR]        (default: $OUT if set, else /tmp/litlab-gpu)
#
# Writes OUT_DIR/gpu.md (the tables for the README) and OUT_DIR/gpu_{eager,compile}.{md,json} (every
# repeat), rewritten after each benchmark, so a run cut short keeps what it measured. Uses
# .venv/bin/python if there is one, else python3 (set PYTHON to choose). Without mlflow installed the
# runs are untracked and the table says so. On a CPU, tiny sizes, to check the code paths:
#   SMOKE=1 bash benchmarks/gpu_all.sh /tmp/smoke
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/litlab-gpu}}
mkdir -p "$OUT"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="platform${PYTHONPATH:+:$PYTHONPATH}" HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

if [ "${SMOKE:-0}" = 1 ]; then
  COMMON=(--smoke --device cpu --epochs 2)
else
  COMMON=(--device cuda)
  "$PYTHON" -c 'import sys, torch; torch.cuda.is_available() or sys.exit("gpu_all.sh: no CUDA device (SMOKE=1 checks the code paths on a CPU)"); print("gpu_all.sh:", torch.cuda.get_device_name(), "torch", torch.__version__, file=sys.stderr)' || exit 1
fi

run() {  # run LIMIT_S NAME ARGS...: one throughput.py call writing OUT/NAME.{md,json}
  local limit=$1 name=$2
  shift 2
  timeout "$limit" "$PYTHON" benchmarks/throughput.py "${COMMON[@]}" "$@" --out "$OUT/$name.md" "$OUT/$name.json"
  local status=$?
  [ $status -eq 124 ] && echo "gpu_all.sh: $name stopped at $limit s; $OUT/$name.md holds what it measured" >&2
  return $status
}

# ~4.5 minutes on an H100. Eager: ResNet-18, 2 variants x 2 repeats x (hand loop + litlab) x 3 epochs of
# 48 steps; GPT-2, 2 repeats x 2 epochs of 26 steps; start-up ~20 s. Compiled GPT-2: one repeat (it is
# mostly compilation; the second side reuses the inductor cache).
run 170 gpu_eager --repeats 2 --startup --bench resnet18:default,notrack gpt2:default
eager=$?
run 115 gpu_compile --repeats 1 --bench gpt2:compile
compiled=$?
cat "$OUT/gpu_eager.md" "$OUT/gpu_compile.md" > "$OUT/gpu.md" 2>/dev/null
cat "$OUT/gpu.md"
[ $eager -eq 0 ] && [ $compiled -eq 0 ]
