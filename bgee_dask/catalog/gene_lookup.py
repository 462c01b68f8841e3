"""The genes table arranged for query planning: gene keys as integer codes, rows grouped by experiment.

Written once per commit beside the genes table (``genes.lookup.arrow``), so that planning a
query reads a few zero-copy Arrow arrays instead of sorting and grouping every gene row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

GENE_LOOKUP_FORMAT = "bgee-dask/gene-lookup"
GENE_LOOKUP_VERSION = "2"
#: Lookup versions this reader takes.
GENE_LOOKUP_READABLE = ("2",)
#: The genes table's columns the planner needs (all of them but none other).
GENE_LOOKUP_COLUMNS = ("experiment", "gene_id", "gene_key", "gene_symbol", "gene_index", "gene_nnz")


def _one_list(values, kind: pa.DataType) -> pa.ListArray:
    """A list column of one row holding ``values``: built from the array whole (``pa.array`` of a
    nested numpy array would visit every element as a Python object)."""
    flat = pa.array(values, kind)
    return pa.ListArray.from_arrays(pa.array([0, len(flat)], pa.int32()), flat)


def dictionary_column(codes: np.ndarray, dictionary: pa.Array) -> pa.DictionaryArray:
    """``codes`` (-1 missing) over ``dictionary``, the dictionary cut to the values used, in its order."""
    keep = _used_positions(codes, len(dictionary))
    new = _renumbered(codes, keep, len(dictionary)).astype(np.int32)
    indices = pa.array(new, pa.int32(), mask=new < 0)
    return pa.DictionaryArray.from_arrays(indices, dictionary.take(pa.array(keep)))


@dataclass
class GeneLookup:
    """The genes table arranged for planning: gene ids as codes, rows grouped by experiment.

    Planning a query over all genes maps every experiment's genes to output columns; done with
    pandas over every row of the genes table, that would be most of a selective query. Here it
    is integer indexing.
    """

    ids: np.ndarray  # sorted distinct gene keys (``gene_key``; ``gene_id`` in catalogs without it)
    code: np.ndarray  # per row: position of its gene key in ``ids``
    gene_index: np.ndarray  # per row: the gene's column in its experiment
    gene_nnz: np.ndarray | None  # per row: values stored for the gene
    rows: dict[str, slice]  # experiment key -> its rows
    symbol_code: np.ndarray | None = None  # per row: position of its symbol in ``symbol_values``, -1 if none
    symbol_values: np.ndarray | None = None  # distinct symbols
    symbol_of_id: np.ndarray | None = None  # per id: its symbol in ``symbol_values`` (the first given), -1 if none

    @property
    def symbols(self) -> np.ndarray | None:
        """A symbol per id (None where unknown), or None for an atlas without symbols."""
        return None if self.symbol_of_id is None else self.symbols_of(np.arange(len(self.ids)))

    def symbols_of(self, codes: np.ndarray) -> np.ndarray | None:
        """The symbols of these ids (None where unknown), or None for an atlas without symbols."""
        if self.symbol_of_id is None:
            return None
        which = self.symbol_of_id[codes]
        out = np.full(len(which), None, dtype=object)
        known = which >= 0
        out[known] = self.symbol_values[which[known]]
        return out

    def rows_of(self, experiments: Sequence[str]) -> np.ndarray:
        """Row numbers of these experiments, in their order (each experiment's rows in catalog order)."""
        parts = [np.arange(sl.start, sl.stop) for key in experiments if (sl := self.rows.get(key)) is not None]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    @classmethod
    def from_table(cls, table: pd.DataFrame) -> GeneLookup:
        """From the genes table as pandas reads it (categorical or plain text columns)."""
        return cls._from_codes(
            _codes(table["experiment"]),
            _codes(table["gene_key" if "gene_key" in table else "gene_id"], sort=True),
            _codes(table["gene_symbol"]) if "gene_symbol" in table else None,
            table["gene_index"].to_numpy(),
            table["gene_nnz"].to_numpy() if "gene_nnz" in table else None,
        )

    @classmethod
    def from_arrow(cls, table: pa.Table) -> GeneLookup:
        """From the genes table as Arrow reads it: dictionary columns give their codes directly.

        Going through pandas would rebuild its categoricals row group by row group, most of
        planning a selective query; Arrow's own arrays are used as they are.
        """
        names = table.column_names
        return cls._from_codes(
            _arrow_codes(table.column("experiment")),
            _arrow_codes(table.column("gene_key" if "gene_key" in names else "gene_id"), sort=True),
            _arrow_codes(table.column("gene_symbol")) if "gene_symbol" in names else None,
            table.column("gene_index").to_numpy(),
            table.column("gene_nnz").to_numpy() if "gene_nnz" in names else None,
        )

    def to_arrow_bytes(self, catalog_id: str, compression: str | None = "zstd") -> bytes:
        """The lookup as written at consolidation: one Arrow IPC record of list columns.

        Reading it back gives zero-copy arrays, where building it from the genes table sorts and
        groups every row.
        ``compression`` (Arrow IPC's "zstd", "lz4" or None) is recorded in the file.
        """
        keys = list(self.rows)
        columns = {
            "ids": _one_list(self.ids, pa.string()),
            "code": _one_list(self.code.astype(np.int32), pa.int32()),
            "gene_index": _one_list(self.gene_index.astype(np.int32), pa.int32()),
            "experiments": _one_list(keys, pa.string()),
            "row_start": _one_list([self.rows[k].start for k in keys], pa.int64()),
            "row_stop": _one_list([self.rows[k].stop for k in keys], pa.int64()),
        }
        if self.gene_nnz is not None:
            wide = self.gene_nnz.size and int(self.gene_nnz.max()) > np.iinfo(np.int32).max
            kind = pa.int64() if wide else pa.int32()
            columns["gene_nnz"] = _one_list(self.gene_nnz.astype(kind.to_pandas_dtype()), kind)
        if self.symbol_of_id is not None:
            columns["symbol_values"] = _one_list(self.symbol_values, pa.string())
            columns["symbol_code"] = _one_list(self.symbol_code.astype(np.int32), pa.int32())
            columns["symbol_of_id"] = _one_list(self.symbol_of_id.astype(np.int32), pa.int32())
        meta = {"format": GENE_LOOKUP_FORMAT, "format_version": GENE_LOOKUP_VERSION, "catalog_id": catalog_id}
        table = pa.table(columns).replace_schema_metadata(meta)
        sink = pa.BufferOutputStream()
        # zstd: several times fewer bytes to store and fetch, for a little decoding when read
        with pa.ipc.new_file(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=compression)) as writer:
            writer.write_table(table)
        return sink.getvalue().to_pybytes()

    @classmethod
    def from_arrow_bytes(cls, payload: bytes | pa.Buffer, catalog_id: str | None) -> GeneLookup | None:
        """The lookup written by ``to_arrow_bytes``; None when it belongs to another consolidation."""
        table = pa.ipc.open_file(pa.BufferReader(payload)).read_all()
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        if meta.get("format") != GENE_LOOKUP_FORMAT or meta.get("format_version") not in GENE_LOOKUP_READABLE:
            return None
        if catalog_id is None or meta.get("catalog_id") != catalog_id:
            return None

        def values(name: str, strings: bool = False) -> np.ndarray | None:
            if name not in table.column_names:
                return None
            flat = table.column(name).chunk(0).values
            return flat.to_numpy(zero_copy_only=False).astype(object, copy=False) if strings else flat.to_numpy()

        keys = values("experiments", strings=True)
        starts, stops = values("row_start"), values("row_stop")
        # int32 arrays as stored, zero-copy and read-only: widening them cost more (fresh pages) than reading
        return cls(
            ids=values("ids", strings=True),
            code=values("code"),
            gene_index=values("gene_index"),
            gene_nnz=values("gene_nnz"),
            rows={str(k): slice(int(a), int(b)) for k, a, b in zip(keys, starts, stops, strict=True)},
            symbol_code=values("symbol_code"),
            symbol_values=values("symbol_values", strings=True),
            symbol_of_id=values("symbol_of_id"),
        )

    @classmethod
    def _from_codes(
        cls,
        experiment: tuple[np.ndarray, np.ndarray],
        gene_id: tuple[np.ndarray, np.ndarray],
        gene_symbol: tuple[np.ndarray, np.ndarray] | None,
        gene_index: np.ndarray,
        gene_nnz: np.ndarray | None,
    ) -> GeneLookup:
        """Each text column as (code per row, -1 if missing; its distinct values), gene ids sorted."""
        exp_codes, exp_keys = experiment
        n_rows = len(exp_codes)
        # experiments numbered in catalog order (a categorical's categories may be in any order)
        first_row = np.full(len(exp_keys), n_rows, dtype=np.int64)
        seen, first_at = np.unique(exp_codes, return_index=True)  # (a sort; np.minimum.at loops per element)
        first_row[seen] = first_at
        by_appearance = np.argsort(first_row, kind="stable")
        renumber = np.empty(len(exp_keys), dtype=np.int64)
        renumber[by_appearance] = np.arange(len(exp_keys))
        exp_codes, exp_keys = renumber[exp_codes], exp_keys[by_appearance]
        order = np.argsort(exp_codes, kind="stable")
        gene_codes, ids = gene_id
        gene_codes = gene_codes[order]
        sorted_exp = exp_codes[order]
        cuts = np.flatnonzero(np.diff(sorted_exp)) + 1
        starts = np.concatenate([[0], cuts]) if n_rows else np.zeros(0, dtype=np.int64)
        stops = np.concatenate([cuts, [n_rows]]) if n_rows else np.zeros(0, dtype=np.int64)
        rows = {str(exp_keys[sorted_exp[a]]): slice(int(a), int(b)) for a, b in zip(starts, stops, strict=True)}
        sym_codes = sym_values = symbol_of_id = None
        if gene_symbol is not None:
            sym_codes, sym_values = gene_symbol
            sym_codes = sym_codes[order]
            symbol_of_id = np.full(len(ids), -1, dtype=np.int64)
            known = sym_codes >= 0
            # the first experiment (in catalog order) that names a gene gives its symbol
            codes_known, first = np.unique(gene_codes[known], return_index=True)
            symbol_of_id[codes_known] = sym_codes[known][first]
        return cls(
            ids=ids,
            code=gene_codes,
            gene_index=np.asarray(gene_index)[order].astype(np.int64),
            gene_nnz=np.asarray(gene_nnz)[order].astype(np.int64) if gene_nnz is not None else None,
            rows=rows,
            symbol_code=sym_codes,
            symbol_values=sym_values,
            symbol_of_id=symbol_of_id,
        )


