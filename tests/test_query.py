"""Query results against references computed from the source H5AD files with anndata/numpy/scanpy."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import bgee_dask as bd

from . import make_inputs as mi
from .test_s3 import gene_column

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bgee"
STATS = ["sum", "mean", "var", "n_expressed", "frac_expressed"]


@pytest.fixture(scope="module")
def sources() -> list[str]:
    files = sorted(
        glob.glob(str(SHARED / "Homo_sapiens" / "*.h5ad")) + glob.glob(str(SHARED / "Mus_musculus" / "*.h5ad"))
    )
    assert len(files) == 7, f"shared Bgee files missing under {SHARED}"
    return files


@pytest.fixture(scope="module")
def atlas(tmp_path_factory, sources):
    out = tmp_path_factory.mktemp("atlas")
    reports = bd.convert(sources, out, workers=1, progress=False)
    assert all(r.status == "converted" for r in reports), [r.message for r in reports]
    return bd.open_atlas(out)


@pytest.fixture(scope="module")
def reference(sources) -> dict[str, ad.AnnData]:
    """The source files as anndata reads them: experimentId from the file name, genes named as queries name them."""
    out = {}
    for f in sources:
        a = ad.read_h5ad(f)
        exp = os.path.basename(f).split("_")[2]
        a.obs["experimentId"] = exp
        a.X = sp.csr_matrix(a.X, dtype=np.float64)
        out[exp] = a
    _name_genes_by_id(out)
    return out


def _name_genes_by_id(refs: dict[str, ad.AnnData]) -> None:
    """Rename the genes of symbol-named files to the Ensembl ids the atlas keys them by, written out plainly.

    Within a species: a name that is not itself an id of an id-named file, and that those files give
    as the symbol of exactly one id, becomes that id, unless that puts the id twice in one file.
    """
    species: dict[int, list[str]] = {}
    for exp, a in refs.items():
        species.setdefault(int(a.obs["speciesId"].iloc[0]), []).append(exp)
    for exps in species.values():
        ids_of: dict[str, set[str]] = {}
        for exp in exps:
            var = refs[exp].var
            if "feature_name" in var:
                for gene_id, symbol in zip(var.index, var["feature_name"], strict=True):
                    if isinstance(symbol, str) and symbol != gene_id:
                        ids_of.setdefault(symbol, set()).add(gene_id)
        named_ids = set().union(*ids_of.values()) if ids_of else set()
        for exp in exps:
            names = list(refs[exp].var_names)
            new = [next(iter(ids_of[n])) if n not in named_ids and len(ids_of.get(n, ())) == 1 else n for n in names]
            times = pd.Series(new).value_counts()
            refs[exp].var_names = [b if b == a or times[b] == 1 else a for a, b in zip(names, new, strict=True)]


def _ref_aggregate(refs, mask_fn, by, genes, normalize=None):
    """Per group and gene: sum, sum of squares, expressing cells, cells measured; plus exact var via numpy."""
    acc: dict[tuple, dict[str, np.ndarray]] = {}
    dense_values: dict[tuple, list[np.ndarray]] = {}
    for a in refs.values():
        mask = mask_fn(a.obs)
        if not mask.any():
            continue
        x = a.X[np.flatnonzero(mask)]
        if normalize:
            totals = np.asarray(a.X.sum(axis=1)).ravel()[mask]
            with np.errstate(divide="ignore"):
                x = sp.diags(np.where(totals > 0, 1e4 / totals, 0.0)) @ x
            if normalize == "log1p_cp10k":
                x = x.log1p()
        cols = pd.Index(a.var_names).get_indexer(genes)
        measured = cols >= 0
        xg = x[:, np.where(measured, cols, 0)].toarray()
        xg[:, ~measured] = 0.0
        obs = a.obs[mask].reset_index(drop=True)
        keys = obs[by].astype(str).agg("\t".join, axis=1) if by else pd.Series([""] * len(obs))
        for key, idx in keys.groupby(keys).groups.items():
            v = xg[np.asarray(idx)]
            slot = acc.setdefault(key, {"sum": 0.0, "n_expressed": 0, "n_measured": 0, "n_cells": 0})
            slot["sum"] = slot["sum"] + np.where(measured, v.sum(axis=0), 0.0)
            slot["n_expressed"] = slot["n_expressed"] + (v > 0).sum(axis=0)
            slot["n_measured"] = slot["n_measured"] + np.where(measured, len(idx), 0)
            slot["n_cells"] += len(idx)
            dense_values.setdefault(key, []).append(np.where(measured, v, np.nan))
    result = {}
    for key, slot in acc.items():
        allv = np.concatenate(dense_values[key], axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            nm = slot["n_measured"]
            var = np.array(
                [np.var(col[~np.isnan(col)], ddof=1) if (~np.isnan(col)).sum() > 1 else np.nan for col in allv.T]
            )
            result[key] = {
                "n_cells": slot["n_cells"],
                "n_measured": nm,
                "sum": np.where(nm > 0, slot["sum"], np.nan),
                "mean": np.where(nm > 0, slot["sum"] / nm, np.nan),
                "var": var,
                "n_expressed": slot["n_expressed"],
                "frac_expressed": np.where(nm > 0, slot["n_expressed"] / nm, np.nan),
            }
    return result


def _check(ds, ref, by):
    keys = ["\t".join(str(ds[c].values[i]) for c in by) if by else "" for i in range(ds.sizes["group"])]
    assert sorted(keys) == sorted(ref), (sorted(keys)[:5], sorted(ref)[:5])
    for i, key in enumerate(keys):
        r = ref[key]
        assert int(ds["n_cells"].values[i]) == r["n_cells"]
        np.testing.assert_array_equal(ds["n_measured"].values[i], r["n_measured"])
        for stat in STATS:
            if stat in ds:
                np.testing.assert_allclose(
                    ds[stat].values[i], r[stat], rtol=1e-9, atol=1e-9, equal_nan=True, err_msg=stat
                )


def _genes_sample(refs, n=60, seed=0):
    """Genes measured in one, several or all experiments of a species, plus their union."""
    rng = np.random.default_rng(seed)
    pool = sorted(set().union(*[set(a.var_names) for a in refs.values()]))
    return sorted(rng.choice(pool, size=n, replace=False).tolist())


@pytest.mark.parametrize("gene_path", ["never", "always"])
def test_full_scan_every_stat_against_numpy(atlas, reference, monkeypatch, gene_path):
    import bgee_dask.query.plan as plan_module

    monkeypatch.setattr(plan_module, "GENE_PATH_SHARE", 0.0 if gene_path == "never" else float("inf"))
    refs = {e: a for e, a in reference.items() if a.obs["speciesId"].iloc[0] == 9606}
    genes = _genes_sample(refs)
    q = atlas.query("speciesId == 9606", genes=genes)
    assert bool(q.plan.gene_tasks) == (gene_path == "always")
    ds = q.aggregate(by=["cellTypeId"], stats=STATS)
    assert list(ds["gene"].values) == genes
    ref = _ref_aggregate(refs, lambda o: np.ones(len(o), bool), ["cellTypeId"], genes)
    _check(ds, ref, ["cellTypeId"])


@pytest.mark.parametrize("gene_path", ["never", "always"])
@pytest.mark.parametrize("normalize", ["cp10k", "log1p_cp10k"])
def test_normalize_modes(atlas, reference, normalize, gene_path, monkeypatch):
    import bgee_dask.query.plan as plan_module

    monkeypatch.setattr(plan_module, "GENE_PATH_SHARE", 0.0 if gene_path == "never" else float("inf"))
    refs = {e: a for e, a in reference.items() if a.obs["speciesId"].iloc[0] == 10090}
    genes = _genes_sample(refs, n=40, seed=1)
    ds = atlas.query("speciesId == 10090", genes=genes).aggregate(by="anatEntityId", stats=STATS, normalize=normalize)
    ref = _ref_aggregate(refs, lambda o: np.ones(len(o), bool), ["anatEntityId"], genes, normalize=normalize)
    _check(ds, ref, ["anatEntityId"])


@pytest.mark.parametrize("gene_path", ["never", "always"])
def test_multi_key_grouping_and_filter(atlas, reference, gene_path, monkeypatch):
    import bgee_dask.query.plan as plan_module

    monkeypatch.setattr(plan_module, "GENE_PATH_SHARE", 0.0 if gene_path == "never" else float("inf"))
    genes = _genes_sample(reference, n=50, seed=2)
    flt = "cellTypeId in ['CL:0000236', 'CL:0000624', 'GO:0005575'] and libID != 'SRXT010003'"
    by = ["cellTypeId", "libID", "experimentId"]
    ds = atlas.query(flt, genes=genes).aggregate(by=by, stats=STATS)

    def mask(o):
        return (
            o["cellTypeId"].astype(str).isin(["CL:0000236", "CL:0000624", "GO:0005575"]).to_numpy()
            & (o["libID"].astype(str) != "SRXT010003").to_numpy()
        )

    _check(ds, _ref_aggregate(reference, mask, by, genes), by)


def test_a_gene_named_by_id_in_one_file_and_by_symbol_in_others_is_one_gene(atlas, sources):
    # SRPT00001 names MALAT1 ENSG00000251562 (symbol in var['feature_name']); SRPT00002/3 name it MALAT1
    raw = {os.path.basename(f).split("_")[2]: ad.read_h5ad(f) for f in sources[:4]}
    first = raw["SRPT00001"].var
    assert first.index[first["feature_name"].astype(str) == "MALAT1"].tolist() == ["ENSG00000251562"]
    ds = atlas.query("speciesId == 9606", genes=["MALAT1"]).aggregate(by="experimentId", stats=["sum", "n_expressed"])
    assert ds["gene"].values.tolist() == ["ENSG00000251562"]
    assert ds["gene_symbol"].values.tolist() == ["MALAT1"]
    row = {str(e): i for i, e in enumerate(ds["experimentId"].values)}
    for exp, a in raw.items():
        col = gene_column(a, "MALAT1")
        i = row[exp]
        if exp == "SRPT00004":  # 230 genes, not MALAT1
            assert col == -1 and ds["n_measured"].values[i, 0] == 0 and np.isnan(ds["sum"].values[i, 0])
            continue
        values = a.X[:, col].toarray().ravel().astype(np.float64)
        assert ds["n_measured"].values[i, 0] == a.n_obs
        assert ds["sum"].values[i, 0] == pytest.approx(values.sum(), rel=1e-12)
        assert ds["n_expressed"].values[i, 0] == (values > 0).sum()
    # asked by id, the same gene
    by_id = atlas.query("speciesId == 9606", genes=["ENSG00000251562"]).aggregate(by="experimentId", stats=["sum"])
    np.testing.assert_array_equal(by_id["sum"].values, ds["sum"].values)


def test_catalog_counts_the_genes_keyed_by_symbol(atlas, sources, reference):
    for f in sources:
        exp = os.path.basename(f).split("_")[2]
        own = ad.read_h5ad(f, backed="r").var_names
        renamed = int((np.asarray(own) != np.asarray(reference[exp].var_names)).sum())
        row = atlas.experiments[atlas.experiments["experimentId"] == exp].iloc[0]
        assert int(row["n_genes_by_symbol"]) == renamed, exp
    assert int(atlas.experiments["n_genes_by_symbol"].sum()) > 30_000  # SRPT00002 and 00003 alone hold ~16k each


def test_missing_genes_do_not_count_as_zero(atlas, reference):
    # A symbol-named gene measured in some experiments only: its n_measured excludes the others' cells.
    in_2 = set(reference["SRPT00002"].var_names)
    in_3 = set(reference["SRPT00003"].var_names)
    gene = sorted(in_2 - in_3)[0]
    ds = atlas.query("experimentId in ['SRPT00002', 'SRPT00003']", genes=[gene]).aggregate(by="experimentId")
    by_exp = {str(e): i for i, e in enumerate(ds["experimentId"].values)}
    assert ds["n_measured"].values[by_exp["SRPT00003"], 0] == 0
    assert np.isnan(ds["mean"].values[by_exp["SRPT00003"], 0])
    assert ds["n_measured"].values[by_exp["SRPT00002"], 0] == reference["SRPT00002"].n_obs


def test_scanpy_aggregate_agrees_on_one_experiment(atlas, reference):
    sc = pytest.importorskip("scanpy")
    a = reference["SRPT00001"]
    ds = atlas.query("experimentId == 'SRPT00001'").aggregate(
        by="cellTypeId", stats=["sum", "mean", "var", "n_expressed"]
    )
    ref = sc.get.aggregate(a, by="cellTypeId", func=["sum", "mean", "var", "count_nonzero"])
    ds = ds.sel(gene=list(a.var_names))
    for i, ct in enumerate(ds["cellTypeId"].values):
        j = list(ref.obs_names).index(str(ct))
        np.testing.assert_allclose(ds["sum"].values[i], np.asarray(ref.layers["sum"][j]).ravel(), rtol=1e-9)
        np.testing.assert_allclose(ds["mean"].values[i], np.asarray(ref.layers["mean"][j]).ravel(), rtol=1e-9)
        np.testing.assert_allclose(ds["var"].values[i], np.asarray(ref.layers["var"][j]).ravel(), rtol=1e-6, atol=1e-9)
        np.testing.assert_array_equal(ds["n_expressed"].values[i], np.asarray(ref.layers["count_nonzero"][j]).ravel())


@pytest.mark.parametrize(
    "flt, fn",
    [
        ("cellTypeId == 'CL:0000236'", lambda o: o["cellTypeId"].astype(str) == "CL:0000236"),
        ("cellTypeId != 'CL:0000236'", lambda o: o["cellTypeId"].astype(str) != "CL:0000236"),
        ("SampleId < 3002", lambda o: o["SampleId"] < 3002),
        ("SampleId <= 3002", lambda o: o["SampleId"] <= 3002),
        ("SampleId > 7050", lambda o: o["SampleId"] > 7050),
        ("SampleId >= 7050", lambda o: o["SampleId"] >= 7050),
        ("libID in ['SRXT010001', 'SRXT070002']", lambda o: o["libID"].astype(str).isin(["SRXT010001", "SRXT070002"])),
        ("anatEntityId not in ['UBERON:0000178']", lambda o: ~o["anatEntityId"].astype(str).isin(["UBERON:0000178"])),
        (
            "(cellTypeId == 'CL:0000236' or cellTypeId == 'CL:0000625') and not (libID == 'SRXT030001')",
            lambda o: (
                o["cellTypeId"].astype(str).isin(["CL:0000236", "CL:0000625"])
                & (o["libID"].astype(str) != "SRXT030001")
            ),
        ),
        ("cellTypeAuthorAnnotation == 'CD19+ B'", lambda o: o["cellTypeAuthorAnnotation"].astype(str) == "CD19+ B"),
        ("barcodes == 'AAACCTGAGATAGGAG'", lambda o: o["barcodes"].astype(str) == "AAACCTGAGATAGGAG"),
    ],
)
def test_filter_operators_select_the_reference_cells(atlas, reference, flt, fn):
    got = atlas.query(flt).obs()
    expected = set()
    for exp, a in reference.items():
        m = np.asarray(fn(a.obs), dtype=bool)
        expected |= {(exp, n) for n in a.obs_names[m]}
    assert set(zip(got["experimentId"].astype(str), got.index.astype(str), strict=True)) == expected


def test_atlas_without_gene_index_scans_blocks(tmp_path, sources):
    reports = bd.convert(sources[2:4], tmp_path / "a", workers=1, progress=False, gene_index=False)
    assert all(r.status == "converted" for r in reports)
    for r in reports:  # no gene-major copy recorded, nor written
        record = mi.record(tmp_path / "a", r.species, r.experiment_id)
        assert record["gene_index"] is None and (tmp_path / "a" / record["store"]).is_dir()
    assert not list((tmp_path / "a").rglob("genes.zarr")) and not list((tmp_path / "a").rglob("*by_gene*"))
    atlas = bd.open_atlas(tmp_path / "a")
    source = ad.read_h5ad(sources[3])  # symbol-named, and no id-named file in this atlas: keyed by symbol
    genes = list(source.var_names[:5])
    q = atlas.query("experimentId == 'SRPT00004'", genes=genes)
    assert not q.plan.gene_tasks
    ds = q.aggregate(by="experimentId", stats=["sum"])
    assert ds["gene"].values.tolist() == genes
    want = np.asarray(source[:, genes].X.sum(axis=0), dtype=np.float64).ravel()
    np.testing.assert_allclose(ds["sum"].values[0], want)


def test_selective_filter_reads_only_matching_experiments(atlas):
    q = atlas.query("experimentId == 'SRPT00003' and cellTypeId == 'CL:0000625'")
    assert list(q.plan.experiments["experimentId"]) == ["SRPT00003"]
    assert len(q.plan.tasks) == 1


def test_an_atlas_not_downloaded_from_bgee_has_no_bgee_annotations(atlas):
    assert atlas.annotations().empty and atlas.annotations(of="libraries").empty


def test_empty_selection_gives_empty_dataset(atlas):
    ds = atlas.query("cellTypeId == 'CL:9999999'").aggregate(by="cellTypeId")
    assert ds.sizes["group"] == 0
    assert atlas.query("cellTypeId == 'CL:9999999'").obs().empty


def test_bad_filters_and_genes_are_clear_errors(atlas):
    with pytest.raises(ValueError, match="position"):
        atlas.query("cellTypeId == ")
    with pytest.raises(KeyError, match="celltypeid"):
        atlas.query("celltypeid == 'x'")
    with pytest.raises(KeyError, match="NOT_A_GENE"):
        atlas.query(genes=["NOT_A_GENE", "CD3E"])
    with pytest.raises(KeyError, match="nope"):
        atlas.query().aggregate(by="nope")


def test_to_anndata_matches_sources(atlas, reference):
    adata = atlas.query("experimentId in ['SRPT00003', 'SRPT00004']").to_anndata()
    for exp in ("SRPT00003", "SRPT00004"):
        a = reference[exp]
        sub = adata[adata.obs["experimentId"] == exp]
        cols = pd.Index(sub.var_names).get_indexer(a.var_names)
        got = sub.X[:, cols]
        want = a[sub.obs_names].X
        assert abs(got - want).max() == 0


def test_to_dask_reductions(atlas, reference):
    x = atlas.query("experimentId == 'SRPT00001'").to_dask()
    a = reference["SRPT00001"]
    assert x.shape[0] == a.n_obs
    total = float(x.sum().compute())
    assert total == pytest.approx(float(a.X.sum()))
    col = x.sum(axis=0).compute()
    genes = atlas.query("experimentId == 'SRPT00001'").plan.gene_ids
    want = np.asarray(a[:, list(genes)].X.sum(axis=0)).ravel()
    np.testing.assert_allclose(np.asarray(col.todense() if hasattr(col, "todense") else col), want, rtol=1e-6)


def test_distributed_cluster_gives_the_same_numbers(atlas):
    from distributed import Client, LocalCluster

    genes = list(atlas.query("experimentId == 'SRPT00002'").plan.gene_ids[:300])
    local = atlas.query("speciesId == 9606", genes=genes).aggregate(by=["cellTypeId"], stats=STATS)
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with cluster, Client(cluster) as client:
        remote = atlas.query("speciesId == 9606", genes=genes, client=client).aggregate(by=["cellTypeId"], stats=STATS)
    for v in ["n_cells", "n_measured", *STATS]:
        np.testing.assert_array_equal(local[v].values, remote[v].values)


def _genes_table(categorical: bool) -> pd.DataFrame:
    """A catalog genes table: 3 experiments (not in name order), shared and missing genes, some symbols missing."""
    rng = np.random.default_rng(5)
    ids = np.array([f"ENSG{i:011d}" for i in rng.permutation(40)], dtype=object)
    rows = []
    for e, exp in enumerate(["b/E2", "a/E1", "c/E3"]):
        genes = rng.choice(ids, size=15 + 5 * e, replace=False)
        for gi, g in enumerate(genes):
            sym = None if rng.random() < 0.3 else f"S{g[-3:]}-{exp}"
            rows.append((exp, g, sym, gi, int(rng.integers(0, 100))))
    table = pd.DataFrame(rows, columns=["experiment", "gene_id", "gene_symbol", "gene_index", "gene_nnz"])
    if categorical:
        for col in ("experiment", "gene_id", "gene_symbol"):
            extra = ["UNUSED-1", "UNUSED-0"]  # categories no row uses, as a dictionary may hold
            table[col] = pd.Categorical(table[col], categories=[*extra, *table[col].dropna().unique()[::-1]])
    return table


def _assert_lookup_matches_pandas(lookup, table: pd.DataFrame) -> None:
    plain = table.astype({c: object for c in ("experiment", "gene_id", "gene_symbol")})
    want_ids = np.sort(plain["gene_id"].unique())
    np.testing.assert_array_equal(lookup.ids.astype(str), want_ids.astype(str))
    assert list(lookup.rows) == list(dict.fromkeys(plain["experiment"]))  # catalog order
    for exp, sl in lookup.rows.items():
        part = plain[plain["experiment"] == exp]
        np.testing.assert_array_equal(lookup.ids[lookup.code[sl]].astype(str), part["gene_id"].to_numpy().astype(str))
        np.testing.assert_array_equal(lookup.gene_index[sl], part["gene_index"].to_numpy())
        np.testing.assert_array_equal(lookup.gene_nnz[sl], part["gene_nnz"].to_numpy())
        got_symbols = [None if c < 0 else lookup.symbol_values[c] for c in lookup.symbol_code[sl]]
        assert got_symbols == [None if pd.isna(v) else v for v in part["gene_symbol"]]
    # a gene's symbol is the first one given in catalog order
    first = plain.dropna(subset=["gene_symbol"]).groupby("gene_id", sort=False)["gene_symbol"].first()
    for i, g in enumerate(lookup.ids):
        assert lookup.symbols[i] == first.get(g, None)


@pytest.mark.parametrize("categorical", [True, False], ids=["categorical", "plain"])
def test_gene_lookup_from_table_matches_pandas(categorical):
    """The planner's gene lookup against pandas' own grouping of the same table (with unused categories and NaN)."""
    from bgee_dask.catalog.reader import GeneLookup

    table = _genes_table(categorical)
    _assert_lookup_matches_pandas(GeneLookup.from_table(table), table)


@pytest.mark.parametrize("categorical", [True, False], ids=["categorical", "plain"])
def test_gene_lookup_from_arrow_and_from_its_file_match_pandas(categorical, tmp_path):
    """The two other ways planning gets the lookup: Arrow's reading of the parquet table, and the file
    consolidation writes (read back only for the catalog it was written for)."""
    import pyarrow.parquet as pq

    from bgee_dask.catalog.reader import GeneLookup
    from bgee_dask.format.location import AtlasLocation

    table = _genes_table(categorical)
    table.to_parquet(tmp_path / "genes.parquet", index=False)
    from_arrow = GeneLookup.from_arrow(pq.read_table(tmp_path / "genes.parquet"))
    _assert_lookup_matches_pandas(from_arrow, table)
    for compression in (None, "zstd", "lz4"):  # local atlases write it uncompressed, object stores zstd
        payload = GeneLookup.from_table(table).to_arrow_bytes("catalog-1", compression)
        _assert_lookup_matches_pandas(GeneLookup.from_arrow_bytes(payload, "catalog-1"), table)
        (tmp_path / "lookup.arrow").write_bytes(payload)  # and memory-mapped, as a local atlas reads it
        mapped = AtlasLocation(tmp_path).read_buffer("lookup.arrow")
        _assert_lookup_matches_pandas(GeneLookup.from_arrow_bytes(mapped, "catalog-1"), table)
    assert GeneLookup.from_arrow_bytes(payload, "catalog-2") is None  # another consolidation's
    assert GeneLookup.from_arrow_bytes(payload, None) is None


def test_catalog_plans_from_its_gene_lookup_file(tmp_path, atlas, monkeypatch):
    """open_atlas + query read the lookup file (not the genes table); a stale or missing file falls back to the
    table, with the same plan."""
    import shutil

    from bgee_dask.catalog import reader as catalog_mod
    from bgee_dask.catalog.commit import consolidate
    from bgee_dask.format.location import AtlasLocation

    root = tmp_path / "atlas"
    shutil.copytree(atlas.catalog.location.path(), root)
    loc = AtlasLocation(root)

    def current(name: str) -> str:  # a table of the tables folder the header names now
        return f"{mi.header(root)['tables']}/{name}"

    lookup_rel = current(catalog_mod.GENE_LOOKUP_FILE)
    assert (root / lookup_rel).is_file()
    want = bd.open_atlas(root).query("speciesId == 9606").plan

    read: list[str] = []
    real_read_bytes = AtlasLocation.read_bytes
    real_read_buffer = AtlasLocation.read_buffer
    real_read_arrow = AtlasLocation.read_arrow
    monkeypatch.setattr(AtlasLocation, "read_bytes", lambda self, rel: read.append(rel) or real_read_bytes(self, rel))
    monkeypatch.setattr(AtlasLocation, "read_buffer", lambda self, rel: read.append(rel) or real_read_buffer(self, rel))
    monkeypatch.setattr(
        AtlasLocation,
        "read_arrow",
        lambda self, rel, columns=None: read.append(rel) or real_read_arrow(self, rel, columns),
    )

    def plan_after(change) -> object:
        change()
        catalog_mod.forget_cached_tables()
        read.clear()
        return bd.open_atlas(root).query("speciesId == 9606").plan

    def same(plan) -> None:
        assert list(plan.gene_ids) == list(want.gene_ids)
        assert list(plan.gene_symbols) == list(want.gene_symbols)
        for a, b in zip(plan.gene_maps, want.gene_maps, strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(plan.measured, want.measured)

    same(plan_after(lambda: None))
    assert lookup_rel in read and current(catalog_mod.GENES_TABLE_FILE) not in read
    stale = (root / lookup_rel).read_bytes()
    consolidate(loc)  # a new catalog_id, in a new tables folder ...
    new_lookup = root / current(catalog_mod.GENE_LOOKUP_FILE)
    assert current(catalog_mod.GENE_LOOKUP_FILE) != lookup_rel and new_lookup.is_file()
    same(plan_after(lambda: new_lookup.write_bytes(stale)))  # ... holding the previous commit's lookup file
    assert current(catalog_mod.GENES_TABLE_FILE) in read
    same(plan_after(new_lookup.unlink))  # a tables folder without the file
    assert current(catalog_mod.GENES_TABLE_FILE) in read


def test_a_catalog_1x_atlas_is_refused_with_a_rebuild_hint(tmp_path, atlas):
    """Catalog 1.x (tables in place, no gene keys) is no longer read: one line telling to rebuild the atlas.

    A genes table without ``gene_key`` still gives a gene lookup keyed by gene id (var_names), as 1.0 matched them.
    """
    import json
    import shutil

    import pyarrow.parquet as pq

    from bgee_dask.catalog import reader as catalog_mod

    root = tmp_path / "atlas"
    shutil.copytree(atlas.catalog.location.path(), root)
    header = mi.header(root)
    genes = pq.read_table(root / header["tables"] / catalog_mod.GENES_TABLE_FILE).drop_columns(["gene_key"])
    (root / "catalog" / "atlas.json").write_text(json.dumps({**header, "format_version": "1.0"}))
    catalog_mod.forget_cached_tables()
    with pytest.raises(catalog_mod.CatalogError) as refused:
        bd.open_atlas(root)
    message = str(refused.value)
    assert "\n" not in message and "1.0" in message and "rebuild" in message and "convert" in message, message

    lookup = catalog_mod.GeneLookup.from_arrow(genes)
    frame = genes.to_pandas()
    human = atlas.experiments.loc[atlas.experiments["species"] == "Homo_sapiens", "experiment"]
    want = sorted(frame.loc[frame["experiment"].astype(str).isin(human), "gene_id"].astype(str).unique())
    got = sorted(set(lookup.ids[lookup.code[lookup.rows_of(list(human))]].astype(str)))
    assert got == want
    assert "MALAT1" in want and "ENSG00000251562" in want  # two columns for one gene, as 1.0 had them


def test_query_preload_readies_workers_before_any_task():
    """Workers started with the preload have the block kernels loaded before any query runs."""
    from distributed import Client, LocalCluster

    from bgee_dask.query.preload import PRELOAD_MODULE

    def kernels_loaded() -> list[int]:
        import sys

        blocks = sys.modules.get("bgee_dask.query.blocks")
        if blocks is None:
            return []
        return [len(blocks.grouped_moments.signatures)]

    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None)
    with cluster, Client(cluster) as client:
        assert list(client.run(kernels_loaded).values()) == [[]]
    cluster = LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None, preload=[PRELOAD_MODULE]
    )
    with cluster, Client(cluster) as client:
        assert list(client.run(kernels_loaded).values()) == [[2]]  # float32 and float64 values


def test_combine_partials_in_any_tree_equals_a_groupby_sum():
    """The combine step against pandas' groupby-sum of all partial rows, whatever the merge order."""
    from bgee_dask.query.reduction import Partial, combine

    rng = np.random.default_rng(11)
    n_exp, n_genes = 3, 7
    parts = []
    for _ in range(9):
        g = int(rng.integers(0, 5))
        keys = [(f"ct{k}", int(k % 2)) for k in rng.choice(8, size=g, replace=False)]
        parts.append(
            Partial(
                keys,
                {
                    "counts": rng.integers(0, 9, (g, n_exp)),
                    "sum": rng.random((g, n_genes)),
                    "sumsq": rng.random((g, n_genes)),
                    "nexpr": rng.integers(0, 9, (g, n_genes)),
                },
            )
        )
    rows = [(k, p, i) for p in parts for i, k in enumerate(p.keys)]
    frames = {}
    for field in ("counts", "sum", "sumsq", "nexpr"):
        df = pd.DataFrame([p.values[field][i] for _, p, i in rows], index=pd.Index([str(k) for k, _, _ in rows]))
        frames[field] = df.groupby(level=0).sum()
    for _ in range(4):
        order = rng.permutation(len(parts))
        layer = [parts[i] for i in order]
        while len(layer) > 1:  # a random fan-in tree
            k = int(rng.integers(2, 4))
            layer = [combine(layer[i : i + k]) for i in range(0, len(layer), k)]
        out = layer[0]
        assert sorted(map(str, out.keys)) == sorted(frames["sum"].index)
        for field, want in frames.items():
            got = pd.DataFrame(out.values[field], index=[str(k) for k in out.keys]).sort_index()
            np.testing.assert_allclose(got.to_numpy(), want.sort_index().to_numpy(), rtol=1e-12)


