"""Reading an atlas's catalog: the header, then the tables it names, with a fixed number of requests.

The header (``catalog/atlas.json``) is the atlas's commit point: it names the folder of
consolidated tables that is current (``catalog/tables/<catalog_id>/``). Those tables are never
modified, so a reader that read one header reads one consistent catalog, however many writers
commit meanwhile (see ``commit.py``). Opening an atlas reads the header and the experiments
table; a query adds the runs table and the gene lookup: four requests, whatever the number of
experiments.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import pandas as pd
import pyarrow as pa

from bgee_dask.catalog.gene_lookup import GENE_LOOKUP_COLUMNS, GeneLookup
from bgee_dask.format.location import AtlasLocation
from bgee_dask.format.paths import HEADER

__all__ = ["AtlasCatalog", "CatalogError", "GeneLookup", "forget_cached_tables", "read_header"]

CATALOG_FORMAT = "bgee-dask/atlas-catalog"
#: 2.0: versioned experiment folders and tables named by the header (1.x kept tables in place).
CATALOG_VERSION = "2.0"
EXPERIMENTS_FILE = "experiments.parquet"
RUNS_TABLE_FILE = "runs.parquet"
GENES_TABLE_FILE = "genes.parquet"
GENE_LOOKUP_FILE = "genes.lookup.arrow"

#: The experiments table's columns, also when it is empty.
EXPERIMENT_COLUMNS = ["experiment", "experimentId", "species", "n_cells", "n_genes", "nnz", "bytes", "store"]


class CatalogError(ValueError):
    """The catalog cannot be read: not an atlas, another format version, or a damaged file."""


def read_header(loc: AtlasLocation) -> dict | None:
    """The current header, or None when there is none; a damaged one is a :class:`CatalogError`."""
    try:
        payload = loc.read_bytes(HEADER)
    except FileNotFoundError:
        return None
    try:
        header = json.loads(payload)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise CatalogError(f"{loc.full_url(HEADER)}: damaged catalog header ({exc})") from None
    return header


#: Tables of recently opened catalogs, by (url, catalog_id): a catalog never changes under its id.
_TABLES: OrderedDict[tuple[str, str], dict] = OrderedDict()
_TABLES_LOCK = threading.Lock()
_TABLES_KEEP = 4


def _cached_tables(key: tuple[str, str]) -> dict:
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
    """The committed catalog of an atlas, as of the header read when it was opened.

    ``experiments`` is read on open; ``runs`` and ``genes`` on first use.
    """

    #: Headers read when the tables named by one were removed before they could be read (two
    #: commits by other writers in between).
    OPEN_ATTEMPTS = 3

    def __init__(self, loc: AtlasLocation):
        self.location = loc
        for attempt in range(self.OPEN_ATTEMPTS):
            self.header = self._checked_header()
            self.tables_dir = self.header["tables"]
            self._tables = _cached_tables((loc.url, self.header["catalog_id"]))
            try:
                if "experiments" not in self._tables:
                    self._tables["experiments"] = self._read_table(EXPERIMENTS_FILE).to_pandas()
                break
            except FileNotFoundError:
                if attempt == self.OPEN_ATTEMPTS - 1:
                    raise
        self.experiments = self._tables["experiments"]

    def _checked_header(self) -> dict:
        loc = self.location
        header = read_header(loc)
        if header is None:
            raise FileNotFoundError(f"{loc.url}: not a bgee-dask atlas (no {HEADER}); create one with 'convert'")
        if header.get("format") != CATALOG_FORMAT:
            raise CatalogError(f"{loc.full_url(HEADER)}: format {header.get('format')!r}, not {CATALOG_FORMAT}")
        version = str(header.get("format_version", "0"))
        if version.split(".")[0] != CATALOG_VERSION.split(".")[0]:
            raise CatalogError(
                f"{loc.url}: catalog format {version} is not readable by this bgee-dask (reads "
                f"{CATALOG_VERSION}); rebuild the atlas: bgee-dask convert SOURCES --out NEW_ATLAS"
            )
        if not header.get("tables") or not header.get("catalog_id"):
            raise CatalogError(f"{loc.full_url(HEADER)}: damaged catalog header (no tables named)")
        return header

    def _read_table(self, name: str, columns=None) -> pa.Table:
        rel = f"{self.tables_dir}/{name}"
        try:
            return self.location.read_arrow(rel, columns)
        except FileNotFoundError:
            raise
        except (OSError, pa.ArrowException) as exc:
            if self.location.storage_error(exc) is not None:
                raise
            raise CatalogError(f"{self.location.full_url(rel)}: damaged catalog table ({exc})") from None

    def _table(self, name: str) -> pd.DataFrame:
        try:
            return self._read_table(name).to_pandas()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{self.location.url}: the catalog was replaced twice since this atlas was opened; open it again"
            ) from None

    @property
    def left_out(self) -> list[dict]:
        """Records the last commit could not consolidate (``experiment``, ``reason``)."""
        return list(self.header.get("left_out") or [])

    @property
    def runs(self) -> pd.DataFrame:
        if "runs" not in self._tables:
            self._tables["runs"] = self._table(RUNS_TABLE_FILE)
        return self._tables["runs"]

    @property
    def genes(self) -> pd.DataFrame:
        if "genes" not in self._tables:
            self._tables["genes"] = self._table(GENES_TABLE_FILE) if len(self.experiments) else pd.DataFrame(
                {c: pd.Series(dtype=object) for c in GENE_LOOKUP_COLUMNS}
            )
        return self._tables["genes"]

    @property
    def gene_lookup(self) -> GeneLookup:
        if "gene_lookup" not in self._tables:
            self._tables["gene_lookup"] = self._read_gene_lookup()
        return self._tables["gene_lookup"]

    def _read_gene_lookup(self) -> GeneLookup:
        """The lookup written with these tables (built from the genes table if it is not this catalog's)."""
        if not len(self.experiments):
            return GeneLookup.from_table(self.genes)
        loc = self.location
        try:
            payload = loc.read_buffer(f"{self.tables_dir}/{GENE_LOOKUP_FILE}")
        except FileNotFoundError:
            payload = None
        if payload is not None:
            lookup = GeneLookup.from_arrow_bytes(payload, self.header.get("catalog_id"))
            if lookup is not None:
                return lookup
        return GeneLookup.from_arrow(self._read_table(GENES_TABLE_FILE, GENE_LOOKUP_COLUMNS))

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
            "left_out": self.left_out,
        }
