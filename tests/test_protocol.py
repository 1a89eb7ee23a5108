"""The wire contracts: committed stubs match the .proto files, and probability matrices round-trip."""

import filecmp

import pytest
import torch

from protos.build_stubs import STUBS_ROOT, build
from speculation.sampling import Sampling, logits_to_probs
from speculation.wire import decode_probs, encode_probs


def test_committed_stubs_are_not_stale(tmp_path):
    fresh = build(tmp_path)
    committed = STUBS_ROOT / "specdec_api"
    assert fresh, "protoc produced nothing"
    for path in fresh:
        twin = committed / path.name
        assert twin.exists(), f"{twin} missing: run `python protos/build_stubs.py`"
        assert filecmp.cmp(path, twin, shallow=False), f"{twin} is stale: run `python protos/build_stubs.py`"
    assert {p.name for p in fresh} == {p.name for p in committed.glob("*_pb2*.py*")}


@pytest.mark.parametrize("sampling,sparse", [(Sampling(1.0), False), (Sampling(1.0, top_k=5), True),
                                             (Sampling(0.8, top_p=0.3), True)], ids=str)
def test_probabilities_round_trip_exactly_dense_or_sparse(sampling, sparse):
    torch.manual_seed(0)
    probs = logits_to_probs(torch.randn(4, 300) * 2, sampling)
    encoded = encode_probs(probs)
    assert bool(encoded.col_indices) == sparse and bool(encoded.dense) != sparse
    decoded = decode_probs(encoded.rows, encoded.cols, encoded.dense, encoded.row_offsets, encoded.col_indices,
                           encoded.values)
    assert torch.equal(decoded, probs)
    size = len(encoded.dense) + len(encoded.row_offsets) + len(encoded.col_indices) + len(encoded.values)
    if sparse:
        assert size < probs.numel() * 4 / 4
