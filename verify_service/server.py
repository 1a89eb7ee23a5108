"""`specdec serve verify`: the target model behind VerifyService."""

from __future__ import annotations

from service_common.server import RunningServer
from serving.model_server import ModelServerSettings, start_model_server
from specdec_api.method_paths import VERIFY_SERVICE
from specdec_api import verify_pb2_grpc
from verify_service.servicer import VerifyServicer

SERVICE_NAME = VERIFY_SERVICE


def start(settings: ModelServerSettings, interceptors=()) -> RunningServer:
    return start_model_server(settings, VerifyServicer, verify_pb2_grpc.add_VerifyServiceServicer_to_server,
                              SERVICE_NAME, interceptors)
