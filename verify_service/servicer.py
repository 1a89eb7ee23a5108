"""VerifyService: unpack the request, score on the model worker, pack the reply."""

from __future__ import annotations

import time

from service_common.errors import InvalidArgument
from service_common.session_fingerprint import session_tag
from serving.model_service import ModelServiceBase, encode_to_message, annotate_server_span, timing
from specdec_api import verify_pb2, verify_pb2_grpc
from speculation.wire import encode_probs
from verify_service.verifier import ScoreJob, score_batch, split_job


class VerifyServicer(ModelServiceBase, verify_pb2_grpc.VerifyServiceServicer):
    def forward(self, jobs):
        """The pass the worker times: the forward, the probabilities and the copy to the host (verifier.py)."""
        return score_batch(self.runner, jobs)

    @staticmethod
    def tokens_of(job: ScoreJob) -> int:
        return len(job.tokens)

    @staticmethod
    def split(job: ScoreJob, n: int):
        return split_job(job, n)

    def Verify(self, request: verify_pb2.VerifyRequest, context) -> verify_pb2.VerifyResponse:
        started = time.perf_counter_ns()
        append, drafts = list(request.append_tokens), list(request.draft_token_ids)
        if len(drafts) > self.max_draft_tokens:
            raise InvalidArgument(f"at most {self.max_draft_tokens} draft tokens per call, got {len(drafts)}")
        self.check_tokens("draft_token_ids", drafts)
        self.check_session(request.session_id, request.prefix_len, append, len(drafts))
        sampling = self.sampling_from(request.sampling)

        with self.session(request, context) as session:
            job = ScoreJob(session.cache, append + drafts, len(drafts) + 1, sampling)
            done = self.submit(job, session, context)
            session.record(job.tokens)
            cached_len = session.length
        scores = done.result
        annotate_server_span(done, **{"specdec.session": session_tag(request.session_id), "specdec.tokens": self.tokens_of(job)})
        reply = verify_pb2.VerifyResponse(argmax_token_ids=scores.argmax_token_ids, cached_len=cached_len)
        if scores.target_probs is not None:
            encode_to_message(encode_probs(scores.target_probs), reply.target_probs)
        reply.timing.CopyFrom(timing(started, done, self.load()))
        return reply
