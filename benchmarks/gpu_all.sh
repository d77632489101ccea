#!/usr/bin/env bash
# Every GPU benchmark of litlab, in one go, in under 5 minutes on one H100/H200:
#   ResNet-18 (CIFAR stem, 32x32 synthetic images, batch 512, bf16, channels_last) with tracking on and off
#   (one untracked run where mlflow is missing),
#   GPT-2 small (86M parameters, 16 x 1024 byte tokens, bf16, fused AdamW + clipping) eager and compiled,
#   and the start-up times (`litlab --help`, `litlab models`, `litlab run` to its first step).
# Each figure is litlab against a hand-written loop on the same model and data, in the same process.
#
#   bash benchmarks/gpu_all.sh [OUT_DIR]        (default: $OUT if set, else /tmp/litlab-gpu)
#
# Writes OUT_DIR/gpu.md (the tables for the README) and OUT_DIR/gpu_{resnet,gpt2,compile}.json (every
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

SHORT=()  # SMOKE: after each benchmark's own arguments, so they win (1 epoch is timed beside the warm-up and the profiled one)
RESNET_REPEATS=2 PAIRED=2 GPT_REPEATS=2
if [ "${SMOKE:-0}" = 1 ]; then
  COMMON=(--smoke --device cpu)
  SHORT=(--epochs 3)
  RESNET_REPEATS=1 PAIRED=1 GPT_REPEATS=1  # the code paths, not the figures
else
  COMMON=(--device cuda)
  "$PYTHON" -c 'import sys, torch; torch.cuda.is_available() or sys.exit("gpu_all.sh: no CUDA device (SMOKE=1 checks the code paths on a CPU)"); print("gpu_all.sh:", torch.cuda.get_device_name(), "torch", torch.__version__, file=sys.stderr)' || exit 1
fi

run() {  # run LIMIT_S NAME ARGS...: one throughput.py call writing OUT/NAME.{md,json}
  local limit=$1 name=$2
  shift 2
  [ "${SMOKE:-0}" = 1 ] && limit=600  # the limits share out GPU time; a busy CPU needs more
  timeout "$limit" "$PYTHON" benchmarks/throughput.py "${COMMON[@]}" "$@" "${SHORT[@]}" --out "$OUT/$name.md" "$OUT/$name.json"
  local status=$?
  [ $status -eq 124 ] && echo "gpu_all.sh: $name stopped at $limit s; $OUT/$name.md holds what it measured" >&2
  return $status
}

# ~3.5 minutes on an H200. ResNet-18: 2 repeats x (hand loop + litlab) x 10 epochs of 48 steps (9
# timed: ~4 s per side), with and without tracking where mlflow is installed (without it both
# variants are the same untracked run, so only one is measured); in the first repeat, the epoch
# after the warm-up runs under torch.profiler, untimed (--profile: wall, host time in ops and GPU
# busy per step, and the calls of each op: whether the host sets the pace, and whether litlab's
# host or GPU work differs from the hand loop's). Then 2 --paired runs: the hand loop's epochs
# between litlab's, ratio epoch by epoch (a host whose speed drifts by +-10% between runs, as the
# H200 sessions' did, moves both sides of a pair alike). GPT-2: 2 repeats x 2 epochs of 28 steps,
# then the start-up times (~20 s). Compiled GPT-2: one repeat (mostly compilation; the second side
# reuses the inductor cache). BENCHES (default "resnet gpt2 compile") picks some of the three.
BENCHES=${BENCHES:-resnet gpt2 compile}
variants=default
"$PYTHON" -c "import mlflow" 2>/dev/null && variants=default,notrack
resnet=0 gpt2=0 compiled=0
if [[ " $BENCHES " == *" resnet "* ]]; then
  run 170 gpu_resnet --repeats "$RESNET_REPEATS" --epochs 10 --paired "$PAIRED" --profile --bench "resnet18:$variants"
  resnet=$?
fi
if [[ " $BENCHES " == *" gpt2 "* ]]; then
  run 90 gpu_gpt2 --repeats "$GPT_REPEATS" --startup --bench gpt2:default
  gpt2=$?
fi
if [[ " $BENCHES " == *" compile "* ]]; then
  run 150 gpu_compile --repeats 1 --bench gpt2:compile
  compiled=$?
fi
cat "$OUT/gpu_resnet.md" "$OUT/gpu_gpt2.md" "$OUT/gpu_compile.md" > "$OUT/gpu.md" 2>/dev/null
rm -f "$OUT/gpu_resnet.md" "$OUT/gpu_gpt2.md" "$OUT/gpu_compile.md"  # in gpu.md (a device call returns 8 files)
cat "$OUT/gpu.md"
[ $resnet -eq 0 ] && [ $gpt2 -eq 0 ] && [ $compiled -eq 0 ]
