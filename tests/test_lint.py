"""The code passes ruff with the rules pyproject.toml selects ([tool.ruff]). It is a test so that the README's
test command, and so CI, lints: a failure prints ruff's report, one line per finding (file:line:column, rule,
what is wrong)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _ruff(*args: str) -> subprocess.CompletedProcess:
    """The venv's ruff (the version constraints.txt pins) on the repository, with pyproject.toml's settings;
    --no-cache: nothing written into the checkout."""
    if importlib.util.find_spec("ruff") is None:
        pytest.fail(f"ruff is not installed for {sys.executable}: run ./setup.sh (the test extra brings it)")
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *args, str(REPO)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_ruff_finds_nothing_to_fix():
    done = _ruff("--output-format", "concise")
    assert done.returncode == 0, ("ruff check found problems (fix them, or see [tool.ruff] in pyproject.toml):\n"
                                  f"{done.stdout}{done.stderr}")


def test_ruff_reads_the_project_and_skips_only_generated_code():
    done = _ruff("--show-files")
    assert done.returncode == 0, done.stderr
    checked = {Path(line).resolve().relative_to(REPO).as_posix() for line in done.stdout.splitlines() if line.strip()}
    assert {"specdec_cli/main.py", "serving/model_worker.py", "client_sdk/specdec_api/method_paths.py",
            "tests/test_lint.py"} <= checked
    assert not [path for path in checked if "_pb2" in path or path.startswith(".venv/")]
