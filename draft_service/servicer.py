"""DraftService: unpack the request, run the drafter on the model worker, pack the reply."""

from __future__ import annotations

import time

from draft_service.drafters.base import Drafter, ProposeJob, encode_rows
from service_common.errors import InvalidArgument
from service_common.session_fingerprint import session_tag
from serving.model_service import ModelServiceBase, annotate_server_span, encode_to_message, timing
from specdec_api import draft_pb2, draft_pb2_grpc


class DraftServicer(ModelServiceBase, draft_pb2_grpc.DraftServiceServicer):
    def __init__(self, loaded, drafter: Drafter, store, **worker_settings):
        self.drafter = drafter
        # self.runner: the torch runner inside the drafter (None for one without a model)
        super().__init__(loaded, drafter.runner, store, **worker_settings)

    def forward(self, jobs):
        return self.drafter.propose_batch(jobs)

    def tokens_of(self, job: ProposeJob) -> int:
        return self.drafter.tokens_of(job)

    def split(self, job: ProposeJob, n: int):
        return self.drafter.split(job, n)

    def GetModelInfo(self, request, context):
        info = super().GetModelInfo(request, context)
        info.drafter = self.drafter.description
        return info

    def Propose(self, request: draft_pb2.ProposeRequest, context) -> draft_pb2.ProposeResponse:
        started = time.perf_counter_ns()
        gamma = request.num_draft_tokens
        if not 1 <= gamma <= self.max_draft_tokens:
            raise InvalidArgument(f"num_draft_tokens must be in [1, {self.max_draft_tokens}], got {gamma}")
        append = list(request.append_tokens)
        self.check_session(request.session_id, request.prefix_len, append, gamma - 1)
        sampling = self.sampling_from(request.sampling)

        if not 0.0 <= request.min_confidence <= 1.0:  # checked before the session is touched
            raise InvalidArgument(f"min_confidence must be in [0, 1], got {request.min_confidence}")
        if request.vocab_limit < 0:
            raise InvalidArgument(f"vocab_limit must be >= 0 (0: no limit), got {request.vocab_limit}")

        with self.session(request, context) as session:
            # No generator: sampled drafts are the race keyed by the request's seed (speculation/sampling.py), so a
            # retried pass draws what it would have drawn alone with nothing to put back.
            job = ProposeJob(session.cache, append, gamma, sampling, request.min_confidence,
                             request.vocab_limit, request.seed)
            done = self.submit(job, session, context)
            # The cache holds the append and as many of its own proposals as the drafter fed (the model: all but
            # the last; the n-gram lookup: none).
            session.record(append + done.result.token_ids)
            cached_len = session.length
        proposal = done.result
        annotate_server_span(done, **{"specdec.session": session_tag(request.session_id),
                                      "specdec.tokens": self.tokens_of(job), "specdec.drafter": proposal.drafter})
        reply = draft_pb2.ProposeResponse(token_ids=proposal.token_ids, cached_len=cached_len, drafter=proposal.drafter)
        if proposal.draft_probs is not None:
            encode_to_message(encode_rows(proposal.draft_probs), reply.draft_probs)
        reply.timing.CopyFrom(timing(started, done, self.load()))
        return reply