def test_resolve_genes_by_id_and_symbol_among_queried_experiments():
    """Gene names against hand-worked answers: ids first, then symbols (one symbol may name several ids)."""
    from types import SimpleNamespace

    from bgee_dask.catalog.reader import GeneLookup
    from bgee_dask.query.plan import resolve_genes

    rows = [  # experiment, gene_id, gene_symbol
        ("a/E1", "ENSG1", "ALPHA"),
        ("a/E1", "ENSG2", "BETA"),
        ("a/E1", "ENSG3", None),
        ("b/E2", "ENSG2", "BETA2"),  # another experiment names ENSG2 differently
        ("b/E2", "ENSG4", "BETA"),  # BETA also names ENSG4 here
        ("c/E3", "ENSG5", "ONLY_IN_E3"),
    ]
    table = pd.DataFrame(rows, columns=["experiment", "gene_id", "gene_symbol"])
    table["gene_index"] = table.groupby("experiment").cumcount()
    table["gene_nnz"] = 1
    for col in ("experiment", "gene_id", "gene_symbol"):
        table[col] = table[col].astype("category")
    catalog = SimpleNamespace(gene_lookup=GeneLookup.from_table(table))
    e12 = pd.DataFrame({"experiment": ["a/E1", "b/E2"]})

    ids, symbols = resolve_genes(catalog, e12, ["ENSG3", "BETA", "ALPHA", "ENSG2"])
    assert list(ids) == ["ENSG3", "ENSG2", "ENSG4", "ENSG1"]  # in asked order; BETA -> both ids, sorted
    assert list(symbols) == [None, "BETA", "BETA", "ALPHA"]  # first symbol in catalog order
    ids, symbols = resolve_genes(catalog, pd.DataFrame({"experiment": ["b/E2"]}), ["ENSG2"])
    assert list(ids) == ["ENSG2"] and list(symbols) == ["BETA2"]  # only the queried experiments name it
    with pytest.raises(KeyError, match="ONLY_IN_E3"):  # known to the atlas, not to the queried experiments
        resolve_genes(catalog, e12, ["ONLY_IN_E3", "ENSG1"])
    with pytest.raises(KeyError, match=r"unknown gene\(s\) 'ENSG5'[^;]*; 'NOPE'.*not in any queried experiment"):
        resolve_genes(catalog, e12, ["ENSG5", "NOPE"])
    ids, symbols = resolve_genes(catalog, e12, None)  # all genes of the queried experiments
    assert list(ids) == ["ENSG1", "ENSG2", "ENSG3", "ENSG4"]
    assert list(symbols) == ["ALPHA", "BETA", None, "BETA"]


