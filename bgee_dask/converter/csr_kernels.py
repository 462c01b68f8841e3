"""Numba kernels for moving CSR rows around; they release the GIL so threads can overlap them."""

from __future__ import annotations

import numpy as np

from bgee_dask._jit import numba


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
def gather_value_range(perm, indptr, indices, data, dest_indptr, v0, out_indices, out_data):  # pragma: no cover
    """Values ``[v0, v0 + len(out))`` of the matrix whose row ``d`` is row ``perm[d]`` of the source.

    Output ranges need not start or end at row boundaries, so the caller can fill fixed-size
    buffers (whole shards) without staging rows first.
    """
    n_out = out_indices.shape[0]
    # the destination row holding value v0 (skipping empty rows)
    lo, hi = 0, dest_indptr.shape[0] - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if dest_indptr[mid] <= v0:
            lo = mid
        else:
            hi = mid - 1
    d = lo
    pos = 0
    v = v0
    while pos < n_out:
        while dest_indptr[d + 1] <= v:
            d += 1
        a = indptr[perm[d]] + (v - dest_indptr[d])
        n = min(dest_indptr[d + 1] - v, n_out - pos)
        for k in range(n):
            out_indices[pos + k] = indices[a + k]
            out_data[pos + k] = data[a + k]
        pos += n
        v += n
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


@numba.njit(nogil=True, cache=True)
def scatter_by_bucket(
    row_start, indptr, indices, data, bucket_of_gene, n_buckets, out_cells, out_genes, out_values, bucket_offsets
):  # pragma: no cover - jit
    """Counting sort of a CSR piece's values by their gene's bucket, keeping row order inside a bucket.

    ``bucket_offsets`` (length n_buckets + 1) receives where each bucket's values start in the outputs.
    """
    bucket_offsets[:] = 0
    for k in range(indices.shape[0]):
        bucket_offsets[bucket_of_gene[indices[k]] + 1] += 1
    for b in range(n_buckets):
        bucket_offsets[b + 1] += bucket_offsets[b]
    pos = bucket_offsets[:-1].copy()
    for r in range(indptr.shape[0] - 1):
        cell = row_start + r
        for k in range(indptr[r], indptr[r + 1]):
            g = indices[k]
            b = bucket_of_gene[g]
            p = pos[b]
            out_cells[p] = cell
            out_genes[p] = g
            out_values[p] = data[k]
            pos[b] = p + 1


@numba.njit(nogil=True, cache=True)
def order_by_gene(genes, cells, values, gene_start, gene_offsets, out_cells, out_values):  # pragma: no cover - jit
    """Counting sort by gene with known per-gene offsets; stable, so each gene's cells stay increasing."""
    pos = gene_offsets[:-1].copy()
    for k in range(genes.shape[0]):
        j = genes[k] - gene_start
        p = pos[j]
        out_cells[p] = cells[k]
        out_values[p] = values[k]
        pos[j] = p + 1


@numba.njit(nogil=True, cache=True)
def gene_window_of_rows(
    perm, indptr, indices, data, g0, g1, gene_pos, v0, v1, out_cells, out_values
):  # pragma: no cover - jit
    """Values of genes ``[g0, g1)`` of rows ``perm[0], perm[1], ...``, gene by gene, in the window ``[v0, v1)``.

    Rows are numbered by their position in ``perm``. Row indices must be sorted: each row's
    first value of the genes is found by bisection, so calls share no state and run on
    different threads. ``gene_pos[g - g0]`` is where gene ``g``'s next value goes in the
    gene-major order (advanced here), which keeps each gene's rows increasing; a value placed
    at ``p`` is written to ``out[p - v0]`` when ``v0 <= p < v1`` and skipped otherwise (the
    genes cut by the window's edges).
    """
    for d in range(perm.shape[0]):
        r = perm[d]
        lo = indptr[r]
        end = indptr[r + 1]
        hi = end
        while lo < hi:
            mid = (lo + hi) // 2
            if indices[mid] < g0:
                lo = mid + 1
            else:
                hi = mid
        k = lo
        while k < end and indices[k] < g1:
            j = indices[k] - g0
            p = gene_pos[j]
            if v0 <= p < v1:
                out_cells[p - v0] = d
                out_values[p - v0] = data[k]
            gene_pos[j] = p + 1
            k += 1


@numba.njit(nogil=True, cache=True)
def sort_row_indices(indptr, indices, data):  # pragma: no cover - jit
    """Sort each row's values by gene, in place; returns whether anything had to move."""
    moved = False
    for r in range(indptr.shape[0] - 1):
        a, b = indptr[r], indptr[r + 1]
        for k in range(a + 1, b):
            if indices[k] < indices[k - 1]:
                order = np.argsort(indices[a:b], kind="mergesort")
                indices[a:b] = indices[a:b][order]
                data[a:b] = data[a:b][order]
                moved = True
                break
    return moved


@numba.njit(nogil=True, cache=True)
def count_values_per_gene(indices, n_genes):  # pragma: no cover - jit
    """How many values each gene has (a loop, not ``np.bincount``, which first copies ``indices`` to int64)."""
    counts = np.zeros(n_genes, dtype=np.int64)
    for k in range(indices.shape[0]):
        counts[indices[k]] += 1
    return counts


def load_kernels() -> None:
    """Load the kernels that put float32 counts in order (numba's cache); other dtypes load when used."""
    one_row = np.array([0, 1], dtype=np.int64)
    perm = np.zeros(1, dtype=np.int64)
    indices, data = np.zeros(1, dtype=np.int32), np.ones(1, dtype=np.float32)
    out_indices, out_data = np.empty(1, dtype=np.int32), np.empty(1, dtype=np.float32)
    gather_value_range(perm, one_row, indices, data, one_row, 0, out_indices, out_data)
    gene_window_of_rows(perm, one_row, indices, data, 0, 1, np.zeros(1, np.int64), 0, 1, out_indices, out_data)
