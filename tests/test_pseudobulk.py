"""Query.pseudobulk against numpy/anndata sums on the source H5AD files, decoupler's own pseudobulk, and
PyDESeq2 / decoupler run end to end on it."""

from __future__ import annotations

import os
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import bgee_dask as bd

from . import make_inputs as mi
from .test_query import _name_genes_by_id

HUMAN = ("SRPT00001", "SRPT00002", "SRPT00003")


@pytest.fixture(scope="module")
def human_sources(bgee_sources) -> list[str]:
    return [str(bgee_sources[k]) for k in HUMAN]


@pytest.fixture(scope="module")
def human_atlas(tmp_path_factory, human_sources):
    out = tmp_path_factory.mktemp("pseudobulk-atlas") / "atlas"
    reports = bd.convert(human_sources, out, workers=1, progress=False)
    assert all(r.status == "converted" for r in reports), [r.message for r in reports]
    return bd.open_atlas(out)


@pytest.fixture(scope="module")
def human_reference(human_sources) -> dict[str, ad.AnnData]:
    """The sources as anndata reads them, genes named as the atlas keys them (see test_query)."""
    refs = {}
    for f in human_sources:
        a = ad.read_h5ad(f)
        a.obs["experimentId"] = os.path.basename(f).split("_")[2]
        a.X = sp.csr_matrix(a.X, dtype=np.float64)
        refs[a.obs["experimentId"].iloc[0]] = a
    _name_genes_by_id(refs)
    return refs


def _reference_pseudobulk(refs: dict[str, ad.AnnData], by: list[str], mask=None):
    """Per group: cell count, total counts, and per gene (over every experiment's own genes) the sum and the
    number of cells with a non-zero count; plus the experiments each group's cells come from."""
    groups: dict[tuple, dict] = {}
    for exp, a in refs.items():
        obs = a.obs
        keep = np.ones(a.n_obs, bool) if mask is None else mask(obs)
        keys = obs[by].astype(object).apply(tuple, axis=1)
        for key in pd.unique(keys[keep]):
            rows = np.flatnonzero(keep & (keys == key).to_numpy())
            x = a.X[rows]
            g = groups.setdefault(key, {"n_cells": 0, "total": 0.0, "sums": {}, "nexpr": {}, "experiments": set()})
            g["n_cells"] += len(rows)
            g["total"] += float(x.sum())
            g["experiments"].add(exp)
            sums = np.asarray(x.sum(axis=0)).ravel()
            nexpr = np.asarray((x > 0).sum(axis=0)).ravel()
            for name, s, n in zip(a.var_names, sums, nexpr, strict=True):
                g["sums"][name] = g["sums"].get(name, 0.0) + s
                g["nexpr"][name] = g["nexpr"].get(name, 0) + n
    return groups


def _check_against_reference(pb: ad.AnnData, refs, by, min_cells, mask=None):
    groups = _reference_pseudobulk(refs, by, mask)
    kept = {k: g for k, g in groups.items() if g["n_cells"] >= min_cells}
    below = {k: g for k, g in groups.items() if g["n_cells"] < min_cells}
    # genes measured by every experiment of every kept group
    exps = set().union(*(g["experiments"] for g in kept.values()))
    genes = set.intersection(*(set(refs[e].var_names) for e in exps))
    assert set(pb.var_names) == genes
    got_keys = [tuple(pb.obs[c].iloc[i] for c in by) for i in range(pb.n_obs)]
    assert sorted(got_keys) == sorted(kept)
    order = list(pb.var_names)
    for i, key in enumerate(got_keys):
        g = kept[key]
        want = np.asarray([g["sums"][n] for n in order])
        np.testing.assert_array_equal(pb.X[i], np.rint(want).astype(np.int64))
        assert pb.obs["n_cells"].iloc[i] == g["n_cells"] == pb.obs["psbulk_cells"].iloc[i]
        assert pb.obs["total_counts"].iloc[i] == round(g["total"])
        assert pb.obs["psbulk_counts"].iloc[i] == pb.X[i].sum()
        np.testing.assert_allclose(pb.layers["mean"][i], want / g["n_cells"], rtol=1e-12)
        nexpr = np.asarray([g["nexpr"][n] for n in order])
        np.testing.assert_allclose(pb.layers["psbulk_props"][i], nexpr / g["n_cells"], rtol=1e-12)
    left = pb.uns["groups_below_min_cells"]
    assert sorted(zip(*(left[c] for c in by), strict=True)) == sorted(below)
    assert dict(zip(zip(*(left[c] for c in by), strict=True), left["n_cells"], strict=True)) == {
        k: g["n_cells"] for k, g in below.items()
    }
    all_genes = set().union(*(set(refs[e].var_names) for e in {e for g in groups.values() for e in g["experiments"]}))
    assert pb.uns["n_genes_dropped"] == len(all_genes) - len(genes)


