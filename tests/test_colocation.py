"""Co-location decides the overlap: draft and target that report the same GPU (ModelInfo.device_id) are drafted
for without overlap unless the operator asks, because there the drafted-ahead steps compete with verification for
the one device (docs/benchmarks.md, GPU: 1.12x with overlap against 1.45x without on an H200)."""

from __future__ import annotations

import logging

import pytest

from orchestrator.deployment import overlap_choice, shared_device
from specdec_api import common_pb2
from tests.conftest import start_stack


def info(device_id: str) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(model="m", device_id=device_id)


def test_only_the_same_reported_gpu_counts_as_shared():
    gpu, other = "GPU-7f0c2d9e-0000-4000-8000-000000000001", "GPU-7f0c2d9e-0000-4000-8000-000000000002"
    assert shared_device(info(gpu), info(gpu)) == gpu
    assert shared_device(info(gpu), info(other)) == ""
    assert shared_device(info(""), info("")) == ""  # CPUs, or services that do not say: not known to share
    assert shared_device(info(gpu), None) == ""  # no draft


def test_overlap_is_off_when_shared_on_otherwise_and_as_asked_when_asked():
    gpu = "GPU-1"
    assert overlap_choice(None, info(gpu), info(gpu)) == (False, "draft and target share GPU-1: drafting ahead "
                                                                 "would compete with verification there")
    assert overlap_choice(None, info(gpu), info("GPU-2"))[0] is True
    assert overlap_choice(None, info(""), info(""))[0] is True
    assert overlap_choice(True, info(gpu), info(gpu)) == (True, "--overlap")
    assert overlap_choice(False, info(""), info("")) == (False, "--no-overlap")


@pytest.mark.parametrize("ids,overlap", [(("GPU-a", "GPU-a"), False), (("GPU-a", "GPU-b"), True)],
                         ids=["same-gpu", "two-gpus"])
def test_the_orchestrator_reads_the_services_devices_and_says_what_it_chose(tiny, monkeypatch, caplog, ids, overlap):
    """Real services report the device id their model runs on (here a stand-in for a GPU's UUID: this machine has
    none); the orchestrator started without --overlap/--no-overlap chooses from them, logs why, and generates."""
    from serving import model_service

    reported = iter(ids)
    monkeypatch.setattr(model_service, "device_identity", lambda device: next(reported))
    with caplog.at_level(logging.INFO, logger="orchestrator.server"):
        stack = start_stack(tiny.target, tiny.draft)
    try:
        assert (stack.verify.servicer.device_id, stack.draft.servicer.device_id) == ids
        assert (stack.orchestrator.servicer.verify_pool is not None) == overlap
        assert any(f"overlap {'on' if overlap else 'off'}" in r.getMessage() for r in caplog.records)
        with stack.client() as client:
            result = client.generate("def main(", max_new_tokens=12)
        assert len(result.token_ids) == 12
    finally:
        stack.stop()
