"""The gene-major copy of an experiment's counts: an index for gene-slice queries.

Asking for a few genes over all cells of a cell-major matrix reads the whole matrix. This
copy stores the same values gene by gene (CSR of genes x cells, cell rows numbered as in the
experiment store), so ten genes over a million cells are a few megabytes read. It is a
separate store next to the AnnData one (``genes.zarr`` beside ``cells.zarr``) because ``anndata.read_zarr``
loads every member of a store, and the index is not part of the data.

When the conversion holds the whole matrix in memory, each gene range is picked out of it
directly, one pass over the matrix per range. Otherwise it is built from the sorted row stream:
values are scattered to gene-range spill files in row order, then each range is put in gene
order with a stable counting sort (the per-gene counts are known), which keeps the rows of each
gene increasing; both passes are O(n). Either way, memory is one gene range beyond what the
conversion already holds, whatever the file size.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import Executor

import numpy as np
import zarr

from bgee_dask._runtime import map_on
from bgee_dask.cancellation import check_cancelled
from bgee_dask.converter.array_writer import ShardedArrayWriter, consolidate
from bgee_dask.converter.csr_kernels import gene_window_of_rows, order_by_gene, scatter_by_bucket
from bgee_dask.converter.reorder import InMemoryMatrix
from bgee_dask.converter.spill_records import append_record, read_records
from bgee_dask.format.layout import (
    DEFAULT_CODEC,
    GENE_INDEX_FORMAT,
    GENE_INDEX_VERSION,
    INDEX_CODEC,
    BloscSettings,
    create_values_array,
    write_indptr_array,
)
from bgee_dask.workdirs import private_dir

#: Values per gene-range spill bucket.
GENE_BUCKET_NNZ = 1 << 23


def gene_spill_bytes(nnz: int, dtype: np.dtype) -> int:
    """The size of the gene buckets' files for a whole matrix: each value with its cell and gene."""
    return nnz * (8 + np.dtype(dtype).itemsize)


