"""`specdec serve orchestrator`: connect to the services, check the pair, serve the public API."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.deployment import connect
from orchestrator.servicer import OrchestratorServicer
from serving.grpc_server import RunningServer, start_server
from specdec_api import orchestrator_pb2, orchestrator_pb2_grpc

SERVICE_NAME = orchestrator_pb2.DESCRIPTOR.services_by_name["Orchestrator"].full_name


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
    overlap: bool = True
    draft_confidence: float = 0.0
    ready_timeout_s: float = 120.0
    max_workers: int = 64


def start(settings: OrchestratorSettings, interceptors=()) -> RunningServer:
    deployment = connect(settings.verify, settings.draft, settings.tokenizer, settings.ready_timeout_s)
    servicer = OrchestratorServicer(deployment, settings.num_draft_tokens, settings.max_draft_tokens,
                                    settings.rpc_timeout_s, settings.adaptive_cost_ratio,
                                    settings.draft_timeout_s, settings.gamma_policy, settings.overlap,
                                    settings.draft_confidence)
    running = start_server([(orchestrator_pb2_grpc.add_OrchestratorServicer_to_server, servicer)],
                           [SERVICE_NAME], settings.port, settings.host, settings.max_workers, interceptors)
    running.servicer = servicer
    return running
