"""`specdec serve orchestrator`: connect to the services, check the pair, serve the public API."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from orchestrator.deployment import connect, overlap_choice
from orchestrator.servicer import OrchestratorServicer
from service_common.caller_limits import DEFAULT_MAX_WORKERS
from service_common.server import DEFAULT_MAX_REQUEST_MB, RunningServer, start_server
from specdec_api.method_paths import ORCHESTRATOR_SERVICE
from specdec_api import orchestrator_pb2_grpc
from transport import TLSSettings

SERVICE_NAME = ORCHESTRATOR_SERVICE
log = logging.getLogger(__name__)


@dataclass
class OrchestratorSettings:
    verify: str
    draft: str | None = None
    port: int = 0
    host: str = "[::]"
    tokenizer: str | None = None
    num_draft_tokens: int = 4
    max_draft_tokens: int = 16
    adaptive_cost_ratio: float | None = None
    rpc_timeout_s: float = 30.0
    draft_timeout_s: float = 5.0
    gamma_policy: str = "fixed"
    overlap: bool | None = None  # None: on, unless draft and target share a GPU (deployment.overlap_choice)
    draft_confidence: float = 0.0
    ready_timeout_s: float = 120.0
    max_workers: int = DEFAULT_MAX_WORKERS  # handler threads (started as calls need them)
    # Calls (a Generate stream: until it ends) one client may have in flight: by API key with
    # api_key_file, else certificate names, else peer host. None: half of max_workers; 0: no limit.
    max_calls_per_caller: int | None = None
    # Listening: TLS / mTLS with tls.cert, tls.key, tls.ca; dialling the services: tls.cert / tls.key as
    # the client identity, tls.ca to verify them (transport/tls.py).
    tls: TLSSettings = field(default_factory=TLSSettings)
    api_key_file: str | None = None  # public API callers must send a key from this file
    service_api_key_file: str | None = None  # the key this orchestrator sends to draft and verify
    health_port: int | None = None  # plaintext health service alone on this port (for probes under TLS)
    max_request_mb: float = DEFAULT_MAX_REQUEST_MB
    resolve_interval_s: float = 10.0  # re-resolve dns:/// replica names and poll replica loads this often


def start(settings: OrchestratorSettings, interceptors=()) -> RunningServer:
    settings.tls.check()
    deployment = connect(settings.verify, settings.draft, settings.tokenizer, settings.ready_timeout_s,
                         tls=settings.tls, api_key_file=settings.service_api_key_file,
                         resolve_interval_s=settings.resolve_interval_s)
    overlap, why = overlap_choice(settings.overlap, deployment.verify_info, deployment.draft_info)
    if deployment.draft is not None:
        log.info("overlap %s: %s", "on" if overlap else "off", why)
    servicer = OrchestratorServicer(deployment, settings.num_draft_tokens, settings.max_draft_tokens,
                                    settings.rpc_timeout_s, settings.adaptive_cost_ratio,
                                    settings.draft_timeout_s, settings.gamma_policy, overlap,
                                    settings.draft_confidence, settings.max_workers)
    try:
        running = start_server([(orchestrator_pb2_grpc.add_OrchestratorServicer_to_server, servicer)],
                               [SERVICE_NAME], settings.port, settings.host, settings.max_workers, interceptors,
                               tls=settings.tls, api_key_file=settings.api_key_file,
                               health_port=settings.health_port, max_request_mb=settings.max_request_mb,
                               max_calls_per_caller=settings.max_calls_per_caller, caller_by_api_key=True)
    except BaseException:
        servicer.close()
        deployment.close()
        raise
    running.servicer = servicer
    running.on_drain.append(servicer.start_draining)  # SIGTERM: no new generation, those streaming go on
    running.busy = servicer.busy  # the drain waits until the last generation ends
    running.on_stop += [servicer.close, deployment.close]  # the verify pool's threads, the service channels
    return running
