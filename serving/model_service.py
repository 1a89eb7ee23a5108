"""What the draft and verify servicers share: request checks, session use on the worker, info, release,
the replica's load report and draining (no new sessions while those held finish)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from opentelemetry import trace

from service_common.callers import caller_of
from service_common.errors import InvalidArgument, OutOfRange
from serving.metrics import record_batch
from serving.model_loading import LoadedModel, ModelIdentity, device_identity
from serving.runtimes.clock import clock_for
from serving.model_worker import PASS_TOKENS, ModelWorker, PrefillLane, Timed
from serving.sessions import Session, SessionStore, owner
from specdec_api import common_pb2
from speculation.sampling import Sampling
from telemetry.tracing import tracing_enabled

MAX_SESSION_ID_LEN = 256


class ModelServiceBase:
    """`loaded` is what the service says it hosts and checks requests against (a LoadedModel, or a ModelIdentity
    when there are no weights); `runner` is the torch runner the subclass's forward uses, if any (None: a drafter
    without a model). Nothing here touches a model: forward, tokens_of and split are the subclass's."""

    def __init__(self, loaded: LoadedModel | ModelIdentity, runner, store: SessionStore, max_draft_tokens: int = 32,
                 max_batch: int = 32, max_wait_ms: float = 0.0, max_queue: int = 256,
                 prefill_lane: PrefillLane | None = None, chunk_tokens: int = 0,
                 max_queue_per_caller: int | None = None, pass_tokens: int = PASS_TOKENS):
        self.loaded = loaded
        self.runner = runner
        self.store = store
        self.max_draft_tokens = max_draft_tokens
        self.draining = False  # shutting down: sessions held are served, new ones refused (start_draining)
        self.instance = secrets.token_hex(8)  # new at every start (ReplicaLoad.instance)
        self.device_id = "" if runner is None else device_identity(runner.device)  # ModelInfo.device_id
        self.worker = ModelWorker(self.run_batch, max_batch=max_batch, max_wait_ms=max_wait_ms,
                                  max_queue=max_queue, on_batch=record_batch, tokens_of=self.tokens_of,
                                  prefill_lane=prefill_lane, chunk_tokens=chunk_tokens, split=self.split,
                                  max_queue_per_caller=max_queue_per_caller, pass_tokens=pass_tokens,
                                  clock=clock_for(None) if runner is None else runner.clock,
                                  # On a GPU every forward runs on the worker's one thread (serving/model_worker.py).
                                  inline=runner is None or runner.device.type == "cpu")

    def run_batch(self, payloads):
        """One forward over the payloads (each has a `.cache`). If it raises, every cache goes back to the
        length it had before, so the worker can retry each payload alone and only the bad one fails."""
        lengths = [payload.cache.length for payload in payloads]
        # A payload's generator too, if it carries one: a retry must draw what it would have drawn alone, or one
        # caller's failing request would change another's seeded sample. The model drafter's proposals carry none
        # now (their draws are the race keyed by the request's seed: a retry redraws them by construction); kept
        # for any payload that does (tests/test_hardening.py holds it to this).
        generators = [(g, g.get_state()) for g in (getattr(p, "generator", None) for p in payloads) if g is not None]
        try:
            return self.forward(payloads)
        except BaseException:
            for payload, length in zip(payloads, lengths):
                payload.cache.crop(length)
            for generator, state in generators:
                generator.set_state(state)
            raise

    def forward(self, payloads):
        raise NotImplementedError

    @staticmethod
    def tokens_of(payload) -> int:
        """Tokens one job feeds through the model (reported as ServerTiming.batch_tokens)."""
        raise NotImplementedError

    @staticmethod
    def split(payload, n: int):
        """Chunked prefill (serving/model_worker.py): (head, rest), where head feeds the first n (or fewer)
        new tokens into the same cache and its result is thrown away, and rest is the remainder, whose
        result is the job's; None when the job cannot be split (its result needs all that is left)."""
        raise NotImplementedError

    @staticmethod
    def caller_alive(context):
        """Whether the RPC still has a caller: not cancelled and not past its deadline."""
        def alive() -> bool:
            remaining = context.time_remaining()
            return context.is_active() and (remaining is None or remaining > 0)
        return alive

    # -- checks shared by Propose and Verify -------------------------------------------------------
    def check_tokens(self, what: str, token_ids: Sequence[int]) -> None:
        vocab = self.loaded.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidArgument(f"{what} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")

    def check_session(self, session_id: str, prefix_len: int, append: Sequence[int], extra: int) -> None:
        if not session_id or len(session_id) > MAX_SESSION_ID_LEN:
            raise InvalidArgument(f"session_id must be 1..{MAX_SESSION_ID_LEN} characters")
        if prefix_len < 0:
            raise InvalidArgument(f"prefix_len must be >= 0, got {prefix_len}")
        if not append:
            raise InvalidArgument("append_tokens must hold at least one token (the last committed token)")
        self.check_tokens("append_tokens", append)
        total = prefix_len + len(append) + extra
        if total > self.loaded.max_context:
            raise OutOfRange(f"the session would reach {total} tokens, past the model's context of "
                             f"{self.loaded.max_context}")

    @staticmethod
    def sampling_from(message: common_pb2.SamplingParams) -> Sampling:
        sampling = Sampling(message.temperature, message.top_k, message.top_p or 1.0)
        problems = sampling.problems()
        if problems:
            raise InvalidArgument("; ".join(problems))
        return sampling

    @contextmanager
    def session(self, request, context) -> Iterator[Session]:
        """The session a Propose / Verify names, checked out for this call (serving/sessions.py: use).

        Sessions are kept per caller (service_common/callers.py: the TLS identity, else the peer's host): one
        caller's session id never reaches another caller's cache, whatever ids they send. Within a caller,
        the prefix fingerprint is what protects a session."""
        with self.store.use(self.store_key(context, request.session_id), request.prefix_len,
                            request.prefix_fingerprint, new_sessions=not self.draining) as session:
            yield session

    @staticmethod
    def store_key(context, session_id: str):
        caller = caller_of(context)
        return session_id if caller is None else (caller, session_id)

    def submit(self, job, session: Session, context):
        """Run the job on the model worker, in the caller's fair share (serving/model_worker.py)."""
        return self.worker.submit(job, alive=self.caller_alive(context), key=session.session_id,
                                  caller=owner(session.session_id))  # the caller its store key names

    # -- load and draining ------------------------------------------------------------------------
    def start_draining(self) -> None:
        """From now on a call that would start a session here is refused (Draining, before any model work);
        calls for sessions the store holds go on, so generations in flight end on this replica. Releasing
        the sessions is what ends the drain (the server's busy())."""
        self.draining = True

    def busy(self) -> bool:
        """Sessions are still held: a drain waits for them to be released (or to time out)."""
        return self.store.stats().live_sessions > 0

    def load(self) -> common_pb2.ReplicaLoad:
        """The replica's load now, as every reply reports it (orchestrators route new sessions by it)."""
        stats = self.store.stats()
        return common_pb2.ReplicaLoad(queued=self.worker.queued(), live_sessions=stats.live_sessions,
                                      memory_used=min(1.0, stats.bytes_used / max(1, self.store.max_bytes)),
                                      draining=self.draining, instance=self.instance)

    # -- RPCs shared by both services --------------------------------------------------------------
    def ReleaseSession(self, request, context):
        key = self.store_key(context, request.session_id)
        self.worker.forget(key)
        return common_pb2.ReleaseSessionResponse(released=self.store.release(key))

    def GetModelInfo(self, request, context):
        loaded = self.loaded
        return common_pb2.ModelInfo(
            model=loaded.name_or_path, vocab_size=loaded.vocab_size, max_context=loaded.max_context,
            eos_token_ids=loaded.eos_token_ids, tokenizer_fingerprint=loaded.tokenizer_fingerprint,
            device=str(loaded.device), dtype="" if loaded.dtype is None else str(loaded.dtype).removeprefix("torch."),
            num_parameters=loaded.num_parameters, max_draft_tokens=self.max_draft_tokens, load=self.load(),
            weights_fingerprint=loaded.weights_fingerprint,
            runtime="" if self.runner is None else self.runner.name, device_id=self.device_id)


def annotate_server_span(done: Timed, **attributes) -> None:
    """The call's queue and compute times, as ServerTiming reports them, on the current (gRPC SERVER) span:
    attributes rather than child spans, because each span costs CPU on the round's path and these two
    are durations the server span already bounds."""
    if not tracing_enabled():
        return
    attributes.update({"specdec.lane": done.lane, "specdec.queue_ms": done.queue_us / 1000,
                       "specdec.compute_ms": done.compute_us / 1000})
    trace.get_current_span().set_attributes(attributes)


def timing(started_ns: int, done: Timed, load: common_pb2.ReplicaLoad | None = None) -> common_pb2.ServerTiming:
    return common_pb2.ServerTiming(queue_us=done.queue_us, compute_us=done.compute_us, batch_size=done.batch_size,
                                   batch_tokens=done.batch_tokens, prefill_lane=done.lane == "prefill",
                                   total_us=(time.perf_counter_ns() - started_ns) // 1000, load=load)


def encode_to_message(encoded, message: common_pb2.ProbMatrix) -> None:
    message.rows, message.cols = encoded.rows, encoded.cols
    message.dense, message.row_offsets = encoded.dense, encoded.row_offsets
    message.col_indices, message.values = encoded.col_indices, encoded.values
