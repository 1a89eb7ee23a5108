#!/usr/bin/env bash
# Creates .venv and installs the project with its test tools. Safe to rerun.
# torch is pinned and installed first: the CPU wheel is what this project's machines use, and an
# unpinned torch would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
