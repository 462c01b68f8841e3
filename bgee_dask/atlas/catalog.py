"""The atlas catalog: one place that lists experiments, their genes and their cell runs.

Each conversion writes only its own fragment (``catalog/fragments/<species>__<exp>.*``), so
conversions running in parallel never touch the same object. One writer then consolidates the
fragments into three tables, the gene lookup the query planner reads instead of the genes
table, and a small JSON header. Opening an atlas reads the header and the experiments table; a
query adds the runs table and the gene lookup. That is four requests, whatever the number of
experiments or arrays.
"""

from __future__ import annotations

import datetime as _dt
import threading
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from .._version import __version__
from .gene_alignment import align_gene_codes
from .location import AtlasLocation

CATALOG_FORMAT = "bgee-dask/atlas-catalog"
CATALOG_VERSION = "1.1"
HEADER = "catalog/atlas.json"
EXPERIMENTS = "catalog/experiments.parquet"
RUNS = "catalog/runs.parquet"
GENES = "catalog/genes.parquet"
GENE_LOOKUP = "catalog/genes.lookup.arrow"
GENE_LOOKUP_FORMAT = "bgee-dask/gene-lookup"
GENE_LOOKUP_VERSION = "2"
#: Lookup versions this reader takes: "1" was keyed by gene_id, which is what "2" keys by when a
#: genes table has no gene_key (catalogs written before gene alignment).
GENE_LOOKUP_READABLE = ("1", "2")
FRAGMENTS = "catalog/fragments"
#: The genes table's columns the planner needs (all of them but none other).
GENE_LOOKUP_COLUMNS = ("experiment", "gene_id", "gene_key", "gene_symbol", "gene_index", "gene_nnz")


def fragment_key(species: str, experiment_id: str) -> str:
    return f"{species}__{experiment_id}"


@dataclass
class Fragment:
    """One experiment's share of the catalog."""

    record: dict
    runs: pd.DataFrame
    genes: pd.DataFrame

    @property
    def key(self) -> str:
        return fragment_key(self.record["species"], self.record["experimentId"])


def write_fragment(loc: AtlasLocation, fragment: Fragment) -> None:
    """Runs and genes first, the record last: a fragment without its record does not exist."""
    base = f"{FRAGMENTS}/{fragment.key}"
    loc.write_parquet(f"{base}.runs.parquet", fragment.runs)
    loc.write_parquet(f"{base}.genes.parquet", fragment.genes)
    loc.write_json(f"{base}.json", fragment.record)


def read_fragment_record(loc: AtlasLocation, species: str, experiment_id: str) -> dict | None:
    rel = f"{FRAGMENTS}/{fragment_key(species, experiment_id)}.json"
    return loc.read_json(rel) if loc.exists(rel) else None


def remove_fragment(loc: AtlasLocation, species: str, experiment_id: str) -> None:
    base = f"{FRAGMENTS}/{fragment_key(species, experiment_id)}"
    for suffix in (".json", ".runs.parquet", ".genes.parquet"):
        loc.remove(base + suffix)


