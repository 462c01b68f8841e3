"""Reading one experiment store: row ranges of X and columns of obs, for query tasks.

Everything is read through zarr's public API: the store is opened with ``zarr.open_group``
(one request when the root ``zarr.json`` carries consolidated metadata, as our stores do; a
store without it is read too, each node's metadata fetched on first use), and row ranges are
``zarr.Array`` slices, which read only the inner chunks of a shard that the range touches.
obs columns follow anndata's on-disk encodings (categorical: ``codes`` and ``categories``;
nullable arrays: ``values`` and ``mask``; plain and string arrays), read as ranges of those
arrays so that a task reads only its own rows. A Dask worker keeps recently used stores open
(``OPEN_STORES``), so the tasks of one query share the parsed metadata and the categories.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import zarr

from bgee_dask.format.layout import ATTRS_KEY, FORMAT_NAME, FORMAT_VERSION

T = TypeVar("T")


def open_root(store: zarr.abc.store.Store, name: str) -> zarr.Group:
    """The store's root group, read-only, from its consolidated metadata where it has some.

    A store with no root ``zarr.json`` is a ``FileNotFoundError`` naming it, in one line.
    """
    try:
        return zarr.open_group(store, mode="r", zarr_format=3, use_consolidated=None)
    except FileNotFoundError:  # zarr's GroupNotFoundError is one, and so is a missing directory
        raise FileNotFoundError(f"{name}: no zarr.json (not a Zarr v3 store)") from None


def as_numpy(values: np.ndarray) -> np.ndarray:
    """Values as callers expect them: text as an object array of ``str`` (zarr reads numpy's StringDType)."""
    if values.dtype.kind == "T":
        return values.astype(object)
    return values


class ExperimentStore:
    """An open experiment store (see ``docs/store-format.md``), safe to share between threads.

    Raises ``ValueError`` (one line naming the store) when the store is not a complete
    bgee-dask experiment store of a readable format version, ``FileNotFoundError`` when there
    is no store.
    """

    def __init__(self, store: zarr.abc.store.Store, name: str = ""):
        self.name = name or str(store)
        self.group: zarr.Group = open_root(store, self.name)
        self.attrs: dict = dict(self.group.attrs.get(ATTRS_KEY, {}))
        if self.attrs.get("format") != FORMAT_NAME:
            raise ValueError(f"{self.name}: not a bgee-dask experiment store")
        if str(self.attrs.get("format_version", "")).split(".")[0] != FORMAT_VERSION.split(".")[0]:
            raise ValueError(f"{self.name}: store format {self.attrs.get('format_version')} is not readable here")
        if not self.attrs.get("complete"):
            raise ValueError(f"{self.name}: store is incomplete (its conversion did not finish)")
        self._lock = threading.Lock()
        self._nodes: dict[str, zarr.Array | zarr.Group] = {}
        self._categories: dict[str, pd.Index] = {}
        self.shape = tuple(int(s) for s in self._node("X").attrs["shape"])
        self._indptr = self._array("X/indptr")
        self._indices = self._array("X/indices")
        self._data = self._array("X/data")

    def _node(self, path: str) -> zarr.Array | zarr.Group:
        """The node at ``path``, looked up once (without consolidated metadata, a lookup is a request)."""
        with self._lock:
            node = self._nodes.get(path)
        if node is None:
            node = self.group[path]  # KeyError if absent
            with self._lock:
                self._nodes[path] = node
        return node

    def _array(self, path: str) -> zarr.Array:
        node = self._node(path)
        if not isinstance(node, zarr.Array):
            raise ValueError(f"{self.name}: {path} is not an array")
        return node

    def _attrs(self, path: str) -> dict:
        return dict(self._node(path).attrs)

    def read_rows(self, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CSR pieces of rows ``[r0, r1)``: indptr rebased to 0, then the rows' column indices and values."""
        indptr = self._indptr[r0 : r1 + 1]
        a, b = int(indptr[0]), int(indptr[-1])
        return indptr - a, self._indices[a:b], self._data[a:b]

    def _read(self, path: str, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` of a 1-D array."""
        return as_numpy(self._array(path)[r0:r1])

    def obs_column(self, name: str, r0: int, r1: int) -> pd.Series:
        """Rows ``[r0, r1)`` of an obs column; categoricals keep their full category list.

        ``KeyError`` if the store has no such column.
        """
        path = f"obs/{name}"
        try:
            enc = self._attrs(path).get("encoding-type")
        except KeyError:
            raise KeyError(name) from None
        if enc == "categorical":
            cats = self._category_values(path)
            codes = self._read(f"{path}/codes", r0, r1)
            return pd.Series(pd.Categorical.from_codes(codes.astype(np.int64), categories=cats))
        if enc in ("nullable-integer", "nullable-boolean"):
            values = self._read(f"{path}/values", r0, r1)
            mask = self._read(f"{path}/mask", r0, r1)
            dtype = "Int64" if enc == "nullable-integer" else "boolean"
            return pd.Series(pd.array(values, dtype=dtype)).mask(mask)
        if enc == "nullable-string-array":
            values = self._read(f"{path}/values", r0, r1)
            mask = self._read(f"{path}/mask", r0, r1)
            return pd.Series(pd.array(values, dtype="string")).mask(mask)
        return pd.Series(self._read(path, r0, r1))

    def obs_names(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` of the obs index (the cell names)."""
        return self._read(f"obs/{self._attrs('obs').get('_index', '_index')}", r0, r1)

    def obs_columns(self) -> list[str]:
        """The obs columns, in anndata's column order (the index not included)."""
        return list(self._attrs("obs").get("column-order", []))

    def _category_values(self, path: str) -> pd.Index:
        with self._lock:
            cached = self._categories.get(path)
        if cached is None:
            cached = pd.Index(self._read(f"{path}/categories", 0, None))
            with self._lock:
                self._categories[path] = cached
        return cached

    def var_names(self) -> pd.Index:
        """The var index (the gene IDs), in the store's column order."""
        index_key = self._attrs("var").get("_index", "_index")
        return pd.Index(self._read(f"var/{index_key}", 0, None))


class _LRU:
    """A small process-wide cache of open stores (thread-safe)."""

    def __init__(self, size: int = 64):
        self.size = size
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, opener: Callable[[], T]) -> T:
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
