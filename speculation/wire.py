"""Probability matrices <-> the ProbMatrix wire format (dense float32, or CSR for a bounded support).

Pure conversion between tensors and bytes; the proto message is filled by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class EncodedProbs:
    rows: int
    cols: int
    dense: bytes = b""
    row_offsets: bytes = b""
    col_indices: bytes = b""
    values: bytes = b""


def encode_probs(probs: torch.Tensor) -> EncodedProbs:
    """[rows, vocab] probabilities -> CSR when that is smaller than dense, dense otherwise."""
    rows, cols = probs.shape
    probs = probs.detach().to(torch.float32).cpu()
    nonzero = probs > 0
    nnz = int(nonzero.sum())
    if nnz * 8 + (rows + 1) * 4 < rows * cols * 4:
        counts = nonzero.sum(dim=1)
        offsets = torch.zeros(rows + 1, dtype=torch.int32)
        offsets[1:] = counts.cumsum(0)
        row_idx, col_idx = nonzero.nonzero(as_tuple=True)
        return EncodedProbs(rows, cols, row_offsets=offsets.numpy().tobytes(),
                            col_indices=col_idx.to(torch.int32).numpy().tobytes(),
                            values=probs[row_idx, col_idx].numpy().tobytes())
    return EncodedProbs(rows, cols, dense=probs.numpy().tobytes())


def decode_probs(rows: int, cols: int, dense: bytes, row_offsets: bytes, col_indices: bytes,
                 values: bytes) -> torch.Tensor:
    """The inverse of encode_probs -> [rows, cols] float32."""
    if dense:
        return torch.from_numpy(np.frombuffer(dense, dtype="<f4").copy()).view(rows, cols)
    out = torch.zeros(rows, cols, dtype=torch.float32)
    offsets = np.frombuffer(row_offsets, dtype="<i4")
    cols_np = torch.from_numpy(np.frombuffer(col_indices, dtype="<i4").astype(np.int64))
    vals = torch.from_numpy(np.frombuffer(values, dtype="<f4").copy())
    row_ids = torch.repeat_interleave(torch.arange(rows), torch.from_numpy(np.diff(offsets).astype(np.int64)))
    out[row_ids, cols_np] = vals
    return out
