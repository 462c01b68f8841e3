"""The dot plot as a matplotlib figure: rows a biologist reads, and every choice made for them said on it.

- rows are labelled by names (``T cell | lung``), each with its number of cells;
- a gene an experiment did not measure is a grey cross with its own legend entry, never an
  empty dot that would read as "not expressed";
- when genes or groups were chosen because not all fit, the title and a note say which and how.
"""

from __future__ import annotations

import warnings

import numpy as np
import xarray as xr

from bgee_dask.query.names import COLUMN_TITLES, group_labels

#: Dot area (points^2) of a gene every cell of a group expresses.
DOT_AREA = 220.0
NOT_MEASURED = "not measured"
NORMALIZED_LABELS = {
    "None": "mean raw counts",
    "cp10k": "mean counts per 10k",
    "log1p_cp10k": "mean log1p(counts per 10k)",
}


def choose_genes(ds: xr.Dataset, max_genes: int) -> tuple[np.ndarray, str | None]:
    """The genes to draw and, when not all fit, a sentence saying how they were chosen."""
    n = ds.sizes["gene"]
    if n <= max_genes:
        return np.arange(n), None
    mean = ds["mean"].values
    with warnings.catch_warnings():  # all-NaN columns (genes no group measured) are expected
        warnings.simplefilter("ignore", RuntimeWarning)
        spread = np.nan_to_num(np.nanmax(mean, axis=0) - np.nanmin(mean, axis=0), nan=-1)
    chosen = np.sort(np.argsort(-spread, kind="stable")[:max_genes])
    return chosen, f"{max_genes} of {n:,} genes, chosen automatically: largest spread of the mean across groups"


def choose_groups(ds: xr.Dataset, genes: np.ndarray, max_groups: int) -> tuple[np.ndarray, list[str]]:
    """The groups to draw, in their order, and notes on those left out.

    Groups whose experiments measured none of the drawn genes are left out (a row of crosses
    says nothing the note does not); of the others, when more than ``max_groups`` remain, those
    with the most cells are drawn.
    """
    cells = ds["n_cells"].values
    some = (ds["n_measured"].values[:, genes] > 0).any(axis=1) if "n_measured" in ds else np.ones(len(cells), bool)
    candidates = np.flatnonzero(some)
    notes = []
    if len(candidates) < len(cells):
        unmeasured = int(cells[~some].sum())
        notes.append(f"{len(cells) - len(candidates)} groups ({unmeasured:,} cells) measured none of these genes")
    if len(candidates) > max_groups:
        chosen = np.sort(candidates[np.argsort(-cells[candidates], kind="stable")[:max_groups]])
        left = int(cells[candidates].sum() - cells[chosen].sum())
        notes.append(
            f"{len(candidates) - max_groups} of {len(candidates)} groups left out ({left:,} cells): "
            f"only the {max_groups} with the most cells are shown"
        )
        return chosen, notes
    return candidates, notes


def dot_plot_figure(
    ds: xr.Dataset,
    *,
    max_genes: int = 40,
    max_groups: int = 60,
    title: str | None = None,
):
    """Groups x genes of an ``aggregate`` result (``mean`` and ``frac_expressed``) as a matplotlib Figure.

    Colour is the mean (in the result's normalization, said on the colour bar), dot size the
    fraction of measured cells expressing. ``title`` replaces the default (the grouping columns);
    the sentence on automatically chosen genes is added below it either way.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "mean" not in ds or "frac_expressed" not in ds:
        raise ValueError("the dot plot needs the 'mean' and 'frac_expressed' statistics")
    if ds.sizes.get("group", 0) == 0:
        raise ValueError("nothing to plot: no cell matched the query")
    if ds.sizes.get("gene", 0) == 0:
        raise ValueError("nothing to plot: the result has no gene")
    genes, genes_note = choose_genes(ds, max_genes)
    groups, groups_notes = choose_groups(ds, genes, max_groups)
    if not len(groups):
        raise ValueError("nothing to plot: no group measured any of the genes")
    groups_note = "; ".join(groups_notes)
    labels = group_labels(ds)
    n_cells = ds["n_cells"].values
    row_labels = [f"{labels[g]}  ({int(n_cells[g]):,} cells)" for g in groups]
    symbols = ds["gene_symbol"].values if "gene_symbol" in ds.coords else ds["gene"].values
    ids = ds["gene"].values
    gene_labels = [str(symbols[g]) if symbols[g] not in (None, "") else str(ids[g]) for g in genes]

    mean = ds["mean"].values[np.ix_(groups, genes)]
    frac = ds["frac_expressed"].values[np.ix_(groups, genes)]
    measured = ~np.isnan(mean)
    fig_w = max(6.0, 0.32 * len(genes) + 0.07 * max(len(s) for s in row_labels) + 3.5)
    fig_h = max(3.2, 0.28 * len(groups) + 2.4 + (0.3 if groups_note else 0.0))
    # constrained layout gives the colour bar and the legend their own room beside the dots
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), layout="constrained")
    yy, xx = np.meshgrid(np.arange(len(groups)), np.arange(len(genes)), indexing="ij")
    shown = mean[measured]
    vmax = float(np.nanmax(shown)) if shown.size and np.nanmax(shown) > 0 else 1.0
    dots = ax.scatter(
        xx[measured],
        yy[measured],
        s=np.nan_to_num(frac[measured], nan=0.0) * DOT_AREA + 1,
        c=shown,
        cmap="Reds",
        vmin=0.0,
        vmax=vmax,
        edgecolors="0.6",
        linewidths=0.3,
    )
    ax.scatter(xx[~measured], yy[~measured], marker="x", s=18, c="0.55", linewidths=0.8, label=NOT_MEASURED)
    ax.set_xticks(np.arange(len(genes)), gene_labels, rotation=90, fontsize=8)
    ax.set_yticks(np.arange(len(groups)), row_labels, fontsize=8)
    ax.set_xlim(-0.7, len(genes) - 0.3)
    ax.set_ylim(len(groups) - 0.3, -0.7)
    ax.grid(False)
    norm = str(ds.attrs.get("normalize", "None"))
    fig.colorbar(dots, ax=ax, fraction=0.03, pad=0.02).set_label(NORMALIZED_LABELS.get(norm, f"mean ({norm})"))
    for level in (0.25, 0.5, 1.0):
        ax.scatter([], [], s=level * DOT_AREA + 1, c="0.7", edgecolors="0.6", linewidths=0.3, label=f"{level:.0%}")
    fig.legend(
        title="fraction of cells\nexpressing", loc="outside right upper", frameon=False, fontsize=8, title_fontsize=8
    )
    by = list(ds.attrs.get("by", []))
    heading = title if title is not None else (" x ".join(COLUMN_TITLES.get(c, c) for c in by) or "all cells")
    ax.set_title(heading + (f"\n{genes_note}" if genes_note else ""), fontsize=10)
    if groups_note:
        fig.supxlabel(groups_note, fontsize=8, color="0.3")
    return fig
