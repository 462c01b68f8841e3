"""The gene-major copy of an experiment's counts: an index for gene-slice queries.

Asking for a few genes over all cells of a cell-major matrix reads the whole matrix. This
copy stores the same values gene by gene (CSR of genes x cells, cell rows numbered as in the
experiment store), so ten genes over a million cells are a few megabytes read. It is a
separate store next to the AnnData one (``<EXP>.by_gene.zarr``) because ``anndata.read_zarr``
loads every member of a store, and the index is not part of the data.

When the conversion holds the whole matrix in memory, each gene range is picked out of it
directly, one pass over the matrix per range. Otherwise it is built from the sorted row stream:
values are scattered to gene-range spill files in row order, then each range is put in gene
order with a stable counting sort (the per-gene counts are known), which keeps the rows of each
gene increasing; both passes are O(n). Either way, memory is one gene range beyond what the
conversion already holds, whatever the file size.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import warnings
from concurrent.futures import Executor

import numpy as np
import zarr

from .csr_kernels import gene_range_of_rows, order_by_gene, scatter_by_bucket
from .layout import DEFAULT_CODEC, INDEX_CODEC, BloscSettings, create_values_array, write_indptr_array
from .reorder import InMemoryMatrix
from .scratch import Lease
from .shard_reader import ConsolidatedNodes
from .shards import ShardWriter
from .spill_records import append_record, read_records

GENE_INDEX_FORMAT = "bgee-dask/gene-index"
GENE_INDEX_VERSION = "1.0"
#: Values per gene-range spill bucket.
GENE_BUCKET_NNZ = 1 << 23


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
        scratch: Lease | None = None,
    ):
        self.store = store
        self.n_cells, self.n_genes = n_cells, n_genes
        self.dtype = np.dtype(dtype)
        self.codec, self.index_codec, self.executor = codec, index_codec, executor
        self.spill_dir, self.bucket_nnz = spill_dir, bucket_nnz
        self.bytes_written = 0
        self.scratch = scratch

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
            self.workdir = tempfile.mkdtemp(prefix="bgee-dask-genes-", dir=self.spill_dir)
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

            cells_out = ShardWriter(
                create_values_array(root, "indices", total, np.dtype(np.int32), self.index_codec),
                self.index_codec,
                self.executor,
                self.scratch,
            )
            data_out = ShardWriter(
                create_values_array(root, "data", total, self.dtype, self.codec),
                self.codec,
                self.executor,
                self.scratch,
            )
            # one pair of buffers for every gene range: fresh ones would be page-faulted in each time
            sizes = self.indptr[self.bounds[1:]] - self.indptr[self.bounds[:-1]]
            largest = int(sizes.max()) if sizes.size else 0
            allocate = self.scratch.empty if self.scratch is not None else np.empty
            cells_buf, values_buf = allocate(largest, np.dtype(np.int32)), allocate(largest, self.dtype)
            for k in range(len(self.bounds) - 1):
                g0, g1 = int(self.bounds[k]), int(self.bounds[k + 1])
                n = int(sizes[k])
                self._gene_range(k, g0, g1, cells_buf[:n], values_buf[:n])
                cells_out.append(cells_buf[:n])
                data_out.append(values_buf[:n])
            self._matrix = None
            if self.scratch is not None:
                self.scratch.give_back(cells_buf)
                self.scratch.give_back(values_buf)
            del cells_buf, values_buf
            cells_out.close()
            data_out.close()
            write_indptr_array(root, "indptr", self.indptr, self.codec)
            root.attrs["bgee_dask"] = {
                "format": GENE_INDEX_FORMAT,
                "format_version": GENE_INDEX_VERSION,
                "shape": [self.n_cells, self.n_genes],
                **attrs,
                "complete": True,
            }
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
                zarr.consolidate_metadata(self.store)
            self.bytes_written = cells_out.bytes_written + data_out.bytes_written
        finally:
            self.discard()

    def _gene_range(self, k: int, g0: int, g1: int, out_cells: np.ndarray, out_values: np.ndarray) -> None:
        """Cell rows and values of genes ``[g0, g1)`` into the outputs, gene by gene, each gene's rows increasing."""
        size = out_cells.size
        if size == 0:
            return
        if self._matrix is not None:
            m = self._matrix
            # the range in pieces of about equal values, on the executor's threads: the
            # pieces' genes, hence their places in the outputs, do not overlap
            cuts = np.searchsorted(self.indptr[g0 : g1 + 1], np.linspace(0, size, 3) + self.indptr[g0])
            edges = np.unique(np.concatenate([[g0], g0 + cuts.clip(0, g1 - g0), [g1]]))
            pieces = list(itertools.pairwise(edges.tolist()))

            def piece(bounds: tuple[int, int]) -> None:
                a, b = bounds
                gene_pos = self.indptr[a:b] - self.indptr[g0]  # a copy: the kernel advances it
                gene_range_of_rows(m.perm, m.indptr, m.indices, m.data, a, b, gene_pos, out_cells, out_values)

            if self.executor is not None and len(pieces) > 1:
                for _ in self.executor.map(piece, pieces):
                    pass
            else:
                for bounds in pieces:
                    piece(bounds)
            return
        cells, genes, values = self._load(k)
        if cells.size != size:
            raise RuntimeError(f"gene bucket {k} holds {cells.size} values, expected {size}")
        offsets = self.indptr[g0 : g1 + 1] - self.indptr[g0]
        order_by_gene(genes, cells, values, g0, offsets, out_cells, out_values)

    def discard(self) -> None:
        if getattr(self, "workdir", None):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _path(self, k: int) -> str:
        return os.path.join(self.workdir, f"genes-{k:05d}.bin")

    def _load(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cells, genes, values = read_records(self._path(k), [(0, np.int32), (0, np.int32), (0, self.dtype)], 1)
        return cells, genes, values


class GeneIndex:
    """Reads gene columns from a gene-major copy: for each gene, its cell rows and values."""

    def __init__(self, store: zarr.abc.store.Store, name: str = ""):
        nodes = ConsolidatedNodes(store, name or str(store))  # one request, as for ExperimentStore
        attrs = nodes.attributes.get("bgee_dask", {})
        if attrs.get("format") != GENE_INDEX_FORMAT or not attrs.get("complete"):
            raise ValueError(f"{nodes.name}: not a complete bgee-dask gene index")
        self.shape = tuple(attrs["shape"])
        self._indptr = nodes.sharded("indptr")
        self._indices = nodes.sharded("indices")
        self._data = nodes.sharded("data")

    @property
    def requests(self) -> int:
        return self._indptr.requests + self._indices.requests + self._data.requests

    def read_genes(self, genes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CSR over ``genes`` (in that order): indptr, cell rows, values."""
        genes = np.asarray(genes, dtype=np.int64)
        starts = np.empty(genes.size, dtype=np.int64)
        stops = np.empty(genes.size, dtype=np.int64)
        for i, g in enumerate(genes.tolist()):
            pair = self._indptr.read(g, g + 2)
            starts[i], stops[i] = pair[0], pair[1]
        lengths = stops - starts
        indptr = np.zeros(genes.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        cells = np.empty(int(indptr[-1]), dtype=np.int32)
        values = np.empty(int(indptr[-1]), dtype=self._data.dtype)
        for i in range(genes.size):
            if lengths[i]:
                cells[indptr[i] : indptr[i + 1]] = self._indices.read(starts[i], stops[i])
                values[indptr[i] : indptr[i + 1]] = self._data.read(starts[i], stops[i])
        return indptr, cells, values
