"""API keys on every role: refused without a valid key (UNAUTHENTICATED, before the request is parsed),
health and reflection open, keys rotated through the key file, the orchestrator's own key to its services,
and the CLI's --api-key with TLS flags."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from specdec_api import common_pb2, draft_pb2, verify_pb2, verify_pb2_grpc
from specdec_client import AsyncClient, Client, Unauthenticated
from tests.conftest import PROMPTS, start_stack
from transport.api_keys import ApiKeys, parse_keys, presented_key
from transport.throwaway_ca import ThrowawayCA

KEY, SERVICE_KEY = "client-key-0123456789abcdef", "service-key-fedcba9876543210"


@pytest.fixture(scope="module")
def keyed(tiny, tmp_path_factory):
    """A stack with keys on every role (the orchestrator sends its own to draft and verify) and mTLS."""
    root = tmp_path_factory.mktemp("keys")
    public, services, orchestrator_key = root / "public.keys", root / "services.keys", root / "orchestrator.key"
    public.write_text(f"# public API keys\n\n{KEY}\nsecond-key-for-rotation\n")
    services.write_text(f"{SERVICE_KEY}\n")
    orchestrator_key.write_text(f"# the key this orchestrator presents\n{SERVICE_KEY}\n")
    ca = ThrowawayCA()
    node, client = ca.issue(root, "node"), ca.issue(root, "client")
    tls = node.tls(require_client_cert=True)
    service = {"api_key_file": str(services), "tls": tls}
    stack = start_stack(tiny.target, tiny.noisy_draft, verify_settings={**service, "health_port": 0},
                        draft_settings=service, api_key_file=str(public),
                        service_api_key_file=str(orchestrator_key), tls=tls)
    yield stack, client, public
    stack.stop()


def _secure(port: int, client) -> grpc.Channel:
    return grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(
        client.ca.read_bytes(), client.key.read_bytes(), client.cert.read_bytes()))


def test_the_public_api_refuses_a_missing_or_wrong_key_and_serves_a_right_one(keyed):
    stack, client_tls, _ = keyed
    tls = client_tls.client_kwargs()
    with Client(stack.address, timeout=60, **tls) as client, pytest.raises(Unauthenticated) as missing:
        client.generate(PROMPTS[0], max_new_tokens=4)
    assert "requires an API key" in missing.value.details and "authorization: Bearer" in missing.value.details
    with Client(stack.address, timeout=60, api_key="not-the-key", **tls) as client:
        with pytest.raises(Unauthenticated) as wrong:
            client.generate(PROMPTS[0], max_new_tokens=4)
        with pytest.raises(Unauthenticated):
            client.info()
    assert "not accepted" in wrong.value.details
    with Client(stack.address, timeout=60, api_key=KEY, **tls) as client:
        result = client.generate(PROMPTS[0], max_new_tokens=8, num_draft_tokens=3)
    assert len(result.token_ids) == 8 and result.stats["drafted_tokens"] > 0  # draft and verify took the service key


def test_the_async_client_sends_its_key_and_raises_unauthenticated_without_it(keyed):
    stack, client_tls, _ = keyed

    async def run():
        async with AsyncClient(stack.address, timeout=60, api_key=KEY, **client_tls.client_kwargs()) as client:
            ok = await client.generate(PROMPTS[1], max_new_tokens=4)
        async with AsyncClient(stack.address, timeout=60, **client_tls.client_kwargs()) as client:
            with pytest.raises(Unauthenticated):
                await client.generate(PROMPTS[1], max_new_tokens=4)
        return ok

    assert len(asyncio.run(run()).token_ids) == 4


@pytest.mark.parametrize("role", ["draft", "verify"])
def test_a_keyed_service_refuses_every_rpc_without_its_key(keyed, role):
    stack, client_tls, _ = keyed
    server, service = ((stack.draft, draft_pb2.DESCRIPTOR.services_by_name["DraftService"]) if role == "draft" else
                       (stack.verify, verify_pb2.DESCRIPTOR.services_by_name["VerifyService"]))
    with _secure(server.port, client_tls) as channel:
        for method in service.methods:
            for metadata in ((), (("authorization", f"Bearer {KEY}"),), (("authorization", SERVICE_KEY),)):
                # no key; the public API's key; the right key without "Bearer"
                call = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
                        (True, False): channel.stream_unary, (True, True): channel.stream_stream}[
                    (method.client_streaming, method.server_streaming)]
                request = iter([b"\xff\xff"]) if method.client_streaming else b"\xff\xff"  # not even valid protobuf
                with pytest.raises(grpc.RpcError) as refused:
                    reply = call(f"/{service.full_name}/{method.name}")(request, timeout=5, metadata=metadata)
                    if method.server_streaming:
                        list(reply)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, (method.name, metadata)
        info = verify_pb2_grpc.VerifyServiceStub(channel) if role == "verify" else None
        if info is not None:
            reply = info.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=5,
                                      metadata=(("authorization", f"Bearer {SERVICE_KEY}"),))
            assert reply.vocab_size > 0


def test_health_and_reflection_need_no_key_and_the_plain_health_port_answers(keyed):
    stack, client_tls, _ = keyed
    with _secure(stack.orchestrator.port, client_tls) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        assert "specdec.v1.Orchestrator" in {s.name for r in replies for s in r.list_services_response.service}
    with grpc.insecure_channel(f"localhost:{stack.verify.health_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_an_orchestrator_without_the_service_key_refuses_to_start_and_says_why(tiny, tmp_path):
    import orchestrator.server as orchestrator_server
    import verify_service.server as verify_server
    from serving.model_server import ModelServerSettings

    keys = tmp_path / "keys"
    keys.write_text(SERVICE_KEY + "\n")
    verify = verify_server.start(ModelServerSettings(str(tiny.target), host="localhost", api_key_file=str(keys)))
    try:
        with pytest.raises(ConnectionError) as refused:
            orchestrator_server.start(orchestrator_server.OrchestratorSettings(
                verify=f"localhost:{verify.port}", host="localhost", ready_timeout_s=10))
        assert "UNAUTHENTICATED" in str(refused.value) and "--service-api-key-file" in str(refused.value)
    finally:
        verify.stop(grace=None)


def test_the_key_file_is_reread_when_it_changes(keyed):
    stack, client_tls, public = keyed
    tls = client_tls.client_kwargs()
    original = public.read_text()
    try:
        with Client(stack.address, timeout=60, api_key="second-key-for-rotation", **tls) as client:
            assert client.generate(PROMPTS[3], max_new_tokens=2).token_ids
        public.write_text("rotated-key\n")
        time.sleep(1.2)  # the file is checked at most once a second
        with Client(stack.address, timeout=60, api_key="second-key-for-rotation", **tls) as client:
            with pytest.raises(Unauthenticated):
                client.generate(PROMPTS[3], max_new_tokens=2)
        with Client(stack.address, timeout=60, api_key="rotated-key", **tls) as client:
            assert client.generate(PROMPTS[3], max_new_tokens=2).token_ids
    finally:
        public.write_text(original)
        time.sleep(1.2)


def test_keys_are_parsed_kept_hashed_and_compared_exactly(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# comment\n\n  alpha  \nbeta\n#gamma\n")
    assert parse_keys(path.read_text()) == ["alpha", "beta"]
    keys = ApiKeys(str(path), reload_interval_s=0.0)
    assert keys.accepts("alpha") and keys.accepts("beta")
    assert not keys.accepts("gamma") and not keys.accepts("alph") and not keys.accepts("alpha ")
    assert all(isinstance(d, bytes) and len(d) == 32 for d in keys._digests)
    assert "alpha" not in repr(vars(keys))
    assert presented_key((("authorization", "Bearer alpha"),)) == "alpha"
    assert presented_key((("authorization", "bearer  alpha"),)) == "alpha"
    assert presented_key((("authorization", "Basic alpha"),)) is None and presented_key(()) is None
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no key"):
        ApiKeys(str(empty))


def test_cli_generate_with_api_key_and_tls_flags(keyed):
    stack, client_tls, _ = keyed
    tls_flags = ["--tls-ca", str(client_tls.ca), "--tls-cert", str(client_tls.cert), "--tls-key", str(client_tls.key)]
    env = {**os.environ, "GRPC_VERBOSITY": "ERROR"}
    env.pop("SPECDEC_API_KEY", None)

    def generate(*args, extra_env=None):
        return subprocess.run([sys.executable, "-m", "specdec_cli", "generate", "--server", stack.address,
                               "--max-new-tokens", "6", "--num-draft-tokens", "3", *args, PROMPTS[4]],
                              capture_output=True, text=True, timeout=120, env={**env, **(extra_env or {})})

    done = generate("--api-key", KEY, *tls_flags, "--json")
    assert done.returncode == 0, done.stderr
    with Client(stack.address, timeout=60, api_key=KEY, **client_tls.client_kwargs()) as client:
        expected = client.generate(PROMPTS[4], max_new_tokens=6, num_draft_tokens=3)
    assert json.loads(done.stdout)["token_ids"] == expected.token_ids
    from_env = generate(*tls_flags, "--json", extra_env={"SPECDEC_API_KEY": KEY})
    assert from_env.returncode == 0 and json.loads(from_env.stdout)["token_ids"] == expected.token_ids
    no_key = generate(*tls_flags)
    assert no_key.returncode == 1 and "UNAUTHENTICATED" in no_key.stderr and "Traceback" not in no_key.stderr
    no_tls = generate("--api-key", KEY, "--timeout", "5")
    assert no_tls.returncode == 1 and "Traceback" not in no_tls.stderr
