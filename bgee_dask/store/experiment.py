"""Reading one experiment store: row ranges of X and columns of obs, for query tasks.

Opening costs one request (the consolidated metadata in the root ``zarr.json``). A Dask
worker keeps recently used stores open, so the tasks of one query share shard indexes and
categorical dictionaries.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable

import numpy as np
import pandas as pd
import zarr

from .layout import ATTRS_KEY, FORMAT_NAME, FORMAT_VERSION
from .shard_reader import ChunkedArrayReader, ConsolidatedNodes


class ExperimentStore:
    """An open experiment store.

    Opening reads only the root ``zarr.json`` (see ``ConsolidatedNodes``). zarr is still used,
    lazily, for the arrays whose layout this module does not decode itself.
    """

    def __init__(self, store: zarr.abc.store.Store, name: str = ""):
        self.name = name or str(store)
        self._store = store
        self._nodes = ConsolidatedNodes(store, self.name)
        self.attrs = self._nodes.attributes.get(ATTRS_KEY, {})
        if self.attrs.get("format") != FORMAT_NAME:
            raise ValueError(f"{self.name}: not a bgee-dask experiment store")
        if str(self.attrs.get("format_version", "")).split(".")[0] != FORMAT_VERSION.split(".")[0]:
            raise ValueError(f"{self.name}: store format {self.attrs.get('format_version')} is not readable here")
        if not self.attrs.get("complete"):
            raise ValueError(f"{self.name}: store is incomplete (its conversion did not finish)")
        self._group: zarr.Group | None = None
        self.shape = tuple(int(s) for s in self._nodes.attrs("X")["shape"])
        self._indptr = self._nodes.sharded("X/indptr")
        self._indices = self._nodes.sharded("X/indices")
        self._data = self._nodes.sharded("X/data")
        self._categories: dict[str, pd.Index] = {}
        self._lock = threading.Lock()
        self._readers: dict[str, ChunkedArrayReader | None] = {}

    @property
    def group(self) -> zarr.Group:
        """The store as a zarr group, opened on first use."""
        if self._group is None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
                self._group = zarr.open_group(self._store, mode="r", use_consolidated=True)
        return self._group

    @property
    def requests(self) -> int:
        return self._indptr.requests + self._indices.requests + self._data.requests

    @property
    def bytes_read(self) -> int:
        return self._indptr.bytes_read + self._indices.bytes_read + self._data.bytes_read

    def read_rows(self, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CSR pieces of rows ``[r0, r1)`` (indptr rebased to 0)."""
        indptr = self._indptr.read(r0, r1 + 1)
        a, b = int(indptr[0]), int(indptr[-1])
        return indptr - a, self._indices.read(a, b), self._data.read(a, b)

    def _attrs(self, path: str) -> dict:
        return self._nodes.attrs(path)

    def _read(self, path: str, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` of a 1-D array: straight from the store when its layout allows, else through zarr."""
        with self._lock:
            if path not in self._readers:
                self._readers[path] = ChunkedArrayReader.for_array(self._store, path, self._nodes.array_meta(path))
            reader = self._readers[path]
        if reader is None:
            return self.group[path][r0:r1]
        return reader.read(r0, r1)

    def obs_column(self, name: str, r0: int, r1: int) -> pd.Series:
        """Rows ``[r0, r1)`` of an obs column; categoricals keep their full category list."""
        path = f"obs/{name}"
        if path not in self._nodes:
            raise KeyError(name)
        enc = self._attrs(path).get("encoding-type")
        if enc == "categorical":
            cats = self._category_values(path)
            codes = self._read(f"{path}/codes", r0, r1)
            return pd.Series(pd.Categorical.from_codes(codes.astype(np.int64), categories=cats))
        if enc in ("nullable-integer", "nullable-boolean"):
            values = self._read(f"{path}/values", r0, r1)
            mask = self._read(f"{path}/mask", r0, r1)
            dtype = "Int64" if enc == "nullable-integer" else "boolean"
            return pd.Series(pd.array(values, dtype=dtype)).mask(mask)
        if enc in ("nullable-string-array",):
            values = self._read(f"{path}/values", r0, r1)
            mask = self._read(f"{path}/mask", r0, r1)
            return pd.Series(pd.array(values, dtype="string")).mask(mask)
        return pd.Series(self._read(path, r0, r1))

    def obs_names(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` of the obs index (the cell names)."""
        return np.asarray(self._read(f"obs/{self._attrs('obs').get('_index', '_index')}", r0, r1))

    def obs_columns(self) -> list[str]:
        return list(self._attrs("obs").get("column-order", []))

    def _category_values(self, path: str) -> pd.Index:
        with self._lock:
            cached = self._categories.get(path)
        if cached is None:
            n = int(self._nodes.array_meta(f"{path}/categories").shape[0])
            cached = pd.Index(self._read(f"{path}/categories", 0, n))
            with self._lock:
                self._categories[path] = cached
        return cached

    def var_names(self) -> pd.Index:
        var = self.group["var"]
        index_key = var.attrs.get("_index", "_index")
        return pd.Index(var[index_key][:])


class _LRU:
    """A small process-wide cache of open stores (thread-safe)."""

    def __init__(self, size: int = 64):
        self.size = size
        self._items: OrderedDict[Hashable, ExperimentStore] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, opener: Callable[[], ExperimentStore]) -> ExperimentStore:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        store = opener()
        with self._lock:
            self._items[key] = store
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return store

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


OPEN_STORES = _LRU()
