"""Fixtures: tiny models built once per test session, and real gRPC servers on free localhost ports."""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import draft_service.server as draft_server
import orchestrator.server as orchestrator_server
import verify_service.server as verify_server
from service_common.server import RunningServer
from serving.model_server import ModelServerSettings
from specdec_client import Client
from tests.tiny_models import build_llama, build_tokenizer, save_noisy_copy

torch.set_num_threads(1)


@dataclass
class TinyModels:
    tokenizer_dir: Path
    target: Path  # 2 layers, d=64
    draft: Path  # a different, smaller model: 1 layer, d=32
    noisy_draft: Path  # the target with noise added: agrees often but not always
    disagreeing_draft: Path  # always proposes token 0, which the target never picks
    other_vocab_draft: Path  # a tokenizer with a different vocabulary


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyModels:
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer(root / "tokenizer")
    target = build_llama(root / "target", tokenizer, hidden=64, layers=2, seed=1, sharpen=6.0)
    # Token 0 is the EOS special token here; the target's lm_head row 0 is zeroed, so its logit is
    # always 0 and (with other logits spread around 0) never the argmax in practice.
    model = AutoModelForCausalLM.from_pretrained(target)
    with torch.no_grad():
        model.lm_head.weight[0].zero_()
        model.lm_head.weight[0] -= 5.0 * model.lm_head.weight[1:].mean(0)
    model.save_pretrained(target)
    draft = build_llama(root / "draft", tokenizer, hidden=32, layers=1, seed=2, sharpen=6.0)
    save_noisy_copy(target, root / "noisy_draft", tokenizer)
    disagreeing = build_llama(root / "disagreeing_draft", tokenizer, hidden=32, layers=1, seed=4,
                              zero_final_norm=True)
    from reference_pair.tokenizer_build import train_tokenizer
    from reference_pair.corpus import source_files

    other_tok = train_tokenizer([t for _, t in source_files()[40:60]], 384, root / "other_tok")
    other = build_llama(root / "other_vocab_draft", other_tok, hidden=32, layers=1, seed=5)
    return TinyModels(root / "tokenizer", target, draft, root / "noisy_draft", disagreeing, other)


@dataclass
class Stack:
    verify: RunningServer
    draft: RunningServer | None
    orchestrator: RunningServer

    @property
    def address(self) -> str:
        return f"localhost:{self.orchestrator.port}"

    def client(self, timeout: float = 120.0) -> Client:
        return Client(self.address, timeout=timeout)

    def stop(self) -> None:
        for server in (self.orchestrator, self.draft, self.verify):
            if server is not None:
                server.stop(grace=None)


def start_stack(target: Path, draft: Path | None, verify_settings: dict | None = None,
                draft_settings: dict | None = None, **orchestrator_settings) -> Stack:
    verify = verify_server.start(ModelServerSettings(str(target), host="localhost", **(verify_settings or {})))
    drafter = None
    if draft is not None:
        drafter = draft_server.start(ModelServerSettings(str(draft), host="localhost",
                                                         **{"runtime": "auto", **(draft_settings or {})}))
    orchestrator = orchestrator_server.start(orchestrator_server.OrchestratorSettings(
        verify=f"localhost:{verify.port}", draft=f"localhost:{drafter.port}" if drafter else None,
        host="localhost", **orchestrator_settings))
    return Stack(verify, drafter, orchestrator)


@pytest.fixture(scope="session")
def stacks(tiny):
    """Stacks keyed by draft kind, started on first use and shared by the session's tests."""
    started: dict[str, Stack] = {}
    drafts = {"different": tiny.draft, "self": tiny.target, "disagreeing": tiny.disagreeing_draft,
              "noisy": tiny.noisy_draft}

    def get(kind: str) -> Stack:
        if kind not in started:
            started[kind] = start_stack(tiny.target, drafts[kind])
        return started[kind]

    yield get
    for stack in started.values():
        stack.stop()


@pytest.fixture(scope="session")
def target_model(tiny):
    return AutoModelForCausalLM.from_pretrained(tiny.target).eval()


@pytest.fixture(scope="session")
def tokenizer(tiny):
    return AutoTokenizer.from_pretrained(tiny.target)


PROMPTS = [
    "def main():\n", "import os\n", "class Foo(object):\n    def", "return self.", "for i in range(",
    "# Copyright", "if __name__ == '__main__':\n", "x = [1, 2, 3]\n", "try:\n    import", "while True:\n",
    "from typing import", "print(", "@property\ndef", "raise ValueError(", "with open(path) as f:\n",
    "lambda x:", "assert ", "self.assertEqual(", "elif", "'''Docstring.\n", "async def fetch(url):\n",
    "yield from", "except KeyError:\n    pass\n",
]