def _codes(column: pd.Series, sort: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(code per row, -1 where missing; the distinct values as strings), from a categorical's codes when it is one.

    The catalog's text columns come back from parquet as categoricals; turning them into a
    Python string per row to factorize them again would be most of planning a selective query.
    """
    if isinstance(column.dtype, pd.CategoricalDtype):
        codes = column.array.codes.astype(np.int64)  # the Categorical's own array (Series.cat.codes is slower)
        values = np.asarray(column.cat.categories.astype(str), dtype=object)
        return _used_codes(codes, values, sort)
    codes, uniques = pd.factorize(column.astype(object).where(column.notna(), None), sort=sort)
    return np.asarray(codes, dtype=np.int64), np.asarray(uniques.astype(str), dtype=object)


def _arrow_codes(column: pa.ChunkedArray, sort: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``_codes`` for an Arrow column: a dictionary column's indices, else the column dictionary-encoded."""
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if not pa.types.is_dictionary(array.type):
        array = array.dictionary_encode()
    codes = array.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    values = np.asarray(array.dictionary.cast(pa.string()).to_pylist(), dtype=object)
    return _used_codes(codes, values, sort)


def _used_codes(codes: np.ndarray, values: np.ndarray, sort: bool) -> tuple[np.ndarray, np.ndarray]:
    """Codes renumbered over the values some row uses (dictionaries may hold others), sorted if asked."""
    keep = _used_positions(codes, len(values))
    if sort:
        keep = keep[np.argsort(values[keep], kind="stable")]
    return _renumbered(codes, keep, len(values)), values[keep]


def _used_positions(codes: np.ndarray, n_values: int) -> np.ndarray:
    """The values (positions in a dictionary of ``n_values``) that some code (-1: missing) uses."""
    used = np.zeros(n_values, dtype=bool)
    used[codes[codes >= 0]] = True
    return np.flatnonzero(used)


def _renumbered(codes: np.ndarray, keep: np.ndarray, n_values: int) -> np.ndarray:
    """``codes`` as positions in ``keep`` (-1 stays -1)."""
    new_code = np.full(n_values + 1, -1, dtype=np.int64)  # the last slot maps -1 to -1
    new_code[keep] = np.arange(len(keep))
    return new_code[codes]
