"""Numba kernels for moving CSR rows around; they release the GIL so threads can overlap them."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def gather_segments(starts, lengths, src_indices, src_data, out_indices, out_data):  # pragma: no cover - jit
    """Copy segments ``[starts[i], starts[i]+lengths[i])`` one after another into the outputs."""
    pos = 0
    for i in range(starts.shape[0]):
        a = starts[i]
        n = lengths[i]
        for k in range(n):
            out_indices[pos + k] = src_indices[a + k]
            out_data[pos + k] = src_data[a + k]
        pos += n
    return pos


@numba.njit(nogil=True, cache=True)
def row_totals(indptr, data, totals, detected):  # pragma: no cover - jit
    """Per-row sum (float64) and number of positive values."""
    for r in range(indptr.shape[0] - 1):
        s = 0.0
        c = 0
        for k in range(indptr[r], indptr[r + 1]):
            v = data[k]
            s += v
            if v > 0:
                c += 1
        totals[r] = s
        detected[r] = c


def gather_rows(
    indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, rows: np.ndarray, out_dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``rows`` of a CSR matrix, concatenated in that order (values cast to ``out_dtype``)."""
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    total = int(lengths.sum())
    out_i = np.empty(total, dtype=np.int32)
    out_d = np.empty(total, dtype=out_dtype)
    gather_segments(starts, lengths, indices, data.astype(out_dtype, copy=False), out_i, out_d)
    return out_i, out_d
