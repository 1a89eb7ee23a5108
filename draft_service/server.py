"""`specdec serve draft`: a drafter (draft_service/drafters/: a draft model, prompt lookup, or a chain of them)
behind DraftService."""

from __future__ import annotations

import logging

from draft_service.drafters import build_drafter
from draft_service.servicer import DraftServicer
from service_common.server import RunningServer
from serving.model_server import Hosted, ModelServerSettings, start_model_server
from specdec_api import draft_pb2_grpc
from specdec_api.method_paths import DRAFT_SERVICE

SERVICE_NAME = DRAFT_SERVICE

log = logging.getLogger(__name__)


def host_drafter(settings: ModelServerSettings) -> Hosted:
    drafter = build_drafter(settings)
    return Hosted(drafter.identity, drafter, drafter.new_cache, drafter.runner)


def start(settings: ModelServerSettings, interceptors=()) -> RunningServer:
    running = start_model_server(settings, DraftServicer, draft_pb2_grpc.add_DraftServiceServicer_to_server,
                                 SERVICE_NAME, interceptors, host=host_drafter)
    identity = running.servicer.loaded
    log.info("draft service: drafter %s, vocabulary of %s (%d ids, context %d)", running.servicer.drafter.description,
             identity.name_or_path, identity.vocab_size, identity.max_context)
    return running
