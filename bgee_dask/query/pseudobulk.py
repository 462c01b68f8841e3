"""Pseudobulk samples as count-based tools take them: one AnnData row per group of cells.

``aggregate`` answers "what is the mean of gene g in group x" with NaN wherever an experiment
did not measure g: right for reading, wrong for PyDESeq2, edgeR or decoupler, which take a
samples x genes matrix of integer counts with no gap in it. This module turns the same
aggregation into that matrix:

- rows: groups of the ``by`` columns with at least ``min_cells`` cells (a pseudobulk of a
  handful of cells is noise that dispersion estimates cannot absorb);
- columns: only the genes measured in every kept group's experiments, so a 0 in ``X`` always
  means "measured, not detected" and never "not measured";
- values: the summed raw counts as integers. Bgee's counts come from ``bustools --em``, which
  splits multi-mapping reads, so sums can be fractional; they are then rounded to the nearest
  integer (``uns["counts_rounded"]``), as count models require integers.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from bgee_dask.query.groups import group_codes
from bgee_dask.query.names import PER_CELL_COLUMNS, add_name_coords, queryable_columns

if TYPE_CHECKING:
    import anndata

    from bgee_dask.api.query import Query

#: decoupler's names (``decoupler.pp.pseudobulk``): cells per sample, counts per sample, and the
#: layer with the fraction of cells expressing each gene.
DECOUPLER_CELLS = "psbulk_cells"
DECOUPLER_COUNTS = "psbulk_counts"
DECOUPLER_PROPS = "psbulk_props"
#: Sums closer than this to an integer count as integers (float32 counts added in float64 are exact).
INTEGER_TOLERANCE = 1e-6


def pseudobulk(query: Query, by: Sequence[str] | str, *, min_cells: int = 10) -> anndata.AnnData:
    """One row per group of ``by`` with at least ``min_cells`` cells, ready for PyDESeq2 and decoupler.

    - ``obs`` (index: the group's values joined by ``" | "``): the ``by`` columns, ``n_cells``,
      ``total_counts`` (the cells' summed counts over every gene their experiment measured:
      the library size before genes are dropped), the same two under decoupler's names
      ``psbulk_cells`` and ``psbulk_counts`` (``psbulk_counts`` is the row sum of ``X``, as
      decoupler defines it), name columns for id columns (``cellTypeName`` for ``cellTypeId``),
      and every other metadata column whose value is the same for all cells of each group
      (``experimentId``, ``speciesId``, ``anatEntityId``... whichever are).
    - ``X``: int64 summed raw counts, groups x genes, dense.
    - ``var`` (index ``gene_id``): ``gene_symbol``. Genes not measured in every kept group's
      experiments are left out.
    - ``layers["mean"]``: mean count per cell; ``layers["psbulk_props"]``: fraction of cells
      with a non-zero count (decoupler's name).
    - ``uns``: ``counts_rounded`` (bool), ``n_genes_dropped``, ``min_cells``, ``by``,
      ``filter`` ("" for none) and ``groups_below_min_cells`` (a DataFrame of the left-out
      groups' ``by`` values and ``n_cells``).
    """
    import anndata

    by = [by] if isinstance(by, str) else list(by)
    if not by:
        raise ValueError("pseudobulk needs at least one column to group by")
    if int(min_cells) < 1:
        raise ValueError(f"min_cells must be at least 1, not {min_cells}")
    ds = query.aggregate(by=by, stats=["sum", "n_expressed"], normalize=None)
    ds = add_name_coords(ds, query.catalog)
    n_cells = ds["n_cells"].values.astype(np.int64)
    keep = n_cells >= int(min_cells)
    keys = [tuple(_plain(ds[c].values[g]) for c in by) for g in range(ds.sizes["group"])]

    below = pd.DataFrame({c: [k[i] for k, kept in zip(keys, keep, strict=True) if not kept] for i, c in enumerate(by)})
    below["n_cells"] = n_cells[~keep]

    n_measured = ds["n_measured"].values[keep]
    # a gene is kept when every cell of every kept group belongs to an experiment that measured it
    measured_everywhere = (n_measured == n_cells[keep, None]).all(axis=0) & keep.any()
    genes = np.flatnonzero(measured_everywhere)
    if keep.any() and not len(genes):
        warnings.warn(
            "pseudobulk: no gene was measured in every group's experiments (groups of several species?); "
            "X has no column. Restrict the filter, e.g. to one species.",
            stacklevel=2,
        )

    sums = ds["sum"].values[np.ix_(keep, genes)]
    rounded = np.rint(sums)
    counts_rounded = bool(sums.size and np.abs(sums - rounded).max() > INTEGER_TOLERANCE)
    x = rounded.astype(np.int64)
    kept_cells = n_cells[keep]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / kept_cells[:, None]
        props = ds["n_expressed"].values[np.ix_(keep, genes)] / kept_cells[:, None]

    obs = _group_obs(query, ds, by, keys, keep)
    obs.insert(obs.columns.get_loc(DECOUPLER_CELLS) + 1, DECOUPLER_COUNTS, x.sum(axis=1))

    var = pd.DataFrame(index=pd.Index(np.asarray(ds["gene"].values[genes], dtype=str), name="gene_id"))
    symbols = ds["gene_symbol"].values[genes] if "gene_symbol" in ds.coords else np.full(len(genes), None)
    var["gene_symbol"] = pd.Series(
        [str(s) if s is not None else "" for s in symbols], index=var.index, dtype=object
    ).astype("category")

    adata = anndata.AnnData(
        X=x,
        obs=obs,
        var=var,
        layers={"mean": mean.astype(np.float64), DECOUPLER_PROPS: props.astype(np.float64)},
    )
    adata.uns["counts_rounded"] = counts_rounded
    adata.uns["n_genes_dropped"] = int(ds.sizes["gene"] - len(genes))
    adata.uns["min_cells"] = int(min_cells)
    adata.uns["by"] = list(by)
    adata.uns["filter"] = query.filter_text or ""
    adata.uns["groups_below_min_cells"] = _writable(below)
    return adata


def _group_obs(query: Query, ds, by: list[str], keys: list[tuple], keep: np.ndarray) -> pd.DataFrame:
    """The kept groups' ``by`` values, cell counts, total counts and the columns constant within each group."""
    kept_keys = [k for k, kept in zip(keys, keep, strict=True) if kept]
    n_cells = ds["n_cells"].values.astype(np.int64)[keep]
    index = pd.Index([" | ".join("NA" if v is None else str(v) for v in k) for k in kept_keys], dtype=str)
    obs = pd.DataFrame(index=index)
    for i, c in enumerate(by):
        obs[c] = _column([k[i] for k in kept_keys])
    for name in ds.coords:
        if name not in by and ds[name].dims == ("group",):
            obs[str(name)] = _column([_plain(v) for v in ds[name].values[keep]])
    obs["n_cells"] = n_cells
    cells = _cells_metadata(query, by)
    # each cell's kept group, keyed as the aggregation keys groups (group_codes: None for missing)
    codes, cell_keys = group_codes(cells, by)
    position_of = {k: i for i, k in enumerate(kept_keys)}
    table = np.asarray([position_of.get(k, -1) for k in cell_keys], dtype=np.int64)
    position = table[codes] if len(codes) else np.zeros(0, dtype=np.int64)
    inside = position >= 0
    cells, position = cells[inside], position[inside]
    counted = np.bincount(position, minlength=len(kept_keys))
    if not np.array_equal(counted, n_cells):  # the cells read and the aggregation must agree
        raise RuntimeError("pseudobulk: the cells' metadata and the aggregation disagree on group sizes")
    totals = np.bincount(position, weights=cells["total_counts"].to_numpy(np.float64), minlength=len(kept_keys))
    whole = np.allclose(totals, np.rint(totals), rtol=0, atol=INTEGER_TOLERANCE)
    obs["total_counts"] = np.rint(totals).astype(np.int64) if whole else totals
    obs[DECOUPLER_CELLS] = n_cells
    order = np.argsort(position, kind="stable")
    starts = np.searchsorted(position[order], np.arange(len(kept_keys)))
    for c in cells.columns:
        if c in by or c in obs or c in PER_CELL_COLUMNS:
            continue
        value = _constant_per_group(cells[c].iloc[order], starts)
        if value is not None:
            obs[c] = _column(value)
    return obs


def _cells_metadata(query: Query, by: list[str]) -> pd.DataFrame:
    """The query's cells' metadata: the ``by`` columns, ``total_counts`` and every other column of the atlas."""
    columns = [c for c in queryable_columns(query.catalog) if c not in PER_CELL_COLUMNS or c == "total_counts"]
    columns = list(dict.fromkeys([*by, *columns, "total_counts"]))
    return query.obs(columns=columns)


def _constant_per_group(column: pd.Series, starts: np.ndarray) -> list | None:
    """Each group's single value (None where all its cells miss it), or None if some group holds two.

    ``column`` is sorted by group and ``starts`` are the groups' first rows (every group has cells).
    """
    codes, uniques = pd.factorize(column.astype(object).where(column.notna(), None), use_na_sentinel=True)
    if not len(starts):
        return []
    low, high = np.minimum.reduceat(codes, starts), np.maximum.reduceat(codes, starts)
    if (low != high).any():
        return None
    return [None if c < 0 else _plain(uniques[c]) for c in low.tolist()]


def _column(values: list) -> pd.Series | list:
    """Text as a categorical (what count tools' design formulas expect), numbers as numbers."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, str) for v in present):
        return pd.Categorical(values)
    if present and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in present):
        return pd.array(values, dtype="Int64") if len(present) < len(values) else np.asarray(values, dtype=np.int64)
    return values


def _writable(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with text where h5ad cannot store mixed or missing Python objects."""
    out = frame.copy()
    for c in out.columns:
        if out[c].dtype == object:
            out[c] = out[c].map(lambda v: "NA" if v is None else str(v))
    return out


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    return value
