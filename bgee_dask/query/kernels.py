"""Per-block numeric kernels: plain loops over CSR rows, compiled by numba, GIL released.

They know nothing of Dask, stores or groups' names: ``blocks.py`` feeds them, and
``reduction.py`` declares how their partial results add up.
"""

from __future__ import annotations

import numpy as np

from bgee_dask._jit import numba

#: How values are transformed before accumulation.
RAW, SCALED, LOG1P_SCALED = 0, 1, 2


@numba.njit(nogil=True, cache=True)
def grouped_moments(
    indptr, indices, data, by_gene, gene_map, row0, row_group, row_scale, mode, sums, sumsq, nexpr
):  # pragma: no cover - jit
    """Add each selected cell's values into its group's sum, sum of squares and expressing count.

    ``indptr, indices, data`` is compressed sparse either way round: cell-major (``by_gene``
    false: one ``indptr`` span per cell, ``indices`` are gene positions) or gene-major (one span
    per gene, ``indices`` are cell positions). Cell position c is row ``c - row0`` of
    ``row_group`` and ``row_scale`` (positions outside them are skipped); gene position k goes
    to output column ``gene_map[k]``. A negative group or column skips the cell or gene.

    Zeros contribute nothing, so only stored values are visited. An accumulator with no rows
    (shape (0, 0)) is not wanted and left alone; cell counts are kept by the caller.
    """
    n_rows = row_group.shape[0]
    want_sums, want_sumsq, want_nexpr = sums.shape[0] > 0, sumsq.shape[0] > 0, nexpr.shape[0] > 0
    for o in range(indptr.shape[0] - 1):
        # what the outer position fixes: a gene's column, or a cell's group and scale
        j, g, scale = -1, -1, 1.0
        if by_gene:
            j = gene_map[o]
            if j < 0:
                continue
        else:
            r = o - row0
            if r < 0 or r >= n_rows:
                continue
            g = row_group[r]
            if g < 0:
                continue
            scale = row_scale[r]
        for p in range(indptr[o], indptr[o + 1]):
            if by_gene:
                r = indices[p] - row0
                if r < 0 or r >= n_rows:
                    continue
                g = row_group[r]
                if g < 0:
                    continue
                scale = row_scale[r]
            else:
                j = gene_map[indices[p]]
                if j < 0:
                    continue
            v = np.float64(data[p])
            if v == 0.0:
                continue
            if mode == SCALED:
                v = v * scale
            elif mode == LOG1P_SCALED:
                v = np.log1p(v * scale)
            if want_sums:
                sums[g, j] += v
            if want_sumsq:
                sumsq[g, j] += v * v
            if want_nexpr and v > 0.0:
                nexpr[g, j] += 1


@numba.njit(nogil=True, cache=True)
def select_rows(indptr, indices, data, rows, gene_map, out_indptr, out_indices, out_data):  # pragma: no cover
    """CSR of ``rows`` restricted to mapped genes, columns renumbered through ``gene_map``."""
    pos = 0
    out_indptr[0] = 0
    for i in range(rows.shape[0]):
        r = rows[i]
        for k in range(indptr[r], indptr[r + 1]):
            j = gene_map[indices[k]]
            if j >= 0:
                out_indices[pos] = j
                out_data[pos] = data[k]
                pos += 1
        out_indptr[i + 1] = pos
    return pos


def warm_up() -> None:
    """Load (or compile) the aggregation kernel for every argument type real blocks pass it.

    numba loads a kernel from its on-disk cache on its first call in a process; calling it here
    on tiny arrays, ahead of the first block, takes that off the block. The types must match the
    blocks' calls exactly, or the first block compiles another signature anyway: int64 indptr,
    int32 indices, float32 or float64 values (the two value types stores hold), int32 gene map
    and groups, float64 scales and sums, int64 counts.
    """
    indptr, indices = np.array([0, 1], np.int64), np.zeros(1, np.int32)
    row_group, row_scale, gene_map = np.zeros(1, np.int32), np.ones(1), np.zeros(1, np.int32)
    sums, sumsq, nexpr = np.zeros((1, 1)), np.zeros((1, 1)), np.zeros((1, 1), np.int64)
    for dtype in (np.float32, np.float64):
        data = np.ones(1, dtype)
        grouped_moments(indptr, indices, data, False, gene_map, 0, row_group, row_scale, RAW, sums, sumsq, nexpr)
