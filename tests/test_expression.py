"""atlas.expression, genes by symbol, column values and names, and the measured mask of to_anndata, against
references computed with scanpy/numpy/anndata on the source H5AD files."""

from __future__ import annotations

import os

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

import bgee_dask as bd
import bgee_dask.query.blocks as blocks_module

from .conftest import MARKER_GENES

MOUSE_GENES = ["Lyz2", "Cd74"]


@pytest.fixture(scope="module")
def atlas(four_file_atlas):
    return bd.open_atlas(four_file_atlas)


@pytest.fixture(scope="module")
def sources(four_files) -> dict[str, ad.AnnData]:
    """The four files with cp10k computed by scanpy (total over every gene of the cell), genes by their names."""
    out = {}
    for f in four_files:
        a = ad.read_h5ad(f)
        a.obs["experimentId"] = os.path.basename(f).split("_")[2]
        a.X = sp.csr_matrix(a.X, dtype=np.float64)
        a.layers["counts"] = a.X.copy()
        sc.pp.normalize_total(a, target_sum=1e4)
        out[a.obs["experimentId"].iloc[0]] = a
    return out


def _reference_expression(sources, genes, by):
    """Per (group, gene): n_cells, n_measured, mean cp10k over measured cells, fraction of them expressing."""
    rows = []
    groups: dict[tuple, list] = {}
    for a in sources.values():
        for key, idx in a.obs.groupby(by, observed=True).indices.items():
            groups.setdefault(key if isinstance(key, tuple) else (key,), []).append((a, idx))
    for gene in genes:
        for key, parts in groups.items():
            n_cells = sum(len(idx) for _, idx in parts)
            values = [np.asarray(a[idx, gene].X.todense()).ravel() for a, idx in parts if gene in a.var_names]
            v = np.concatenate(values) if values else np.zeros(0)
            rows.append(
                {
                    **dict(zip(by, key, strict=True)),
                    "gene": gene,
                    "n_cells": n_cells,
                    "n_measured": len(v),
                    "mean_cp10k": v.mean() if len(v) else np.nan,
                    "frac_expressed": (v > 0).mean() if len(v) else np.nan,
                }
            )
    return pd.DataFrame(rows)


