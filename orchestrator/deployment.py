"""The orchestrator's view of its services: channels, stubs, model info, the tokenizer, and the
startup checks that draft and target can be paired."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
from transformers import AutoTokenizer

from service_common.server import CHANNEL_OPTIONS
from specdec_api import common_pb2, draft_pb2_grpc, verify_pb2_grpc
from transport import TLSSettings, dial

log = logging.getLogger(__name__)


class IncompatibleModels(RuntimeError):
    pass


@dataclass
class Deployment:
    verify_stub: verify_pb2_grpc.VerifyServiceStub
    draft_stub: draft_pb2_grpc.DraftServiceStub | None
    verify_info: common_pb2.ModelInfo
    draft_info: common_pb2.ModelInfo | None
    tokenizer: object
    tokenizer_name: str
    channels: list[grpc.Channel]

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


def check_pair(draft: common_pb2.ModelInfo, target: common_pb2.ModelInfo) -> None:
    """Draft and target must share a vocabulary, or draft_probs and target_probs are not comparable.

    The same tokenizer with a different number of logits is allowed (a family's small and large models
    often pad their embedding matrices to different sizes, e.g. 151936 vs 152064 rows): the rows past the
    tokenizer are padding, the draft proposes only ids the target has (ProposeRequest.vocab_limit) and the
    orchestrator compares distributions over the target's ids. That needs both fingerprints to say the
    tokenizers are the same; without them, differing sizes are refused."""
    if draft.tokenizer_fingerprint and target.tokenizer_fingerprint and \
            draft.tokenizer_fingerprint != target.tokenizer_fingerprint:
        raise IncompatibleModels(
            f"draft {draft.model!r} and target {target.model!r} have different tokenizer vocabularies; "
            "speculative decoding needs a draft trained with the target's tokenizer")
    same_tokenizer = bool(draft.tokenizer_fingerprint) and draft.tokenizer_fingerprint == target.tokenizer_fingerprint
    if draft.vocab_size != target.vocab_size and not same_tokenizer:
        raise IncompatibleModels(
            f"draft {draft.model!r} has {draft.vocab_size} logits per token but target {target.model!r} has "
            f"{target.vocab_size}, and their tokenizers cannot be compared (a service found no tokenizer); "
            "pick a draft with the target's vocabulary, or ship the tokenizer beside both models")
    if draft.vocab_size != target.vocab_size:
        log.info("draft %s has %d logits per token, target %s %d: same tokenizer, the difference is padding; "
                 "drafts are limited to the target's ids", draft.model, draft.vocab_size, target.model,
                 target.vocab_size)


def _channel(address: str, tls: TLSSettings | None = None, api_key_file: str | None = None) -> grpc.Channel:
    # No tracing interceptor: the calls on the hot path open their CLIENT spans themselves
    # (service_clients.py). TLS (our certificate as the client identity) and the service key, when
    # configured, come from transport.dial, which follows their files as they rotate.
    return dial(address, tls, CHANNEL_OPTIONS, api_key_file)


def _model_info(stub, role: str, address: str, timeout_s: float, tls: TLSSettings | None) -> common_pb2.ModelInfo:
    """The service's ModelInfo, waiting for it to come up; a refusal as one line an operator can act on."""
    try:
        return stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=timeout_s, wait_for_ready=True)
    except grpc.RpcError as error:
        hint = ""
        if error.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
            hint = (" (with TLS, a handshake the service refuses looks like this: check that --tls-ca signed its "
                    "certificate, that it trusts our --tls-cert, and --tls-server-name)" if tls and tls.dials_tls
                    else " (is it up? if it serves TLS, give the orchestrator --tls-ca, --tls-cert and --tls-key)")
        elif error.code() == grpc.StatusCode.UNAUTHENTICATED:
            hint = " (give the orchestrator --service-api-key-file with a key from the service's --api-key-file)"
        raise ConnectionError(f"{role} service at {address}: {error.code().name}: {error.details()}{hint}") from None


def connect(verify_address: str, draft_address: str | None, tokenizer: str | None = None,
            ready_timeout_s: float = 60.0, tls: TLSSettings | None = None,
            api_key_file: str | None = None) -> Deployment:
    channels = []
    try:
        verify_channel = _channel(verify_address, tls, api_key_file)
        channels.append(verify_channel)
        verify_stub = verify_pb2_grpc.VerifyServiceStub(verify_channel)
        verify_info = _model_info(verify_stub, "verify", verify_address, ready_timeout_s, tls)
        draft_stub = draft_info = None
        if draft_address:
            draft_channel = _channel(draft_address, tls, api_key_file)
            channels.append(draft_channel)
            draft_stub = draft_pb2_grpc.DraftServiceStub(draft_channel)
            draft_info = _model_info(draft_stub, "draft", draft_address, ready_timeout_s, tls)
            check_pair(draft_info, verify_info)
    except BaseException:
        for channel in channels:
            channel.close()
        raise
    tokenizer_name = tokenizer or verify_info.model
    loaded_tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    log.info("target %s, draft %s, tokenizer %s", verify_info.model, draft_info.model if draft_info else None,
             tokenizer_name)
    return Deployment(verify_stub, draft_stub, verify_info, draft_info, loaded_tokenizer, tokenizer_name, channels)
