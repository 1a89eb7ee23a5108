"""Inputs that used to be handled badly: each either works exactly or gets a clear status, before any work
proportional to it, and never harms a session or another caller."""

from __future__ import annotations

import math
import threading
import time

import grpc
import pytest
import torch

from service_common.session_fingerprint import fingerprint
from specdec_api import common_pb2, draft_pb2, draft_pb2_grpc, verify_pb2, verify_pb2_grpc
from specdec_client import InvalidArgument, OutOfRange
from speculation.sampling import MIN_SAMPLED_TEMPERATURE, Sampling, logits_to_probs
from tests.conftest import PROMPTS
from tests.tiny_models import CONTEXT


def test_temperatures_below_the_sampled_minimum_are_the_greedy_limit():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0 - 1e-4]])
    for temperature in (0.0, 1e-40, 1e-30, MIN_SAMPLED_TEMPERATURE / 2):
        sampling = Sampling(temperature)
        assert sampling.greedy and not sampling.problems()
        assert logits_to_probs(logits, sampling).tolist() == [[0.0, 1.0, 0.0, 0.0]]
    sampled = logits_to_probs(logits, Sampling(MIN_SAMPLED_TEMPERATURE))
    assert not Sampling(MIN_SAMPLED_TEMPERATURE).greedy and torch.isfinite(sampled).all()
    assert sampled.sum().item() == pytest.approx(1.0)
    for bad in (math.inf, math.nan, -1e-40):
        assert Sampling(bad).problems(), bad