def _keyed(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    out = frame.copy()
    for c in by:
        out[c] = out[c].map(lambda v: str(int(v)) if isinstance(v, (int, np.integer)) else str(v))
    return out.set_index([*by, "gene"]).sort_index()


def test_expression_equals_scanpy_per_species_tissue_and_cell_type(atlas, sources, monkeypatch):
    """Default groups, names beside ids, cp10k means and fractions over measured cells; read from the
    gene-major copy only (reading a row block would fail here)."""

    def no_row_blocks(*args, **kwargs):
        raise AssertionError("expression read a row block instead of the gene-major copy")

    monkeypatch.setattr(blocks_module, "aggregate_block", no_row_blocks)
    genes = [*MARKER_GENES, *MOUSE_GENES]
    got = atlas.expression(",".join(genes))
    by = ["speciesId", "anatEntityId", "cellTypeId"]
    assert list(got.columns) == [
        "speciesId", "species", "anatEntityId", "anatEntityName", "cellTypeId", "cellTypeName",
        "gene", "gene_symbol", "n_cells", "n_measured", "mean_cp10k", "frac_expressed",
    ]  # fmt: skip
    want = _reference_expression(sources, genes, by)
    assert len(got) == len(want)
    g, w = _keyed(got, by), _keyed(want, by)
    assert g.index.equals(w.index)
    np.testing.assert_array_equal(g["n_cells"], w["n_cells"])
    np.testing.assert_array_equal(g["n_measured"], w["n_measured"])
    np.testing.assert_allclose(g["mean_cp10k"], w["mean_cp10k"], rtol=1e-9, equal_nan=True)
    np.testing.assert_allclose(g["frac_expressed"], w["frac_expressed"], rtol=1e-12, equal_nan=True)
    # names as the sources give them
    for a in sources.values():
        for ct, name in a.obs[["cellTypeId", "cellTypeName"]].drop_duplicates().itertuples(index=False):
            assert set(got.loc[got["cellTypeId"] == ct, "cellTypeName"]) == {name}
        for t, name in a.obs[["anatEntityId", "anatEntityName"]].drop_duplicates().itertuples(index=False):
            assert set(got.loc[got["anatEntityId"] == t, "anatEntityName"]) == {name}
    assert set(zip(got["speciesId"], got["species"], strict=True)) == {(9606, "Homo sapiens"), (10090, "Mus musculus")}
    # genes in the order asked; within a gene the highest mean first, not-measured groups last
    assert list(dict.fromkeys(got["gene"])) == genes
    for _, part in got.groupby("gene", sort=False):
        means = part["mean_cp10k"].to_numpy()
        measured = ~np.isnan(means)
        assert measured[: measured.sum()].all() and (np.diff(means[measured]) <= 0).all()


def test_expression_with_filter_and_own_groups(atlas, sources):
    got = atlas.expression(["LYZ"], by="libID", filter="speciesId == 9606")
    human = {k: a for k, a in sources.items() if k in ("SRPT00003", "SRPT00004")}
    want = _reference_expression(human, ["LYZ"], ["libID"])
    g, w = _keyed(got, ["libID"]), _keyed(want, ["libID"])
    assert g.index.equals(w.index)
    np.testing.assert_allclose(g["mean_cp10k"], w["mean_cp10k"], rtol=1e-9)
    with pytest.raises(ValueError, match="at least one gene"):
        atlas.expression(" , ")


def test_genes_as_comma_separated_text_mean_the_list(atlas):
    a = atlas.query(genes="CD19, LYZ").aggregate(by="cellTypeId")
    b = atlas.query(genes=["CD19", "LYZ"]).aggregate(by="cellTypeId")
    c = atlas.query(genes=["CD19,LYZ"]).aggregate(by="cellTypeId")
    assert list(a["gene"].values) == ["CD19", "LYZ"]
    assert a.identical(b) and b.identical(c)


def test_sel_by_gene_symbol_on_aggregate_results(atlas, sources):
    ds = atlas.query("speciesId == 9606", genes=["CD3E", "LYZ"]).aggregate(by="cellTypeId")
    one = ds.sel(gene_symbol="LYZ")
    np.testing.assert_array_equal(one["mean"].values, ds["mean"].values[:, 1])
    assert str(one["gene"].values) == "LYZ"
    # the name coordinate beside the id, from the sources
    names = pd.concat([a.obs[["cellTypeId", "cellTypeName"]] for a in sources.values()]).drop_duplicates()
    want = dict(zip(names["cellTypeId"], names["cellTypeName"], strict=True))
    assert [want[c] for c in ds["cellTypeId"].values] == list(ds["cellTypeName"].values)


def test_unknown_genes_get_near_matches(atlas):
    with pytest.raises(KeyError) as err:
        atlas.query(genes=["cd19"])
    message = str(err.value)
    assert "'cd19'" in message and "did you mean" in message and "CD19" in message
    with pytest.raises(KeyError) as err:  # a mouse symbol in a human-only query: the human one is offered
        atlas.query("speciesId == 9606", genes=["Lyz"])
    assert "LYZ" in str(err.value)
    with pytest.raises(KeyError, match="'XYZZY42': not in any queried experiment"):
        atlas.query(genes=["XYZZY42"])


def test_to_anndata_says_which_genes_each_experiment_measured(atlas, sources):
    """varm["measured"] is genes x experiments, its columns the values of obs["experimentId"]."""
    genes = ["CD19", "LYZ", "Lyz2", "Cd74"]
    adata = atlas.query(genes=genes).to_anndata()
    measured = adata.varm["measured"]
    assert list(measured.index) == genes
    assert set(measured.columns) == set(adata.obs["experimentId"].astype(str))
    for exp, a in sources.items():
        np.testing.assert_array_equal(measured[exp].to_numpy(), [g in a.var_names for g in genes])
    # files that name genes by symbol: the name is the symbol
    assert list(adata.var["gene_symbol"]) == genes


def test_values_of_a_column_with_names_and_counts(atlas, sources):
    obs = pd.concat([a.obs for a in sources.values()])
    got = atlas.values("cellTypeId")
    want = obs.groupby("cellTypeId", observed=True).agg(
        n_cells=("cellTypeId", "size"), n_experiments=("experimentId", "nunique"), name=("cellTypeName", "first")
    )
    assert list(got.columns) == ["cellTypeId", "cellTypeName", "n_cells", "n_experiments"]
    assert set(got["cellTypeId"]) == set(want.index)
    for row in got.itertuples(index=False):
        assert (row.n_cells, row.n_experiments, row.cellTypeName) == tuple(want.loc[row.cellTypeId])
    assert (np.diff(got["n_cells"].to_numpy()) <= 0).all()
    human = atlas.values("sex", filter="speciesId == 9606")
    assert human.to_dict("records") == [
        {"sex": "not annotated", "n_cells": int((obs["speciesId"] == 9606).sum()), "n_experiments": 2}
    ]
    species = atlas.values("speciesId")
    assert dict(zip(species["species"], species["n_cells"], strict=True)) == {
        "Homo sapiens": int((obs["speciesId"] == 9606).sum()),
        "Mus musculus": int((obs["speciesId"] == 10090).sum()),
    }
    with pytest.raises(KeyError, match="did you mean"):
        atlas.values("cellType")
    assert {"cellTypeId", "anatEntityId", "cellTypeAuthorAnnotation", "experimentId"} <= set(atlas.columns)
