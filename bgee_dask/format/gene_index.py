"""Reading gene columns from an experiment's gene-major copy (``genes.zarr``, written by ``GeneIndexBuilder``).

The copy is a CSR matrix of genes x cells: ``indptr`` (one offset per gene, plus the total),
``indices`` (each gene's cell rows, increasing) and ``data`` (their values), 1-D sharded
arrays read through zarr's public API. A gene's values are one contiguous range of
``indices`` and ``data``, so a slice reads only the inner chunks holding it.
"""

from __future__ import annotations

import threading

import numpy as np
import zarr

from bgee_dask.format.experiment import open_root
from bgee_dask.format.layout import ATTRS_KEY, GENE_INDEX_FORMAT, GENE_INDEX_VERSION

#: Most positions asked of zarr in one coordinate selection (8 bytes each, and as many values).
COORDINATES_PER_READ = 1 << 22


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
        self._lock = threading.Lock()
        self._indptr_values: np.ndarray | None = None

    def _offsets(self) -> np.ndarray:
        """The whole ``indptr``, read on first use and kept: one number per gene, and the stores of a
        worker stay open across queries (``OPEN_STORES``), so later gene slices skip that read."""
        with self._lock:
            if self._indptr_values is None:
                self._indptr_values = self._indptr[:].astype(np.int64, copy=False)
            return self._indptr_values

    def read_genes(self, genes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CSR over ``genes`` (column positions, in that order): indptr, int32 cell rows, values."""
        genes = np.asarray(genes, dtype=np.int64)
        if genes.size == 0:
            return np.zeros(1, dtype=np.int64), np.empty(0, dtype=np.int32), np.empty(0, dtype=self._data.dtype)
        offsets = self._offsets()
        starts, stops = offsets[genes], offsets[genes + 1]
        lengths = stops - starts
        indptr = np.zeros(genes.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        cells = np.empty(int(indptr[-1]), dtype=np.int32)
        values = np.empty(int(indptr[-1]), dtype=self._data.dtype)
        for array, out in ((self._indices, cells), (self._data, values)):
            _read_ranges(array, starts, lengths, indptr, out)
        return indptr, cells, values


def _spans(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The positions ``starts[i] .. starts[i] + lengths[i] - 1`` of every range, concatenated."""
    before = np.cumsum(lengths) - lengths
    return np.repeat(starts - before, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


def _read_ranges(array: zarr.Array, starts: np.ndarray, lengths: np.ndarray, dest: np.ndarray, out: np.ndarray) -> None:
    """``array[starts[i] : starts[i] + lengths[i]]`` into ``out[dest[i] : dest[i + 1]]`` for every ``i``.

    A range longer than an inner chunk is one slice. The shorter ones (most genes of most
    experiments) go together into coordinate selections of at most ``COORDINATES_PER_READ``
    positions: one call reads the inner chunks of all of them concurrently, and a shard's index
    once, where a slice per gene would read them one after the other, each with its shard's index.
    """
    short = lengths <= array.chunks[0]
    for i in np.flatnonzero(~short).tolist():
        out[dest[i] : dest[i + 1]] = array[int(starts[i]) : int(starts[i] + lengths[i])]
    picked = np.flatnonzero(short & (lengths > 0))
    while picked.size:
        n = max(1, int(np.searchsorted(np.cumsum(lengths[picked]), COORDINATES_PER_READ, side="right")))
        batch, picked = picked[:n], picked[n:]
        values = array.get_coordinate_selection(_spans(starts[batch], lengths[batch]))
        out[_spans(dest[batch], lengths[batch])] = values