class GeneIndexBuilder:
    """A ``RowSink`` that writes the gene-major copy; call ``close`` after the stream ends."""

    def __init__(
        self,
        store: zarr.abc.store.Store,
        n_cells: int,
        n_genes: int,
        dtype: np.dtype,
        *,
        codec: BloscSettings = DEFAULT_CODEC,
        index_codec: BloscSettings = INDEX_CODEC,
        executor: Executor | None = None,
        spill_dir: str | None = None,
        bucket_nnz: int = GENE_BUCKET_NNZ,
    ):
        self.store = store
        self.n_cells, self.n_genes = n_cells, n_genes
        self.dtype = np.dtype(dtype)
        self.codec, self.index_codec, self.executor = codec, index_codec, executor
        self.spill_dir, self.bucket_nnz = spill_dir, bucket_nnz

    def begin(self, dest_indptr: np.ndarray, gene_nnz: np.ndarray) -> None:
        self._matrix: InMemoryMatrix | None = None
        self.gene_nnz = gene_nnz.astype(np.int64)
        self.indptr = np.zeros(self.n_genes + 1, dtype=np.int64)
        np.cumsum(self.gene_nnz, out=self.indptr[1:])
        # gene ranges of about bucket_nnz values each (a gene bigger than that stands alone)
        bounds = [0]
        while bounds[-1] < self.n_genes:
            g0 = bounds[-1]
            g1 = int(np.searchsorted(self.indptr, self.indptr[g0] + self.bucket_nnz, side="right")) - 1
            bounds.append(min(self.n_genes, max(g1, g0 + 1)))
        self.bounds = np.asarray(bounds, dtype=np.int64)
        self.bucket_of_gene = np.repeat(np.arange(len(bounds) - 1, dtype=np.int32), np.diff(self.bounds))
        self.workdir: str | None = None

    def matrix(self, matrix: InMemoryMatrix) -> None:
        """close() will read the gene ranges from the matrix; no rows to collect."""
        self._matrix = matrix

    def rows(self, row_start: int, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> None:
        n = indices.size
        if n == 0:
            return
        if self.workdir is None:
            self._scratch_dir = contextlib.ExitStack()
            self.workdir = self._scratch_dir.enter_context(private_dir("genes", self.spill_dir))
        n_buckets = len(self.bounds) - 1
        cells = np.empty(n, dtype=np.int32)
        genes = np.empty(n, dtype=np.int32)
        values = np.empty(n, dtype=self.dtype)
        offsets = np.empty(n_buckets + 1, dtype=np.int64)
        scatter_by_bucket(
            row_start, indptr, indices, data, self.bucket_of_gene, n_buckets, cells, genes, values, offsets
        )
        for k in np.flatnonzero(np.diff(offsets)).tolist():
            a, b = int(offsets[k]), int(offsets[k + 1])
            append_record(self._path(k), [b - a], [cells[a:b], genes[a:b], values[a:b]])

    def close(self, attrs: dict) -> None:
        """Put each gene range in order, write the arrays, then the attributes and metadata."""
        try:
            root = zarr.open_group(self.store, mode="w", zarr_format=3)
            total = int(self.indptr[-1])

            cells_array = create_values_array(root, "indices", total, np.dtype(np.int32), self.index_codec)
            data_array = create_values_array(root, "data", total, self.dtype, self.codec)
            cells_out, data_out = ShardedArrayWriter(cells_array), ShardedArrayWriter(data_array)
            try:
                if self._matrix is not None:
                    self._write_from_matrix(cells_out, data_out)
                else:
                    self._write_from_spill(cells_out, data_out)
                cells_out.close()
                data_out.close()
            except BaseException:
                cells_out.stop()  # no writer thread may still be writing when the store is removed
                data_out.stop()
                raise
            write_indptr_array(root, "indptr", self.indptr, self.codec)
            root.attrs["bgee_dask"] = {
                "format": GENE_INDEX_FORMAT,
                "format_version": GENE_INDEX_VERSION,
                "shape": [self.n_cells, self.n_genes],
                **attrs,
                "complete": True,
            }
            consolidate(self.store)
        finally:
            self.discard()

    def _write_from_matrix(self, cells_out: ShardedArrayWriter, data_out: ShardedArrayWriter) -> None:
        """Transpose the in-memory matrix straight into the shard buffers, one shard at a time.

        A shard holds the genes whose values fall in its span; the genes cut by its edges are
        taken by both neighbours, each keeping its own part. Each shard is transposed in two
        halves of about equal values on the executor's threads (their genes, hence their places
        in the shard, do not overlap).
        """
        indptr = self.indptr
        while (room_cells := cells_out.writable()).size:
            check_cancelled()
            v0 = cells_out.written
            v1 = v0 + room_cells.size
            room_values = data_out.writable()[: room_cells.size]
            g0 = int(np.searchsorted(indptr, v0, side="right")) - 1  # the gene holding value v0
            g1 = int(np.searchsorted(indptr, v1, side="left"))  # the first gene starting at v1 or later
            mid = int(np.searchsorted(indptr, (v0 + v1) // 2, side="left"))
            cut = max(g0, min(mid, g1))
            jobs = [(a, b, v0, v1, room_cells, room_values) for a, b in ((g0, cut), (cut, g1)) if b > a]
            map_on(self.executor, self._transpose, jobs)
            cells_out.advance(room_cells.size)
            data_out.advance(room_cells.size)
        self._matrix = None

    def _transpose(self, job: tuple[int, int, int, int, np.ndarray, np.ndarray]) -> None:
        """Genes ``[a, b)`` of the matrix, their values in the window ``[v0, v1)`` into the rooms."""
        a, b, v0, v1, room_cells, room_values = job
        m = self._matrix
        assert m is not None
        gene_pos = self.indptr[a:b].copy()  # each gene's next value's place in the whole array
        gene_window_of_rows(m.perm, m.indptr, m.indices, m.data, a, b, gene_pos, v0, v1, room_cells, room_values)

    def _write_from_spill(self, cells_out: ShardedArrayWriter, data_out: ShardedArrayWriter) -> None:
        """Put each gene range's spill file in gene order and append it."""
        # one pair of buffers for every gene range
        sizes = self.indptr[self.bounds[1:]] - self.indptr[self.bounds[:-1]]
        largest = int(sizes.max()) if sizes.size else 0
        cells_buf, values_buf = np.empty(largest, np.dtype(np.int32)), np.empty(largest, self.dtype)
        for k in range(len(self.bounds) - 1):
            check_cancelled()
            g0, g1 = int(self.bounds[k]), int(self.bounds[k + 1])
            n = int(sizes[k])
            if n:
                cells, genes, values = self._load(k)
                if cells.size != n:
                    raise RuntimeError(f"gene bucket {k} holds {cells.size} values, expected {n}")
                offsets = self.indptr[g0 : g1 + 1] - self.indptr[g0]
                order_by_gene(genes, cells, values, g0, offsets, cells_buf[:n], values_buf[:n])
            cells_out.append(cells_buf[:n])
            data_out.append(values_buf[:n])

    def discard(self) -> None:
        scratch_dir = getattr(self, "_scratch_dir", None)
        if scratch_dir is not None:
            scratch_dir.close()
            self._scratch_dir = None

    def _path(self, k: int) -> str:
        return os.path.join(self.workdir, f"genes-{k:05d}.bin")

    def _load(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cells, genes, values = read_records(self._path(k), [(0, np.int32), (0, np.int32), (0, self.dtype)], 1)
        return cells, genes, values
