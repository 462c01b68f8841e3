"""Reading obs and var of an H5AD file without anndata, for the encodings Bgee files use.

anndata's reader is general, but importing it is heavy (it brings in dask.array, sparse
and numba's array support), which a conversion run paid before its first file, and it reads a
frame through a registry of readers per element. Bgee's files, in every layout, hold data
frames (encoding 0.2.0) of categorical, string-array and plain array columns only; those are
read here straight from h5py. A frame holding anything else (nullable arrays, older encodings)
is handed to anndata, imported then, so every file anndata can read is still read.

With ``text_as_arrow``, text columns and the index are Arrow-backed strings (``string[pyarrow]``),
decoded a slice at a time: a file of millions of cells holds a few columns of unique text (cell
names, barcodes), which as one array of Python strings each would cost about 100 bytes a cell.
"""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa

#: Rows of a text array decoded to Python strings at a time when it is read as Arrow strings.
TEXT_ROWS = 1 << 18


def _attr(node: h5py.HLObject, key: str) -> str | None:
    value = node.attrs.get(key)
    return value.decode() if isinstance(value, bytes) else value


def _encoding(node: h5py.HLObject) -> tuple[str | None, str | None]:
    return _attr(node, "encoding-type"), _attr(node, "encoding-version")


def _plain_array(
    node: h5py.HLObject, text_as_arrow: bool = False
) -> np.ndarray | pd.api.extensions.ExtensionArray | None:
    """A string-array (as Python ``str`` objects, like anndata, or as Arrow strings) or a numeric/boolean array."""
    if not isinstance(node, h5py.Dataset) or node.ndim != 1:
        return None
    kind = _encoding(node)
    if kind == ("string-array", "0.2.0"):
        return _arrow_text(node) if text_as_arrow else node.asstr()[...]
    if kind == ("array", "0.2.0") and node.dtype.kind in "biuf":
        return node[...]
    return None


def _arrow_text(node: h5py.Dataset) -> pd.api.extensions.ExtensionArray:
    text = node.asstr()
    pieces = [pa.array(text[i : i + TEXT_ROWS], type=pa.large_string()) for i in range(0, node.shape[0], TEXT_ROWS)]
    return pd.arrays.ArrowStringArray(pa.chunked_array(pieces, type=pa.large_string()))


def _column(
    node: h5py.HLObject, text_as_arrow: bool = False
) -> np.ndarray | pd.Categorical | pd.api.extensions.ExtensionArray | None:
    """One column as anndata reads it, or ``None`` when its encoding is not one of ours."""
    if isinstance(node, h5py.Group):
        if _encoding(node) != ("categorical", "0.2.0") or set(node.keys()) != {"codes", "categories"}:
            return None
        codes, categories = node["codes"], _plain_array(node["categories"])
        if categories is None or not isinstance(codes, h5py.Dataset) or codes.dtype.kind not in "iu":
            return None
        ordered = bool(node.attrs.get("ordered", False))
        return pd.Categorical.from_codes(codes[...], categories=categories, ordered=ordered)
    return _plain_array(node, text_as_arrow)


def read_frame(group: h5py.Group, *, text_as_arrow: bool = False) -> pd.DataFrame:
    """The data frame stored at ``group`` (obs or var), equal to ``anndata.io.read_elem(group)``
    (with ``text_as_arrow``: the same values, text columns and index as ``string[pyarrow]``)."""
    if isinstance(group, h5py.Group) and _encoding(group) == ("dataframe", "0.2.0"):
        frame = _read_known(group, text_as_arrow)
        if frame is not None:
            return frame
    from anndata.io import read_elem  # anything else: anndata's general reader

    return read_elem(group)


def _column_names(group: h5py.Group) -> list[str]:
    order = group.attrs.get("column-order", [])
    return [c.decode() if isinstance(c, bytes) else str(c) for c in np.atleast_1d(order)]


def peek_frame(group: h5py.Group) -> tuple[list[str], int] | None:
    """(column names, number of rows) of a frame in one of our encodings, from its metadata alone.

    Opening a source needs only these to name its layout and check the matrix's shape, so the
    matrix can be decoding while the frames' strings (most of the time it takes to open) are read.
    ``None`` when the frame is in another encoding: the caller then reads the whole frame.
    """
    if not isinstance(group, h5py.Group) or _encoding(group) != ("dataframe", "0.2.0"):
        return None
    index_key = _attr(group, "_index")
    index = group.get(index_key) if index_key is not None else None
    if not isinstance(index, h5py.Dataset) or index.ndim != 1:
        return None
    return _column_names(group), int(index.shape[0])


def _read_known(group: h5py.Group, text_as_arrow: bool = False) -> pd.DataFrame | None:
    index_key = _attr(group, "_index")
    names = _column_names(group)
    if index_key is None or index_key not in group:
        return None
    index = _column(group[index_key], text_as_arrow)
    if index is None:
        return None
    columns = {}
    for name in names:
        if name not in group:
            return None
        column = _column(group[name], text_as_arrow)
        if column is None:
            return None
        columns[name] = column
    frame = pd.DataFrame(columns, index=pd.Index(index), columns=names)
    frame.index.name = None if index_key == "_index" else index_key
    return frame
