#!/usr/bin/env bash
# Downloads the wheels benchmarking/gpu_wheels.txt names into .whl/ (git-ignored), for a GPU machine with no
# network: cp312 manylinux x86_64 or pure-Python builds, no dependencies resolved (the list names them all).
# Usage, from the repository root: benchmarking/fetch_gpu_wheels.sh   (PYTHON=... to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
mkdir -p .whl
grep -v '^\s*#' benchmarking/gpu_wheels.txt | grep -v '^\s*$' | while read -r spec; do
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec"
done
ls -1 .whl
du -sh .whl
