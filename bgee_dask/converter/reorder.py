"""Streaming a source matrix in sorted cell order, in bounded memory.

Cells are stored sorted by metadata, but Bgee files stack cells library by library, so every
output block gathers rows from all over the source. Matrices of up to ``IN_MEMORY_NNZ`` values
(most Bgee files: 25k cells of ~1.5k genes are 38M values) are decoded once, in place, into
memory and handed whole to the sink, which gathers each output shard straight from it (and
may read it in another order too: the gene-major copy does). Larger ones take two passes: the
source is decoded once, in its own order, and each row is appended to a spill file for the
output block it belongs to; then every spill file is read back and its rows put in order.
Memory is then bounded by one source block plus one output block, whatever the size of the
file. CSC sources go through the same spill, as row fragments.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from queue import Full, Queue
from typing import Protocol, TypeVar

import numpy as np

from bgee_dask._runtime import release_free_heap
from bgee_dask.cancellation import check_cancelled
from bgee_dask.converter.csr_kernels import (
    count_values_per_gene,
    gather_rows,
    gather_segments,
    gather_value_range,
    row_totals,
    sort_row_indices,
)
from bgee_dask.converter.spill_records import append_record, read_records
from bgee_dask.format.layout import row_blocks
from bgee_dask.sources.h5ad import H5adSource
from bgee_dask.sources.value_check import RowScan, scan_csr
from bgee_dask.workdirs import private_dir


@dataclass
class InMemoryMatrix:
    """The whole source matrix, decoded: its row ``perm[d]`` is stored row ``d``."""

    perm: np.ndarray
    indptr: np.ndarray  # int64
    indices: np.ndarray  # int32, sorted within each row
    data: np.ndarray  # the output dtype
    dest_indptr: np.ndarray  # int64: where stored row d starts among the stored values

    def fill_sorted(self, start: int, indices_out: np.ndarray, data_out: np.ndarray) -> None:
        """Stored values ``[start, start + len(indices_out))``, as they are in stored row order."""
        gather_value_range(
            self.perm, self.indptr, self.indices, self.data, self.dest_indptr, start, indices_out, data_out
        )


class RowSink(Protocol):
    """Receives the sorted matrix: its shape first, then either the whole matrix or row ranges in order."""

    def begin(self, dest_indptr: np.ndarray, gene_nnz: np.ndarray) -> None: ...

    def matrix(self, matrix: InMemoryMatrix) -> None:
        """The whole matrix, when it is in memory; ``rows`` is then not called."""

    def rows(self, row_start: int, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> None: ...


T = TypeVar("T")

#: CSR and dense matrices with at most this many values are reordered in memory (8 bytes per
#: value: 320 MB; converting a 38M-value file this way peaks at 850 MB RSS, under the 1 GB target).
IN_MEMORY_NNZ = 40 << 20
#: CSC matrices are turned into CSR by scipy, which needs twice the memory.
IN_MEMORY_NNZ_CSC = 1 << 24
#: Values per spill bucket: one bucket is held in memory while it is put in order.
BUCKET_NNZ = 1 << 23
#: Values decoded per source block.
READ_NNZ = 1 << 23


@dataclass
class ReorderResult:
    """What streaming the matrix learned about it."""

    indptr: np.ndarray  # destination CSR offsets, int64, length n_cells + 1
    total_counts: np.ndarray  # per source row, float64
    n_genes: np.ndarray  # per source row, int32
    nnz: int
    spilled: bool


def stream_sorted(
    source: H5adSource,
    perm: np.ndarray,
    sink: RowSink,
    *,
    out_dtype: np.dtype,
    spill_dir: str | None = None,
    in_memory_nnz: int = IN_MEMORY_NNZ,
    bucket_nnz: int = BUCKET_NNZ,
    read_nnz: int = READ_NNZ,
    decoded: Future | None = None,
) -> ReorderResult:
    """Feed ``sink`` the rows ``perm[0], perm[1], ...`` in that order, in blocks.

    ``decoded`` is the matrix already being decoded by ``start_decoding``, if it was started.
    """
    n = source.n_obs
    if _fits_in_memory(source, in_memory_nnz):
        if decoded is not None:
            indptr, indices, data, scan = decoded.result()
        else:
            indptr, indices, data, scan = _read_all_csr(source, read_nnz, np.dtype(out_dtype))
        dest_indptr = _permuted_indptr(indptr, perm)
        sink.begin(dest_indptr, scan.gene_nnz)
        sink.matrix(InMemoryMatrix(perm, indptr, indices, data, dest_indptr))
        return ReorderResult(dest_indptr, scan.totals, scan.detected, int(dest_indptr[-1]), False)

    totals = np.zeros(n, dtype=np.float64)
    detected = np.zeros(n, dtype=np.int32)
    inv = np.empty(n, dtype=np.int64)
    inv[perm] = np.arange(n, dtype=np.int64)
    if source.format == "csc":
        mean_row = max(1.0, (source.nnz or 1) / max(1, n))
        rows_per_bucket = max(1, int(bucket_nnz / mean_row))
        bounds = np.arange(0, n + rows_per_bucket, rows_per_bucket, dtype=np.int64)
        bounds[-1] = n
        bounds = np.unique(np.minimum(bounds, n))
    else:
        bounds = None  # known once the source's row lengths are
    with contextlib.ExitStack() as scratch_dir:
        workdir = scratch_dir.enter_context(private_dir("spill", spill_dir))
        spill = _Spill(workdir, out_dtype)
        row_len = np.zeros(n, dtype=np.int64)
        gene_nnz = np.zeros(source.n_vars, dtype=np.int64)
        if source.format == "csc":
            for block in prefetch(source.iter_csc_blocks(nnz_per_block=read_nnz)):
                check_cancelled()
                csr = (
                    _scipy_sparse()
                    .csc_matrix((block.data, block.indices, block.indptr), shape=(n, block.col_stop - block.col_start))
                    .tocsr()
                )
                csr.sort_indices()
                rows = np.flatnonzero(np.diff(csr.indptr))
                t = np.zeros(n, dtype=np.float64)
                c = np.zeros(n, dtype=np.int32)
                row_totals(csr.indptr.astype(np.int64), csr.data, t, c)
                totals += t
                detected += c
                row_len[rows] += np.diff(csr.indptr)[rows]
                gene_nnz[block.col_start : block.col_stop] += np.diff(block.indptr)
                spill.scatter(
                    csr.indptr.astype(np.int64),
                    csr.indices.astype(np.int32) + block.col_start,
                    csr.data,
                    rows,
                    inv[rows],
                    bounds,
                )
        else:
            lengths = np.diff(source.indptr) if source.format == "csr" else None
            if lengths is not None:
                bounds = row_blocks(_permuted_indptr(source.indptr, perm), bucket_nnz)
            for block in prefetch(source.iter_csr_blocks(nnz_per_block=read_nnz)):
                check_cancelled()
                r0, r1 = block.row_start, block.row_stop
                row_totals(block.indptr, block.data, totals[r0:r1], detected[r0:r1])
                row_len[r0:r1] = np.diff(block.indptr)
                gene_nnz += count_values_per_gene(block.indices, source.n_vars)
                if bounds is None:  # dense source: a row holds at most n_vars values
                    bounds = _even_bounds(n, source.n_vars, bucket_nnz)
                rows = np.arange(r1 - r0, dtype=np.int64)
                spill.scatter(block.indptr, block.indices, block.data, rows, inv[r0:r1], bounds)
        dest_indptr = _permuted_indptr(np.concatenate([[0], np.cumsum(row_len)]), perm)
        sink.begin(dest_indptr, gene_nnz)
        for k in range(len(bounds) - 1):
            check_cancelled()
            indices, data = spill.gather(k)
            expected = int(dest_indptr[bounds[k + 1]] - dest_indptr[bounds[k]])
            if indices.size != expected:
                raise RuntimeError(f"spill bucket {k} holds {indices.size} values, expected {expected}")
            if indices.size:
                b0, b1 = int(bounds[k]), int(bounds[k + 1])
                sink.rows(b0, dest_indptr[b0 : b1 + 1] - dest_indptr[b0], indices, data)
        return ReorderResult(dest_indptr, totals, detected, int(dest_indptr[-1]), True)


def _fits_in_memory(source: H5adSource, in_memory_nnz: int) -> bool:
    nnz_hint = source.nnz if source.nnz is not None else source.n_obs * source.n_vars
    if source.format == "csc":
        in_memory_nnz = min(in_memory_nnz, IN_MEMORY_NNZ_CSC)
    return nnz_hint <= in_memory_nnz


def start_decoding(
    source: H5adSource,
    executor: Executor,
    *,
    out_dtype: np.dtype,
    in_memory_nnz: int = IN_MEMORY_NNZ,
    read_nnz: int = READ_NNZ,
) -> Future | None:
    """Decode the whole matrix on ``executor`` when it will be reordered in memory (``None`` otherwise).

    The writer sorts and writes the cell metadata meanwhile; they need no values. Errors in the
    values are raised by ``stream_sorted``, when it takes the result.
    """
    if not _fits_in_memory(source, in_memory_nnz):
        return None
    return executor.submit(_read_all_csr, source, read_nnz, np.dtype(out_dtype))


def prefetch(blocks: Iterator[T], depth: int = 1) -> Iterator[T]:
    """Decode the next source block on a helper thread while this one is processed.

    Decoding releases the GIL, so this overlaps reading with the scatter and the encoding of
    the previous block; ``depth`` blocks are held in memory in addition to the current one.
    If the consumer stops early (an error), the producer notices and ends.
    """
    queue: Queue = Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            for block in blocks:
                if not put(block):
                    return
        except BaseException as exc:  # handed to the consumer, which raises it
            put(exc)
            return
        put(done)

    thread = threading.Thread(target=produce, name="bgee-dask-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = queue.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _scipy_sparse():
    """scipy.sparse, imported for CSC sources only: Bgee writes CSR, so most conversions never pay for the import."""
    import scipy.sparse

    return scipy.sparse


def _permuted_indptr(indptr: np.ndarray, perm: np.ndarray) -> np.ndarray:
    lengths = np.diff(indptr)[perm]
    out = np.zeros(len(perm) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _even_bounds(n: int, max_row: int, bucket_nnz: int) -> np.ndarray:
    # Sized for full rows: the mean of the first block (once used here) can be far too low
    # (e.g. empty first cells), which let one bucket grow to the whole matrix.
    step = max(1, bucket_nnz // max(1, max_row))
    bounds = np.append(np.arange(0, n, step, dtype=np.int64), n)
    return np.unique(bounds)


def _read_all_csr(
    source: H5adSource, read_nnz: int, out_dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray, np.ndarray, RowScan]:
    """The whole matrix as CSR with sorted rows, and its row and gene summary."""
    if source.format == "csc":
        parts = list(source.iter_csc_blocks(nnz_per_block=read_nnz))
        indptr = np.concatenate([[0], *[p.indptr[1:] + off for p, off in _offsets(parts)]])
        indices = np.concatenate([p.indices for p in parts]) if parts else np.empty(0, np.int32)
        data = np.concatenate([p.data for p in parts]) if parts else np.empty(0, source.dtype)
        csr = _scipy_sparse().csc_matrix((data, indices, indptr), shape=(source.n_obs, source.n_vars)).tocsr()
        csr.sort_indices()
        indptr, indices, data = csr.indptr.astype(np.int64), csr.indices.astype(np.int32), csr.data
    elif source.nnz is None:  # dense: sizes are known once it is read
        parts = list(prefetch(source.iter_csr_blocks(nnz_per_block=read_nnz)))
        indptr = np.concatenate([[0], *[p.indptr[1:] + off for p, off in _offsets(parts)]]).astype(np.int64)
        indices = np.concatenate([p.indices for p in parts]) if parts else np.empty(0, np.int32)
        data = np.concatenate([p.data for p in parts]) if parts else np.empty(0, out_dtype)
    else:
        # Decoded straight into arrays of the final size: one copy of the matrix in memory, not two.
        indptr = np.asarray(source.indptr, dtype=np.int64)
        indices = np.empty(source.nnz, np.int32)
        data = np.empty(source.nnz, out_dtype)
        scan = source.read_csr_into(indices, data, nnz_per_block=read_nnz)
        if scan.unsorted:  # anndata writes rows sorted, but nothing guarantees it
            sort_row_indices(indptr, indices, data)
        release_free_heap()
        return indptr, indices, data, scan
    data = data.astype(out_dtype, copy=False)
    # these blocks were checked as they were read; the scan gives the same summary as above
    return indptr, indices, data, scan_csr(indptr, indices, data, source.n_vars)


def _offsets(parts):
    off = 0
    for p in parts:
        yield p, off
        off += int(p.indptr[-1])


def row_spill_bytes(nnz: int, n_rows: int, out_dtype: np.dtype) -> int:
    """The size of ``_Spill``'s files for a whole matrix: each value with its column index, and
    each row's destination and length (the per-record headers aside)."""
    return nnz * (4 + np.dtype(out_dtype).itemsize) + 16 * n_rows


