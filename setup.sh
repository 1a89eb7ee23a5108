#!/usr/bin/env bash
# Creates .venv and installs the project with its test tools, at the versions in constraints.txt (the
# set the test suite last passed with). Safe to rerun.
#
#   ./setup.sh                        install (what the README's commands run)
#   ./setup.sh --refresh-constraints  resolve the newest versions pyproject.toml allows in a scratch
#                                     venv and rewrite constraints.txt; run the suite, then commit it
#
# torch is pinned and installed first: the CPU wheel is what this project's machines use, and an
# unpinned torch would pull several GB of CUDA packages. constraints.txt leaves torch out for that reason.
# The client SDK (client_sdk/, distribution specdec-client) is installed from its directory before the
# main project, which depends on it: it is not on PyPI, so pip must find it installed already.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH="torch==${TORCH_VERSION:-2.13.0}"

if [ "${1:-}" = "--refresh-constraints" ]; then
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    "$PYTHON" -m venv "$scratch/venv"
    "$scratch/venv/bin/python" -m pip install -q --upgrade pip
    "$scratch/venv/bin/python" -m pip install -q "$TORCH"
    "$scratch/venv/bin/python" -m pip install -q ./client_sdk
    "$scratch/venv/bin/python" -m pip install -q ".[test]"
    {
        echo "# Versions the test suite passed with; setup.sh installs with 'pip install -c constraints.txt'."
        echo "# Regenerate with './setup.sh --refresh-constraints' (torch is pinned by setup.sh itself)."
        "$scratch/venv/bin/python" -m pip freeze --exclude-editable | grep -v -i -E '^(torch|specdec|specdec[-_]client)( |=|@)'
    } > constraints.txt
    echo "constraints.txt rewritten; now run './setup.sh && .venv/bin/python -m pytest -q' and commit it"
    exit 0
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH"
.venv/bin/python -m pip install -q -c constraints.txt -e ./client_sdk
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
