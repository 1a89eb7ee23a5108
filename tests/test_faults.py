"""A service that loses a session (eviction, restart) or a draft outage never changes the tokens."""

from __future__ import annotations

import threading

import grpc

import verify_service.server as verify_server
from service_common.server import start_server
from serving.model_loading import load_model
from serving.model_server import ModelServerSettings, start_model_server
from serving.runtimes.hf import ModelRunner
from serving.sessions import SessionStore
from specdec_api import verify_pb2_grpc
from tests.conftest import PROMPTS, Stack, start_stack
from verify_service.servicer import VerifyServicer

PROMPT = PROMPTS[4]


def _solo(stacks, **kw):
    with stacks("noisy").client() as client:
        return client.generate(PROMPT, max_new_tokens=30, num_draft_tokens=2, **kw)


class DroppingVerify(VerifyServicer):
    """Drops every session after its 2nd and 4th call: an eviction between two rounds."""
    calls = 0

    def Verify(self, request, context):
        reply = super().Verify(request, context)
        DroppingVerify.calls += 1
        if DroppingVerify.calls in (2, 4):
            self.store.drop_all()
        return reply


def test_evicted_sessions_are_reprefilled_and_tokens_unchanged(tiny, stacks):
    expected = _solo(stacks)
    sampled_expected = _solo(stacks, temperature=1.0, seed=5)
    verify = start_model_server(ModelServerSettings(str(tiny.target), host="localhost"), DroppingVerify,
                                verify_pb2_grpc.add_VerifyServiceServicer_to_server, verify_server.SERVICE_NAME)
    import draft_service.server as draft_server
    import orchestrator.server as orchestrator_server

    draft = draft_server.start(ModelServerSettings(str(tiny.noisy_draft), host="localhost", max_sessions=1, runtime="auto"))
    orch = orchestrator_server.start(orchestrator_server.OrchestratorSettings(
        verify=f"localhost:{verify.port}", draft=f"localhost:{draft.port}", host="localhost"))
    stack = Stack(verify, draft, orch)
    try:
        with stack.client() as client:
            result = client.generate(PROMPT, max_new_tokens=30, num_draft_tokens=2)
            DroppingVerify.calls = 0
            sampled = client.generate(PROMPT, max_new_tokens=30, num_draft_tokens=2, temperature=1.0, seed=5)
        assert result.token_ids == expected.token_ids
        assert result.stats["reprefills"] >= 2
        assert sampled.token_ids == sampled_expected.token_ids and sampled.stats["reprefills"] >= 2
    finally:
        stack.stop()


def test_verify_restart_between_rounds_completes_with_the_same_tokens(tiny, stacks):
    expected = _solo(stacks)
    loaded = load_model(str(tiny.target))
    servers = {}
    restarted = threading.Event()

    class RestartingVerify(VerifyServicer):
        calls = 0

        def Verify(self, request, context):
            reply = super().Verify(request, context)
            RestartingVerify.calls += 1
            if RestartingVerify.calls == 3 and not restarted.is_set():
                threading.Thread(target=restart).start()
            return reply

    def serve(port):
        runner = ModelRunner(loaded.model, loaded.device)
        servicer = RestartingVerify(loaded, runner, SessionStore(runner.new_cache))
        return start_server([(verify_pb2_grpc.add_VerifyServiceServicer_to_server, servicer)],
                            [verify_server.SERVICE_NAME], port, "localhost")

    def restart():
        old = servers["verify"]
        old.stop(grace=0.5)
        servers["verify"] = serve(old.port)  # a fresh process would hold no sessions either
        restarted.set()

    servers["verify"] = serve(0)
    import draft_service.server as draft_server
    import orchestrator.server as orchestrator_server

    draft = draft_server.start(ModelServerSettings(str(tiny.noisy_draft), host="localhost", runtime="auto"))
    orch = orchestrator_server.start(orchestrator_server.OrchestratorSettings(
        verify=f"localhost:{servers['verify'].port}", draft=f"localhost:{draft.port}", host="localhost"))
    try:
        with Stack(servers["verify"], draft, orch).client() as client:
            result = client.generate(PROMPT, max_new_tokens=30, num_draft_tokens=2)
        assert restarted.is_set()
        assert result.token_ids == expected.token_ids
        assert result.stats["reprefills"] >= 1
    finally:
        orch.stop(None)
        draft.stop(None)
        servers["verify"].stop(None)


def test_draft_outage_falls_back_to_target_only_with_the_same_tokens(tiny, stacks):
    expected = _solo(stacks)
    stack = start_stack(tiny.target, tiny.noisy_draft)
    try:
        stack.draft.stop(grace=None)  # the draft is gone before the first round
        with stack.client() as client:
            result = client.generate(PROMPT, max_new_tokens=30, num_draft_tokens=2)
        assert result.token_ids == expected.token_ids
        assert result.stats["target_only_rounds"] >= 1
    finally:
        stack.stop()


