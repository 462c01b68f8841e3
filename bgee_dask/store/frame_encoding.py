"""obs and var in anndata's on-disk dataframe encoding, as store objects built directly.

anndata's ``write_elem`` creates every column through zarr-python, a few round trips through
zarr's event loop per array: 0.25 s of CPU for the 57 arrays of one Bgee file's obs and var,
an eighth of converting it. The encoding itself is small and documented (anndata's
"dataframe" 0.2.0: a group listing its columns, one array per plain column, a group with
codes and categories per categorical, values and mask per nullable integer), so the column
kinds Bgee files hold are written here as zarr v3 metadata documents and zstd-compressed
chunks. A frame with any other kind of column is left to anndata, whole (``encode_frame``
returns None); ``anndata.read_zarr`` reads both alike (tested).
"""

from __future__ import annotations

import json

import numcodecs
import numpy as np
import pandas as pd

#: Rows per chunk: a query block (at most 65,536 rows) reads one or two chunks of a column.
CHUNK_ROWS = 1 << 16
_ZSTD = numcodecs.Zstd(level=0)
_VLEN = numcodecs.VLenUTF8()
_ZSTD_META = {"name": "zstd", "configuration": {"level": 0, "checksum": False}}
_NUMERIC_KINDS = "biuf"


def _array_doc(n: int, data_type: str, fill_value, codecs: list[dict], attributes: dict) -> dict:
    return {
        "shape": [n],
        "data_type": data_type,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [max(1, min(n, CHUNK_ROWS))]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": fill_value,
        "codecs": codecs,
        "attributes": attributes,
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def _group_doc(attributes: dict) -> dict:
    return {"attributes": attributes, "zarr_format": 3, "node_type": "group"}


def _json(doc: dict) -> bytes:
    return json.dumps(doc).encode()


class _Objects:
    """Store keys -> bytes, under one prefix."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.items: dict[str, bytes] = {}

    def group(self, path: str, attributes: dict) -> None:
        self.items[f"{self.prefix}/{path}/zarr.json" if path else f"{self.prefix}/zarr.json"] = _json(
            _group_doc(attributes)
        )

    def numeric(self, path: str, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values)
        dtype = values.dtype
        data_type = "bool" if dtype.kind == "b" else dtype.name
        fill = False if dtype.kind == "b" else (0.0 if dtype.kind == "f" else 0)
        little = values.astype(dtype.newbyteorder("<"), copy=False)
        bytes_codec: dict = {"name": "bytes"}
        if dtype.itemsize > 1:
            bytes_codec["configuration"] = {"endian": "little"}
        attrs = {"encoding-type": "array", "encoding-version": "0.2.0"}
        self._array(path, _array_doc(len(values), data_type, fill, [bytes_codec, _ZSTD_META], attrs), little, False)

    def strings(self, path: str, values: np.ndarray) -> None:
        attrs = {"encoding-type": "string-array", "encoding-version": "0.2.0"}
        codecs = [{"name": "vlen-utf8", "configuration": {}}, _ZSTD_META]
        self._array(path, _array_doc(len(values), "string", "", codecs, attrs), values, True)

    def _array(self, path: str, doc: dict, values: np.ndarray, text: bool) -> None:
        base = f"{self.prefix}/{path}"
        self.items[f"{base}/zarr.json"] = _json(doc)
        chunk = doc["chunk_grid"]["configuration"]["chunk_shape"][0]
        for i, start in enumerate(range(0, len(values), chunk)):
            piece = values[start : start + chunk]
            if len(piece) < chunk:  # a chunk at the array's end is stored whole, padded with the fill value
                pad = np.full(chunk - len(piece), doc["fill_value"], dtype=piece.dtype)
                piece = np.concatenate([piece, pad])
            raw = _VLEN.encode(piece) if text else piece.tobytes()
            self.items[f"{base}/c/{i}"] = _ZSTD.encode(raw)


def _plain_strings(values: pd.Series | pd.Index) -> np.ndarray | None:
    """The values as an object array of str, or None if any is missing or not a str."""
    arr = np.asarray(values, dtype=object)
    # pandas' C check: "string" when every value is a str ("empty" for none); a Python loop of
    # isinstance calls was 0.03 s per 25k-cell file
    if arr.size and pd.api.types.infer_dtype(arr, skipna=False) != "string":
        return None
    return arr


def _codes_dtype(n_categories: int) -> np.dtype:
    for dtype in (np.int8, np.int16, np.int32):
        if n_categories < np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def encode_frame(frame: pd.DataFrame, prefix: str) -> dict[str, bytes] | None:
    """Store objects of ``frame`` at ``prefix`` in anndata's dataframe encoding, or None if a column
    (or the index) is of a kind only anndata writes: text with missing values, nullable booleans,
    categories that are not text, dates, a named index ..."""
    out = _Objects(prefix)
    index = _plain_strings(frame.index)
    # a named index (stored under its name) and repeated column names (an error) are anndata's to handle
    if index is None or frame.index.name is not None or "_index" in frame.columns or not frame.columns.is_unique:
        return None
    out.group("", {
        "_index": "_index",
        "column-order": [str(c) for c in frame.columns],
        "encoding-type": "dataframe",
        "encoding-version": "0.2.0",
    })  # fmt: skip
    out.strings("_index", index)
    for name in frame.columns:
        if not isinstance(name, str) or "/" in name:
            return None
        col = frame[name]
        dtype = col.dtype
        if isinstance(dtype, pd.CategoricalDtype):
            categories = _plain_strings(dtype.categories)
            if categories is None:
                return None
            codes = col.array.codes.astype(_codes_dtype(len(categories)))
            attrs = {"ordered": bool(dtype.ordered), "encoding-type": "categorical", "encoding-version": "0.2.0"}
            out.group(name, attrs)
            out.numeric(f"{name}/codes", codes)
            out.strings(f"{name}/categories", categories)
        elif isinstance(dtype, pd.Int64Dtype | pd.Int32Dtype | pd.Int16Dtype | pd.Int8Dtype):
            mask = col.isna().to_numpy()
            values = col.to_numpy(dtype=dtype.numpy_dtype, na_value=0)
            out.group(name, {"encoding-type": "nullable-integer", "encoding-version": "0.1.0"})
            out.numeric(f"{name}/values", values)
            out.numeric(f"{name}/mask", mask)
        elif isinstance(dtype, np.dtype) and dtype.kind in _NUMERIC_KINDS:
            out.numeric(name, col.to_numpy())
        elif isinstance(dtype, np.dtype) and dtype.kind == "O":
            strings = _plain_strings(col)
            if strings is None:
                return None
            out.strings(name, strings)
        else:
            return None
    return out.items


def encode_empty_mapping(prefix: str) -> dict[str, bytes]:
    """An empty mapping element (obsm, varm, layers, uns ...): a group anndata reads as ``{}``."""
    return {f"{prefix}/zarr.json": _json(_group_doc({"encoding-type": "dict", "encoding-version": "0.1.0"}))}


def encode_arrays(columns: dict[str, np.ndarray], prefix: str) -> dict[str, bytes]:
    """Numeric or boolean 1-D arrays as anndata "array" elements under ``prefix``."""
    out = _Objects(prefix)
    for name, values in columns.items():
        if values.dtype.kind not in _NUMERIC_KINDS:
            raise TypeError(f"{name}: {values.dtype} is not a numeric array")
        out.numeric(name, values)
    return out.items