@pytest.mark.parametrize(
    "flt, by, normalize, decided",
    [
        (None, ["cellTypeId", "anatEntityId"], None, "all"),
        (
            "cellTypeId in ['CL:0000236', 'CL:0000624'] and libID != 'SRXT010003'",
            ["libID", "experimentId"],
            None,
            "all",
        ),
        ("speciesId == 10090", ["anatEntityId"], "log1p_cp10k", "all"),
        ("SampleId > 3002", ["cellTypeId"], None, "none"),  # SampleId is not a catalog run column
        (None, ["speciesId"], None, "none"),  # a number column: its keys come from the stores
        (None, ["cellTypeAuthorAnnotation"], None, "none"),  # not in the catalog
    ],
)
def test_catalog_decided_groups_equal_reading_the_metadata(atlas, reference, monkeypatch, flt, by, normalize, decided):
    """Tasks whose rows and groups the catalog decides read no obs; the result is identical (same keys, same
    key types, same numbers) to every task reading its cells' metadata, and matches numpy on the sources."""
    import xarray as xr

    import bgee_dask.api.query as query_module
    from bgee_dask.query.plan import run_groups

    pool = atlas.query(flt).plan.gene_ids  # the genes of the experiments the filter may touch
    genes = sorted(np.random.default_rng(4).choice(np.asarray(pool), size=30, replace=False).tolist())
    q = atlas.query(flt, genes=genes)
    block_tasks, gene_tasks = q.plan.aggregation_tasks()
    spans = [(t.experiment, t.r0, t.r1) for t in [*block_tasks, *gene_tasks]]
    n_decided = sum(g is not None for g in run_groups(q.plan, spans, by))
    assert n_decided == (len(spans) if decided == "all" else 0)
    got = q.aggregate(by=by, stats=STATS, normalize=normalize)
    monkeypatch.setattr(query_module, "run_groups", lambda plan, spans, by: [None] * len(spans))
    from_obs = q.aggregate(by=by, stats=STATS, normalize=normalize)
    xr.testing.assert_identical(got, from_obs)
    for c in by:
        assert [type(v) for v in got[c].values] == [type(v) for v in from_obs[c].values]
    if flt is None:
        mask = lambda o: np.ones(len(o), bool)  # noqa: E731
        _check(got, _ref_aggregate(reference, mask, by, genes, normalize=normalize), by)


