"""Building the project's wheels offline for the packaging tests: `pip wheel --no-deps --no-build-isolation`
with the setuptools of the venv running the tests, from a copy of the sources (a build in place writes build/
and *.egg-info into the checkout, and a stale build/lib would put old packages in the wheel)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLIENT_DIR = REPO / "client_sdk"  # the client SDK's distribution, specdec-client


def clean_env() -> dict[str, str]:
    """No PYTHONPATH: the checkout must be found by the code under test, not by the caller's environment."""
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def build_wheel(source: Path, dist: Path) -> Path:
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(dist), str(source)],
                          capture_output=True, text=True, timeout=120, env=clean_env())
    assert done.returncode == 0, f"building the wheel of {source} failed:\n{done.stdout}\n{done.stderr}"
    [built] = dist.glob("*.whl")
    return built


def build_client_wheel(work: Path) -> Path:
    """specdec-client's wheel, built from a copy of client_sdk/ under `work`."""
    source = work / "client_source"
    shutil.copytree(CLIENT_DIR, source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build"))
    return build_wheel(source, work / "client_dist")
