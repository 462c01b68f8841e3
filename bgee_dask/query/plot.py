"""The dot plot single-cell people read at a glance: colour = mean expression, size = fraction expressing."""

from __future__ import annotations

import os

import xarray as xr


def dot_plot(
    ds: xr.Dataset,
    path: str | os.PathLike,
    *,
    max_genes: int = 40,
    max_groups: int = 60,
    title: str | None = None,
) -> str:
    """Draw groups x genes of an ``aggregate`` result into a PNG (or any format matplotlib knows).

    Rows are labelled by names with their cell counts, genes not measured are grey crosses;
    with more genes than fit, the ones with the largest spread of means across groups are
    shown, and with more groups, those with the most cells; the figure says so (see
    ``dotplot.dot_plot_figure``).
    """
    import matplotlib.pyplot as plt

    from bgee_dask.query.dotplot import dot_plot_figure

    fig = dot_plot_figure(ds, max_genes=max_genes, max_groups=max_groups, title=title)
    try:
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return os.fspath(path)