def test_overlapped_drafting_keeps_outputs_exact_and_saves_draft_calls(tiny, stacks, target_model, tokenizer):
    """`self` draft: every draft is accepted and its bonus guess always right, so rounds chain."""
    on = start_stack(tiny.target, tiny.target, overlap=True)
    off = start_stack(tiny.target, tiny.noisy_draft, overlap=False)
    noisy_on = start_stack(tiny.target, tiny.noisy_draft, overlap=True)
    try:
        with on.client() as a, off.client() as b, noisy_on.client() as c:
            for prompt in PROMPTS[:6]:
                chained = a.generate(prompt, max_new_tokens=30, num_draft_tokens=3)
                plain = b.generate(prompt, max_new_tokens=30, num_draft_tokens=3)
                mixed = c.generate(prompt, max_new_tokens=30, num_draft_tokens=3)
                assert chained.token_ids == plain.token_ids == mixed.token_ids
                assert chained.stats["overlapped_rounds"] >= chained.stats["rounds"] - 2
                assert plain.stats["overlapped_rounds"] == 0
            sampled = [c.generate(PROMPTS[1], max_new_tokens=30, num_draft_tokens=3, temperature=1.0, seed=9)
                       for _ in range(2)]
            assert sampled[0].token_ids == sampled[1].token_ids
            assert on.draft.servicer.store.stats().live_sessions == 0
    finally:
        on.stop()
        off.stop()
        noisy_on.stop()


def test_a_draft_with_a_shorter_context_hands_over_to_the_target_with_the_same_tokens(tiny, stacks, tmp_path):
    """The draft refuses (OUT_OF_RANGE) once the session outgrows its 24 positions: the rest of the
    generation runs target-only, and the tokens are the target's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    short = AutoModelForCausalLM.from_pretrained(tiny.noisy_draft)
    short.config.max_position_embeddings = 24
    short.save_pretrained(tmp_path / "short_draft")
    AutoTokenizer.from_pretrained(tiny.noisy_draft).save_pretrained(tmp_path / "short_draft")
    expected = _solo(stacks)
    stack = start_stack(tiny.target, tmp_path / "short_draft")
    try:
        with stack.client() as client:
            result = client.generate(PROMPT, max_new_tokens=30, num_draft_tokens=2)
    finally:
        stack.stop()
    assert result.token_ids == expected.token_ids
    assert result.stats["drafted_tokens"] > 0 and result.stats["target_only_rounds"] >= 1


class FullVerify(VerifyServicer):
    """Session memory that is always full, as a verify replica under more sessions than its budget."""

    def Verify(self, request, context):
        from service_common.errors import ResourceExhausted

        raise ResourceExhausted("session memory is full (test): retry later or raise --session-memory-mb")


def test_the_verify_services_status_reaches_the_client_with_its_code_and_message(tiny):
    import pytest

    import orchestrator.server as orchestrator_server
    from specdec_client.errors import SpecDecError

    verify = start_model_server(ModelServerSettings(str(tiny.target), host="localhost"), FullVerify,
                                verify_pb2_grpc.add_VerifyServiceServicer_to_server, verify_server.SERVICE_NAME)
    orch = orchestrator_server.start(orchestrator_server.OrchestratorSettings(verify=f"localhost:{verify.port}",
                                                                              host="localhost"))
    try:
        with Stack(verify, None, orch).client() as client, pytest.raises(SpecDecError) as raised:
            client.generate(PROMPT, max_new_tokens=8)
    finally:
        orch.stop(None)
        verify.stop(None)
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED  # not UNKNOWN
    assert "verify service: session memory is full (test)" in str(raised.value)


def test_at_temperature_one_a_matching_draft_guesses_the_bonus_so_rounds_chain(tiny):
    """The draft's guess for the bonus and the target's bonus share their Gumbel noise (coupled_sample):
    with the target as its own draft every guess is right, so nearly every round reuses the drafts made
    during the previous verify, as under greedy decoding. Drawn independently, few would."""
    stack = start_stack(tiny.target, tiny.target, overlap=True)
    try:
        with stack.client() as client:
            results = [client.generate(prompt, max_new_tokens=30, num_draft_tokens=3, temperature=1.0, seed=seed)
                       for seed, prompt in enumerate(PROMPTS[:4])]
    finally:
        stack.stop()
    for result in results:
        assert result.stats["accepted_tokens"] == result.stats["drafted_tokens"] > 0
        assert result.stats["overlapped_rounds"] >= result.stats["rounds"] - 2, result.stats


class BusyVerify(VerifyServicer):
    """Refuses the first calls as a verify at its per-caller limit would (RESOURCE_EXHAUSTED), then serves."""

    refusals = 3

    def Verify(self, request, context):
        from service_common.errors import ResourceExhausted

        if BusyVerify.refusals > 0:
            BusyVerify.refusals -= 1
            raise ResourceExhausted("this caller already has 128 calls in flight (test)")
        return super().Verify(request, context)


def test_a_verify_refusing_for_load_for_a_moment_delays_the_generation_and_does_not_fail_it(tiny):
    import orchestrator.server as orchestrator_server

    reference = start_stack(tiny.target, None)
    verify = start_model_server(ModelServerSettings(str(tiny.target), host="localhost"), BusyVerify,
                                verify_pb2_grpc.add_VerifyServiceServicer_to_server, verify_server.SERVICE_NAME)
    orch = orchestrator_server.start(orchestrator_server.OrchestratorSettings(verify=f"localhost:{verify.port}",
                                                                              host="localhost"))
    try:
        with reference.client() as client:
            expected = client.generate(PROMPT, max_new_tokens=12)
        with Stack(verify, None, orch).client() as client:
            result = client.generate(PROMPT, max_new_tokens=12)
    finally:
        orch.stop(None)
        verify.stop(None)
        reference.stop()
    assert BusyVerify.refusals == 0 and result.token_ids == expected.token_ids
