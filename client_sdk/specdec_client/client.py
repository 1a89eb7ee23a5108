"""Sync and asyncio clients for Orchestrator.Generate: streaming and one-shot, with timeouts.

Security: `api_key` is sent as `authorization: Bearer <key>` on every call; `root_certificates` (the CA
that signed the orchestrator's certificate), `private_key` / `certificate_chain` (a client certificate,
for an orchestrator that requires one) and `server_name` (the name to check on the orchestrator's
certificate, when it is not the address's host) make the channel TLS. Each takes PEM bytes or a path.
`tls=True` with no certificate trusts the system's roots.
"""

from __future__ import annotations

import ipaddress
import os
import warnings
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc

from specdec_api import orchestrator_pb2, orchestrator_pb2_grpc
from specdec_client.errors import from_rpc_error
from specdec_client.results import Chunk, GenerationResult

_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]

Pem = bytes | str | os.PathLike | None


def _pem(value: Pem) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


def _channel_setup(api_key: str | None, root_certificates: Pem, private_key: Pem, certificate_chain: Pem,
                   server_name: str | None, tls: bool | None, target: str | None = None):
    """(channel credentials or None for plaintext, channel options, metadata for every call)."""
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("private_key and certificate_chain go together (a client certificate and its key)")
    if tls is None:
        tls = any(v is not None for v in (root_certificates, private_key, certificate_chain, server_name))
    credentials = None
    options = list(_OPTIONS)
    if tls:
        credentials = grpc.ssl_channel_credentials(_pem(root_certificates), _pem(private_key),
                                                   _pem(certificate_chain))
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
    if api_key and not tls and target is not None and not _loopback(target):
        warnings.warn(f"sending an API key to {target} over plaintext: anyone on the path can read it; pass "
                      "root_certificates= (or tls=True) to use TLS", stacklevel=3)
    return credentials, options, metadata


def _loopback(target: str) -> bool:
    """Whether a gRPC target names this machine (where plaintext keys stay on the host)."""
    host = target.split("///")[-1].removeprefix("ipv4:").removeprefix("ipv6:")
    host = host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    """Blocking client. `timeout` (seconds) bounds each whole call; None waits forever. The security
    arguments are described in the module docstring; `channel` replaces the channel they would make."""

    def __init__(self, target: str, timeout: float | None = 300.0, channel: grpc.Channel | None = None, *,
                 api_key: str | None = None, root_certificates: Pem = None, private_key: Pem = None,
                 certificate_chain: Pem = None, server_name: str | None = None, tls: bool | None = None):
        credentials, options, self._metadata = _channel_setup(api_key, root_certificates, private_key,
                                                              certificate_chain, server_name, tls, target)
        if channel is None:
            channel = (grpc.secure_channel(target, credentials, options=options) if credentials
                       else grpc.insecure_channel(target, options=options))
        self._channel = channel
        self._stub = orchestrator_pb2_grpc.OrchestratorStub(self._channel)
        self.timeout = timeout

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 128, *, timeout: float | None = None,
               **options) -> Iterator[Chunk]:
        call = self._stub.Generate(build_request(prompt, max_new_tokens, **options),
                                   timeout=timeout if timeout is not None else self.timeout,
                                   metadata=self._metadata)
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
                                      timeout=timeout if timeout is not None else self.timeout,
                                      metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """asyncio client; create it inside a running event loop. Security arguments as for Client."""

    def __init__(self, target: str, timeout: float | None = 300.0, *, api_key: str | None = None,
                 root_certificates: Pem = None, private_key: Pem = None, certificate_chain: Pem = None,
                 server_name: str | None = None, tls: bool | None = None):
        credentials, options, self._metadata = _channel_setup(api_key, root_certificates, private_key,
                                                              certificate_chain, server_name, tls, target)
        self._channel = (grpc.aio.secure_channel(target, credentials, options=options) if credentials
                         else grpc.aio.insecure_channel(target, options=options))
        self._stub = orchestrator_pb2_grpc.OrchestratorStub(self._channel)
        self.timeout = timeout

    async def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 128, *,
                     timeout: float | None = None, **options) -> AsyncIterator[Chunk]:
        call = self._stub.Generate(build_request(prompt, max_new_tokens, **options),
                                   timeout=timeout if timeout is not None else self.timeout,
                                   metadata=self._metadata)
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

    async def info(self, timeout: float | None = None) -> orchestrator_pb2.OrchestratorInfo:
        try:
            return await self._stub.GetInfo(orchestrator_pb2.GetInfoRequest(),
                                            timeout=timeout if timeout is not None else self.timeout,
                                            metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
