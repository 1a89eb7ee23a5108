"""The SDK: no torch or transformers on import, asyncio and sync agree, typed errors, timeouts."""

import asyncio
import subprocess
import sys

import pytest

from specdec_client import AsyncClient, Client, DeadlineExceeded, InvalidArgument, Unavailable
from tests.conftest import PROMPTS


def test_sdk_imports_without_torch_or_transformers():
    code = ("import sys, specdec_client; from specdec_client import Client, AsyncClient; "
            "heavy = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_async_client_streams_the_same_tokens_as_the_sync_client(stacks):
    stack = stacks("noisy")
    with stack.client() as client:
        expected = client.generate(PROMPTS[1], max_new_tokens=20, num_draft_tokens=3)

    async def run():
        async with AsyncClient(stack.address) as client:
            chunks = [c async for c in client.stream(PROMPTS[1], max_new_tokens=20, num_draft_tokens=3)]
            whole = await client.generate(PROMPTS[1], max_new_tokens=20, num_draft_tokens=3)
            with pytest.raises(InvalidArgument):
                await client.generate(PROMPTS[1], max_new_tokens=0)
            return chunks, whole

    chunks, whole = asyncio.run(run())
    assert [t for c in chunks for t in c.token_ids] == expected.token_ids == whole.token_ids
    assert whole.text == expected.text and whole.finish_reason == "length"


def test_unreachable_server_raises_unavailable_within_the_timeout():
    with Client("localhost:1", timeout=2.0) as client:
        with pytest.raises((Unavailable, DeadlineExceeded)):
            client.generate("x", max_new_tokens=2)


def test_a_timeout_too_short_for_the_generation_is_deadline_exceeded(stacks):
    with stacks("noisy").client() as client:
        with pytest.raises(DeadlineExceeded):
            client.generate(PROMPTS[0], max_new_tokens=200, timeout=0.001)


def test_info_describes_the_deployment(stacks, tiny):
    with stacks("different").client() as client:
        info = client.info()
    assert info.target_model == str(tiny.target) and info.draft_model == str(tiny.draft)
    assert info.vocab_size > 0 and info.max_context == 256 and info.default_num_draft_tokens == 4

    async def async_info():
        async with AsyncClient(stacks("different").address) as client:
            return await client.info()

    assert asyncio.run(async_info()) == info
    with pytest.raises(Unavailable):
        asyncio.run(_async_info_of_nothing())


async def _async_info_of_nothing():
    async with AsyncClient("127.0.0.1:1", timeout=1.0) as client:
        return await client.info()


def test_unauthenticated_and_cancelled_are_typed_and_exported():
    import grpc

    import specdec_client
    from specdec_client.errors import from_rpc_error

    class Refused(grpc.RpcError):
        def __init__(self, code):
            self._code = code

        def code(self):
            return self._code

        def details(self):
            return "no key"

    assert {"Unauthenticated", "Cancelled"} <= set(specdec_client.__all__)
    assert isinstance(from_rpc_error(Refused(grpc.StatusCode.UNAUTHENTICATED)), specdec_client.Unauthenticated)
    assert isinstance(from_rpc_error(Refused(grpc.StatusCode.CANCELLED)), specdec_client.Cancelled)


def test_a_client_key_without_its_certificate_is_refused_at_once():
    with pytest.raises(ValueError, match="go together"):
        Client("localhost:1", private_key=b"-----BEGIN PRIVATE KEY-----")


def test_an_api_key_over_plaintext_to_another_host_is_warned_about():
    import warnings

    from specdec_client import Client

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Client("specdec.example:50051", api_key="sk-1")
        Client("localhost:50051", api_key="sk-1")  # stays on this machine
        Client("[::1]:50051", api_key="sk-1")
        Client("specdec.example:50051", api_key="sk-1", tls=True)
        Client("specdec.example:50051")  # no key, nothing to leak
    assert [str(w.message) for w in caught] == [
        "sending an API key to specdec.example:50051 over plaintext: anyone on the path can read it; pass "
        "root_certificates= (or tls=True) to use TLS"]


def test_a_chunks_round_timing_holds_every_field_as_protobuf_json_would_with_int64_as_int():
    from google.protobuf.json_format import MessageToDict

    from specdec_api import orchestrator_pb2
    from specdec_client.results import Chunk

    message = orchestrator_pb2.GenerateChunk(text="x")
    message.round.num_draft_tokens, message.round.round_ms, message.round.bytes = 4, 12.5, 1 << 40
    expected = MessageToDict(message.round, preserving_proto_field_name=True,
                             always_print_fields_with_no_presence=True)
    expected["bytes"] = int(expected["bytes"])  # JSON's int64 is a string
    assert Chunk.from_message(message).round == expected
    assert Chunk.from_message(orchestrator_pb2.GenerateChunk(text="x")).round is None
