"""Writing aggregate results where people open them: CSV and Parquet (long tables) or netCDF."""

from __future__ import annotations

import os

import pandas as pd
import xarray as xr


def to_long_frame(ds: xr.Dataset) -> pd.DataFrame:
    """One row per (group, gene): the group's key columns, the gene, n_cells and the statistics."""
    by = list(ds.attrs.get("by", []))
    per_gene = [v for v in ds.data_vars if ds[v].dims == ("group", "gene")]
    n_groups, n_genes = ds.sizes["group"], ds.sizes["gene"]
    frame = {c: ds[c].values.repeat(n_genes) for c in by}
    frame["gene"] = pd.Series(ds["gene"].values).tolist() * n_groups
    if "gene_symbol" in ds.coords:
        frame["gene_symbol"] = pd.Series(ds["gene_symbol"].values).tolist() * n_groups
    frame["n_cells"] = ds["n_cells"].values.repeat(n_genes)
    for v in per_gene:
        frame[v] = ds[v].values.reshape(-1)
    return pd.DataFrame(frame)


def write_result(ds: xr.Dataset, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".nc":
        out = ds.copy()
        for name in list(out.coords):
            if out[name].dtype == object:
                out[name] = out[name].astype(str)
        out.to_netcdf(path, engine="h5netcdf")  # a dependency: scipy's netCDF3 writer cannot store text
    elif ext == ".csv":
        to_long_frame(ds).to_csv(path, index=False)
    elif ext in (".parquet", ".pq"):
        frame = to_long_frame(ds)
        for c in frame.columns:
            if frame[c].dtype == object:
                frame[c] = frame[c].astype(str)
        frame.to_parquet(path, index=False)
    else:
        raise ValueError(f"{path}: unknown output format {ext!r}; use .csv, .parquet or .nc")
    return path

