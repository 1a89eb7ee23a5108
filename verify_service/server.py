"""`specdec serve verify`: the target model behind VerifyService."""

from __future__ import annotations

from serving.grpc_server import RunningServer
from serving.model_server import ModelServerSettings, start_model_server
from specdec_api import verify_pb2, verify_pb2_grpc
from verify_service.servicer import VerifyServicer

SERVICE_NAME = verify_pb2.DESCRIPTOR.services_by_name["VerifyService"].full_name


def start(settings: ModelServerSettings, interceptors=()) -> RunningServer:
    return start_model_server(settings, VerifyServicer, verify_pb2_grpc.add_VerifyServiceServicer_to_server,
                              SERVICE_NAME, interceptors)
