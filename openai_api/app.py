"""The FastAPI app: /v1/models, /v1/completions, /v1/chat/completions, /health; the API-key check; Server-Sent
Events; and cancellation: a client that goes away, mid-stream or while waiting for a whole completion,
cancels its Generate call, so the orchestrator releases the services' sessions.

One AsyncClient per process, made when the app starts, carries every request to the orchestrator.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from openai_api.chat_template import ChatTemplate, ChatTemplateError
from openai_api.errors import ApiError, bad_request, from_sdk
from openai_api.protocol import (
    FINISH_REASONS,
    ChatCompletionRequest,
    CompletionRequest,
    Envelope,
    check_supported,
    choice,
    completion_prompt,
    message_dicts,
    requested_max_tokens,
    sampling_options,
    spec_decode_stats,
    usage,
)
from openai_api.tokenizer_files import TokenizerFiles
from specdec_client import AsyncClient, Chunk, SpecDecError
from service_common.server import DEFAULT_MAX_REQUEST_MB
from transport.api_keys import ApiKeys, presented_key

log = logging.getLogger(__name__)

OPEN_PATHS = ("/health", "/healthz")  # probes carry no key
DEFAULT_MAX_REQUEST_BYTES = int(DEFAULT_MAX_REQUEST_MB * (1 << 20))  # the gRPC API's default, in bytes
CLIENT_GONE = 499  # nginx's "client closed request": only logs see it


@dataclass
class Served:
    """What this front serves, read once at startup."""

    model_name: str
    max_context: int
    orchestrator: str  # its address, for messages
    tokenizer: TokenizerFiles
    template: ChatTemplate | None
    no_template_reason: str | None  # the chat endpoint's 400 when template is None
    created: int


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


class RequireApiKey:
    """ASGI middleware: every path but the probes needs `Authorization: Bearer <key>` with a key from the key
    file; checked before the body is read (transport/api_keys.py holds the keys as digests, compares them in
    constant time and follows the file)."""

    def __init__(self, app, keys: ApiKeys):
        self.app = app
        self.keys = keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        key = presented_key((name.decode("latin-1"), value.decode("latin-1")) for name, value in scope["headers"])
        if sum(name == b"authorization" for name, _ in scope["headers"]) > 1:
            key = ""  # two keys: which one counts would be a guess; refuse both
        if key and self.keys.accepts(key):
            return await self.app(scope, receive, send)
        message = ("this server requires an API key: send the header 'Authorization: Bearer <key>' (openai client: "
                   "OpenAI(api_key=...))" if key is None else
                   "send one Authorization header, not several" if key == "" else
                   "API key not accepted: it is not in the server's --api-key-file")
        error = ApiError(401, message, None, "invalid_api_key")
        await JSONResponse(error.body(), 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)


class LimitRequestSize:
    """ASGI middleware: a request body over `max_bytes` is refused with 413 before it is held in memory,
    from its Content-Length when it has one, else while it arrives (chunked). A body under the limit is
    read here and handed on as it came."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def refuse(self, scope, receive, send):
        mb = self.max_bytes / (1 << 20)
        error = ApiError(413, f"request body too large: this server accepts at most {mb:g} MB "
                              "(its operator sets --max-request-mb)", None, "request_too_large")
        await JSONResponse(error.body(), 413, headers={"Connection": "close"})(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    too_large = int(value) > self.max_bytes
                except ValueError:
                    too_large = False  # the HTTP layer refuses a malformed length
                if too_large:
                    return await self.refuse(scope, receive, send)
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                parts = [message]
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self.refuse(scope, receive, send)
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                parts = [{"type": "http.request", "body": b"".join(parts), "more_body": False}]
                break
        replay = iter(parts)

        async def replayed():
            return next(replay, None) or await receive()

        return await self.app(scope, replayed, send)


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


class EventStream(StreamingResponse):
    """StreamingResponse that always closes its event generator, also when the client left mid-stream
    (Starlette then stops iterating without closing it), so the Generate call is cancelled at once."""

    def __init__(self, events: AsyncIterator[str]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _client_gone(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_gone(request: Request, work: Callable[[], object]):
    """Await `work()`, cancelling it (and so its Generate call) if the client disconnects first."""
    task = asyncio.ensure_future(work())
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)  # its finally cancels the call
        raise ClientGone
    return task.result()


async def sse_events(stream: AsyncIterator[Chunk], first: Chunk, envelope: Envelope, chat: bool, include_usage: bool,
                     orchestrator: str) -> AsyncIterator[str]:
    """One streamed response: chat's role delta, an event per round that added text, the finish event (with
    spec_decode), the usage event when asked for, [DONE]. Events that are ready together go out in one write
    (one send on the socket: on a loaded host each costs more than building the event). A failure after the
    headers went out is an error event, and the stream ends there."""
    extra = {"usage": None} if include_usage else {}  # OpenAI's chunks carry usage: null until the last
    ready = []
    if chat:
        ready.append(sse(envelope.wrap([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}], **extra)))
    async with aclosing(stream):
        try:
            chunk = first
            while chunk is not None:
                if chunk.text:
                    ready.append(sse(envelope.wrap([choice(chat, chunk.text, None, streamed=True)], **extra)))
                if chunk.finish_reason:
                    stats = chunk.stats or {}
                    finish = choice(chat, None, FINISH_REASONS.get(chunk.finish_reason), streamed=True)
                    ready.append(sse(envelope.wrap([finish], **extra, spec_decode=spec_decode_stats(stats))))
                    if include_usage:
                        ready.append(sse(envelope.wrap([], usage=usage(stats))))
                    ready.append(sse("[DONE]"))
                    yield "".join(ready)
                    # Read the call to its end, so that it finishes rather than being cancelled.
                    async for _ in stream:
                        pass
                    return
                if ready:
                    yield "".join(ready)
                    ready = []
                chunk = await anext(stream, None)
            yield "".join(ready) + sse(ApiError(502, "the orchestrator ended the stream without its final chunk").body())
        except SpecDecError as error:
            yield "".join(ready) + sse(from_sdk(error, orchestrator).body())
        except Exception as error:  # noqa: BLE001 - the headers are sent: the error goes in the stream
            log.exception("stream failed", exc_info=error)
            yield "".join(ready) + sse(ApiError(500, f"internal error: {type(error).__name__}").body())


def create_app(served: Served, make_client: Callable[[], AsyncClient], api_keys: ApiKeys | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.client = make_client()  # inside the server's event loop, as grpc.aio needs
        try:
            yield
        finally:
            await app.state.client.close()

    app = FastAPI(title="specdec OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(LimitRequestSize, max_bytes=max_request_bytes)
    if api_keys is not None:  # added last, so it runs first: no body is read for a caller without a key
        app.add_middleware(RequireApiKey, keys=api_keys)

    @app.exception_handler(ApiError)
    async def api_error(_request, error: ApiError):
        return JSONResponse(error.body(), error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request, error: RequestValidationError):
        problems = error.errors()
        where = [".".join(str(p) for p in problem.get("loc", ()) if p != "body") for problem in problems]
        message = "; ".join(f"{w or 'body'}: {p.get('msg', 'invalid')}" for w, p in zip(where, problems))
        return JSONResponse(ApiError(400, f"invalid request: {message}", where[0] if where else None).body(), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, error: StarletteHTTPException):
        return JSONResponse(ApiError(error.status_code, str(error.detail)).body(), error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(ClientGone)
    async def client_gone(_request, _error):
        return Response(status_code=CLIENT_GONE)

    @app.exception_handler(Exception)
    async def unexpected(_request, error: Exception):
        log.exception("unexpected error", exc_info=error)
        return JSONResponse(ApiError(500, f"internal error: {type(error).__name__}").body(), 500)

    @app.get("/health")
    @app.get("/healthz")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.model_name, "object": "model", "created": served.created,
                                            "owned_by": "specdec", "max_model_len": served.max_context}]}

    def check_model(name: str | None) -> None:
        if name and name != served.model_name:
            raise ApiError(404, f"The model `{name}` does not exist: this server serves `{served.model_name}` "
                                "(GET /v1/models)", "model", "model_not_found")

    def default_max_tokens(prompt: str | list[int]) -> int:
        """Absent max_tokens: the rest of the context (vLLM's default), max_context - prompt tokens."""
        count = len(prompt) if isinstance(prompt, list) else served.tokenizer.count(prompt)
        if count is None:
            raise bad_request(f"max_tokens is required here: without {served.tokenizer.source}'s tokenizer.json this "
                              "server cannot count the prompt's tokens to give it the rest of the context",
                              "max_tokens")
        if count >= served.max_context:
            raise bad_request(f"This model's maximum context length is {served.max_context} tokens, and the prompt "
                              f"has {count} tokens: no room to generate. Shorten the prompt.", "prompt",
                              "context_length_exceeded")
        return served.max_context - count

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        check_supported(body)
        prompt = completion_prompt(body)
        max_tokens = requested_max_tokens(body) or default_max_tokens(prompt)
        return await generate(request, body, prompt, max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        check_supported(body)
        if served.template is None:
            raise bad_request(f"chat completions need a chat template: {served.no_template_reason}", "messages",
                              "no_chat_template")
        try:
            rendered = served.template.render(message_dicts(body), add_generation_prompt=True)
        except ChatTemplateError as error:
            raise bad_request(f"the model's chat template refused these messages: {error}", "messages",
                              "chat_template_error") from None
        prompt = served.tokenizer.prompt_text(rendered)
        max_tokens = requested_max_tokens(body) or default_max_tokens(prompt)
        return await generate(request, body, prompt, max_tokens, chat=True)

    async def generate(request: Request, body, prompt: str | list[int], max_tokens: int, chat: bool):
        options = sampling_options(body)
        envelope = Envelope.new(chat, bool(body.stream), served.model_name)
        client: AsyncClient = request.app.state.client
        if not body.stream:
            try:
                result = await unless_client_gone(request, lambda: client.generate(
                    prompt, max_tokens, request_id=envelope.id, **options))
            except SpecDecError as error:
                raise from_sdk(error, served.orchestrator) from None
            return JSONResponse(envelope.wrap(
                [choice(chat, result.text, FINISH_REASONS.get(result.finish_reason), streamed=False)],
                usage=usage(result.stats), spec_decode=spec_decode_stats(result.stats)))
        stream = client.stream(prompt, max_tokens, request_id=envelope.id, **options)
        # Wait for the first chunk before answering, so that a refused request gets its HTTP status.
        try:
            first = await unless_client_gone(request, lambda: anext(stream))
        except SpecDecError as error:
            raise from_sdk(error, served.orchestrator) from None
        except BaseException:
            await stream.aclose()
            raise
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(sse_events(stream, first, envelope, chat, include_usage, served.orchestrator))

    return app
