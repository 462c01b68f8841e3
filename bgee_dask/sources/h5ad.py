"""One Bgee H5AD file, seen through the canonical schema.

Opening a source validates everything that can be checked without decoding the matrix
(HDF5 readable, X present, shapes consistent, names unique, layout known), so that a bad file
fails before anything is written for it. Values are checked block by block as they stream.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute
from pandas.api.types import infer_dtype

from bgee_dask.schema import (
    CANONICAL_COLUMNS,
    INTEGER_COLUMNS,
    PLACEHOLDER_CELL_TYPE,
    SPECIES_TAXON,
    BgeeInputError,
    canonical_column_map,
    check_identifier,
    detect_layout,
    parse_bgee_filename,
    species_from_taxon,
)
from bgee_dask.sources import value_check
from bgee_dask.sources.chunks import ChunkedReader
from bgee_dask.sources.frame_reader import peek_frame, read_frame

#: Rows of X whose sums are within this relative distance of 1e6 look like CPM.
_CPM_TOLERANCE = 1e-3
_CPM_SAMPLE_ROWS = 256


@dataclass
class CsrBlock:
    """Rows ``[row_start, row_stop)`` of the counts matrix as CSR pieces (indptr starts at 0)."""

    row_start: int
    row_stop: int
    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray


@dataclass
class CscBlock:
    """Columns ``[col_start, col_stop)`` of the counts matrix as CSC pieces (indptr starts at 0)."""

    col_start: int
    col_stop: int
    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray


def _fail(path: str, problem: str) -> BgeeInputError:
    return BgeeInputError(path, problem)


class H5adSource:
    """An open, validated Bgee H5AD file."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        experiment_id: str | None = None,
        species: str | None = None,
        executor: Executor | None = None,
        on_matrix: Callable[[H5adSource], Callable[[], None] | None] | None = None,
    ):
        """Open and validate ``path``.

        ``on_matrix`` is called once the counts matrix is open and checked, before obs and var
        are read (their strings are most of the time opening takes), so that the caller can start
        decoding meanwhile. If opening then fails, what it returned is called before the file
        is closed: that is where the caller stops whatever is still reading.
        """
        self.path = os.fspath(path)
        self.name = os.path.basename(self.path)
        self.executor = executor
        #: called with the number of values each decoded block holds (progress bars)
        self.on_read: Callable[[int], None] | None = None
        self._stop_readers: Callable[[], None] | None = None  # set by ``on_matrix`` while opening
        if not os.path.exists(self.path):
            raise _fail(self.path, "no such file")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as exc:
            msg = str(exc)
            if "signature" in msg:
                raise _fail(self.path, "not an HDF5 file") from None
            if "truncat" in msg or "eof" in msg.lower():
                raise _fail(self.path, "truncated HDF5 file (file is shorter than its header says)") from None
            raise _fail(self.path, f"cannot open as HDF5 ({msg.splitlines()[0]})") from None
        try:
            self._inspect(experiment_id, species, on_matrix)
        except BgeeInputError:
            self.close()
            raise
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
            self.close()
            raise _fail(self.path, f"corrupt or unreadable file ({type(exc).__name__}: {exc})") from None
        self._stop_readers = None  # opened: the caller's own exit stops its readers

    # -- opening ---------------------------------------------------------------------------
    def _inspect(
        self,
        experiment_id: str | None,
        species: str | None,
        on_matrix: Callable[[H5adSource], Callable[[], None] | None] | None,
    ) -> None:
        f = self.file
        if "X" not in f:
            raise _fail(self.path, "no X matrix")
        if "obs" not in f or "var" not in f:
            raise _fail(self.path, "no obs or var table")
        layers = set(f["layers"].keys()) if "layers" in f else set()
        uns = set(f["uns"].keys()) if "uns" in f else set()
        obs_shape, var_shape = peek_frame(f["obs"]), peek_frame(f["var"])
        raw_obs = self.var = None
        if obs_shape is None:  # not our encoding: the whole frame gives its columns and length
            raw_obs = read_frame(f["obs"], text_as_arrow=True)
            obs_shape = (list(raw_obs.columns), len(raw_obs))
        if var_shape is None:
            self.var = read_frame(f["var"])
            var_shape = (list(self.var.columns), len(self.var))
        try:
            self.layout = detect_layout(obs_shape[0], uns, layers)
        except ValueError as exc:
            raise _fail(self.path, str(exc)) from None
        self.n_obs, self.n_vars = obs_shape[1], var_shape[1]
        self.counts_key, self.cpm_in_x = self._choose_counts(layers)
        self._open_matrix(self.counts_key)
        if on_matrix is not None:
            self._stop_readers = on_matrix(self)
        if raw_obs is None:
            raw_obs = read_frame(f["obs"], text_as_arrow=True)
        if self.var is None:
            self.var = read_frame(f["var"])
        dups = _repeated(raw_obs.index)
        if dups:
            raise _fail(self.path, f"duplicate cell names in obs (e.g. {dups})")
        dups = _repeated(self.var.index)
        if dups:
            raise _fail(self.path, f"duplicate gene ids in var (e.g. {dups})")
        self.obs = self._canonical_obs(raw_obs, experiment_id, species)

    def _open_matrix(self, key: str) -> None:
        node = self.file[key]
        shape_here: tuple[int, int]
        if isinstance(node, h5py.Dataset):
            if node.ndim != 2:
                raise _fail(self.path, f"{key} is a {node.ndim}-D array, expected cells x genes")
            self.format = "dense"
            shape_here = tuple(node.shape)  # type: ignore[assignment]
            self.dtype = node.dtype
            self.nnz = None
        else:
            enc = node.attrs.get("encoding-type", "")
            if isinstance(enc, bytes):
                enc = enc.decode()
            if enc not in ("csr_matrix", "csc_matrix"):
                raise _fail(self.path, f"{key} has encoding {enc!r}; expected csr_matrix or csc_matrix")
            for part in ("data", "indices", "indptr"):
                if part not in node:
                    raise _fail(self.path, f"{key} has no '{part}' array")
            self.format = "csr" if enc == "csr_matrix" else "csc"
            shape_here = tuple(int(s) for s in node.attrs["shape"])  # type: ignore[assignment]
            data, indices, indptr = node["data"], node["indices"], node["indptr"]
            self.dtype = data.dtype
            self.nnz = int(data.shape[0])
            if indices.shape[0] != self.nnz:
                raise _fail(self.path, f"{key}: indices ({indices.shape[0]}) and data ({self.nnz}) differ in length")
            major = shape_here[0] if self.format == "csr" else shape_here[1]
            if indptr.shape[0] != major + 1:
                raise _fail(
                    self.path, f"{key}: indptr has {indptr.shape[0]} entries, shape {shape_here} needs {major + 1}"
                )
            self.indptr = indptr[:].astype(np.int64)
            if self.indptr[0] != 0 or self.indptr[-1] != self.nnz or np.any(np.diff(self.indptr) < 0):
                raise _fail(self.path, f"{key}: indptr is not a valid offset array for {self.nnz} values")
            self._close_readers()  # of X, when the counts turned out to be in a layer
            self._data = ChunkedReader(data, self.executor)
            self._indices = ChunkedReader(indices, self.executor)
        if not (np.issubdtype(self.dtype, np.floating) or np.issubdtype(self.dtype, np.integer)):
            raise _fail(self.path, f"{key} has dtype {self.dtype}; expected float or integer counts")
        if shape_here != (self.n_obs, self.n_vars):
            raise _fail(
                self.path,
                f"{key} shape {shape_here} disagrees with obs ({self.n_obs} cells) and var ({self.n_vars} genes)",
            )
        self._node = node

    def _choose_counts(self, layers: set[str]) -> tuple[str, bool]:
        """Detect Bgee's known writer bug: CPM in X with the raw counts in ``layers['abundance']``."""
        if "abundance" not in layers:
            return "X", False
        self._open_matrix("X")
        x_sums = self._sample_row_sums()
        x_is_cpm = x_sums.size > 0 and bool(np.all(np.abs(x_sums - 1e6) <= _CPM_TOLERANCE * 1e6))
        if not x_is_cpm:
            return "X", False
        self._open_matrix("layers/abundance")
        layer_vals = self._sample_values()
        layer_integral = layer_vals.size > 0 and bool(np.all(layer_vals == np.round(layer_vals)))
        if not layer_integral:
            raise _fail(
                self.path,
                "X looks like CPM (row sums near 1e6) but layers['abundance'] is not integral either; "
                "cannot tell which matrix holds raw counts",
            )
        return "layers/abundance", True

    def _sample_row_sums(self) -> np.ndarray:
        n = min(_CPM_SAMPLE_ROWS, self.n_obs)
        if self.format == "csr":
            block = next(self.iter_csr_blocks(rows_per_block=n, stop=n))
            # np.add.reduceat fails when the last sampled rows are empty; bincount handles empty rows
            rows = np.repeat(np.arange(n), np.diff(block.indptr))
            return np.bincount(rows, weights=block.data.astype(np.float64), minlength=n)
        if self.format == "dense":
            return self._node[:n].astype(np.float64).sum(axis=1)
        # CSC: the first rows are spread over every column, so this reads X once
        sums = np.zeros(n, dtype=np.float64)
        for block in self.iter_csc_blocks():
            keep = block.indices < n
            sums += np.bincount(block.indices[keep], weights=block.data[keep].astype(np.float64), minlength=n)
        return sums

    def _sample_values(self) -> np.ndarray:
        if self.format == "dense":
            return self._node[: min(_CPM_SAMPLE_ROWS, self.n_obs)].ravel()
        return self._data.read(0, min(self.nnz or 0, 1 << 16))

    def _canonical_obs(self, raw: pd.DataFrame, experiment_id: str | None, species: str | None) -> pd.DataFrame:
        mapping = canonical_column_map(self.layout, list(raw.columns))
        obs = raw.rename(columns=mapping)
        from_name = parse_bgee_filename(self.path)
        exp = experiment_id
        if exp is None and from_name:
            exp = from_name[1]
        if exp is None and "experimentId" in obs and obs["experimentId"].notna().any():
            values = pd.unique(obs["experimentId"].dropna().astype(str))
            if len(values) != 1:
                raise _fail(self.path, f"obs names several experiments {list(values)[:3]}; pass experiment_id")
            exp = str(values[0])
        if exp is None:
            raise _fail(self.path, "experiment id unknown: not in the file name nor in obs; pass experiment_id")
        sp = species
        if sp is None and from_name:
            sp = from_name[0]
        if sp is None and "speciesId" in obs and obs["speciesId"].notna().any():
            sp = species_from_taxon(int(pd.to_numeric(obs["speciesId"]).dropna().iloc[0]))
        if sp is None:
            raise _fail(self.path, "species unknown: not in the file name nor in obs; pass species")
        try:
            self.experiment_id = check_identifier("experiment id", str(exp))
            self.species = check_identifier("species", str(sp))
        except ValueError as exc:
            raise _fail(self.path, str(exc)) from None
        obs["experimentId"] = pd.Categorical.from_codes(np.zeros(len(obs), dtype=np.int8), [self.experiment_id])
        if "speciesId" not in obs and self.species in SPECIES_TAXON:
            obs["speciesId"] = SPECIES_TAXON[self.species]
        if self.layout == "D":
            # Layout D replaced Bgee's placeholder cell type by "unknown"; restore it so one
            # filter means the same thing in every layout.
            for col, placeholder in zip(("cellTypeId", "cellTypeName"), PLACEHOLDER_CELL_TYPE, strict=True):
                if col in obs:
                    values = obs[col].astype(object)
                    obs[col] = values.where(values != "unknown", placeholder)
        for col in CANONICAL_COLUMNS:
            if col not in obs:
                obs[col] = pd.array([pd.NA] * len(obs), dtype="Int64" if col in INTEGER_COLUMNS else "string")
        for col in INTEGER_COLUMNS:
            try:
                obs[col] = pd.to_numeric(obs[col].astype(object)).astype("Int64")
            except (ValueError, TypeError):
                raise _fail(self.path, f"obs column {col!r} should hold integers") from None
        for col in CANONICAL_COLUMNS:
            if col not in INTEGER_COLUMNS:
                obs[col] = _as_text(obs[col], self.path, col)
        ordered = list(CANONICAL_COLUMNS) + [c for c in obs.columns if c not in CANONICAL_COLUMNS]
        return _compact_strings(obs[ordered])

    def take_obs(self) -> pd.DataFrame:
        """The canonical obs, handed over: this source keeps no reference to it afterwards.

        A million cells' metadata are several hundred MB of Python objects; the writer sorts
        and writes them, then lets them go before the matrix streams.
        """
        obs, self.obs = self.obs, None
        if obs is None:
            raise RuntimeError(f"{self.path}: obs was already taken")
        return obs

    # -- streaming -------------------------------------------------------------------------
    def iter_csr_blocks(
        self, *, nnz_per_block: int = 1 << 23, rows_per_block: int | None = None, stop: int | None = None
    ) -> Iterator[CsrBlock]:
        """Row blocks of a CSR or dense matrix, validated as they are decoded."""
        stop = self.n_obs if stop is None else min(stop, self.n_obs)
        if self.format == "dense":
            step = rows_per_block or max(1, nnz_per_block // max(1, self.n_vars))
            for r0 in range(0, stop, step):
                r1 = min(stop, r0 + step)
                dense = self._node[r0:r1]
                yield self._checked_csr(r0, r1, *_dense_to_csr(dense))
            return
        if self.format != "csr":
            raise RuntimeError("iter_csr_blocks needs a CSR or dense matrix")
        indptr = self.indptr
        if rows_per_block:
            bounds = [(r0, min(stop, r0 + rows_per_block)) for r0 in range(0, stop, rows_per_block)]
        else:
            bounds = _blocks(indptr, stop, nnz_per_block)
        for r0, r1 in bounds:
            a, b = int(indptr[r0]), int(indptr[r1])
            yield self._checked_csr(r0, r1, indptr[r0 : r1 + 1] - a, self._indices.read(a, b), self._data.read(a, b))

    def read_csr_into(
        self, indices: np.ndarray, data: np.ndarray, *, nnz_per_block: int = 1 << 23
    ) -> value_check.RowScan:
        """All values of a CSR matrix decoded straight into ``indices`` and ``data`` (``nnz`` long), validated.

        Blocks are decoded in place when the dtypes match, so the matrix exists once in memory;
        the whole matrix is then checked and summarised in one parallel pass, whose row sums,
        detected genes and per-gene counts are returned.
        """
        if self.format != "csr":
            raise RuntimeError("read_csr_into needs a CSR matrix")
        indptr = self.indptr
        for r0, r1 in _blocks(indptr, self.n_obs, nnz_per_block):
            a, b = int(indptr[r0]), int(indptr[r1])
            got_indices, indices_placed = _read_maybe_into(self._indices, a, b, indices[a:b])
            got_data, data_placed = _read_maybe_into(self._data, a, b, data[a:b])
            if not (data_placed and indices_placed):
                # checked before the cast: a cast to float32 would hide integers beyond its range
                # (and one to int32 indices out of range)
                self._check_values(got_data, got_indices, self.n_vars, f"rows {r0}-{r1}")
            if not data_placed:
                data[a:b] = got_data
            if not indices_placed:
                indices[a:b] = got_indices
            if self.on_read is not None:
                self.on_read(b - a)
        scan = value_check.scan_csr(indptr, indices, data, self.n_vars, self.executor)
        if scan.code != value_check.OK:
            row = int(np.searchsorted(indptr, scan.position, side="right")) - 1
            self._raise_problem(scan.code, data, scan.position, f"row {row}")
        return scan

    def iter_csc_blocks(self, *, nnz_per_block: int = 1 << 23) -> Iterator[CscBlock]:
        """Column blocks of a CSC matrix, validated as they are decoded."""
        if self.format != "csc":
            raise RuntimeError("iter_csc_blocks needs a CSC matrix")
        indptr = self.indptr
        for c0, c1 in _blocks(indptr, self.n_vars, nnz_per_block):
            a, b = int(indptr[c0]), int(indptr[c1])
            data, indices = self._data.read(a, b), self._indices.read(a, b)
            self._check_values(data, indices, self.n_obs, f"columns {c0}-{c1}")
            if self.on_read is not None:
                self.on_read(int(data.size))
            yield CscBlock(c0, c1, indptr[c0 : c1 + 1] - a, indices, data)

    def _checked_csr(self, r0: int, r1: int, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> CsrBlock:
        self._check_values(data, indices, self.n_vars, f"rows {r0}-{r1}")
        if self.on_read is not None:
            self.on_read(int(data.size))
        return CsrBlock(r0, r1, indptr, indices, data)

    def _check_values(self, data: np.ndarray, indices: np.ndarray, bound: int, where: str) -> None:
        code, pos = value_check.first_problem(data, indices, bound)
        if code != value_check.OK:
            self._raise_problem(code, data, pos, where)

    def _raise_problem(self, code: int, data: np.ndarray, pos: int, where: str) -> None:
        problem = {
            value_check.NAN: "NaN values",
            value_check.INFINITE: "infinite values",
            value_check.NEGATIVE: "negative values",
        }.get(code)
        if problem is not None:
            raise _fail(self.path, f"{problem} in {self.counts_key} ({where})")
        if code == value_check.TOO_LARGE:
            raise _fail(
                self.path,
                f"count {data[pos]} in {self.counts_key} ({where}) exceeds float32's exact range",
            )
        raise _fail(self.path, f"{self.counts_key} indices out of range ({where})")

    @property
    def out_dtype(self) -> np.dtype:
        """Counts are stored as float32 unless the source needs float64's precision."""
        return np.dtype(np.float64) if self.dtype == np.float64 else np.dtype(np.float32)

    def _close_readers(self) -> None:
        for reader in (getattr(self, "_data", None), getattr(self, "_indices", None)):
            if reader is not None:
                reader.close()

    def close(self) -> None:
        stop, self._stop_readers = self._stop_readers, None
        if stop is not None:  # opening failed while the caller was decoding: it ends before the file closes
            stop()
        self._close_readers()
        with contextlib.suppress(Exception):  # already closed or never opened
            self.file.close()

    def __enter__(self) -> H5adSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _blocks(indptr: np.ndarray, stop: int, nnz_per_block: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges of the major axis (rows or columns) up to ``stop``, ~``nnz_per_block`` values each."""
    r0 = 0
    while r0 < stop:
        r1 = int(np.searchsorted(indptr, indptr[r0] + nnz_per_block, side="right")) - 1
        r1 = min(stop, max(r1, r0 + 1))
        yield r0, r1
        r0 = r1


def _read_maybe_into(reader: ChunkedReader, start: int, stop: int, out: np.ndarray) -> tuple[np.ndarray, bool]:
    """The values, and whether they were decoded into ``out`` (possible when it has the source's dtype)."""
    if out.dtype == reader.dtype and out.flags.c_contiguous:
        return reader.read_into(start, stop, out), True
    return reader.read(start, stop), False


def _repeated(index: pd.Index, n: int = 3) -> list:
    """Up to ``n`` values that occur more than once in ``index``.

    Hashes the index's own array: pandas' ``Index.has_duplicates`` builds (and keeps) a lookup
    table of Python strings for an Arrow-backed index, ~100 bytes a cell. Arrow text is first
    only counted, which needs no copy of the names.
    """
    arrow = isinstance(index.dtype, pd.StringDtype) and index.dtype.storage == "pyarrow"
    if arrow and pa.compute.count_distinct(pa.array(index.array), mode="all").as_py() == len(index):
        return []
    codes, uniques = index.factorize()
    if len(uniques) == int((codes >= 0).sum()):
        return []
    repeated = np.flatnonzero(np.bincount(codes[codes >= 0], minlength=len(uniques)) > 1)[:n]
    return [uniques[i] for i in repeated]


def _text_of(value: object) -> str | None:
    """A canonical text column's value as text: numbers written as numbers (129.0 -> "129"), NaN missing."""
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)) and np.isfinite(value):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    raise TypeError(f"{type(value).__name__} {value!r}")


def _as_text(values: pd.Series, path: str, column: str) -> pd.Series:
    """A canonical text column as text, whatever type the file gave it (missing stays missing).

    Bgee writes NULL metadata as NaN, so an all-missing column reads back as float, and some
    files hold numbers or booleans in text columns; the catalog declares these columns text.
    """
    if isinstance(values.dtype, pd.CategoricalDtype):
        categories = values.cat.categories
        if infer_dtype(categories, skipna=True) in ("string", "empty"):
            return values
        codes, uniques = values.cat.codes.to_numpy(), categories
    elif isinstance(values.dtype, pd.StringDtype):
        return values
    else:
        codes, uniques = pd.factorize(values.astype(object), use_na_sentinel=True)
    try:
        texts = [_text_of(v) for v in uniques]
    except (TypeError, UnicodeDecodeError) as exc:
        raise _fail(path, f"obs column {column!r} holds a value that cannot be written as text: {exc}") from None
    mapped = np.asarray([*texts, None], dtype=object)[np.where(codes < 0, len(texts), codes)]
    return pd.Series(mapped, index=values.index, dtype=object)


def _compact_strings(obs: pd.DataFrame) -> pd.DataFrame:
    """Text columns as categoricals (repeated values) or Arrow strings (mostly unique ones).

    Python string objects cost ~70 bytes a cell per column; cell names, barcodes and
    unique_cell_ids would otherwise make the converter's memory grow with the number of cells.
    """
    for col in obs.columns:
        s = obs[col]
        if s.dtype != object:  # Arrow strings among them: compact already; the writer picks their encoding
            continue
        non_null = s.dropna()
        if not all(isinstance(v, str) for v in non_null.head(1000)):
            continue
        if non_null.nunique() < max(2, len(s) // 2):
            obs[col] = s.astype("category")
        else:
            obs[col] = s.astype("string[pyarrow]")
    obs.index = obs.index.astype("string[pyarrow]") if obs.index.dtype == object else obs.index
    return obs


def _dense_to_csr(dense: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows, cols = np.nonzero(dense)
    indptr = np.zeros(dense.shape[0] + 1, dtype=np.int64)
    np.add.at(indptr, rows + 1, 1)
    return np.cumsum(indptr), cols.astype(np.int32), dense[rows, cols]