def consolidate(loc: AtlasLocation) -> dict:
    """Rebuild the consolidated tables from all fragments (the single-writer step).

    Every conversion ends here, so its cost is paid per run and grows with the atlas. The genes
    table (one row per gene of every experiment: 2.8M rows at 96 experiments) stays in Arrow
    from the fragments to the written file, its text as dictionary codes; through pandas, turning
    those rows into Python strings and back into categoricals took 4.1 s at 96 experiments.
    """
    names = loc.list(FRAGMENTS)
    keys = sorted(n[: -len(".json")] for n in names if n.endswith(".json"))
    fragments = _read_fragments(loc, keys)
    records = [record for record, _, _ in fragments]
    experiments = pd.DataFrame.from_records(records) if records else pd.DataFrame(columns=_EXPERIMENT_COLUMNS)
    if records:
        experiments.insert(0, "experiment", keys)
    runs_df = _stack_runs(keys, [runs for _, runs, _ in fragments])
    genes = _stack_genes(keys, [genes for _, _, genes in fragments])
    if genes is not None:
        genes = _with_gene_keys(genes, experiments)
    catalog_id = uuid.uuid4().hex
    loc.write_parquet(RUNS, runs_df)
    if genes is not None:
        loc.write_arrow_parquet(GENES, genes)
        # uncompressed on local disk: mapped and used in place (0.3 ms) where zstd took 4-8 ms to
        # inflate, most of planning a query; an object store pays per byte instead
        compression = None if loc.is_local else "zstd"
        loc.write_bytes(GENE_LOOKUP, GeneLookup.from_arrow(genes).to_arrow_bytes(catalog_id, compression))
    else:
        loc.write_parquet(GENES, pd.DataFrame())
        loc.remove(GENE_LOOKUP)
    loc.write_parquet(EXPERIMENTS, experiments)
    header = {
        "format": CATALOG_FORMAT,
        "format_version": CATALOG_VERSION,
        "writer": f"bgee-dask {__version__}",
        "updated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        # New at every consolidation: readers may cache the tables of one catalog_id.
        "catalog_id": catalog_id,
        "n_experiments": len(records),
        "experiments": keys,
    }
    loc.write_json(HEADER, header)
    return header


#: Fragments read at once: three small objects each, so an object store's latency, not its
#: bandwidth, is what reading a few hundred of them costs.
FRAGMENT_READERS = 16


def _read_fragments(loc: AtlasLocation, keys: list[str]) -> list[tuple[dict, pa.Table, pa.Table]]:
    def read(key: str) -> tuple[dict, pa.Table, pa.Table]:
        base = f"{FRAGMENTS}/{key}"
        runs, genes = loc.read_arrow(f"{base}.runs.parquet"), loc.read_arrow(f"{base}.genes.parquet")
        return loc.read_json(f"{base}.json"), runs, genes

    if len(keys) <= 1:
        return [read(k) for k in keys]
    with ThreadPoolExecutor(min(FRAGMENT_READERS, len(keys)), thread_name_prefix="bgee-dask-catalog") as pool:
        return list(pool.map(read, keys))


def _stack_runs(keys: list[str], tables: list[pa.Table]) -> pd.DataFrame:
    """The runs of every experiment in one frame (a few rows each), text as categoricals."""
    if not tables:
        return pd.DataFrame()
    frame = pa.concat_tables(tables, promote_options="permissive").to_pandas()
    frame.insert(0, "experiment", np.repeat(np.asarray(keys, dtype=object), [t.num_rows for t in tables]))
    for col in frame.columns:  # dictionary-encoded: read back as codes, not strings
        if frame[col].dtype == object:
            frame[col] = frame[col].astype("category")
    return frame


def _stack_genes(keys: list[str], tables: list[pa.Table]) -> pa.Table | None:
    """The genes of every experiment in one table, led by an ``experiment`` dictionary column."""
    if not tables or not sum(t.num_rows for t in tables):
        return None
    stacked = pa.concat_tables(tables, promote_options="permissive").combine_chunks()
    lengths = np.asarray([t.num_rows for t in tables])
    experiment = pa.DictionaryArray.from_arrays(
        pa.array(np.repeat(np.arange(len(keys), dtype=np.int32), lengths)), pa.array(keys, pa.string())
    )
    return stacked.add_column(0, "experiment", experiment)


