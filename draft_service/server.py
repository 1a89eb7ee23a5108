"""`specdec serve draft`: the draft model behind DraftService."""

from __future__ import annotations

from draft_service.servicer import DraftServicer
from service_common.server import RunningServer
from serving.model_server import ModelServerSettings, start_model_server
from specdec_api.method_paths import DRAFT_SERVICE
from specdec_api import draft_pb2_grpc

SERVICE_NAME = DRAFT_SERVICE


def start(settings: ModelServerSettings, interceptors=()) -> RunningServer:
    return start_model_server(settings, DraftServicer, draft_pb2_grpc.add_DraftServiceServicer_to_server,
                              SERVICE_NAME, interceptors)
