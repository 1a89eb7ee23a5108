"""The orchestrator's view of its services: a replica set per role (orchestrator/replicas.py), model
info, the tokenizer, and the startup checks that draft and target can be paired and that the replicas of
a role agree."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import grpc
from transformers import AutoTokenizer

from orchestrator.replicas import IncompatibleReplica, ReplicaSet, parse_targets
from service_common.server import CHANNEL_OPTIONS
from specdec_api import common_pb2, draft_pb2_grpc, verify_pb2_grpc
from transport import TLSSettings, dial

log = logging.getLogger(__name__)


class IncompatibleModels(RuntimeError):
    pass


@dataclass
class Deployment:
    verify: ReplicaSet
    draft: ReplicaSet | None
    verify_info: common_pb2.ModelInfo  # what every verify replica serves (the first one's info)
    draft_info: common_pb2.ModelInfo | None  # the first draft replica's; all have its vocabulary
    tokenizer: object
    tokenizer_name: str

    @property
    def channels(self) -> list[grpc.Channel]:
        """Every replica's channel now (replicas come and go with dns:/// names)."""
        return [c for s in (self.verify, self.draft) if s is not None for c in s.channels()]

    def close(self) -> None:
        for replicas in (self.verify, self.draft):
            if replicas is not None:
                replicas.close()


def shared_device(verify: common_pb2.ModelInfo, draft: common_pb2.ModelInfo | None) -> str:
    """The accelerator draft and target both run on (ModelInfo.device_id), or "" when they do not share one (or say
    none: a CPU, a drafter without a model, a service older than the field)."""
    if draft is None or not verify.device_id or verify.device_id != draft.device_id:
        return ""
    return verify.device_id


def overlap_choice(requested: bool | None, verify: common_pb2.ModelInfo,
                   draft: common_pb2.ModelInfo | None) -> tuple[bool, str]:
    """Whether the orchestrator drafts ahead while the target verifies, and why. Asked for (--overlap or
    --no-overlap): as asked. Else on, unless draft and target share a GPU: there the drafted-ahead steps compete with
    the verify for the one device instead of hiding behind it (on an H200, co-located, alpha 0.8: 1.12x the target
    alone with overlap, 1.45x without; docs/benchmarks.md, GPU; speculation/placement.py predicts the same)."""
    if requested is not None:
        return requested, "--overlap" if requested else "--no-overlap"
    shared = shared_device(verify, draft)
    if shared:
        return False, f"draft and target share {shared}: drafting ahead would compete with verification there"
    return True, "draft and target on separate devices (the default)"


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


def same_target(info: common_pb2.ModelInfo, reference: common_pb2.ModelInfo | None) -> None:
    """Every verify replica serves the same target: a generation's tokens must not depend on which replica
    scored them. IncompatibleReplica names the first difference."""
    if reference is None:
        return
    for name in ("model", "vocab_size", "max_context", "tokenizer_fingerprint", "num_parameters"):
        mine, theirs = getattr(info, name), getattr(reference, name)
        if mine != theirs:
            raise IncompatibleReplica(f"it serves {name} {mine!r} where the other verify replicas serve {theirs!r}; "
                                      "every verify replica must host the same target model")
    if info.weights_fingerprint and reference.weights_fingerprint and \
            info.weights_fingerprint != reference.weights_fingerprint:
        raise IncompatibleReplica(f"its weights differ from the other verify replicas' ({info.model!r}: weights "
                                  f"{info.weights_fingerprint[:12]}…, theirs {reference.weights_fingerprint[:12]}…); "
                                  "every verify replica must host the same target model (a rolling update to new "
                                  "weights needs its own orchestrators, or all replicas updated before they serve)")
    if list(info.eos_token_ids) != list(reference.eos_token_ids):
        raise IncompatibleReplica(f"its EOS ids {list(info.eos_token_ids)} differ from the other verify "
                                  f"replicas' {list(reference.eos_token_ids)}")
    if info.dtype != reference.dtype:
        log.warning("verify replicas differ in dtype (%s vs %s): greedy output may differ by replica in rare "
                    "near-ties", info.dtype, reference.dtype)


def same_vocabulary_and_limits(new: common_pb2.ModelInfo, old: common_pb2.ModelInfo) -> bool:
    """Whether the orchestrator may follow its role to `new` weights: what it read from the first replica at
    startup (the tokenizer, the vocabulary, the context, EOS ids) still holds, so requests it checked
    against `old` mean the same to `new`."""
    return (new.vocab_size, new.max_context, new.tokenizer_fingerprint, list(new.eos_token_ids)) == \
        (old.vocab_size, old.max_context, old.tokenizer_fingerprint, list(old.eos_token_ids))


