"""DraftService: unpack the request, run the drafter on the model worker, pack the reply."""

from __future__ import annotations

import time

from draft_service.drafter import ProposeJob, propose_batch, split_job
from service_common.errors import InvalidArgument
from service_common.session_fingerprint import session_tag
from serving.model_service import ModelServiceBase, encode_to_message, annotate_server_span, timing
from specdec_api import draft_pb2, draft_pb2_grpc
from speculation.sampling import seeded_generator
from speculation.wire import encode_probs


class DraftServicer(ModelServiceBase, draft_pb2_grpc.DraftServiceServicer):
    def forward(self, jobs):
        return propose_batch(self.runner, jobs)

    @staticmethod
    def tokens_of(job: ProposeJob) -> int:
        # What it feeds: the new committed tokens, then its own drafts but the last (a chunk: gamma 0).
        return len(job.append) + max(job.gamma - 1, 0)

    @staticmethod
    def split(job: ProposeJob, n: int):
        return split_job(job, n)

    def Propose(self, request: draft_pb2.ProposeRequest, context) -> draft_pb2.ProposeResponse:
        started = time.perf_counter_ns()
        gamma = request.num_draft_tokens
        if not 1 <= gamma <= self.max_draft_tokens:
            raise InvalidArgument(f"num_draft_tokens must be in [1, {self.max_draft_tokens}], got {gamma}")
        append = list(request.append_tokens)
        self.check_session(request.session_id, request.prefix_len, append, gamma - 1)
        sampling = self.sampling_from(request.sampling)
        generator = None
        if not sampling.greedy:
            generator = seeded_generator(request.seed)

        if not 0.0 <= request.min_confidence <= 1.0:  # checked before the session is touched
            raise InvalidArgument(f"min_confidence must be in [0, 1], got {request.min_confidence}")
        if request.vocab_limit < 0:
            raise InvalidArgument(f"vocab_limit must be >= 0 (0: no limit), got {request.vocab_limit}")

        with self.session(request, context) as session:
            job = ProposeJob(session.cache, append, gamma, sampling, generator, request.min_confidence,
                             request.vocab_limit, request.seed)
            done = self.submit(job, session, context)
            session.record(append + done.result.token_ids)  # the cache holds all but the last proposal
            cached_len = session.length
        annotate_server_span(done, **{"specdec.session": session_tag(request.session_id), "specdec.tokens": self.tokens_of(job)})
        reply = draft_pb2.ProposeResponse(token_ids=done.result.token_ids, cached_len=cached_len)
        if done.result.draft_probs is not None:
            encode_to_message(encode_probs(done.result.draft_probs), reply.draft_probs)
        reply.timing.CopyFrom(timing(started, done, self.load()))
        return reply