class _Spill:
    """One append-only file per output bucket, holding records of whole rows or row fragments."""

    def __init__(self, workdir: str, out_dtype: np.dtype):
        self.workdir = workdir
        self.out_dtype = np.dtype(out_dtype)

    def _path(self, k: int) -> str:
        return os.path.join(self.workdir, f"bucket-{k:06d}.bin")

    def scatter(
        self,
        indptr: np.ndarray,
        indices: np.ndarray,
        data: np.ndarray,
        rows: np.ndarray,
        dest_rows: np.ndarray,
        bounds: np.ndarray,
    ) -> None:
        """Append rows ``rows`` of the given CSR piece to the buckets of their destination rows."""
        if rows.size == 0:
            return
        bucket = np.searchsorted(bounds, dest_rows, side="right") - 1
        order = np.argsort(bucket, kind="stable")
        rows, dest_rows, bucket = rows[order], dest_rows[order], bucket[order]
        out_i, out_d = gather_rows(indptr, indices, data, rows, self.out_dtype)
        lengths = (indptr[rows + 1] - indptr[rows]).astype(np.int64)
        row_cuts = np.flatnonzero(np.diff(bucket)) + 1
        row_starts = np.concatenate([[0], row_cuts])
        row_stops = np.concatenate([row_cuts, [rows.size]])
        nnz_offsets = np.concatenate([[0], np.cumsum(lengths)])
        for a, b in zip(row_starts.tolist(), row_stops.tolist(), strict=True):
            lo, hi = int(nnz_offsets[a]), int(nnz_offsets[b])
            arrays = [dest_rows[a:b].astype(np.int64), lengths[a:b], out_i[lo:hi], out_d[lo:hi]]
            append_record(self._path(int(bucket[a])), [b - a, hi - lo], arrays)

    def gather(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The bucket's values with its rows in destination order (fragments of a row in arrival order)."""
        fields = [(0, np.int64), (0, np.int64), (1, np.int32), (1, self.out_dtype)]
        dest, length, indices, data = read_records(self._path(k), fields, 2)
        if indices.size == 0:
            return indices, data
        starts = np.zeros(length.size, dtype=np.int64)
        np.cumsum(length[:-1], out=starts[1:])
        order = np.argsort(dest, kind="stable")
        out_i = np.empty(indices.size, dtype=np.int32)
        out_d = np.empty(indices.size, dtype=self.out_dtype)
        gather_segments(starts[order], length[order], indices, data, out_i, out_d)
        return out_i, out_d
