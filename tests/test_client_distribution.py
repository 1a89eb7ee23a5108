"""The client SDK as an application installs it: specdec-client's wheel in a fresh venv (no system site-packages,
no checkout on the path) brings grpcio and protobuf and nothing heavier, and from there generates against a
live orchestrator the same tokens as the SDK in the project's own venv.

The venv's dependencies come from the package index, at the versions constraints.txt pins (pip's cache makes a
rerun quick); only the wheel itself is built here, offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from specdec_client import Client
from tests.conftest import PROMPTS
from tests.wheels import REPO, build_client_wheel, clean_env

HEAVY = ("torch", "transformers", "numpy", "tokenizers", "specdec_cli", "orchestrator", "serving")

# What the venv's python prints about itself: every installed distribution with its unconditional requirements,
# and which of the heavy modules it could import.
INVENTORY = f"""
import importlib.metadata, importlib.util, json, re
def name(text):
    return re.sub(r"[-_.]+", "-", text).lower()
dists = {{name(d.metadata["Name"]): sorted(name(re.match(r"[A-Za-z0-9._-]+", r).group())
                                          for r in d.requires or () if "extra ==" not in r)
         for d in importlib.metadata.distributions()}}
print(json.dumps({{"dists": dists, "importable": [m for m in {HEAVY!r} if importlib.util.find_spec(m)]}}))
"""

# An application's script: the sync client one-shot (greedy) and streaming (seeded sampling), the asyncio
# client, a typed error, and what it had to import for all that.
APPLICATION = f"""
import asyncio, json, sys
import specdec_client
from specdec_client import AsyncClient, Client, InvalidArgument

address, prompt = sys.argv[1], sys.argv[2]
with Client(address, timeout=120) as client:
    greedy = client.generate(prompt, max_new_tokens=24)
    sampled = [t for chunk in client.stream(prompt, max_new_tokens=24, temperature=0.8, seed=7)
               for t in chunk.token_ids]
    target_model = client.info().target_model
    try:
        client.generate(prompt, max_new_tokens=0)
        refused = None
    except InvalidArgument as error:
        refused = type(error).__name__

async def run():
    async with AsyncClient(address, timeout=120) as client:
        return (await client.generate(prompt, max_new_tokens=24)).token_ids

print(json.dumps({{"greedy": greedy.token_ids, "text": greedy.text, "finish_reason": greedy.finish_reason,
                  "sampled": sampled, "async": asyncio.run(run()), "target_model": target_model,
                  "refused": refused, "sdk": specdec_client.__file__,
                  "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def _run(python: Path, code: str, *args: str, cwd: Path) -> str:
    """The venv's python in isolated mode (no current directory, PYTHONPATH or user site on sys.path), run
    outside the checkout: it sees only what was installed into the venv."""
    done = subprocess.run([str(python), "-I", "-c", code, *args], capture_output=True, text=True, timeout=180,
                          cwd=cwd, env=clean_env())
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def sdk_venv(tmp_path_factory) -> Path:
    """A fresh venv with the client wheel installed as an application would: `pip install -c constraints.txt
    WHEEL`, dependencies resolved from the wheel's metadata. Returns the venv's python."""
    work = tmp_path_factory.mktemp("client_distribution")
    wheel = build_client_wheel(work)
    venv = work / "venv"
    made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=120,
                          env=clean_env())
    assert made.returncode == 0, made.stdout + made.stderr
    python = venv / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                                "-c", str(REPO / "constraints.txt"), str(wheel)],
                               capture_output=True, text=True, timeout=600, cwd=work, env=clean_env())
    assert installed.returncode == 0, f"pip install {wheel.name} failed:\n{installed.stdout}\n{installed.stderr}"
    return python


def test_the_sdk_installs_with_grpcio_and_protobuf_and_nothing_heavier(sdk_venv, tmp_path):
    inventory = json.loads(_run(sdk_venv, INVENTORY, cwd=tmp_path))
    dists = inventory["dists"]
    assert inventory["importable"] == [], f"the SDK's venv can import {inventory['importable']}"
    assert {"specdec-client", "grpcio", "protobuf"} <= set(dists)
    assert dists["specdec-client"] == ["grpcio", "protobuf"]
    # Beyond the venv's own installer: the SDK, grpcio, protobuf and what those two require, nothing else.
    allowed = {"pip", "setuptools", "specdec-client", "grpcio", "protobuf", *dists["grpcio"], *dists["protobuf"]}
    assert set(dists) <= allowed, f"installed beyond the SDK's needs: {sorted(set(dists) - allowed)}"
    assert "specdec" not in dists and "torch" not in dists and "transformers" not in dists


def test_an_application_venv_generates_the_tokens_the_project_sdk_gets(sdk_venv, stacks, tiny, tmp_path):
    stack = stacks("different")  # start_stack(tiny.target, tiny.draft), shared with the other SDK tests
    prompt = PROMPTS[2]
    with Client(stack.address, timeout=120) as client:
        greedy = client.generate(prompt, max_new_tokens=24)
        sampled = client.generate(prompt, max_new_tokens=24, temperature=0.8, seed=7)

    app = json.loads(_run(sdk_venv, APPLICATION, stack.address, prompt, cwd=tmp_path))

    assert Path(app["sdk"]).is_relative_to(sdk_venv.parent.parent), f"the SDK came from {app['sdk']}"
    assert app["heavy"] == []
    assert app["greedy"] == greedy.token_ids and len(greedy.token_ids) == 24
    assert app["text"] == greedy.text and app["finish_reason"] == greedy.finish_reason == "length"
    assert app["sampled"] == sampled.token_ids
    assert app["async"] == greedy.token_ids
    assert app["target_model"] == str(tiny.target)
    assert app["refused"] == "InvalidArgument"
