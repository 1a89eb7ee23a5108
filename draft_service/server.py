"""`specdec serve draft`: the draft model behind DraftService."""

from __future__ import annotations

from draft_service.servicer import DraftServicer
from serving.grpc_server import RunningServer
from serving.model_server import ModelServerSettings, start_model_server
from specdec_api import draft_pb2, draft_pb2_grpc

SERVICE_NAME = draft_pb2.DESCRIPTOR.services_by_name["DraftService"].full_name


def start(settings: ModelServerSettings, interceptors=()) -> RunningServer:
    return start_model_server(settings, DraftServicer, draft_pb2_grpc.add_DraftServiceServicer_to_server,
                              SERVICE_NAME, interceptors)
