"""Where is my gene expressed: a few genes across every experiment and species, in one table.

The question names genes, so the answer reads each experiment's gene-major copy (the gene-slice
path of ``plan.make_plan``): the genes' values only, never every value of every cell.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from bgee_dask.api.query import Query
from bgee_dask.catalog.reader import AtlasCatalog
from bgee_dask.query.genes import parse_genes
from bgee_dask.query.names import NAME_OF, add_name_coords

#: Groups by default: species, tissue, cell type (their names are added beside them).
DEFAULT_BY: tuple[str, ...] = ("speciesId", "anatEntityId", "cellTypeId")
#: The normalization of the ``mean_cp10k`` column: counts per 10,000 of each cell's total.
NORMALIZE = "cp10k"
MEAN_COLUMN = "mean_cp10k"


def expression(
    catalog: AtlasCatalog,
    genes: Sequence[str] | str,
    by: Sequence[str] | str | None = None,
    filter: str | None = None,
    *,
    client: Any | None = None,
) -> pd.DataFrame:
    """One row per gene and group of cells: how many cells, how many measured the gene, how much, how often.

    Columns: the ``by`` columns (default species, tissue and cell type) each followed by its
    name where it has one (``speciesId, species, anatEntityId, anatEntityName, cellTypeId,
    cellTypeName``), ``gene``, ``gene_symbol``, ``n_cells``, ``n_measured`` (cells whose
    experiment measured the gene), ``mean_cp10k`` (mean over measured cells of counts per 10,000
    of the cell's total) and ``frac_expressed`` (share of measured cells with a non-zero count).
    Rows come gene by gene in the order asked, highest mean first; groups whose experiments did
    not measure the gene come last, with NaN mean and fraction. ``genes`` may be ids or symbols,
    as a list or comma-separated text.
    """
    return expression_frame(expression_dataset(catalog, genes, by=by, filter=filter, client=client))


def expression_dataset(
    catalog: AtlasCatalog,
    genes: Sequence[str] | str,
    by: Sequence[str] | str | None = None,
    filter: str | None = None,
    *,
    client: Any | None = None,
    progress: bool = False,
    normalize: str = NORMALIZE,
) -> xr.Dataset:
    """The ``aggregate`` result behind ``expression`` (``mean`` and ``frac_expressed``, with names), for a
    dot plot of the same groups; ``normalize="log1p_cp10k"`` gives the means a plot's colours read best."""
    names = parse_genes(genes)
    if not names:
        raise ValueError("expression needs at least one gene (Ensembl id or symbol)")
    by = list(DEFAULT_BY) if by is None else ([by] if isinstance(by, str) else list(by))
    query = Query(catalog, filter=filter, genes=names, client=client, progress=progress)
    ds = query.aggregate(by=by, stats=["mean", "frac_expressed"], normalize=normalize)
    return add_name_coords(ds, catalog)


def expression_frame(ds: xr.Dataset) -> pd.DataFrame:
    """The long table of ``expression`` from a cp10k ``aggregate`` result with name coordinates."""
    by = list(ds.attrs.get("by", []))
    columns: list[str] = []
    for c in by:
        columns.append(c)
        name = NAME_OF.get(c)
        if name and name in ds.coords and name not in by:
            columns.append(name)
    n_groups, n_genes = ds.sizes["group"], ds.sizes["gene"]
    frame: dict[str, Any] = {}
    for c in columns:
        frame[c] = np.tile(np.asarray(ds[c].values, dtype=object), n_genes)
    frame["gene"] = np.repeat(np.asarray(ds["gene"].values, dtype=object), n_groups)
    symbols = ds["gene_symbol"].values if "gene_symbol" in ds.coords else np.full(n_genes, None, dtype=object)
    frame["gene_symbol"] = np.repeat(np.asarray(symbols, dtype=object), n_groups)
    frame["n_cells"] = np.tile(ds["n_cells"].values.astype(np.int64), n_genes)
    frame["n_measured"] = ds["n_measured"].values.T.reshape(-1).astype(np.int64)
    frame[MEAN_COLUMN] = ds["mean"].values.T.reshape(-1)
    frame["frac_expressed"] = ds["frac_expressed"].values.T.reshape(-1)
    out = pd.DataFrame(frame)
    out["_gene_order"] = np.repeat(np.arange(n_genes), n_groups)
    out = out.sort_values(
        ["_gene_order", MEAN_COLUMN, "n_cells"], ascending=[True, False, False], na_position="last", kind="stable"
    )
    return out.drop(columns="_gene_order").reset_index(drop=True)


def format_expression_table(table: pd.DataFrame, max_rows_per_gene: int | None = 30) -> str:
    """The table as people read it in a terminal: one block per gene, names rather than ids, aligned."""
    if table.empty:
        return "no cell matched"
    id_columns = [c for c in table.columns if c in NAME_OF]
    lines: list[str] = []
    for (gene, symbol), part in table.groupby(["gene", "gene_symbol"], sort=False, dropna=False):
        title = f"{symbol} ({gene})" if isinstance(symbol, str) and symbol and symbol != gene else str(gene)
        measured = part[part["n_measured"] > 0]
        lines.append(
            f"{title}: measured in {int(measured['n_measured'].sum()):,} of {int(part['n_cells'].sum()):,} cells, "
            f"{len(measured)} of {len(part)} groups"
        )
        shown = measured if max_rows_per_gene is None else measured.head(max_rows_per_gene)
        rows = []
        for _, r in shown.iterrows():
            label = " | ".join(_readable(r, c) for c in id_columns) or "all cells"
            rows.append(
                (
                    label,
                    f"{int(r['n_cells']):,}",
                    f"{int(r['n_measured']):,}",
                    _number(r[MEAN_COLUMN]),
                    f"{r['frac_expressed']:.1%}",
                )
            )
        header = ("group", "cells", "measured", "mean cp10k", "expressing")
        widths = [max(len(header[i]), *(len(row[i]) for row in rows)) if rows else len(header[i]) for i in range(5)]
        lines.append(
            "  " + "  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(header))
        )
        for row in rows:
            lines.append(
                "  " + "  ".join(v.ljust(widths[0]) if i == 0 else v.rjust(widths[i]) for i, v in enumerate(row))
            )
        if len(shown) < len(measured):
            lines.append(f"  ... {len(measured) - len(shown)} more groups (write them all with --out)")
        unmeasured = part[part["n_measured"] == 0]
        if len(unmeasured):
            lines.append(f"  not measured in {len(unmeasured)} groups ({int(unmeasured['n_cells'].sum()):,} cells)")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _readable(row: pd.Series, column: str) -> str:
    name = NAME_OF.get(column)
    if name and name in row.index and isinstance(row[name], str) and row[name]:
        return row[name]
    value = row[column]
    return "NA" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def _number(value: float) -> str:
    """Means in a few significant digits: 119.1, 1.70, 0.00577."""
    if not np.isfinite(value):
        return "NA"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}" if value else "0"
