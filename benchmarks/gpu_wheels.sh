#!/usr/bin/env bash
# Wheels of what litlab's GPU checks need and the GPU machines' image lacks, for gpu_session.sh.
# The image (the device tool's KINDS.md) has torch, lightning, torchmetrics, pandas, pytest, ... but
# not Hugging Face `datasets`, which the digits data module uses, nor mlflow (gpu_all.sh and the
# GPU tests run untracked without it). Run it here, where pip reaches the package index; it writes
# .whl/ (git-ignored): datasets, dill and multiprocess at this venv's versions, and in
# .whl/fallback/ a pyarrow that gpu_session.sh installs only if `import datasets` fails without it.
#   bash benchmarks/gpu_wheels.sh            (PYVER=3.12: the image's Python; x86-64 Linux wheels)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PYVER=${PYVER:-3.12}
version() {  # this checkout's venv's version of a package, else the one this script was written with
  local v
  v=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null) || v=$2
  echo "$1==$v"
}
download() {  # download DIR REQUIREMENT...
  local dir=$1
  shift
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir" "$@" 2>&1 | grep -v "is ignored" || true
}
rm -rf .whl
mkdir -p .whl/fallback
download .whl "$(version datasets 5.2.0)" "$(version dill 0.4.1)" "$(version multiprocess 0.70.19)"
download .whl/fallback "$(version pyarrow 25.0.1)"
ls -l .whl .whl/fallback
du -sh .whl
