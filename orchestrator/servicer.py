"""Orchestrator.Generate: check the request, run a Generation, stream its rounds, free its sessions."""

from __future__ import annotations

import logging
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor

from opentelemetry import trace

from orchestrator.deployment import Deployment
from orchestrator.load_gamma import LoadAwareGamma, LoadModel
from orchestrator.generation import Generation, GenerationSpec
from orchestrator.service_clients import DraftSession, VerifyFailed, VerifySession
from orchestrator.text_stream import TextStream
from service_common.caller_limits import DEFAULT_MAX_WORKERS
from service_common.errors import Downstream, Draining, InvalidArgument, OutOfRange
from service_common.session_fingerprint import session_tag
from specdec_api import orchestrator_pb2, orchestrator_pb2_grpc
from speculation.gamma_policy import AdaptiveGamma, PerDrafterGamma
from speculation.sampling import Sampling
from telemetry.metrics import record_generation
from telemetry.tracing import get_tracer

log = logging.getLogger(__name__)

MAX_REQUEST_ID_CHARS = 256


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServicer):
    def __init__(self, deployment: Deployment, default_gamma: int = 4, max_gamma: int = 16,
                 rpc_timeout_s: float = 30.0, adaptive_cost_ratio: float | None = None,
                 draft_timeout_s: float = 5.0, gamma_policy: str = "fixed", overlap: bool = True,
                 draft_confidence: float = 0.0, max_workers: int = DEFAULT_MAX_WORKERS):
        self.deployment = deployment
        self.default_gamma = default_gamma
        self.max_gamma = min(max_gamma, deployment.verify_info.max_draft_tokens or max_gamma,
                             deployment.draft_info.max_draft_tokens if deployment.draft_info else max_gamma)
        self.rpc_timeout_s = rpc_timeout_s
        self.draft_timeout_s = draft_timeout_s
        # Verify calls run here while a handler thread drafts ahead (the overlap): one per handler thread.
        self.verify_pool = ThreadPoolExecutor(max_workers, thread_name_prefix="verify-call") if overlap else None
        self.draft_confidence = draft_confidence
        if gamma_policy not in ("fixed", "load"):
            raise ValueError(f"--gamma-policy must be fixed or load, got {gamma_policy!r}")
        self.load_model = LoadModel() if gamma_policy == "load" else None
        self.adaptive_cost_ratio = adaptive_cost_ratio
        # No token of this tokenizer spans more characters than this, so a text longer than
        # max_context * this cannot fit the context whatever it holds: refused before tokenizing it.
        vocab = deployment.tokenizer.get_vocab() if hasattr(deployment.tokenizer, "get_vocab") else {}
        self.max_chars_per_token = max((len(token) for token in vocab), default=0) or 64
        self.draining = False  # SIGTERM: no new generation; those in flight go on (RunningServer.drain)
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()

    def start_draining(self) -> None:
        self.draining = True

    def busy(self) -> bool:
        """Generations are still streaming (what a drain waits for)."""
        return self._in_flight > 0

    # -- request checks ---------------------------------------------------------------------------
    def spec_from(self, request: orchestrator_pb2.GenerateRequest) -> GenerationSpec:
        info = self.deployment.verify_info
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidArgument(f"request_id must be at most {MAX_REQUEST_ID_CHARS} characters, "
                                  f"got {len(request.request_id)}")
        if request.max_new_tokens <= 0:
            raise InvalidArgument(f"max_new_tokens must be > 0, got {request.max_new_tokens}")
        room = info.max_context - request.max_new_tokens  # tokens left for the prompt
        which = request.WhichOneof("prompt")
        if which == "text":
            if not request.text:
                raise InvalidArgument("the prompt is empty; send text or token_ids with at least one token")
            if len(request.text) > max(0, room) * self.max_chars_per_token:
                raise OutOfRange(
                    f"the prompt's {len(request.text)} characters cannot fit in {max(0, room)} tokens (the target's "
                    f"context of {info.max_context} less max_new_tokens {request.max_new_tokens}; no token of this "
                    f"tokenizer is longer than {self.max_chars_per_token} characters); shorten the prompt or lower "
                    "max_new_tokens")
            prompt_ids = list(self.deployment.tokenizer(request.text)["input_ids"])
        elif which == "token_ids":
            prompt_ids = list(request.token_ids.ids)
            if len(prompt_ids) > room:
                raise OutOfRange(
                    f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({request.max_new_tokens}) exceeds the "
                    f"target's context of {info.max_context} tokens; shorten the prompt or lower max_new_tokens")
            bad = [t for t in prompt_ids if not 0 <= t < info.vocab_size]
            if bad:
                raise InvalidArgument(f"prompt token ids outside the vocabulary [0, {info.vocab_size}): {bad[:5]}")
        else:
            raise InvalidArgument("no prompt: set `text` or `token_ids`")
        if not prompt_ids:
            raise InvalidArgument("the prompt tokenizes to zero tokens; send a non-empty prompt")
        if len(prompt_ids) + request.max_new_tokens > info.max_context:
            raise OutOfRange(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({request.max_new_tokens}) exceeds the "
                f"target's context of {info.max_context} tokens; shorten the prompt or lower max_new_tokens")
        sampling = Sampling(
            temperature=request.temperature if request.HasField("temperature") else 0.0,
            top_k=request.top_k if request.HasField("top_k") else 0,
            top_p=request.top_p if request.HasField("top_p") else 1.0)
        problems = sampling.problems()
        if problems:
            raise InvalidArgument("; ".join(problems))
        adaptive = not request.HasField("num_draft_tokens") and (
            self.adaptive_cost_ratio is not None or self.load_model is not None)
        gamma = request.num_draft_tokens if request.HasField("num_draft_tokens") else self.default_gamma
        if not 0 <= gamma <= self.max_gamma:
            raise InvalidArgument(f"num_draft_tokens must be in [0, {self.max_gamma}] (0 = no speculation), "
                                  f"got {gamma}")
        if any(len(s) > 1000 for s in request.stop) or len(request.stop) > 16:
            raise InvalidArgument("at most 16 stop strings of at most 1000 characters each")
        seed = request.seed if request.HasField("seed") else secrets.randbits(63)
        return GenerationSpec(
            prompt_ids=prompt_ids, max_new_tokens=request.max_new_tokens, sampling=sampling, seed=seed,
            gamma=gamma, stop=list(request.stop), eos_token_ids=set(info.eos_token_ids),
            max_context=info.max_context, adaptive=adaptive, max_gamma=self.max_gamma,
            draft_vocab_size=self.deployment.draft_info.vocab_size if self.deployment.draft_info else 0,
            target_vocab_size=info.vocab_size)

    # -- RPCs -------------------------------------------------------------------------------------
    def Generate(self, request, context):
        if self.draining:
            raise Draining("this orchestrator is shutting down and takes no new generation; retry (another "
                           "replica will take it)")
        with self._in_flight_lock:
            self._in_flight += 1
        try:
            yield from self._generate(request, context)
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1

    def _generate(self, request, context):
        spec = self.spec_from(request)
        # The session id is what lets a caller touch the services' caches: random, never derived from what
        # the client sent, and kept out of spans and logs (they carry session_tag, a one-way name).
        session_id = secrets.token_hex(16)
        d = self.deployment
        draft = None
        if d.draft is not None:
            vocab_limit = spec.target_vocab_size if spec.draft_vocab_size > spec.target_vocab_size else 0
            draft = DraftSession(d.draft, session_id, self.draft_timeout_s, spec.sampling, self.draft_confidence,
                                 vocab_limit)
        verify = VerifySession(d.verify, session_id, self.rpc_timeout_s, spec.sampling)
        policy = None
        if spec.adaptive and self.load_model is not None:
            policy = PerDrafterGamma(lambda: LoadAwareGamma(self.load_model, max_gamma=spec.max_gamma, gamma=spec.gamma))
        elif spec.adaptive:
            policy = PerDrafterGamma(lambda: AdaptiveGamma(max_gamma=spec.max_gamma, gamma=spec.gamma,
                                                           cost_ratio=self.adaptive_cost_ratio))
        # Not made current: the handler yields between rounds, so each round names it as parent instead.
        span = get_tracer().start_span("generation", attributes={
            "specdec.session": session_tag(session_id), "specdec.request_id": request.request_id,
            "specdec.prompt_tokens": len(spec.prompt_ids), "specdec.max_new_tokens": spec.max_new_tokens,
            "specdec.temperature": spec.sampling.temperature, "specdec.gamma": spec.gamma})
        generation = Generation(spec, draft, verify, TextStream(d.tokenizer, spec.stop), policy,
                                is_active=context.is_active, trace_context=trace.set_span_in_context(span),
                                load_model=self.load_model, verify_pool=self.verify_pool)
        if self.load_model is not None:
            self.load_model.enter()
        try:
            for event in generation.rounds():
                chunk = orchestrator_pb2.GenerateChunk(token_ids=event.token_ids, text=event.text,
                                                       finish_reason=event.finish_reason, round=event.timing)
                if event.finish_reason:
                    stats = generation.stats()
                    chunk.stats.CopyFrom(stats)
                    record_generation(stats.new_tokens, stats.rounds, stats.tokens_per_s, stats.acceptance_rate,
                                      stats.mean_accepted_len)
                    span.set_attributes({"specdec.new_tokens": stats.new_tokens, "specdec.rounds": stats.rounds,
                                         "specdec.acceptance_rate": stats.acceptance_rate,
                                         "specdec.rebinds": stats.rebinds,
                                         "specdec.verify_replica": verify.replica_address,
                                         "specdec.draft_replica": draft.replica_address if draft else ""})
                yield chunk
        except VerifyFailed as failure:  # the client gets the verify service's status, not UNKNOWN
            raise Downstream("verify", failure.code, failure.details) from failure
        finally:
            if self.load_model is not None:
                self.load_model.leave()
            span.end()
            verify.release()
            if draft is not None:
                draft.release()

    def close(self) -> None:
        """After the server stopped: its generations are over, so the verify pool's threads may end."""
        if self.verify_pool is not None:
            self.verify_pool.shutdown()

    def GetInfo(self, request, context):
        d = self.deployment
        return orchestrator_pb2.OrchestratorInfo(
            # The reference: the model a rolling update moved the verify replicas to, if one did.
            target_model=(d.verify.reference or d.verify_info).model,
            draft_model=d.draft_info.model if d.draft_info else "",
            tokenizer=d.tokenizer_name, vocab_size=d.verify_info.vocab_size, max_context=d.verify_info.max_context,
            default_num_draft_tokens=self.default_gamma, max_draft_tokens=self.max_gamma)
