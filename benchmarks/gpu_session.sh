#!/usr/bin/env bash
# Every GPU check of litlab in ONE device call, about 8 minutes on an H100/H200 (GPU time is scarce):
#   1. the wheels in .whl/ (benchmarks/gpu_wheels.sh, run beforehand where pip works) installed if the
#      image lacks HF datasets;
#   2. every GPU benchmark (gpu_all.sh, ~3.5 min) -> OUT/gpu.md and OUT/gpu_{resnet,gpt2,compile}.json;
#   3. the GPU tests (pytest -m gpu: CUDA graphs and host syncs first, then every digits model under
#      bf16-mixed, then 16-mixed) for TEST_S seconds (default 160: with the benchmarks' limits, 170 + 90 + 150 s,
#      the call stays under the device tool's 600 s) -> OUT/gpu_tests.log, one line per
#      test and the traceback of each failure; pytest's own output in OUT/gpu_pytest.log. TESTS (test
#      ids, space-separated; default tests/test_gpu.py) runs some of them.
#   BENCHES (gpu_all.sh) picks benchmarks: e.g. BENCHES="resnet compile" TEST_S=150 bash benchmarks/gpu_session.sh
# With the device tool: run(command="bash benchmarks/gpu_session.sh $OUT", carry=[".whl"], timeout_s=600).
# On a CPU, the same code paths at tiny sizes: SMOKE=1 bash benchmarks/gpu_session.sh /tmp/smoke
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/litlab-gpu}}
TEST_S=${TEST_S:-160}
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
# Each test's outcome (and a failure's traceback) lands in gpu_tests.log as it ends (tests/conftest.py),
# so tests cut off by TEST_S still say why they failed. SIGKILL: Lightning catches SIGTERM and SIGINT
# and the next test would start. The digits runs are small: with pytest-xdist (in the GPU image) they
# share the GPU, TEST_WORKERS at a time.
workers=()
"$PYTHON" -c "import xdist" 2>/dev/null && workers=(-n "${TEST_WORKERS:-6}")
LITLAB_TEST_LOG="$OUT/gpu_tests.log" timeout -s KILL "$TEST_S" "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider \
  "${workers[@]}" ${TESTS:-tests/test_gpu.py} > "$OUT/gpu_pytest.log" 2>&1
tests=$?
[ $tests -eq 137 ] && echo "gpu_session.sh: the GPU tests stopped at $TEST_S s; $OUT/gpu_tests.log lists those that ended" >&2
grep -E "^(PASSED|FAILED|SKIPPED|ERROR)" "$OUT/gpu_tests.log" | cut -c1-160
tail -n 3 "$OUT/gpu_pytest.log"
[ $bench -eq 0 ] && [ $tests -eq 0 ]
