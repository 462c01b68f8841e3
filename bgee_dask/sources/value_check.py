"""One pass over counts to find the first thing wrong with them, and to summarise the rows.

numpy would need four passes and two temporary boolean arrays (``isfinite``, ``< 0``, ``min``,
``max``) per block; on a 25k-cell file those temporaries alone are ~75 MB of fresh memory.
The whole-matrix scan also sums each row, counts its detected genes and each gene's values, and
notices unsorted rows, in the same pass, so the values are read from memory once rather than four
times, and it runs on every core.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from bgee_dask._jit import numba
from bgee_dask._runtime import OncePerProcess, map_on

OK, NAN, INFINITE, NEGATIVE, TOO_LARGE, INDEX_OUT_OF_RANGE = range(6)
#: Integer counts at or above this lose precision as float32.
FLOAT32_EXACT = 1 << 24


@numba.njit(nogil=True, cache=True, inline="always")
def _problem(v, i, bound, check_int_range):  # pragma: no cover - jit
    """What is wrong with one value ``v`` at gene index ``i`` (OK when nothing)."""
    if v != v:
        return NAN
    if v < 0:
        return NEGATIVE
    if check_int_range and v >= FLOAT32_EXACT:
        return TOO_LARGE
    if v - v != 0:  # +inf (-inf was negative)
        return INFINITE
    if i < 0 or i >= bound:
        return INDEX_OUT_OF_RANGE
    return OK


@numba.njit(nogil=True, cache=True)
def _first_problem(data, indices, bound, check_int_range):  # pragma: no cover - jit
    for k in range(data.shape[0]):
        code = _problem(data[k], indices[k], bound, check_int_range)
        if code != OK:
            return code, k
    return OK, -1


def first_problem(data: np.ndarray, indices: np.ndarray, bound: int) -> tuple[int, int]:
    """(code, position) of the first bad value or index, ``(OK, -1)`` when the block is sound."""
    if data.size == 0:
        return OK, -1
    is_int = bool(np.issubdtype(data.dtype, np.integer))
    code, pos = _first_problem(data, indices, bound, is_int)
    return int(code), int(pos)


@numba.njit(nogil=True, cache=True)
def _scan_rows(indptr, indices, data, r0, r1, bound, totals, detected, gene_counts):  # pragma: no cover - jit
    """Check and summarise rows ``[r0, r1)``: (code, position, whether some row's indices are unsorted)."""
    unsorted = False
    for r in range(r0, r1):
        s = 0.0
        c = 0
        prev = -1
        for k in range(indptr[r], indptr[r + 1]):
            v = data[k]
            i = indices[k]
            code = _problem(v, i, bound, False)
            if code != OK:
                return code, k, unsorted
            if i < prev:
                unsorted = True
            prev = i
            s += v
            if v > 0:
                c += 1
            gene_counts[i] += 1
        totals[r] = s
        detected[r] = c
    return OK, -1, unsorted


@dataclass
class RowScan:
    """What one pass over a whole CSR matrix found."""

    code: int  # OK or the first problem
    position: int  # of the first problem's value, -1 when OK
    totals: np.ndarray  # per row, float64
    detected: np.ndarray  # per row: values > 0, int32
    gene_nnz: np.ndarray  # per gene: stored values, int64
    unsorted: bool  # some row's indices are not increasing


def scan_csr(
    indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, n_genes: int, executor: Executor | None = None
) -> RowScan:
    """Check a float matrix (NaN, negative, infinite, index range) and summarise its rows, on ``executor``'s threads."""
    n = indptr.shape[0] - 1
    totals = np.zeros(n, dtype=np.float64)
    detected = np.zeros(n, dtype=np.int32)
    nnz = int(indptr[-1])
    # pieces of ~4M values, however many threads there are (each with its own gene counts)
    pieces = 1 if executor is None else max(1, min(16, nnz >> 22))
    bounds = np.unique(np.searchsorted(indptr, np.linspace(0, nnz, pieces + 1), side="left").clip(0, n))
    bounds[0], bounds[-1] = 0, n
    ranges = list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)) or [(0, 0)]

    def scan(r: tuple[int, int]) -> tuple[int, int, bool, np.ndarray]:
        counts = np.zeros(n_genes, dtype=np.int64)
        code, pos, unsorted = _scan_rows(indptr, indices, data, r[0], r[1], n_genes, totals, detected, counts)
        return int(code), int(pos), bool(unsorted), counts

    results = map_on(executor, scan, ranges)
    first_bad = next(((code, pos) for code, pos, _, _ in results if code != OK), (OK, -1))
    gene_nnz = results[0][3]
    for _, _, _, counts in results[1:]:
        gene_nnz += counts
    return RowScan(first_bad[0], first_bad[1], totals, detected, gene_nnz, any(u for _, _, u, _ in results))


def load_kernels() -> None:
    """Load the scan kernel now, on this thread (numba's cache; cheap once loaded).

    What ``warm_up_in_background`` does, but before any file is open: numba's first kernel of a
    process sets up its compiler, mostly Python holding the GIL, which on a helper thread during
    the first file starved that file's obs reading.
    """
    _WARM_UP.claim()
    _load()


def warm_up_in_background() -> None:
    """Load numba and the scan kernel on a helper thread, once per process.

    For a process that converts without ``load_kernels`` having been called first (a Dask
    worker): the loading then overlaps the first file's decoding instead of following it.
    """
    _WARM_UP.start_in_background()


def _load() -> None:
    indptr = np.array([0, 1], dtype=np.int64)
    scan_csr(indptr, np.zeros(1, np.int32), np.ones(1, np.float32), 1)


_WARM_UP = OncePerProcess(_load, "bgee-dask-warm-up")
