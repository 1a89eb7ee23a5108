"""Every RPC of every service survives fuzzed requests: no crash, no hang, no UNKNOWN / INTERNAL, no token
changed by a tampered session, and greedy output still equals the target's `generate` afterwards.

The engine is benchmarking/fuzz.py (`python -m benchmarking.fuzz --long` runs it for thousands of requests per
service on separate processes); here it runs a few seconds per service (SPECDEC_FUZZ_SECONDS) on in-process
servers, so "no crash" is every server still answering its health check SERVING. The seed is fixed
(SPECDEC_FUZZ_SEED), so a failure prints a report whose `--case ROLE:INDEX` replays it.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from benchmarking import fuzz
from draft_service.server import SERVICE_NAME as DRAFT
from orchestrator.server import SERVICE_NAME as ORCHESTRATOR
from tests.conftest import PROMPTS, start_stack
from verify_service.server import SERVICE_NAME as VERIFY

SECONDS_PER_SERVICE = float(os.environ.get("SPECDEC_FUZZ_SECONDS", "5"))
SEED = int(os.environ.get("SPECDEC_FUZZ_SEED", "0"))


@pytest.fixture(scope="module")
def fuzzed_stack(tiny):
    """A stack of its own: the fuzzing must not leave its sessions in the shared ones."""
    stack = start_stack(tiny.target, tiny.draft)
    yield {"verify": fuzz.Endpoint("verify", f"localhost:{stack.verify.port}", VERIFY),
           "draft": fuzz.Endpoint("draft", f"localhost:{stack.draft.port}", DRAFT),
           "orchestrator": fuzz.Endpoint("orchestrator", stack.address, ORCHESTRATOR)}
    stack.stop()


@pytest.fixture(scope="module")
def reference(target_model, tokenizer):
    def generate(prompt: str, max_new_tokens: int) -> list[int]:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = target_model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        return out[0, inputs["input_ids"].shape[1]:].tolist()
    return generate


def test_the_fuzzer_finds_every_rpc_of_every_service():
    services = fuzz.discover_rpcs()
    assert {VERIFY, DRAFT, ORCHESTRATOR} <= set(services)
    limits = fuzz.Limits(vocab_size=384, max_context=256, max_draft_tokens=32)
    for rpcs in services.values():
        for rpc in rpcs:
            request = fuzz.valid_request(rpc, limits, random.Random(0))
            assert isinstance(request, rpc.request_class)
            if rpc.request_class.DESCRIPTOR.fields:  # every field gets mutated
                labels = " ".join(m.label for m in fuzz.field_mutations(rpc.request_class.DESCRIPTOR, limits))
                assert all(f.name in labels for f in rpc.request_class.DESCRIPTOR.fields), rpc.name


@pytest.mark.parametrize("role", ["verify", "draft", "orchestrator"])
def test_fuzzed_requests_get_a_clear_status_and_leave_the_stack_exact(fuzzed_stack, reference, role):
    options = fuzz.Options(requests=100_000, seconds=SECONDS_PER_SERVICE, seed=SEED, base_deadline_s=10.0)
    summary = fuzz.fuzz(fuzzed_stack, options, roles=[role], reference=reference, prompts=PROMPTS[:4])
    report = fuzz.format_report(summary)
    (service_report,) = summary.reports
    rpcs = fuzz.discover_rpcs()[fuzzed_stack[role].service]
    if summary.failures:  # the report, not the failures' repr: it names each distinct one and its replay
        pytest.fail(report, pytrace=False)
    print(report)
    assert set(service_report["per_rpc"]) == {rpc.name for rpc in rpcs}, "an RPC was never called"
    assert service_report["requests"] >= 20, report
    assert summary.exactness == {"prompts": 4, "equal": 4}, report