def test_runs_with_missing_group_values_read_the_metadata(tmp_path, monkeypatch):
    """Blocks whose catalog runs lack a grouping value read their cells' metadata; blocks beside them do not,
    and together they give what reading every cell's metadata gives, with None as the missing group."""
    import xarray as xr

    import bgee_dask.api.query as query_module
    from bgee_dask.query.plan import run_groups
    from tests import make_inputs as mi

    with_gaps = mi.make_adata(400, 50, seed=31)
    sex = with_gaps.obs["sex"].astype(object)
    sex.iloc[:150] = None
    with_gaps.obs["sex"] = pd.Categorical(sex)
    full = mi.make_adata(300, 50, seed=32)
    files = [
        mi.write(with_gaps, tmp_path / mi.bgee_name("SRPT95001")),
        mi.write(full, tmp_path / mi.bgee_name("SRPT95002")),
    ]
    assert all(r.ok for r in bd.convert(files, tmp_path / "atlas", workers=1, progress=False))
    q = bd.open_atlas(tmp_path / "atlas").query(None)
    by = ["sex", "cellTypeId"]
    block_tasks, gene_tasks = q.plan.aggregation_tasks()
    decided = run_groups(q.plan, [(t.experiment, t.r0, t.r1) for t in [*block_tasks, *gene_tasks]], by)
    assert decided[1] is not None and decided[0] is None  # one block per experiment here
    got = q.aggregate(by=by, stats=STATS, normalize="cp10k")
    monkeypatch.setattr(query_module, "run_groups", lambda plan, spans, by: [None] * len(spans))
    xr.testing.assert_identical(got, q.aggregate(by=by, stats=STATS, normalize="cp10k"))
    both = pd.concat([with_gaps.obs[by], full.obs[by]]).astype(object)
    want = both.groupby(by, dropna=False).size()
    have = {(s if isinstance(s, str) else None, c): int(n) for (s, c), n in want.items()}
    # the missing group's label is None (xarray with pandas 3 shows it as NaN)
    assert {
        (None if pd.isna(a) else a, b): int(n)
        for a, b, n in zip(got["sex"].values, got["cellTypeId"].values, got["n_cells"].values, strict=True)
    } == have


def test_local_kernels_are_prepared_once_per_process(atlas, monkeypatch):
    """Queries on the local scheduler start one kernel-loading thread between them, not one each."""
    import threading

    from bgee_dask.api import query as query_module

    calls = []
    done = threading.Event()

    def counting_prepare() -> None:
        calls.append(threading.current_thread().name)
        done.set()

    monkeypatch.setattr(query_module.blocks, "prepare_worker", counting_prepare)
    monkeypatch.setattr(query_module._LOCAL_PREPARE, "started", False)
    for _ in range(3):
        atlas.query("speciesId == 9606", genes=["CD3E"])
    assert done.wait(10)
    for t in threading.enumerate():
        if t.name == "bgee-dask-prepare":
            t.join(10)
    assert calls == ["bgee-dask-prepare"]
