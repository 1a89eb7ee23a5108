"""The `specdec` console script: generate --json, serve (health, reflection, SIGTERM), pair checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from orchestrator.deployment import IncompatibleModels, connect
from local_stack.processes import wait_healthy
from transport import free_port
from tests.conftest import PROMPTS

ENV = {**os.environ, "GRPC_VERBOSITY": "ERROR"}


def specdec(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "specdec_cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def test_generate_json_prints_text_token_ids_and_stats(stacks, tokenizer):
    stack = stacks("noisy")
    done = specdec("generate", "--server", stack.address, "--max-new-tokens", "12", "--num-draft-tokens", "3",
                   "--json", PROMPTS[0])
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    with stack.client() as client:
        expected = client.generate(PROMPTS[0], max_new_tokens=12, num_draft_tokens=3)
    assert out["token_ids"] == expected.token_ids and out["text"] == expected.text
    assert out["stats"]["new_tokens"] == 12 and out["finish_reason"] == "length"
    for key in ("rounds", "drafted_tokens", "accepted_tokens", "acceptance_rate", "mean_accepted_len",
                "tokens_per_s", "draft_ms", "verify_ms", "other_ms"):
        assert key in out["stats"]


def test_generate_reports_bad_input_without_a_traceback(stacks):
    done = specdec("generate", "--server", stacks("noisy").address, "--max-new-tokens", "0", "x")
    assert done.returncode == 1 and "INVALID_ARGUMENT" in done.stderr and "Traceback" not in done.stderr


def test_serve_refuses_to_start_with_one_line_that_says_why(tiny, tmp_path):
    missing = specdec("serve", "draft", "--model", str(tmp_path / "no-such-model"), "--port", "0")
    assert missing.returncode == 2
    assert f"draft service refused to start: no model directory at {tmp_path / 'no-such-model'}" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad_runtime = specdec("serve", "verify", "--model", str(tiny.target), "--runtime", "fastest", "--port", "0")
    assert bad_runtime.returncode == 2
    assert "verify service refused to start: --runtime must be one of auto, hf, lean" in bad_runtime.stderr


def test_serve_exposes_health_and_reflection_and_stops_on_sigterm(tiny):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "specdec_cli", "serve", "verify", "--model", str(tiny.target),
                                "--port", str(port), "--host", "127.0.0.1"], env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(f"127.0.0.1:{port}", 60, process)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="specdec.v1.VerifyService"), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
            services = {s.name for r in replies for s in r.list_services_response.service}
        assert {"specdec.v1.VerifyService", "grpc.health.v1.Health"} <= services
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_orchestrator_refuses_a_draft_with_another_vocabulary(tiny):

    import draft_service.server as draft_server
    import verify_service.server as verify_server
    from serving.model_server import ModelServerSettings

    verify = verify_server.start(ModelServerSettings(str(tiny.target), host="localhost"))
    draft = draft_server.start(ModelServerSettings(str(tiny.other_vocab_draft), host="localhost"))
    try:
        with pytest.raises(IncompatibleModels, match="different tokenizer"):
            connect(f"localhost:{verify.port}", f"localhost:{draft.port}")
        done = specdec("serve", "orchestrator", "--port", str(free_port()), "--verify", f"localhost:{verify.port}",
                       "--draft", f"localhost:{draft.port}")
        assert done.returncode == 2 and "different tokenizer" in done.stderr and "Traceback" not in done.stderr
    finally:
        verify.stop(None)
        draft.stop(None)


def test_serve_reads_flags_from_environment_variables(tiny):
    port = free_port()
    env = {**ENV, "SPECDEC_MODEL": str(tiny.draft), "SPECDEC_PORT": str(port), "SPECDEC_HOST": "127.0.0.1"}
    process = subprocess.Popen([sys.executable, "-m", "specdec_cli", "serve", "draft"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"127.0.0.1:{port}", 60, process)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_serve_refuses_tls_flags_that_cannot_work_with_one_line(tiny, tmp_path):
    half = specdec("serve", "verify", "--model", str(tiny.target), "--port", "0", "--tls-cert", str(tmp_path / "c.pem"))
    assert half.returncode == 2 and "--tls-cert and --tls-key go together" in half.stderr
    assert "Traceback" not in half.stderr
    no_ca = specdec("serve", "draft", "--model", str(tiny.target), "--port", "0", "--tls-require-client-cert")
    assert no_ca.returncode == 2 and "--tls-require-client-cert needs --tls-ca" in no_ca.stderr
