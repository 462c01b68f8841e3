"""Per-block numeric kernels: plain loops over CSR rows, compiled by numba, GIL released.

They know nothing of Dask, stores or groups' names; ``reduction.py`` decides what they are
fed and how their partial results add up.
"""

from __future__ import annotations

import numpy as np

from bgee_dask._jit import numba

#: How values are transformed before accumulation.
RAW, SCALED, LOG1P_SCALED = 0, 1, 2


@numba.njit(nogil=True, cache=True)
def grouped_moments(
    indptr, indices, data, row_group, row_scale, gene_map, mode, sums, sumsq, nexpr
):  # pragma: no cover - jit
    """Add each selected row's values into its group's sum, sum of squares and expressing count.

    ``row_group[r] < 0`` skips row r; ``gene_map[j] < 0`` skips gene j. Zeros contribute
    nothing to sums, so only stored values are visited; cell counts are kept by the caller.
    """
    for r in range(indptr.shape[0] - 1):
        g = row_group[r]
        if g < 0:
            continue
        scale = row_scale[r]
        for k in range(indptr[r], indptr[r + 1]):
            j = gene_map[indices[k]]
            if j < 0:
                continue
            v = np.float64(data[k])
            if v == 0.0:
                continue
            if mode == 1:
                v = v * scale
            elif mode == 2:
                v = np.log1p(v * scale)
            sums[g, j] += v
            sumsq[g, j] += v * v
            if v > 0.0:
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


@numba.njit(nogil=True, cache=True)
def grouped_moments_by_gene(
    gindptr, cells, values, out_cols, r0, row_group, row_scale, mode, sums, sumsq, nexpr
):  # pragma: no cover - jit
    """Same sums as ``grouped_moments``, from gene-major data: gene k's cells are ``cells[gindptr[k]:gindptr[k+1]]``.

    Cell rows are store rows; only rows ``r0 <= row < r0 + len(row_group)`` take part.
    """
    n_rows = row_group.shape[0]
    for k in range(out_cols.shape[0]):
        j = out_cols[k]
        for p in range(gindptr[k], gindptr[k + 1]):
            r = cells[p] - r0
            if r < 0 or r >= n_rows:
                continue
            g = row_group[r]
            if g < 0:
                continue
            v = np.float64(values[p])
            if v == 0.0:
                continue
            if mode == 1:
                v = v * row_scale[r]
            elif mode == 2:
                v = np.log1p(v * row_scale[r])
            sums[g, j] += v
            sumsq[g, j] += v * v
            if v > 0.0:
                nexpr[g, j] += 1
