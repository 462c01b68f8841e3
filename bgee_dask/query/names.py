"""Names for ontology ids, and the columns one can filter and group on: what a biologist reads.

Cells carry ids (``CL:0000236``) and their labels (``B cell``) side by side; the catalog's runs
table holds both for every run of cells, so the names of any result's ids come from the catalog
without reading a store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import xarray as xr

from bgee_dask.catalog.reader import AtlasCatalog

if TYPE_CHECKING:
    from bgee_dask.api.query import Query

#: The label column of each id column (``speciesId`` is named by the experiments' ``species``).
NAME_OF: dict[str, str] = {
    "cellTypeId": "cellTypeName",
    "anatEntityId": "anatEntityName",
    "stageId": "stageName",
    "speciesId": "species",
}

#: How a figure or table names a column for a reader.
COLUMN_TITLES: dict[str, str] = {
    "cellTypeId": "cell type",
    "cellTypeName": "cell type",
    "anatEntityId": "tissue",
    "anatEntityName": "tissue",
    "stageId": "stage",
    "stageName": "stage",
    "speciesId": "species",
    "experimentId": "experiment",
    "libID": "library",
    "SampleId": "sample",
}

#: Per-cell columns that are not metadata one groups on (they differ from cell to cell).
PER_CELL_COLUMNS: tuple[str, ...] = ("barcodes", "unique_cell_ids", "source_row", "total_counts", "n_genes")


def queryable_columns(catalog: AtlasCatalog) -> list[str]:
    """Every cell metadata column of the atlas (what filters, ``by`` and ``bgee-dask values`` take).

    The same set ``plan.check_columns`` accepts: the catalog runs' columns and every
    experiment's obs columns. Columns of some experiments only are included (cells of the
    others have missing values there).
    """
    known: dict[str, None] = {}
    for c in catalog.runs.columns:
        if c not in ("experiment", "row_start", "row_stop"):
            known[str(c)] = None
    if "obs_columns" in catalog.experiments:
        for cols in catalog.experiments["obs_columns"]:
            for c in list(cols):
                known[str(c)] = None
    return list(known)


def id_names(catalog: AtlasCatalog, column: str) -> dict:
    """``{id: name}`` for an id column with a label column (see ``NAME_OF``); empty for others.

    Taken from the runs table (the experiments table for species). Where files disagree on an
    id's label, the first one in catalog order is used.
    """
    name_col = NAME_OF.get(column)
    if name_col is None:
        return {}
    if column == "speciesId":
        runs = catalog.runs
        if "speciesId" not in runs or "experiment" not in runs:
            return {}
        species = dict(zip(catalog.experiments["experiment"], catalog.experiments["species"], strict=True))
        pairs = runs[["experiment", "speciesId"]].drop_duplicates()
        out: dict = {}
        for exp, taxon in zip(pairs["experiment"].astype(str), pairs["speciesId"], strict=True):
            if pd.notna(taxon) and exp in species:
                out.setdefault(_plain(taxon), str(species[exp]).replace("_", " "))
        return out
    runs = catalog.runs
    if column not in runs or name_col not in runs:
        return {}
    pairs = runs[[column, name_col]].astype(object).dropna().drop_duplicates(subset=[column])
    return {_plain(k): str(v) for k, v in zip(pairs[column], pairs[name_col], strict=True)}


def add_name_coords(ds: xr.Dataset, catalog: AtlasCatalog) -> xr.Dataset:
    """``ds`` with a name coordinate along ``group`` beside each id column it was grouped by.

    ``by=["cellTypeId"]`` gets ``cellTypeName`` (None where the catalog knows no label), unless
    the names were grouped on too. Groups and statistics are unchanged.
    """
    by = list(ds.attrs.get("by", []))
    new = {}
    for col in by:
        name_col = NAME_OF.get(col)
        if name_col is None or name_col in by or name_col in ds.coords:
            continue
        names = id_names(catalog, col)
        if names:
            values = [names.get(_plain(v)) for v in ds[col].values]
            new[name_col] = ("group", np.asarray(values, dtype=object))
    return ds.assign_coords(new) if new else ds


def group_labels(ds: xr.Dataset, sep: str = " | ") -> list[str]:
    """One label per group: each ``by`` value by its name where the result has one (``T cell | lung``)."""
    by = list(ds.attrs.get("by", []))
    columns = []
    for col in by:
        name_col = NAME_OF.get(col)
        ids = ds[col].values
        names = ds[name_col].values if name_col in ds.coords and name_col not in by else None
        columns.append([_label(n) if names is not None and _label(n) else _label(i) for i, n in _zip(ids, names)])
    if not columns:
        return ["all cells"] * ds.sizes.get("group", 0)
    return [sep.join(parts) for parts in zip(*columns, strict=True)]


def _zip(ids: np.ndarray, names: np.ndarray | None) -> list[tuple]:
    return list(zip(ids, names if names is not None else [None] * len(ids), strict=True))


def _label(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return str(value)


def _plain(value):
    """Catalog numbers may come back as numpy scalars or widened to float; keys compare as Python values."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def column_values(query: Query, column: str) -> pd.DataFrame:
    """The values of a metadata column among a ``Query``'s cells, with cell and experiment counts.

    Columns: the column itself, its name column where it has one (``cellTypeId`` ->
    ``cellTypeName``), ``n_cells`` and ``n_experiments``; most cells first. Cells without a
    value are one row with a missing value. Computed as an aggregation without genes, so where
    the catalog decides the groups no cell is read.
    """
    by = [column] if column == "experimentId" else [column, "experimentId"]
    counted = query.aggregate(by=by, stats=[])
    frame = pd.DataFrame({c: pd.Series(counted[c].values, dtype=object) for c in by})
    frame["n_cells"] = counted["n_cells"].values.astype(np.int64)
    out = (
        frame.groupby(column, dropna=False, sort=False)
        .agg(n_cells=("n_cells", "sum"), n_experiments=("experimentId", "nunique"))
        .reset_index()
    )
    out[column] = out[column].astype(object).where(out[column].notna(), None)
    names = id_names(query.catalog, column)
    if names:
        out.insert(1, NAME_OF[column], [names.get(_plain(v)) for v in out[column]])
    text = out[column].map(lambda v: "" if v is None else str(v))
    out = out.assign(_text=text).sort_values(["n_cells", "_text"], ascending=[False, True], kind="stable")
    return out.drop(columns="_text").reset_index(drop=True)
