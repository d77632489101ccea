#!/usr/bin/env bash
# Every GPU check of litlab in ONE device call, about 9 minutes on an H100/H200 (GPU time is scarce):
#   1. the wheels in .whl/ (benchmarks/gpu_wheels.sh, run beforehand where pip works) installed if the
#      image lacks HF datasets;
#   2. every GPU benchmark (gpu_all.sh, ~4.5 min) -> OUT/gpu.md and OUT/gpu_{eager,compile}.{md,json};
#   3. the GPU tests (pytest -m gpu: CUDA graphs first, then the digits models under bf16-mixed and
#      16-mixed) for TEST_S seconds (default 240) -> OUT/gpu_tests.log, one line per test.
# With the device tool: run(command="bash benchmarks/gpu_session.sh $OUT", carry=[".whl"], timeout_s=600).
# On a CPU, the same code paths at tiny sizes: SMOKE=1 bash benchmarks/gpu_session.sh /tmp/smoke
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/litlab-gpu}}
TEST_S=${TEST_S:-240}
mkdir -p "$OUT"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHON

install() {  # install DIR: its wheels into /tmp/site, first on PYTHONPATH
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$1"/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
}
if ! "$PYTHON" -c "import datasets" 2>/dev/null && ls .whl/*.whl > /dev/null 2>&1; then
  install .whl
  if ! "$PYTHON" -c "import datasets" 2> "$OUT/datasets_import.log" && ls .whl/fallback/*.whl > /dev/null 2>&1; then
    install .whl/fallback  # the image's pyarrow is older than datasets needs
  fi
fi
[ -s "$OUT/datasets_import.log" ] || rm -f "$OUT/datasets_import.log"
"$PYTHON" -c "import datasets, lightning, torch; print('gpu_session.sh: datasets', datasets.__version__, 'lightning', lightning.__version__, 'torch', torch.__version__)" \
  || echo "gpu_session.sh: no HF datasets: the digits runs will fail (run bash benchmarks/gpu_wheels.sh where pip works, and carry .whl)" >&2

bash benchmarks/gpu_all.sh "$OUT"
bench=$?
export PYTHONPATH="platform${PYTHONPATH:+:$PYTHONPATH}" HF_DATASETS_OFFLINE=1
timeout "$TEST_S" "$PYTHON" -m pytest -m gpu -v -p no:cacheprovider tests/test_gpu.py > "$OUT/gpu_tests.log" 2>&1
tests=$?
[ $tests -eq 124 ] && echo "gpu_session.sh: the GPU tests stopped at $TEST_S s; $OUT/gpu_tests.log lists those that ran" >&2
tail -n 20 "$OUT/gpu_tests.log"
[ $bench -eq 0 ] && [ $tests -eq 0 ]
