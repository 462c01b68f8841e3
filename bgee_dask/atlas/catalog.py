"""The atlas catalog: one place that lists experiments, their genes and their cell runs.

Each conversion writes only its own fragment (``catalog/fragments/<species>__<exp>.*``), so
conversions running in parallel never touch the same object. One writer then consolidates the
fragments into three tables plus a small JSON header. Opening an atlas reads the header and
the experiments table; a query adds the runs and genes tables. That is four requests, whatever
the number of experiments or arrays.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

import pandas as pd

from .._version import __version__
from .location import AtlasLocation

CATALOG_FORMAT = "bgee-dask/atlas-catalog"
CATALOG_VERSION = "1.0"
HEADER = "catalog/atlas.json"
EXPERIMENTS = "catalog/experiments.parquet"
RUNS = "catalog/runs.parquet"
GENES = "catalog/genes.parquet"
FRAGMENTS = "catalog/fragments"


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
    """Rebuild the consolidated tables from all fragments (the single-writer step)."""
    names = loc.list(FRAGMENTS)
    keys = sorted(n[: -len(".json")] for n in names if n.endswith(".json"))
    records, runs, genes = [], [], []
    for key in keys:
        record = loc.read_json(f"{FRAGMENTS}/{key}.json")
        records.append(record)
        r = loc.read_parquet(f"{FRAGMENTS}/{key}.runs.parquet")
        r.insert(0, "experiment", key)
        runs.append(r)
        g = loc.read_parquet(f"{FRAGMENTS}/{key}.genes.parquet")
        g.insert(0, "experiment", key)
        genes.append(g)
    experiments = pd.DataFrame.from_records(records) if records else pd.DataFrame(columns=_EXPERIMENT_COLUMNS)
    if records:
        experiments.insert(0, "experiment", keys)
    runs_df = pd.concat(runs, ignore_index=True) if runs else pd.DataFrame()
    genes_df = pd.concat(genes, ignore_index=True) if genes else pd.DataFrame()
    for col in runs_df.columns:
        if runs_df[col].dtype == object:
            runs_df[col] = runs_df[col].astype("category")
    loc.write_parquet(RUNS, runs_df)
    loc.write_parquet(GENES, genes_df)
    loc.write_parquet(EXPERIMENTS, experiments)
    header = {
        "format": CATALOG_FORMAT,
        "format_version": CATALOG_VERSION,
        "writer": f"bgee-dask {__version__}",
        "updated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "n_experiments": len(records),
        "experiments": keys,
    }
    loc.write_json(HEADER, header)
    return header


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
        self.experiments = loc.read_parquet(EXPERIMENTS)
        self._runs: pd.DataFrame | None = None
        self._genes: pd.DataFrame | None = None

    @property
    def runs(self) -> pd.DataFrame:
        if self._runs is None:
            self._runs = self.location.read_parquet(RUNS)
        return self._runs

    @property
    def genes(self) -> pd.DataFrame:
        if self._genes is None:
            self._genes = self.location.read_parquet(GENES)
        return self._genes

    def summary(self) -> dict:
        """Totals and per-experiment rows, as ``bgee-dask info`` prints them."""
        e = self.experiments
        cols = [c for c in ("experimentId", "species", "n_cells", "n_genes", "nnz", "bytes", "layout") if c in e]
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