def _with_gene_keys(genes: pa.Table, experiments: pd.DataFrame) -> pa.Table:
    """The genes table with its ``gene_key`` column (see ``gene_alignment``), text dictionary-encoded.

    Also adds ``n_genes_by_symbol`` to ``experiments``.
    """
    n = genes.num_rows
    names = genes.column("gene_id").combine_chunks().cast(pa.string())
    if "gene_symbol" in genes.column_names:
        symbols = genes.column("gene_symbol").combine_chunks().cast(pa.string())
    else:
        symbols = pa.nulls(n, pa.string())
    # names and symbols numbered together, so that the rule compares them as integers
    shared = pa.concat_arrays([names, symbols]).dictionary_encode()
    codes = shared.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    experiment = genes.column("experiment").combine_chunks().indices.to_numpy().astype(np.int64)
    _, species_of_experiment = np.unique(experiments["species"].to_numpy(dtype=object), return_inverse=True)
    key, symbol, by_symbol = align_gene_codes(experiment, species_of_experiment[experiment], codes[:n], codes[n:])
    experiments["n_genes_by_symbol"] = np.bincount(experiment[by_symbol], minlength=len(experiments))
    columns = {name: genes.column(name) for name in genes.column_names}
    columns["gene_id"] = _dictionary_column(codes[:n], shared.dictionary)
    columns["gene_key"] = _dictionary_column(key, shared.dictionary)
    columns["gene_symbol"] = _dictionary_column(symbol, shared.dictionary)
    order = ["experiment", "gene_id", "gene_key", "gene_symbol"]
    order += [c for c in genes.column_names if c not in order]
    return pa.table({name: columns[name] for name in order})


def _one_list(values, kind: pa.DataType) -> pa.ListArray:
    """A list column of one row holding ``values``: built from the array whole (``pa.array`` of a
    nested numpy array visits every element, 0.3 s for a 2.6M-row lookup)."""
    flat = pa.array(values, kind)
    return pa.ListArray.from_arrays(pa.array([0, len(flat)], pa.int32()), flat)


def _dictionary_column(codes: np.ndarray, dictionary: pa.Array) -> pa.DictionaryArray:
    """``codes`` (-1 missing) over ``dictionary``, the dictionary cut to the values used, in its order."""
    keep = _used_positions(codes, len(dictionary))
    new = _renumbered(codes, keep, len(dictionary)).astype(np.int32)
    indices = pa.array(new, pa.int32(), mask=new < 0)
    return pa.DictionaryArray.from_arrays(indices, dictionary.take(pa.array(keep)))


_EXPERIMENT_COLUMNS = [
    "experiment",
    "experimentId",
    "species",
    "n_cells",
    "n_genes",
    "nnz",
    "bytes",
    "store",
]