def test_a_tiny_temperature_generates_the_greedy_output_and_spares_the_requests_batched_with_it(stacks):
    """1e-40 once raised inside the draft's shared batch: every caller in it lost its draft for rounds."""
    stack = stacks("different")
    with stack.client() as client:
        greedy = {p: client.generate(p, max_new_tokens=16) for p in PROMPTS[:6]}
    results: dict[tuple, object] = {}
    errors: list[BaseException] = []

    def run(prompt, temperature):
        try:
            with stack.client() as client:
                results[(prompt, temperature)] = client.generate(prompt, max_new_tokens=16, temperature=temperature,
                                                                 seed=3)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(p, t)) for p in PROMPTS[:6] for t in (0.0, 1e-40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for (prompt, _), result in results.items():
        assert result.token_ids == greedy[prompt].token_ids
        # nobody lost the draft (a last round with room for one token only is target-only either way)
        assert result.stats["target_only_rounds"] == greedy[prompt].stats["target_only_rounds"]


@pytest.mark.parametrize("temperature", [1e-40, 1e-30])
def test_the_services_answer_a_tiny_temperature_as_greedy(stacks, temperature):
    stack = stacks("different")
    sampling = common_pb2.SamplingParams(temperature=temperature)
    verify = verify_pb2_grpc.VerifyServiceStub(grpc.insecure_channel(f"localhost:{stack.verify.port}"))
    reply = verify.Verify(verify_pb2.VerifyRequest(session_id="tiny-t", append_tokens=[5, 6, 7], draft_token_ids=[8],
                                                   sampling=sampling), timeout=30)
    assert len(reply.argmax_token_ids) == 2 and reply.target_probs.rows == 0
    draft = draft_pb2_grpc.DraftServiceStub(grpc.insecure_channel(f"localhost:{stack.draft.port}"))
    proposal = draft.Propose(draft_pb2.ProposeRequest(session_id="tiny-t", append_tokens=[5, 6, 7],
                                                      num_draft_tokens=3, sampling=sampling), timeout=30)
    assert len(proposal.token_ids) == 3


@pytest.mark.parametrize("temperature", [math.inf, math.nan])
def test_a_temperature_that_is_not_a_finite_number_is_refused(stacks, temperature):
    with stacks("different").client() as client:
        with pytest.raises(InvalidArgument, match="temperature"):
            client.generate("x", max_new_tokens=4, temperature=temperature)


@pytest.mark.parametrize("bad", [{"min_confidence": math.nan}, {"min_confidence": 2.0}, {"vocab_limit": -1},
                                 {"num_draft_tokens": 0}, {"sampling": common_pb2.SamplingParams(top_p=math.nan)}])
def test_a_rejected_propose_leaves_the_session_it_named_as_it_was(stacks, bad):
    stack = stacks("different")
    draft = draft_pb2_grpc.DraftServiceStub(grpc.insecure_channel(f"localhost:{stack.draft.port}"))
    first = draft.Propose(draft_pb2.ProposeRequest(session_id="kept", append_tokens=[5, 6, 7], num_draft_tokens=2),
                          timeout=30)
    held = [5, 6, 7, *first.token_ids][: first.cached_len]
    request = {"session_id": "kept", "prefix_len": len(held), "prefix_fingerprint": fingerprint(held),
               "append_tokens": [9], "num_draft_tokens": 2}
    with pytest.raises(grpc.RpcError) as caught:
        draft.Propose(draft_pb2.ProposeRequest(**{**request, **bad}), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    again = draft.Propose(draft_pb2.ProposeRequest(**request), timeout=30)  # not session-lost
    assert again.cached_len == len(held) + 2


def test_a_long_request_id_is_refused_naming_the_request_id(stacks):
    with stacks("different").client() as client:
        with pytest.raises(InvalidArgument, match="request_id must be at most 256 characters, got 300"):
            client.generate("x", max_new_tokens=4, request_id="r" * 300)
        assert len(client.generate("x", max_new_tokens=4, request_id="r" * 256).token_ids) == 4


def test_a_text_prompt_that_cannot_fit_the_context_is_refused_before_it_is_tokenized(stacks):
    stack = stacks("different")
    servicer = stack.orchestrator.servicer
    calls = []
    tokenizer = servicer.deployment.tokenizer
    original = type(tokenizer).__call__

    def counting(self, *args, **kwargs):
        calls.append(len(args[0]) if args else 0)
        return original(self, *args, **kwargs)

    type(tokenizer).__call__ = counting
    try:
        with stack.client() as client:
            started = time.perf_counter()
            with pytest.raises(OutOfRange, match="characters cannot fit"):
                client.generate("def f(x):\n    return x\n" * 100_000, max_new_tokens=4)  # 2.3 MB of text
            elapsed = time.perf_counter() - started
            assert calls == []  # never tokenized
            client.generate(PROMPTS[0], max_new_tokens=4)
            assert len(calls) == 1
    finally:
        type(tokenizer).__call__ = original
    assert elapsed < 5.0
    # the bound is exact for what fits: a prompt just inside the context still works
    with stack.client() as client:
        assert len(client.generate("a " * (CONTEXT // 4), max_new_tokens=4).token_ids) == 4


def test_a_failed_pass_puts_back_every_jobs_cache_and_seeded_generator():
    """So the worker's retry of each job alone draws and scores exactly what an undisturbed pass would:
    one caller's failing request cannot change another's seeded sample."""
    from types import SimpleNamespace

    from serving.model_service import ModelServiceBase
    from speculation.sampling import seeded_generator

    class Cache:
        def __init__(self):
            self.length = 3

        def crop(self, length):
            self.length = length

    class Failing(ModelServiceBase):
        def __init__(self):  # no model: only run_batch's contract is under test
            pass

        def forward(self, payloads):
            for payload in payloads:
                payload.cache.length += 4
                torch.rand(5, generator=payload.generator)  # draws happened before the failure
            raise RuntimeError("the pass failed")

    jobs = [SimpleNamespace(cache=Cache(), generator=seeded_generator(7)), SimpleNamespace(cache=Cache(), generator=None)]
    expected = torch.rand(3, generator=seeded_generator(7))
    with pytest.raises(RuntimeError):
        Failing().run_batch(jobs)
    assert [job.cache.length for job in jobs] == [3, 3]
    assert torch.equal(torch.rand(3, generator=jobs[0].generator), expected)