def pairable_draft(target: common_pb2.ModelInfo):
    """The check a draft replica passes: it pairs with the target (check_pair) and has the first draft
    replica's vocabulary. Draft replicas may host different models (a heterogeneous pool): the draft only
    proposes, so which one proposed changes speed, never tokens."""
    def check(info: common_pb2.ModelInfo, reference: common_pb2.ModelInfo | None) -> None:
        check_pair(info, target)
        if reference is not None and info.vocab_size != reference.vocab_size:
            raise IncompatibleReplica(f"it has {info.vocab_size} logits per token where the other draft "
                                      f"replicas have {reference.vocab_size}")
    return check


def _channel(address: str, tls: TLSSettings | None = None, api_key_file: str | None = None) -> grpc.Channel:
    # No tracing interceptor: the calls on the hot path open their CLIENT spans themselves
    # (service_clients.py). TLS (our certificate as the client identity) and the service key, when
    # configured, come from transport.dial, which follows their files as they rotate. A replica that went
    # away is retried within 2 s of coming back, not gRPC's default of up to 2 minutes.
    options = [*CHANNEL_OPTIONS, ("grpc.initial_reconnect_backoff_ms", 250),
               ("grpc.max_reconnect_backoff_ms", 2000), ("grpc.min_reconnect_backoff_ms", 250)]
    return dial(address, tls, options, api_key_file)


def _hint(code: grpc.StatusCode | None, tls: TLSSettings | None) -> str:
    """What an operator should check when a service does not answer at startup."""
    if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE, None):
        return ("with TLS, a handshake the service refuses looks like this: check that --tls-ca signed its "
                "certificate, that it trusts our --tls-cert, and --tls-server-name" if tls and tls.dials_tls
                else "is it up? if it serves TLS, give the orchestrator --tls-ca, --tls-cert and --tls-key")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return "give the orchestrator --service-api-key-file with a key from the service's --api-key-file"
    return ""


def replica_set(role: str, spec: str, flag: str, make_stub, check_info, tls: TLSSettings | None,
                api_key_file: str | None, resolve_interval_s: float) -> ReplicaSet:
    targets = parse_targets(spec, flag)
    if targets.resolved and tls is not None and tls.dials_tls and not tls.server_name:
        # Resolved replicas are dialled by IP: their certificates are checked against the name resolved.
        tls = dataclasses.replace(tls, server_name=targets.dns_host)
    return ReplicaSet(role, targets, lambda address: _channel(address, tls, api_key_file), make_stub, check_info,
                      resolve_interval_s, may_follow=same_vocabulary_and_limits)


def connect(verify_address: str, draft_address: str | None, tokenizer: str | None = None,
            ready_timeout_s: float = 60.0, tls: TLSSettings | None = None,
            api_key_file: str | None = None, resolve_interval_s: float = 10.0) -> Deployment:
    """The replica sets `--verify` and `--draft` name, once at least one replica of each takes sessions.
    ValueError for a malformed address list, ConnectionError when no replica answers in time,
    IncompatibleModels when the draft cannot pair with the target."""
    verify = replica_set("verify", verify_address, "--verify", verify_pb2_grpc.VerifyServiceStub, same_target, tls,
                         api_key_file, resolve_interval_s)
    draft = None
    try:
        verify_info = verify.wait_ready(ready_timeout_s, lambda code: _hint(code, tls))
        draft_info = None
        if draft_address:
            draft = replica_set("draft", draft_address, "--draft", draft_pb2_grpc.DraftServiceStub,
                                pairable_draft(verify_info), tls, api_key_file, resolve_interval_s)
            draft_info = draft.wait_ready(ready_timeout_s, lambda code: _hint(code, tls), refusal=IncompatibleModels)
    except BaseException:
        verify.close()
        if draft is not None:
            draft.close()
        raise
    tokenizer_name = tokenizer or verify_info.model
    loaded_tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    log.info("target %s, draft %s, tokenizer %s", verify_info.model, draft_info.model if draft_info else None,
             tokenizer_name)
    verify.start()
    if draft is not None:
        draft.start()
    return Deployment(verify, draft, verify_info, draft_info, loaded_tokenizer, tokenizer_name)
