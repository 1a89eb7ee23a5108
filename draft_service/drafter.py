"""The model drafter's loop, where benchmarking/microbench.py imports it from; it lives in
draft_service/drafters/model.py (the drafter seam: draft_service/drafters/base.py)."""

from draft_service.drafters.base import Proposal, ProposeJob, split_job
from draft_service.drafters.model import propose_batch

__all__ = ["Proposal", "ProposeJob", "propose_batch", "split_job"]
