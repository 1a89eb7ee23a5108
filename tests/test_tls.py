"""mTLS between every role: what a caller without the right certificate gets, rotation without restart,
exact output over TLS, the plaintext health port, request size limits, and where metrics bind.

Certificates are made at run time by a throwaway CA (trustme); servers are real, on free localhost ports.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec_api import common_pb2, draft_pb2, orchestrator_pb2, verify_pb2, verify_pb2_grpc
from specdec_client import Client, ResourceExhausted
from local_stack.processes import wait_healthy
from transport import free_port
from tests.conftest import PROMPTS, start_stack
from transport import ManagedChannel, TLSSettings, dial
from transport.throwaway_ca import Identity, ThrowawayCA
from transport.tls import WatchedFiles, validate_pem

SERVICES = {
    "draft": draft_pb2.DESCRIPTOR.services_by_name["DraftService"],
    "verify": verify_pb2.DESCRIPTOR.services_by_name["VerifyService"],
    "orchestrator": orchestrator_pb2.DESCRIPTOR.services_by_name["Orchestrator"],
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca, other_ca = ThrowawayCA(), ThrowawayCA("another CA")
    return {"node": ca.issue(root, "node"), "client": ca.issue(root, "client"),
            "stranger": other_ca.issue(root, "stranger")}


@pytest.fixture(scope="module")
def mtls_stack(tiny, pki):
    """Draft, verify and orchestrator, every one serving mTLS; the orchestrator dials with its certificate."""
    tls = pki["node"].tls(require_client_cert=True)
    stack = start_stack(tiny.target, tiny.noisy_draft, verify_settings={"tls": tls, "health_port": 0},
                        draft_settings={"tls": tls}, tls=tls)
    yield stack
    stack.stop()


def _ports(stack) -> dict[str, int]:
    return {"draft": stack.draft.port, "verify": stack.verify.port, "orchestrator": stack.orchestrator.port}


def _call_every_method(channel: grpc.Channel, service) -> dict[str, grpc.StatusCode]:
    """Each RPC of `service` called once with an empty request: its status code (OK if it answered)."""
    codes = {}
    for method in service.methods:
        path = f"/{service.full_name}/{method.name}"
        kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
                (True, False): channel.stream_unary, (True, True): channel.stream_stream}[
            (method.client_streaming, method.server_streaming)]
        call = kind(path)
        request = iter([b""]) if method.client_streaming else b""
        try:
            reply = call(request, timeout=5)
            if method.server_streaming:
                list(reply)
            codes[method.name] = grpc.StatusCode.OK
        except grpc.RpcError as error:
            codes[method.name] = error.code()
    return codes


def _tls_channel(port: int, identity: Identity | None, ca: Identity) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        ca.ca.read_bytes(), identity.key.read_bytes() if identity else None,
        identity.cert.read_bytes() if identity else None)
    return grpc.secure_channel(f"localhost:{port}", credentials)


def _model_info(channel: grpc.Channel):
    return verify_pb2_grpc.VerifyServiceStub(channel).GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=5)


def test_with_mtls_an_insecure_client_cannot_call_any_rpc_of_any_role(mtls_stack):
    for role, port in _ports(mtls_stack).items():
        with grpc.insecure_channel(f"localhost:{port}") as channel:
            codes = _call_every_method(channel, SERVICES[role])
        assert len(codes) >= 2 and set(codes.values()) == {grpc.StatusCode.UNAVAILABLE}, (role, codes)


def test_a_caller_without_a_client_certificate_is_refused(mtls_stack, pki):
    for role, port in _ports(mtls_stack).items():
        with _tls_channel(port, None, pki["node"]) as channel:
            codes = _call_every_method(channel, SERVICES[role])
        assert set(codes.values()) == {grpc.StatusCode.UNAVAILABLE}, (role, codes)
    with _tls_channel(mtls_stack.verify.port, pki["client"], pki["node"]) as channel:  # the control
        assert _model_info(channel).vocab_size > 0


def test_a_client_certificate_from_another_ca_is_refused(mtls_stack, pki):
    for role, port in _ports(mtls_stack).items():
        with _tls_channel(port, pki["stranger"], pki["node"]) as channel:
            codes = _call_every_method(channel, SERVICES[role])
        assert set(codes.values()) == {grpc.StatusCode.UNAVAILABLE}, (role, codes)


def test_a_server_certificate_from_another_ca_is_refused_by_the_client(mtls_stack, pki):
    with _tls_channel(mtls_stack.verify.port, pki["client"], pki["stranger"]) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            _model_info(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_greedy_generation_over_mtls_equals_the_target_alone(mtls_stack, pki, target_model, tokenizer):
    with Client(mtls_stack.address, timeout=120, **pki["client"].client_kwargs()) as client:
        for prompt in PROMPTS[:6]:
            result = client.generate(prompt, max_new_tokens=20, num_draft_tokens=3)
            inputs = tokenizer(prompt, return_tensors="pt")
            with torch.inference_mode():
                expected = target_model.generate(**inputs, do_sample=False, max_new_tokens=20)
            assert result.token_ids == expected[0, inputs["input_ids"].shape[1]:].tolist(), prompt
            assert result.stats["drafted_tokens"] > 0


def test_the_plain_health_port_serves_health_alone_without_tls_and_shows_draining(mtls_stack):
    server = mtls_stack.verify
    assert server.health_port and server.health_port != server.port
    with grpc.insecure_channel(f"localhost:{server.health_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "specdec.v1.VerifyService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as other:
            _model_info(channel)
        assert other.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # The same HealthServicer as the TLS port: what draining sets shows here too.
        server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            server.health.set("", health_pb2.HealthCheckResponse.SERVING)


def _replace(identity: Identity, new: Identity) -> None:
    """Rotate as a secret volume would: new contents under the same paths."""
    for name in ("cert", "key", "ca"):
        tmp = getattr(identity, name).with_suffix(".new")
        shutil.copyfile(getattr(new, name), tmp)
        os.replace(tmp, getattr(identity, name))


def test_certificates_rotate_without_restart_on_every_role(tiny, tmp_path):
    """Every role's files are replaced by a new CA's: the servers hand the new certificate to new
    connections, the orchestrator's channels to draft and verify rebuild with its new client certificate,
    and a caller holding the old CA or an old-CA client certificate is refused."""
    old_ca, new_ca = ThrowawayCA("old"), ThrowawayCA("new")
    live = old_ca.issue(tmp_path / "live", "node")
    old_client = old_ca.issue(tmp_path / "old", "client")
    new_node, new_client = new_ca.issue(tmp_path / "new", "node"), new_ca.issue(tmp_path / "new", "client")
    tls = live.tls(require_client_cert=True, reload_interval_s=0.1)
    stack = start_stack(tiny.target, tiny.draft, verify_settings={"tls": tls}, draft_settings={"tls": tls}, tls=tls)
    try:
        with Client(stack.address, timeout=60, **old_client.client_kwargs()) as client:
            before = client.generate(PROMPTS[2], max_new_tokens=12, num_draft_tokens=3)
        _replace(live, new_node)
        time.sleep(0.3)  # past the orchestrator's reload interval
        with Client(stack.address, timeout=60, **new_client.client_kwargs()) as client:
            after = client.generate(PROMPTS[2], max_new_tokens=12, num_draft_tokens=3)
        assert after.token_ids == before.token_ids and after.stats["drafted_tokens"] > 0
        channels = stack.orchestrator.servicer.deployment.channels
        assert all(isinstance(c, ManagedChannel) and c.rebuilds == 1 for c in channels)
        method = f"/{SERVICES['verify'].full_name}/GetModelInfo"
        for port in (stack.verify.port, stack.draft.port, stack.orchestrator.port):
            # A caller that still trusts only the old CA no longer accepts the server's certificate ...
            with _tls_channel(port, new_client, old_client) as channel, pytest.raises(grpc.RpcError) as stale:
                channel.unary_unary(method)(b"", timeout=5)
            assert stale.value.code() == grpc.StatusCode.UNAVAILABLE
            # ... and a client certificate of the old CA is no longer accepted by the server.
            with _tls_channel(port, old_client, new_node) as channel, pytest.raises(grpc.RpcError) as stale:
                channel.unary_unary(method)(b"", timeout=5)
            assert stale.value.code() == grpc.StatusCode.UNAVAILABLE
        with _tls_channel(stack.verify.port, new_client, new_node) as channel:
            assert _model_info(channel).vocab_size > 0
    finally:
        stack.stop()


def test_a_half_rotated_pair_is_not_taken(tmp_path):
    ca = ThrowawayCA()
    live, other = ca.issue(tmp_path, "live"), ca.issue(tmp_path, "other")
    files = WatchedFiles({"cert": str(live.cert), "key": str(live.key), "ca": str(live.ca)}, validate_pem)
    assert files.poll() is None
    shutil.copyfile(other.cert, live.cert)  # the certificate replaced, not yet its key
    assert files.poll() is None and files.contents["cert"] != live.cert.read_bytes()
    shutil.copyfile(other.key, live.key)
    assert files.poll() is not None and files.contents["key"] == other.key.read_bytes()


def test_the_managed_channel_rebuilds_only_when_its_files_change_and_retires_the_old_one(tmp_path):
    ca = ThrowawayCA()
    live, new = ca.issue(tmp_path, "live"), ca.issue(tmp_path, "new")
    channel = dial("localhost:1", live.tls(require_client_cert=False, reload_interval_s=0.0))
    assert isinstance(channel, ManagedChannel)
    channel.retire_after_s = 0.0
    first = channel.current()[1]
    assert channel.current()[1] is first and channel.rebuilds == 0
    _replace(live, new)
    second = channel.current()[1]
    assert second is not first and channel.rebuilds == 1
    channel.current()
    assert channel._retired == []  # the old channel closed once its grace passed
    channel.close()
    assert isinstance(dial("localhost:1"), grpc.Channel) and not isinstance(dial("localhost:1"), ManagedChannel)


def test_tls_flags_that_cannot_work_are_refused_with_the_reason(tmp_path):
    problems = TLSSettings(cert="c.pem", require_client_cert=True).problems()
    assert any("--tls-cert and --tls-key go together" in p for p in problems)
    assert any("--tls-require-client-cert needs --tls-ca" in p for p in problems)
    assert any("no file at c.pem" in p for p in problems)
    assert TLSSettings().problems() == []


def test_a_request_over_the_size_limit_is_refused_before_it_is_parsed(stacks):
    stack = stacks("noisy")
    prompt = "x" * int(16.7e6)
    with stack.client() as client, pytest.raises(ResourceExhausted) as refused:
        client.generate(prompt, max_new_tokens=2)
    assert "larger than max" in refused.value.details  # gRPC's own check, before the handler runs
    with grpc.insecure_channel(f"localhost:{stack.verify.port}") as channel:
        request = verify_pb2.VerifyRequest(session_id="big", append_tokens=[5] * (5 << 20))  # 5 MiB
        with pytest.raises(grpc.RpcError) as too_big:
            verify_pb2_grpc.VerifyServiceStub(channel).Verify(request, timeout=10)
    assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with stack.client() as client:  # an ordinary request still passes
        assert client.generate(PROMPTS[0], max_new_tokens=4).token_ids


def _listening_address(port: int) -> str | None:
    """The local address a TCP socket listening on `port` is bound to, from /proc/net/tcp{,6}."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:
                    return address
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/net/tcp")
def test_serve_with_tls_binds_metrics_to_host_and_answers_probes_on_the_health_port(tiny, pki):
    port, health_port, metrics_port = free_port(), free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "specdec_cli", "serve", "verify", "--model", str(tiny.target), "--port", str(port),
         "--host", "127.0.0.1", "--metrics-port", str(metrics_port), "--health-port", str(health_port),
         *pki["node"].cli_args(), "--tls-require-client-cert"],
        env={**os.environ, "GRPC_VERBOSITY": "ERROR"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(f"127.0.0.1:{health_port}", 60, process)  # plaintext probe while the main port is mTLS
        assert _listening_address(metrics_port) == "0100007F"  # 127.0.0.1, not 0.0.0.0
        with _tls_channel(port, pki["client"], pki["node"]) as channel:
            assert _model_info(channel).vocab_size > 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_metrics_bind_the_serve_host():
    from telemetry.metrics import build_metrics, metrics_host

    assert metrics_host("[::]") == metrics_host("0.0.0.0") == "0.0.0.0"
    assert metrics_host("127.0.0.1") == "127.0.0.1" and metrics_host("[::1]") == "::1"
    setup = build_metrics("test", 0, metrics_host("127.0.0.1"))
    try:
        assert setup._http_server.server_address[0] == "127.0.0.1"
    finally:
        setup.shutdown()