@dataclass
class GeneLookup:
    """The genes table arranged for planning: gene ids as codes, rows grouped by experiment.

    Planning a query over all genes maps every experiment's genes to output columns; done with
    pandas on the 660k-row table of a 24-experiment atlas that took 0.2 s, most of a selective
    query. Here it is integer indexing.
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

        Going through pandas cost 0.3 s for the 660k rows of a 24-experiment atlas (its
        categoricals are rebuilt row group by row group), most of planning a selective query;
        Arrow's own arrays take 0.03 s.
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

        Reading it back is a few milliseconds of zero-copy arrays, where building it from the
        genes table sorts and groups every row (0.1-0.3 s for 660k rows in a fresh process).
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
        # zstd: a quarter of the bytes (3.6 MB against 11.6 MB for 660k rows) for 4-8 ms more to read
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
        seen, first_at = np.unique(exp_codes, return_index=True)  # (np.minimum.at: 0.1 s on 1.1M rows)
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

    The catalog's text columns come back from parquet as categoricals; turning 660k of them
    into Python strings to factorize them again took 0.3 s, most of planning a selective query.
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


#: Tables of recently opened catalogs, by (url, catalog_id): a catalog never changes under its id.
_TABLES: OrderedDict[tuple[str, str], dict] = OrderedDict()
_TABLES_LOCK = threading.Lock()
_TABLES_KEEP = 4


def _cached_tables(key: tuple[str, str] | None) -> dict:
    if key is None:
        return {}
    with _TABLES_LOCK:
        tables = _TABLES.setdefault(key, {})
        _TABLES.move_to_end(key)
        while len(_TABLES) > _TABLES_KEEP:
            _TABLES.popitem(last=False)
        return tables


def forget_cached_tables() -> None:
    """Drop the tables of catalogs opened before (the next open reads them again)."""
    with _TABLES_LOCK:
        _TABLES.clear()


class AtlasCatalog:
    """The consolidated catalog of an atlas, read with a fixed number of requests.

    ``experiments`` is read on open; ``runs`` and ``genes`` on first use.
    """

    def __init__(self, loc: AtlasLocation):
        self.location = loc
        try:
            self.header = loc.read_json(HEADER)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{loc.url}: not a bgee-dask atlas (no {HEADER}); create one with 'convert'"
            ) from None
        if self.header.get("format") != CATALOG_FORMAT:
            raise ValueError(f"{loc.url}: {HEADER} says format {self.header.get('format')!r}, not {CATALOG_FORMAT}")
        major = str(self.header.get("format_version", "0")).split(".")[0]
        if major != CATALOG_VERSION.split(".")[0]:
            raise ValueError(
                f"{loc.url}: catalog version {self.header.get('format_version')} is not readable by "
                f"this bgee-dask (reads {CATALOG_VERSION})"
            )
        catalog_id = self.header.get("catalog_id")
        self._tables = _cached_tables((loc.url, catalog_id) if catalog_id else None)
        if "experiments" not in self._tables:
            self._tables["experiments"] = loc.read_parquet(EXPERIMENTS)
        self.experiments = self._tables["experiments"]

    @property
    def runs(self) -> pd.DataFrame:
        if "runs" not in self._tables:
            self._tables["runs"] = self.location.read_parquet(RUNS)
        return self._tables["runs"]

    @property
    def genes(self) -> pd.DataFrame:
        if "genes" not in self._tables:
            self._tables["genes"] = self.location.read_parquet(GENES)
        return self._tables["genes"]

    @property
    def gene_lookup(self) -> GeneLookup:
        if "gene_lookup" not in self._tables:
            self._tables["gene_lookup"] = self._read_gene_lookup()
        return self._tables["gene_lookup"]

    def _read_gene_lookup(self) -> GeneLookup:
        """The lookup consolidation wrote for this catalog, else one built from the genes table.

        Atlases consolidated before the lookup file existed have none; a lookup left by another
        consolidation (its catalog_id differs) is not this catalog's and is not used.
        """
        loc = self.location
        try:
            payload = loc.read_buffer(GENE_LOOKUP)  # one request; no existence check first
        except FileNotFoundError:
            payload = None
        if payload is not None:
            lookup = GeneLookup.from_arrow_bytes(payload, self.header.get("catalog_id"))
            if lookup is not None:
                return lookup
        # planning needs the codes, not the strings: no pandas frame of 660k rows
        return GeneLookup.from_arrow(loc.read_arrow(GENES, GENE_LOOKUP_COLUMNS))

    def summary(self) -> dict:
        """Totals and per-experiment rows, as ``bgee-dask info`` prints them."""
        e = self.experiments
        names = ("experimentId", "species", "n_cells", "n_genes", "n_genes_by_symbol", "nnz", "bytes", "layout")
        cols = [c for c in names if c in e]
        return {
            "atlas": self.location.url,
            "format": self.header.get("format"),
            "format_version": self.header.get("format_version"),
            "updated_at": self.header.get("updated_at"),
            "n_experiments": len(e),
            "species": sorted(e["species"].unique().tolist()) if len(e) else [],
            "n_cells": int(e["n_cells"].sum()) if len(e) else 0,
            "nnz": int(e["nnz"].sum()) if len(e) else 0,
            "bytes": int(e["bytes"].sum()) if len(e) else 0,
            "experiments": e[cols].to_dict(orient="records") if len(e) else [],
        }
