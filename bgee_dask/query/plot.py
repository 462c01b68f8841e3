"""The dot plot single-cell people read at a glance: colour = mean expression, size = fraction expressing."""

from __future__ import annotations

import os

import numpy as np
import xarray as xr


def dot_plot(ds: xr.Dataset, path: str | os.PathLike, *, max_genes: int = 40, max_groups: int = 60) -> str:
    """Draw groups x genes of an ``aggregate`` result into a PNG (or any format matplotlib knows).

    With more genes than fit, the ones with the largest spread of means across groups are shown.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "mean" not in ds or "frac_expressed" not in ds:
        raise ValueError("the dot plot needs the 'mean' and 'frac_expressed' statistics")
    if ds.sizes.get("group", 0) == 0:
        raise ValueError("nothing to plot: no cell matched the query")
    mean = ds["mean"].values
    frac = ds["frac_expressed"].values
    genes = np.arange(ds.sizes["gene"])
    if genes.size > max_genes:
        with np.errstate(invalid="ignore"):
            spread = np.nan_to_num(np.nanmax(mean, axis=0) - np.nanmin(mean, axis=0), nan=-1)
        genes = np.sort(np.argsort(-spread)[:max_genes])
    groups = np.arange(min(ds.sizes["group"], max_groups))
    by = list(ds.attrs.get("by", []))
    labels = [" | ".join(str(ds[c].values[g]) for c in by) or "all cells" for g in groups]
    names = ds["gene_symbol"].values if "gene_symbol" in ds.coords else ds["gene"].values
    gene_labels = [str(names[g]) if names[g] is not None else str(ds["gene"].values[g]) for g in genes]

    m = mean[np.ix_(groups, genes)]
    f = np.nan_to_num(frac[np.ix_(groups, genes)], nan=0.0)
    fig_w = max(5.0, 0.32 * len(genes) + 4.0)
    fig_h = max(3.0, 0.28 * len(groups) + 2.0)
    # constrained layout gives the colour bar and the size legend their own room beside the dots
    fig, ax = plt.subplots(figsize=(fig_w + 1.2, fig_h), layout="constrained")
    yy, xx = np.meshgrid(np.arange(len(groups)), np.arange(len(genes)), indexing="ij")
    sc = ax.scatter(
        xx.ravel(), yy.ravel(), s=(f.ravel() * 220) + 1, c=m.ravel(), cmap="Reds", edgecolors="0.6", linewidths=0.3
    )
    ax.set_xticks(np.arange(len(genes)), gene_labels, rotation=90, fontsize=8)
    ax.set_yticks(np.arange(len(groups)), labels, fontsize=8)
    ax.set_xlim(-0.7, len(genes) - 0.3)
    ax.set_ylim(len(groups) - 0.3, -0.7)
    norm = ds.attrs.get("normalize", "None")
    fig.colorbar(sc, ax=ax, fraction=0.03, pad=0.02).set_label(f"mean ({'raw counts' if norm == 'None' else norm})")
    for frac_level in (0.25, 0.5, 1.0):
        ax.scatter([], [], s=frac_level * 220 + 1, c="0.7", label=f"{frac_level:.0%}")
    fig.legend(title="fraction\nexpressing", loc="outside right upper", frameon=False, fontsize=8, title_fontsize=8)
    ax.set_title(" x ".join(by) if by else "all cells", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return os.fspath(path)