def test_pseudobulk_by_cell_type_and_library_equals_numpy(human_atlas, human_reference):
    by = ["cellTypeId", "libID"]
    pb = human_atlas.query().pseudobulk(by, min_cells=150)
    assert pb.X.dtype == np.int64 and pb.uns["counts_rounded"] is False
    _check_against_reference(pb, human_reference, by, 150)
    # one library is one experiment: experimentId, tissue, species and names are constant within each group
    for c in ("experimentId", "speciesId", "anatEntityId", "anatEntityName", "stageId", "cellTypeName"):
        assert c in pb.obs, c
    for i in range(pb.n_obs):
        exp = pb.obs["experimentId"].iloc[i]
        src = human_reference[exp].obs
        cells = src[(src["cellTypeId"] == pb.obs["cellTypeId"].iloc[i]) & (src["libID"] == pb.obs["libID"].iloc[i])]
        assert cells["cellTypeName"].iloc[0] == pb.obs["cellTypeName"].iloc[i]
        assert int(pb.obs["speciesId"].iloc[i]) == 9606
    # per-cell columns never become group columns
    assert not {"barcodes", "unique_cell_ids", "source_row", "n_genes"} & set(pb.obs.columns)
    symbols = dict(zip(pb.var_names, pb.var["gene_symbol"], strict=True))
    assert symbols["ENSG00000177455"] == "CD19"


def test_genes_keyed_by_ensembl_id_are_selected_by_symbol(human_atlas, human_reference):
    """SRPT00001 names genes by Ensembl id (symbols in feature_name), SRPT00002/3 by symbol: one CD19 column,
    found by ds.sel(gene_symbol=...) and carried as var["gene_symbol"] by to_anndata."""
    q = human_atlas.query("cellTypeId == 'CL:0000236'", genes="CD19,MS4A1")
    ds = q.aggregate(by="experimentId")
    cd19 = ds.sel(gene_symbol="CD19")
    assert str(cd19["gene"].values) == "ENSG00000177455"
    for i, exp in enumerate(ds["experimentId"].values):
        a = human_reference[exp]
        rows = (a.obs["cellTypeId"] == "CL:0000236").to_numpy()
        assert cd19["sum"].values[i] == a[rows, "ENSG00000177455"].X.sum()
    adata = q.to_anndata()
    assert list(adata.var["gene_symbol"]) == ["CD19", "MS4A1"]
    assert adata.varm["measured"].to_numpy().all()


def test_pseudobulk_across_experiments_keeps_only_genes_every_group_measured(human_atlas, human_reference):
    """B cells come from three experiments with different gene sets: only the genes all three measured stay,
    and constant columns are only those constant within every group (experimentId is not)."""
    flt = "cellTypeId in ['CL:0000236', 'CL:0000624', 'CL:0000113']"
    pb = human_atlas.query(flt).pseudobulk("cellTypeId", min_cells=10)

    def mask(obs):
        return obs["cellTypeId"].isin(["CL:0000236", "CL:0000624", "CL:0000113"]).to_numpy()

    _check_against_reference(pb, human_reference, ["cellTypeId"], 10, mask)
    assert "experimentId" not in pb.obs and pb.obs["anatEntityId"].astype(str).tolist() == ["UBERON:0000178"] * 3
    assert pb.uns["filter"] == flt and pb.uns["by"] == ["cellTypeId"] and pb.uns["min_cells"] == 10


def test_pseudobulk_equals_decouplers_pseudobulk_of_the_cells(human_atlas, human_reference):
    """decoupler.pp.pseudobulk over the source cells of one experiment gives the same X, cell counts,
    count totals and fraction-expressing layer (it names the last three as we do)."""
    import decoupler as dc

    cells = human_reference["SRPT00003"].copy()
    cells.obs = cells.obs[["cellTypeId", "libID"]].astype(str)
    cells.obs_names_make_unique()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = dc.pp.pseudobulk(cells, sample_col="libID", groups_col="cellTypeId", mode="sum")
    pb = human_atlas.query("experimentId == 'SRPT00003'").pseudobulk(["libID", "cellTypeId"], min_cells=1)
    want = want[want.obs["psbulk_cells"].to_numpy() > 0]  # decoupler lists every library x cell type pair
    assert pb.n_obs == want.n_obs == 3
    want = want[:, pb.var_names]
    order = [
        np.flatnonzero((want.obs["libID"] == lib).to_numpy() & (want.obs["cellTypeId"] == ct).to_numpy())[0]
        for lib, ct in zip(pb.obs["libID"], pb.obs["cellTypeId"], strict=True)
    ]
    want = want[order]
    np.testing.assert_array_equal(pb.X, np.asarray(want.X))
    np.testing.assert_array_equal(pb.obs["psbulk_cells"].to_numpy(), want.obs["psbulk_cells"].to_numpy())
    np.testing.assert_array_equal(pb.obs["psbulk_counts"].to_numpy(), want.obs["psbulk_counts"].to_numpy())
    np.testing.assert_allclose(pb.layers["psbulk_props"], np.asarray(want.layers["psbulk_props"]), rtol=1e-12)


