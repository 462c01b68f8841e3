"""Reading gene columns from an experiment's gene-major copy (``genes.zarr``, written by ``GeneIndexBuilder``).

The copy is a CSR matrix of genes x cells: ``indptr`` (one offset per gene, plus the total),
``indices`` (each gene's cell rows, increasing) and ``data`` (their values), 1-D sharded
arrays read through zarr's public API. A gene's values are one contiguous range of
``indices`` and ``data``, so a slice reads only the inner chunks holding it.
"""

from __future__ import annotations

import numpy as np
import zarr

from .experiment import open_root
from .layout import ATTRS_KEY, GENE_INDEX_FORMAT, GENE_INDEX_VERSION


class GeneIndex:
    """An open gene-major copy, safe to share between threads.

    Raises ``ValueError`` (one line naming the store) if the store is not a complete gene index
    of a readable format version, ``FileNotFoundError`` if there is no store.
    """

    def __init__(self, store: zarr.abc.store.Store, name: str = ""):
        self.name = name or str(store)
        group = open_root(store, self.name)
        attrs = dict(group.attrs.get(ATTRS_KEY, {}))
        if attrs.get("format") != GENE_INDEX_FORMAT or not attrs.get("complete"):
            raise ValueError(f"{self.name}: not a complete bgee-dask gene index")
        if str(attrs.get("format_version", "")).split(".")[0] != GENE_INDEX_VERSION.split(".")[0]:
            raise ValueError(f"{self.name}: gene index format {attrs.get('format_version')} is not readable here")
        self.shape = tuple(int(s) for s in attrs["shape"])
        self._indptr = group["indptr"]
        self._indices = group["indices"]
        self._data = group["data"]

    def read_genes(self, genes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CSR over ``genes`` (column positions, in that order): indptr, int32 cell rows, values."""
        genes = np.asarray(genes, dtype=np.int64)
        if genes.size == 0:
            return np.zeros(1, dtype=np.int64), np.empty(0, dtype=np.int32), np.empty(0, dtype=self._data.dtype)
        bounds = self._indptr.get_coordinate_selection(np.concatenate([genes, genes + 1])).astype(np.int64)
        starts, stops = bounds[: genes.size], bounds[genes.size :]
        lengths = stops - starts
        indptr = np.zeros(genes.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        cells = np.empty(int(indptr[-1]), dtype=np.int32)
        values = np.empty(int(indptr[-1]), dtype=self._data.dtype)
        for i in np.flatnonzero(lengths).tolist():
            a, b = int(starts[i]), int(stops[i])
            cells[indptr[i] : indptr[i + 1]] = self._indices[a:b]
            values[indptr[i] : indptr[i + 1]] = self._data[a:b]
        return indptr, cells, values
