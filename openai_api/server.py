"""`specdec serve openai`: its settings, its startup (the orchestrator's GetInfo, the tokenizer's files, the
key file) and uvicorn, in the foreground (the CLI; SIGTERM drains for up to 5 s) or on a thread (tests).

A process of its own in front of the orchestrator: it scales apart from the orchestrator, keeps the
orchestrator's surface gRPC-only, and reaches it through the SDK as any application does.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import jinja2
import uvicorn

from openai_api.app import Served, create_app
from openai_api.chat_template import ChatTemplate
from openai_api.tokenizer_files import TokenizerFiles
from service_common.server import DEFAULT_MAX_REQUEST_MB
from specdec_client import AsyncClient, Client, Unavailable
from transport.api_keys import ApiKeys, read_key_file

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 5


@dataclass
class OpenAISettings:
    orchestrator: str  # HOST:PORT
    port: int = 8000  # 0: any free port
    host: str = "127.0.0.1"
    tokenizer: str | None = None  # default: the tokenizer the orchestrator reports
    model_name: str | None = None  # default: the target model the orchestrator reports
    api_key_file: str | None = None  # callers must send one of these keys
    # How this server reaches the orchestrator, as `specdec generate` does: a key (the file's first), TLS.
    orchestrator_api_key_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None
    timeout_s: float = 600.0  # each generation's deadline
    startup_timeout_s: float = 60.0  # how long to wait for the orchestrator at startup
    log_level: str = "info"
    max_request_mb: float = DEFAULT_MAX_REQUEST_MB  # a larger request body is refused with 413 before it is read

    def client_kwargs(self) -> dict:
        api_key = None
        if self.orchestrator_api_key_file:
            keys = read_key_file(self.orchestrator_api_key_file)
            if not keys:
                raise ValueError(f"--orchestrator-api-key-file {self.orchestrator_api_key_file} holds no key")
            api_key = keys[0]
        return dict(api_key=api_key, root_certificates=self.tls_ca, private_key=self.tls_key,
                    certificate_chain=self.tls_cert, server_name=self.tls_server_name)


def orchestrator_info(settings: OpenAISettings):
    """GetInfo, retried while the orchestrator is not up yet (it may start after this process)."""
    deadline = time.monotonic() + settings.startup_timeout_s
    with Client(settings.orchestrator, timeout=5.0, **settings.client_kwargs()) as client:
        while True:
            try:
                return client.info()
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def build_app(settings: OpenAISettings):
    info = orchestrator_info(settings)
    files = TokenizerFiles.load(settings.tokenizer or info.tokenizer)
    template, reason = None, files.no_template_reason
    if files.chat_template is not None:
        try:
            template = ChatTemplate(files.chat_template, files.special_tokens)
        except jinja2.TemplateSyntaxError as error:
            reason = f"the chat template in {files.directory} does not compile: {error}"
    served = Served(model_name=settings.model_name or info.target_model, max_context=info.max_context,
                    orchestrator=settings.orchestrator, tokenizer=files, template=template, no_template_reason=reason,
                    created=int(time.time()))
    log.info("serving %s (context %d) from orchestrator %s; tokenizer %s: chat template %s, prompt counting %s",
             served.model_name, served.max_context, settings.orchestrator, files.directory or files.source,
             "yes" if template else f"no ({reason})", "yes" if files.tokenizer else "no (max_tokens required)")
    keys = ApiKeys(settings.api_key_file) if settings.api_key_file else None
    client_kwargs = settings.client_kwargs()
    return create_app(served, lambda: AsyncClient(settings.orchestrator, timeout=settings.timeout_s, **client_kwargs),
                      keys, max_request_bytes=int(settings.max_request_mb * (1 << 20)))


class _Server(uvicorn.Server):
    """Stopped by SIGTERM / SIGINT, it drains and then returns, so the process exits 0 as the gRPC roles do
    (uvicorn re-raises the signal once drained, which would end the process by it)."""

    @contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            getattr(self, "_captured_signals", []).clear()


def _server(settings: OpenAISettings) -> tuple[uvicorn.Server, object]:
    config = uvicorn.Config(build_app(settings), host=settings.host.strip("[]"), port=settings.port,
                            log_level=settings.log_level.lower(), access_log=settings.log_level.lower() == "debug",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, lifespan="on")
    return _Server(config), config.bind_socket()


def serve(settings: OpenAISettings) -> None:
    """Serve in the foreground until SIGTERM / SIGINT."""
    server, sock = _server(settings)
    server.run(sockets=[sock])


@dataclass
class RunningHttp:
    server: uvicorn.Server
    thread: threading.Thread
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)


def start(settings: OpenAISettings, timeout_s: float = 30.0) -> RunningHttp:
    """Serve on a thread of this process (tests); returns once it accepts connections."""
    server, sock = _server(settings)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="openai-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the OpenAI API server did not start")
        time.sleep(0.01)
    return RunningHttp(server, thread, sock.getsockname()[1])