def test_pseudobulk_goes_into_pydeseq2_and_decoupler_as_is(human_atlas, tmp_path):
    """B cells against CD4 T cells, one pseudobulk per library of three experiments, read back from h5ad:
    decoupler's filter_samples and filter_by_expr, then PyDESeq2, with no reshaping. The design "~cellTypeId"
    is accepted and its size factors equal DESeq2's median of ratios computed with numpy; the full fit,
    with the experiment (a constant obs column) as a batch, finds the B cell and T cell markers."""
    import decoupler as dc
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.default_inference import DefaultInference
    from pydeseq2.ds import DeseqStats

    flt = "cellTypeId in ['CL:0000236', 'CL:0000624']"
    pb = human_atlas.query(flt).pseudobulk(["cellTypeId", "libID"], min_cells=10)
    path = tmp_path / "pb.h5ad"
    pb.write_h5ad(path)
    pb = ad.read_h5ad(path)  # what a user reads back from the command line's output
    assert pb.n_obs == 6 and pb.obs["experimentId"].nunique() == 3
    dc.pp.filter_samples(pb, min_cells=10, min_counts=1000)  # uses psbulk_cells / psbulk_counts
    assert pb.n_obs == 6
    dc.pp.filter_by_expr(pb, group="cellTypeId", min_count=50, min_total_count=100)
    assert 500 < pb.n_vars < 5000
    inference = DefaultInference(n_cpus=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        simple = DeseqDataSet(adata=pb, design="~cellTypeId", inference=inference, quiet=True)
        simple.fit_size_factors()
        counts = pb.X.astype(np.float64)
        logs = np.log(counts[:, (counts > 0).all(axis=0)])
        ratios = logs - logs.mean(axis=0)
        np.testing.assert_allclose(simple.obs["size_factors"].to_numpy(), np.exp(np.median(ratios, axis=1)), rtol=1e-10)
        dds = DeseqDataSet(adata=pb, design="~experimentId + cellTypeId", inference=inference, quiet=True)
        dds.deseq2()
        stats = DeseqStats(dds, contrast=["cellTypeId", "CL:0000236", "CL:0000624"], inference=inference, quiet=True)
        stats.summary()
    res = stats.results_df
    res.index = pb.var.loc[res.index, "gene_symbol"].astype(str)
    for b_marker in ("CD79A", "MS4A1", "CD74"):
        assert res.loc[b_marker, "log2FoldChange"] > 3 and res.loc[b_marker, "padj"] < 1e-3, b_marker
    for t_marker in ("CD3E", "IL7R"):  # less separated than the B markers: padj ~1e-3 here
        assert res.loc[t_marker, "log2FoldChange"] < -2 and res.loc[t_marker, "padj"] < 1e-2, t_marker


def test_fractional_counts_are_rounded_and_said_so(tmp_path):
    """Bgee's bustools --em counts can be fractional: sums are rounded to the nearest integer and uns says so."""
    rng = np.random.default_rng(3)
    base = mi.random_counts(200, 40, seed=3, density=0.3).astype(np.float64)
    x = base.copy()
    x.data = x.data * rng.choice([0.5, 1.0, 1.25, 0.3333], size=x.data.size)
    a = mi.make_adata(200, 40, seed=3, x=sp.csr_matrix(x.astype(np.float32)))
    src = mi.write(a, tmp_path / mi.bgee_name("SRPT97001"))
    assert all(r.ok for r in bd.convert([src], tmp_path / "atlas", workers=1, progress=False))
    pb = bd.open_atlas(tmp_path / "atlas").query().pseudobulk("cellTypeId", min_cells=1)
    assert pb.uns["counts_rounded"] is True and pb.X.dtype == np.int64
    xs = sp.csr_matrix(a.X, dtype=np.float64)
    for i, ct in enumerate(pb.obs["cellTypeId"]):
        rows = (a.obs["cellTypeId"] == ct).to_numpy()
        want = np.asarray(xs[rows].sum(axis=0)).ravel()
        np.testing.assert_array_equal(pb.X[i], np.rint(want).astype(np.int64))
        np.testing.assert_allclose(pb.layers["mean"][i], want / rows.sum(), rtol=1e-6)
    pb.write_h5ad(tmp_path / "pb.h5ad")
    assert bool(ad.read_h5ad(tmp_path / "pb.h5ad").uns["counts_rounded"]) is True


def test_pseudobulk_across_species_has_no_gene_and_warns(four_file_atlas):
    """Human and mouse experiments share no gene key: nothing is measured in every group; a warning says why."""
    with pytest.warns(UserWarning, match="no gene was measured"):
        pb = bd.open_atlas(four_file_atlas).query().pseudobulk("speciesId", min_cells=1)
    assert pb.n_vars == 0 and sorted(pb.obs["speciesId"].tolist()) == [9606, 10090]


def test_pseudobulk_rejects_bad_arguments(four_file_atlas):
    q = bd.open_atlas(four_file_atlas).query()
    with pytest.raises(ValueError, match="at least one column"):
        q.pseudobulk([])
    with pytest.raises(ValueError, match="min_cells"):
        q.pseudobulk("cellTypeId", min_cells=0)
