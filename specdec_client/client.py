"""Sync and asyncio clients for Orchestrator.Generate: streaming and one-shot, with timeouts."""

from __future__ import annotations

from typing import AsyncIterator, Iterator, Sequence

import grpc

from specdec_api import orchestrator_pb2, orchestrator_pb2_grpc
from specdec_client.errors import from_rpc_error
from specdec_client.results import Chunk, GenerationResult

_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]


def build_request(prompt: str | Sequence[int], max_new_tokens: int, temperature: float | None = None,
                  top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                  num_draft_tokens: int | None = None, stop: Sequence[str] = (),
                  request_id: str = "") -> orchestrator_pb2.GenerateRequest:
    request = orchestrator_pb2.GenerateRequest(max_new_tokens=max_new_tokens, stop=list(stop),
                                               request_id=request_id)
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(int(t) for t in prompt)
    for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("seed", seed),
                        ("num_draft_tokens", num_draft_tokens)):
        if value is not None:
            setattr(request, name, value)
    return request


class Client:
    """Blocking client. `timeout` (seconds) bounds each whole call; None waits forever."""

    def __init__(self, target: str, timeout: float | None = 300.0, channel: grpc.Channel | None = None):
        self._channel = channel or grpc.insecure_channel(target, options=_OPTIONS)
        self._stub = orchestrator_pb2_grpc.OrchestratorStub(self._channel)
        self.timeout = timeout

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 128, *, timeout: float | None = None,
               **options) -> Iterator[Chunk]:
        call = self._stub.Generate(build_request(prompt, max_new_tokens, **options),
                                   timeout=timeout if timeout is not None else self.timeout)
        try:
            for message in call:
                yield Chunk.from_message(message)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()  # no-op once finished; frees the server's sessions if the caller stopped early

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 128, **options) -> GenerationResult:
        result = GenerationResult()
        for chunk in self.stream(prompt, max_new_tokens, **options):
            result.add(chunk)
        return result

    def info(self, timeout: float | None = None) -> orchestrator_pb2.OrchestratorInfo:
        try:
            return self._stub.GetInfo(orchestrator_pb2.GetInfoRequest(),
                                      timeout=timeout if timeout is not None else self.timeout)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """asyncio client; create it inside a running event loop."""

    def __init__(self, target: str, timeout: float | None = 300.0):
        self._channel = grpc.aio.insecure_channel(target, options=_OPTIONS)
        self._stub = orchestrator_pb2_grpc.OrchestratorStub(self._channel)
        self.timeout = timeout

    async def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 128, *,
                     timeout: float | None = None, **options) -> AsyncIterator[Chunk]:
        call = self._stub.Generate(build_request(prompt, max_new_tokens, **options),
                                   timeout=timeout if timeout is not None else self.timeout)
        try:
            async for message in call:
                yield Chunk.from_message(message)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    async def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 128, **options) -> GenerationResult:
        result = GenerationResult()
        async for chunk in self.stream(prompt, max_new_tokens, **options):
            result.add(chunk)
        return result

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
