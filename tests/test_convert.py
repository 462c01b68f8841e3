"""Converting Bgee H5AD files into an atlas, checked against anndata/h5py/numpy reads of the sources."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

from bgee_dask.api.convert import convert
from bgee_dask.catalog.check import check_atlas
from bgee_dask.catalog.commit import consolidate
from bgee_dask.catalog.reader import AtlasCatalog
from bgee_dask.format.location import AtlasLocation

from . import make_inputs as mi

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def open_catalog(atlas) -> AtlasCatalog:
    """What ``bgee_dask.open_atlas`` reads: the consolidated catalog."""
    return AtlasCatalog(AtlasLocation(atlas))


LAYOUT = {"SRPT00002.B": "B", "SRPT00003.C": "C", "SRPT00005.D": "D"}
SPECIES = {
    "SRPT00001": "Homo_sapiens",
    "SRPT00002": "Homo_sapiens",
    "SRPT00003": "Homo_sapiens",
    "SRPT00004": "Homo_sapiens",
    "SRPT00005": "Mus_musculus",
    "SRPT00006": "Mus_musculus",
    "SRPT00007": "Mus_musculus",
}
PRIMARY = sorted(SPECIES)
VARIANTS = sorted(LAYOUT)


def _run(sources, out, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return convert([str(s) for s in sources], str(out), **kw)


def _by_source(reports) -> dict[str, object]:
    return {os.path.basename(r.source): r for r in reports}


def _shard(atlas: Path, species: str, exp: str) -> Path:
    return mi.store_path(atlas, species, exp) / "X" / "data" / "c" / "0"


@pytest.fixture(scope="module")
def primary_atlas(tmp_path_factory, bgee_sources):
    out = tmp_path_factory.mktemp("primary") / "atlas"
    reports = _run([bgee_sources[k] for k in PRIMARY], out)
    assert [r.status for r in reports] == ["converted"] * 7, [r.message for r in reports]
    return out, reports


@pytest.fixture(scope="module")
def variant_atlas(tmp_path_factory, bgee_sources):
    """Converted the default way (a folder, ``workers=None``): Dask tasks on the threaded scheduler."""
    import threading

    from dask.callbacks import Callback

    import bgee_dask.api.convert as conv

    out = tmp_path_factory.mktemp("variants") / "atlas"
    calls, tasks, threads_used = [], [], []
    real_run_threads, real_convert_file = conv._run_threads, conv.convert_file

    def spy_convert_file(*a, **k):
        threads_used.append(threading.current_thread() is threading.main_thread())
        return real_convert_file(*a, **k)

    def spy_run_threads(todo, loc, kwargs, progress, n, threads):
        calls.append((len(todo), n, threads))
        return real_run_threads(todo, loc, kwargs, progress, n, threads)

    class Tasks(Callback):  # sees every task a local dask scheduler runs
        def _posttask(self, key, result, dsk, state, worker_id):
            tasks.append(type(result).__name__)

    with pytest.MonkeyPatch.context() as mp, Tasks():
        mp.setattr(conv, "_run_threads", spy_run_threads)
        mp.setattr(conv, "convert_file", spy_convert_file)
        reports = _run([bgee_sources["SRPT00002.B"].parent], out, workers=None)  # a folder
    assert [r.status for r in reports] == ["converted"] * 3, [r.message for r in reports]
    cores = conv.cpu_count()
    n = max(1, min(3, cores // 4))
    assert calls == [(3, n, max(1, cores // n))]
    assert tasks.count("ConversionReport") == 3  # one dask task per file
    assert threads_used == [False] * 3  # run by the scheduler's worker threads
    return out, reports


# -- 1. the shared files, every layout ---------------------------------------------------------
@pytest.mark.parametrize("exp", PRIMARY)
def test_primary_file_matches_source(primary_atlas, bgee_sources, exp):
    atlas, reports = primary_atlas
    species = SPECIES[exp]
    report = _by_source(reports)[bgee_sources[exp].name]
    assert (report.experiment_id, report.species, report.layout) == (exp, species, "doc")
    store = mi.store_path(atlas, species, exp)
    stored = mi.check_store(store, bgee_sources[exp], layout="doc", experiment_id=exp)
    mi.check_catalog(atlas, stored, species=species, experiment_id=exp, layout="doc")
    assert zarr.open_group(store, mode="r").metadata.zarr_format == 3


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_file_matches_source_and_primary(variant_atlas, bgee_sources, name):
    atlas, reports = variant_atlas
    exp, layout = name.split(".")[0], LAYOUT[name]
    species = SPECIES[exp]
    assert _by_source(reports)[bgee_sources[name].name].layout == layout
    stored = mi.check_store(mi.store_path(atlas, species, exp), bgee_sources[name], layout=layout, experiment_id=exp)
    mi.check_catalog(atlas, stored, species=species, experiment_id=exp, layout=layout)
    # Same cells as the primary (doc) file: every canonical column the layout has must hold the doc values.
    doc = ad.read_h5ad(bgee_sources[exp], backed="r").obs.loc[stored.obs_names]
    for col in mi.CANONICAL:
        if col == "experimentId" or mi.LAYOUT_COLUMNS[layout][col] is None:
            continue
        assert mi.as_str(stored.obs[col]) == mi.as_str(doc[col]), f"{name}: {col} differs from the doc file"


def test_variant_specific_mappings(variant_atlas):
    atlas, _ = variant_atlas
    d = ad.read_zarr(mi.store_path(atlas, "Mus_musculus", "SRPT00005")).obs
    assert "GO:0005575" in set(d["cellTypeId"].astype(str))
    assert "unknown" not in set(d["cellTypeId"].astype(str))
    assert set(d["sex"].astype(str)) == {"not annotated"}  # from bgeeSex, not the PATO label
    assert set(d["sex_ontology_label"].astype(str)) == {"unknown"}
    assert d["SampleId"].isna().all() and d["unique_cell_ids"].isna().all()
    c = ad.read_zarr(mi.store_path(atlas, "Homo_sapiens", "SRPT00003")).obs
    assert set(c["anatEntityId"].astype(str)) == {"UBERON:0000178"}
    assert set(c["libID"].astype(str)) == {"SRXT030001", "SRXT030002", "SRXT030003"}
    b = ad.read_zarr(mi.store_path(atlas, "Homo_sapiens", "SRPT00002")).obs
    assert set(b["libID"].astype(str)) == {"SRXT020001"}
    assert "rnaSeqSequencerName" in b and "cellCompartment" in b


def test_catalog_lists_everything(primary_atlas, variant_atlas, bgee_sources):
    atlas, _ = primary_atlas
    header = json.loads((atlas / "catalog" / "atlas.json").read_text())
    assert header["n_experiments"] == 7
    e = pd.read_parquet(mi.catalog_table(atlas, "experiments.parquet"))
    assert sorted(e["experimentId"]) == PRIMARY
    assert int(e["n_cells"].sum()) == 17_293
    for exp in PRIMARY:
        h5 = ad.read_h5ad(bgee_sources[exp], backed="r")
        row = e[e["experimentId"] == exp].iloc[0]
        assert int(row["n_cells"]) == h5.n_obs and int(row["n_genes"]) == h5.n_vars
    genes = pd.read_parquet(mi.catalog_table(atlas, "genes.parquet"))
    assert len(genes) == int(e["n_genes"].sum())
    v = pd.read_parquet(mi.catalog_table(variant_atlas[0], "experiments.parquet"))
    assert dict(zip(v["experimentId"], v["layout"], strict=True)) == {
        "SRPT00002": "B",
        "SRPT00003": "C",
        "SRPT00005": "D",
    }
    assert open_catalog(atlas).experiments.shape[0] == 7


# -- 2. odd but valid inputs --------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind",
    ["csc", "dense", "float64", "int32", "uncompressed", "csc-uncompressed"],
)
def test_odd_matrix_encodings(tmp_path, bgee_sources, kind):
    src = bgee_sources["SRPT00003"] if kind.startswith("csc") else bgee_sources["SRPT00004"]
    exp = "SRPT91001"
    path = tmp_path / "in" / mi.bgee_name(exp)
    opts = {
        "csc": {"fmt": "csc"},
        "dense": {"fmt": "dense"},
        "float64": {"dtype": np.float64},
        "int32": {"dtype": np.int32},
        "uncompressed": {"compression": None},
        "csc-uncompressed": {"fmt": "csc", "compression": None},
    }[kind]
    mi.reformat(src, path, **opts)
    reports = _run([path], tmp_path / "atlas")
    assert [r.status for r in reports] == ["converted"], reports[0].message
    store = mi.store_path(tmp_path / "atlas", "Homo_sapiens", exp)
    stored = mi.check_store(store, path, layout="doc", experiment_id=exp)
    assert stored.X.dtype == (np.float64 if kind == "float64" else np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_integer_values_preserved(tmp_path, dtype):
    x = mi.random_counts(150, 40, seed=11, dtype=np.float64).astype(dtype)
    x.data[::3] = dtype(0.5)
    x.data[1::7] = dtype(1 / 3)
    x.data[2::11] = dtype(2.718281828459045)
    path = mi.write(mi.make_adata(150, 40, x=x), tmp_path / mi.bgee_name("SRPT91002"))
    reports = _run([path], tmp_path / "atlas")
    assert reports[0].status == "converted", reports[0].message
    stored = mi.check_store(
        mi.store_path(tmp_path / "atlas", "Homo_sapiens", "SRPT91002"), path, layout="doc", experiment_id="SRPT91002"
    )
    assert stored.X.dtype == dtype
    assert dtype(1 / 3) in set(stored.X.data.tolist())


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
def test_cpm_in_x_bug_uses_raw_counts(tmp_path, fmt):
    # older name pattern: <Genus_species>_SC_RNA-Seq_read_counts_CPM_<EXPID>.h5ad
    name = "Mus_musculus_SC_RNA-Seq_read_counts_CPM_SRPT91003.h5ad"
    path, raw = mi.cpm_bug(tmp_path / name, exp="SRPT91003", fmt=fmt)
    x_sums = np.asarray(ad.read_h5ad(path).X.sum(axis=1), dtype=np.float64).ravel()
    assert np.allclose(x_sums, 1e6, rtol=1e-4)  # the input really has CPM in X
    reports = _run([path], tmp_path / "atlas")
    r = reports[0]
    assert r.status == "converted", r.message
    assert (r.experiment_id, r.species, r.layout) == ("SRPT91003", "Mus_musculus", "B")
    assert r.cpm_in_x is True
    assert "CPM" in r.message and "abundance" in r.message
    assert "CPM" in r.line()
    store = mi.store_path(tmp_path / "atlas", "Mus_musculus", "SRPT91003")
    stored = mi.check_store(store, path, layout="B", experiment_id="SRPT91003", counts="layers/abundance")
    order = stored.obs["source_row"].to_numpy()
    np.testing.assert_array_equal(stored.X.toarray(), raw.toarray()[order])
    attrs = zarr.open_group(store, mode="r").attrs["bgee_dask"]
    assert attrs["cpm_in_x"] is True and attrs["provenance"]["cpm_in_x"] is True
    assert attrs["provenance"]["counts_source"] == "layers/abundance"
    e = pd.read_parquet(mi.catalog_table(tmp_path / "atlas", "experiments.parquet"))
    assert bool(e["cpm_in_x"].iloc[0]) is True


def test_missing_canonical_columns_are_missing_values(tmp_path):
    """A doc file without stage, sex, strain and species columns: stored as missing, cells still sorted."""
    a = mi.make_adata(100, 30, seed=8)
    a.obs = a.obs.drop(columns=["stageId", "stageName", "sex", "strain", "SampleId"])
    path = mi.write(a, tmp_path / mi.bgee_name("SRPT91009"))
    other = mi.write(mi.make_adata(100, 30, seed=9), tmp_path / mi.bgee_name("SRPT91010"))
    reports = _run([path, other], tmp_path / "atlas")
    assert [r.status for r in reports] == ["converted", "converted"], [r.message for r in reports]
    stored = mi.check_store(
        mi.store_path(tmp_path / "atlas", "Homo_sapiens", "SRPT91009"), path, layout="doc", experiment_id="SRPT91009"
    )
    for col in ("stageId", "stageName", "sex", "strain", "SampleId"):
        assert stored.obs[col].isna().all(), col
    mi.check_catalog(tmp_path / "atlas", stored, species="Homo_sapiens", experiment_id="SRPT91009", layout="doc")


@pytest.mark.filterwarnings("ignore:The behavior of DataFrame concatenation:FutureWarning")  # empty runs table
def test_empty_matrix_edge_cases_and_unsafe_ids(tmp_path):
    no_cells = mi.write(mi.make_adata(5, 30, seed=8)[:0].copy(), tmp_path / "in" / mi.bgee_name("SRPT91012"))
    zeros = mi.make_adata(5, 30, seed=8)
    zeros.X = sp.csr_matrix(zeros.X.shape, dtype=np.float32)
    all_zero = mi.write(zeros, tmp_path / "in" / mi.bgee_name("SRPT91013"))
    mi.b_layout(tmp_path / "in" / "evil.h5ad", exp="../evil")
    atlas = tmp_path / "atlas"
    by = _by_source(_run([tmp_path / "in"], atlas))
    assert by[no_cells.name].status == "converted", by[no_cells.name].message
    assert by[all_zero.name].status == "converted", by[all_zero.name].message
    assert by["evil.h5ad"].status == "failed" and "not usable" in by["evil.h5ad"].message
    assert not (tmp_path / "evil").exists() and not (atlas.parent / "evil.zarr").exists()
    assert not (atlas.parent / "evil").exists() and not list(atlas.rglob("*evil*"))
    assert sorted(mi.version_folders(atlas)) == ["Homo_sapiens/SRPT91012", "Homo_sapiens/SRPT91013"]
    for path, exp in ((no_cells, "SRPT91012"), (all_zero, "SRPT91013")):
        stored = mi.check_store(mi.store_path(atlas, "Homo_sapiens", exp), path, layout="doc", experiment_id=exp)
        assert stored.X.nnz == 0
    assert sorted(open_catalog(atlas).experiments["experimentId"]) == ["SRPT91012", "SRPT91013"]


def test_b_layout_with_cpm_layer_keeps_x(tmp_path):
    """Layout B as documented: X raw, CPM in layers['abundance']; nothing to swap."""
    path, _ = mi.b_layout(tmp_path / mi.bgee_name("SRPT91004"), exp="SRPT91004")
    reports = _run([path], tmp_path / "atlas")
    assert reports[0].status == "converted" and reports[0].cpm_in_x is False
    mi.check_store(
        mi.store_path(tmp_path / "atlas", "Homo_sapiens", "SRPT91004"), path, layout="B", experiment_id="SRPT91004"
    )


def test_empty_cells_are_kept(tmp_path):
    """Cells without any count, including the last cells sampled by the CPM check (B layout)."""
    path, _ = mi.b_layout(tmp_path / mi.bgee_name("SRPT91005"), exp="SRPT91005")
    a = ad.read_h5ad(path)
    x = a.X.tolil()
    x[[0, 33, a.n_obs - 1], :] = 0
    a.X = sp.csr_matrix(x)
    a.X.eliminate_zeros()
    mi.write(a, path)
    reports = _run([path], tmp_path / "atlas")
    assert reports[0].status == "converted", reports[0].message
    stored = mi.check_store(
        mi.store_path(tmp_path / "atlas", "Homo_sapiens", "SRPT91005"), path, layout="B", experiment_id="SRPT91005"
    )
    empty = set(stored.obs_names[stored.obs["n_genes"].to_numpy() == 0])
    assert {a.obs_names[0], a.obs_names[33], a.obs_names[-1]} <= empty


def test_experiment_id_from_obs_option_or_error(tmp_path):
    named, _ = mi.b_layout(tmp_path / "a" / "my_download.h5ad", exp="SRPT91006")
    unnamed, _ = mi.b_layout(tmp_path / "b" / "other_file.h5ad", exp=None)
    atlas = tmp_path / "atlas"
    r = _run([named, unnamed], atlas)
    by = _by_source(r)
    assert by["my_download.h5ad"].status == "converted"
    assert by["my_download.h5ad"].experiment_id == "SRPT91006"
    assert by["my_download.h5ad"].species == "Homo_sapiens"  # from speciesId 9606
    mi.check_store(mi.store_path(atlas, "Homo_sapiens", "SRPT91006"), named, layout="B", experiment_id="SRPT91006")
    bad = by["other_file.h5ad"]
    assert bad.status == "failed"
    assert str(unnamed) in bad.message and "experiment id" in bad.message and "\n" not in bad.message
    # the option names the experiment
    r2 = _run([unnamed], atlas, experiment_id="SRPT91007")
    assert r2[0].status == "converted", r2[0].message
    mi.check_store(mi.store_path(atlas, "Homo_sapiens", "SRPT91007"), unnamed, layout="B", experiment_id="SRPT91007")
    e = pd.read_parquet(mi.catalog_table(atlas, "experiments.parquet"))
    assert sorted(e["experimentId"]) == ["SRPT91006", "SRPT91007"]


# -- 3. bad inputs ------------------------------------------------------------------------------
BAD = {
    "truncated": ("SRPT81001", "truncat"),
    "not_hdf5": ("SRPT81002", "not an HDF5"),
    "no_x": ("SRPT81003", "no X"),
    "shapes": ("SRPT81004", "disagrees"),
    "duplicates": ("SRPT81005", "duplicate cell names"),
    "negative": ("SRPT81006", "negative"),
    "nan": ("SRPT81007", "NaN"),
    "inf": ("SRPT81008", "infinite"),
    "unknown_layout": ("SRPT81009", "unknown layout"),
    "late_nan": ("SRPT81010", "NaN"),
}


def _make_bad(kind: str, dst: Path, real: Path) -> Path:
    if kind == "truncated":
        return mi.truncated(real, dst)
    if kind == "not_hdf5":
        return mi.not_hdf5(dst)
    if kind == "no_x":
        return mi.without_x(real, dst)
    if kind == "shapes":
        return mi.obs_shorter_than_x(real, dst)
    if kind == "duplicates":
        return mi.duplicate_cell_names(real, dst)
    if kind == "negative":
        return mi.bad_value(dst, -1.0)
    if kind == "nan":
        return mi.bad_value(dst, np.nan, position=0)
    if kind == "inf":
        return mi.bad_value(dst, np.inf)
    if kind == "unknown_layout":
        return mi.unknown_layout(dst)
    if kind == "late_nan":  # found only after part of the store was written (spill path, many blocks)
        adata = mi.make_adata(3000, 200, seed=9)
        adata.X.data[-1] = np.nan
        return mi.write(adata, dst)
    raise AssertionError(kind)


def test_bad_inputs_fail_cleanly_and_others_convert(tmp_path, bgee_sources):
    real = bgee_sources["SRPT00004"]
    bad_dir = tmp_path / "in"
    bad = {kind: _make_bad(kind, bad_dir / mi.bgee_name(exp), real) for kind, (exp, _) in BAD.items()}
    good = [bgee_sources["SRPT00004"], bgee_sources["SRPT00007"]]
    atlas = tmp_path / "atlas"
    reports = _run([bad_dir, *good], atlas)
    by = _by_source(reports)
    assert len(reports) == len(bad) + 2
    for kind, path in bad.items():
        r = by[path.name]
        exp, word = BAD[kind]
        assert r.status == "failed", f"{kind}: {r.status}"
        assert not r.ok
        assert "\n" not in r.message, f"{kind}: message is not one line: {r.message!r}"
        assert str(path) in r.message, f"{kind}: message does not name the file: {r.message}"
        assert word.lower() in r.message.lower(), f"{kind}: {r.message}"
        assert "Traceback" not in r.message
        assert r.line().startswith("FAILED") and "\n" not in r.line()
        assert not (atlas / "experiments" / "Homo_sapiens" / exp).exists(), kind
        assert not (atlas / "catalog" / "fragments" / "Homo_sapiens" / f"{exp}.json").exists(), kind
        assert not list(atlas.rglob(f"*{exp}*")), f"{kind}: leftovers {list(atlas.rglob(f'*{exp}*'))}"
    for path in good:
        assert by[path.name].status == "converted", by[path.name].message
    mi.assert_no_debris(atlas)
    assert sorted(mi.version_folders(atlas)) == ["Homo_sapiens/SRPT00004", "Mus_musculus/SRPT00007"]
    assert check_atlas(AtlasLocation(atlas)).clean
    fragments = sorted(
        str(p.relative_to(atlas / "catalog" / "fragments")) for p in atlas.glob("catalog/fragments/**/*.json")
    )
    assert fragments == ["Homo_sapiens/SRPT00004.json", "Mus_musculus/SRPT00007.json"]
    e = pd.read_parquet(mi.catalog_table(atlas, "experiments.parquet"))
    assert sorted(e["experimentId"]) == ["SRPT00004", "SRPT00007"]
    stored = mi.check_store(
        mi.store_path(atlas, "Mus_musculus", "SRPT00007"), good[1], layout="doc", experiment_id="SRPT00007"
    )
    mi.check_catalog(atlas, stored, species="Mus_musculus", experiment_id="SRPT00007", layout="doc")


def test_late_bad_value_on_spill_path_leaves_nothing(tmp_path, monkeypatch):
    """A NaN in the last block is only seen after shards were written: the partial store must go."""
    import bgee_dask.api.convert as conv

    path = _make_bad("late_nan", tmp_path / "in" / mi.bgee_name("SRPT81011"), Path())
    real_convert_file = conv.convert_file
    monkeypatch.setattr(conv, "convert_file", lambda *a, **k: real_convert_file(*a, in_memory_nnz=0, **k))
    atlas = tmp_path / "atlas"
    reports = _run([path], atlas)
    assert reports[0].status == "failed" and "NaN" in reports[0].message
    assert not list(atlas.rglob("*SRPT81011*"))
    assert not atlas.exists()  # nothing converted into a new path: no atlas folder


# -- 4. atlas behaviour --------------------------------------------------------------------------
def test_two_sources_same_experiment(tmp_path, bgee_sources):
    primary, variant = bgee_sources["SRPT00003"], bgee_sources["SRPT00003.C"]
    atlas = tmp_path / "atlas"
    # in one call
    reports = _run([primary, variant, bgee_sources["SRPT00004"]], atlas)
    by = _by_source(reports)
    assert by[primary.name].status == "converted"
    assert by[bgee_sources["SRPT00004"].name].status == "converted"
    clash = by[variant.name]
    assert clash.status == "failed"
    assert str(variant) in clash.message and str(primary) in clash.message and "\n" not in clash.message
    # in a later call
    again = _run([variant], atlas)[0]
    assert again.status == "failed"
    assert str(variant) in again.message and primary.name in again.message
    first_store = mi.store_path(atlas, "Homo_sapiens", "SRPT00003")
    stored = mi.check_store(first_store, primary, layout="doc", experiment_id="SRPT00003")
    mi.check_catalog(atlas, stored, species="Homo_sapiens", experiment_id="SRPT00003", layout="doc")
    # overwrite=True replaces it
    replaced = _run([variant], atlas, overwrite=True)[0]
    assert replaced.status == "converted", replaced.message
    store = mi.store_path(atlas, "Homo_sapiens", "SRPT00003")
    assert store != first_store and not first_store.parent.exists()  # a new version; the replaced one removed
    stored = mi.check_store(store, variant, layout="C", experiment_id="SRPT00003")
    row = mi.check_catalog(atlas, stored, species="Homo_sapiens", experiment_id="SRPT00003", layout="C")
    assert row["source_name"] == variant.name
    mi.assert_no_debris(atlas)


def test_two_sources_same_experiment_overwrite_in_one_call(tmp_path, bgee_sources):
    primary, variant = bgee_sources["SRPT00005"], bgee_sources["SRPT00005.D"]
    atlas = tmp_path / "atlas"
    reports = _run([primary, variant], atlas, overwrite=True)
    statuses = sorted(r.status for r in reports)
    assert statuses == ["converted", "skipped"], [r.message for r in reports]
    winner = next(r for r in reports if r.status == "converted")
    loser = next(r for r in reports if r.status == "skipped")
    assert winner.source in loser.message
    layout = "D" if winner.source == str(variant) else "doc"
    mi.check_store(
        mi.store_path(atlas, "Mus_musculus", "SRPT00005"), winner.source, layout=layout, experiment_id="SRPT00005"
    )


def test_rerun_skips_overwrite_reconverts_and_second_call_adds(tmp_path, bgee_sources):
    atlas = tmp_path / "atlas"
    first = [bgee_sources["SRPT00004"], bgee_sources["SRPT00007"]]
    assert [r.status for r in _run(first, atlas)] == ["converted", "converted"]
    shards = {exp: _shard(atlas, SPECIES[exp], exp) for exp in ("SRPT00004", "SRPT00007")}
    before = {exp: p.stat().st_mtime_ns for exp, p in shards.items()}
    attrs_before = zarr.open_group(mi.store_path(atlas, "Homo_sapiens", "SRPT00004"), mode="r").attrs["bgee_dask"]
    time.sleep(0.05)

    again = _run(first, atlas)
    assert [r.status for r in again] == ["skipped", "skipped"]
    assert all("unchanged" in r.message for r in again)
    assert {exp: p.stat().st_mtime_ns for exp, p in shards.items()} == before

    # a second call adds experiments without touching the first stores
    added = _run([bgee_sources["SRPT00005"], *first], atlas)
    assert sorted(r.status for r in added) == ["converted", "skipped", "skipped"]
    assert {exp: p.stat().st_mtime_ns for exp, p in shards.items()} == before
    e = pd.read_parquet(mi.catalog_table(atlas, "experiments.parquet"))
    assert sorted(e["experimentId"]) == ["SRPT00004", "SRPT00005", "SRPT00007"]
    assert json.loads((atlas / "catalog" / "atlas.json").read_text())["n_experiments"] == 3
    assert len(open_catalog(atlas).experiments) == 3
    stored = mi.check_store(
        mi.store_path(atlas, "Mus_musculus", "SRPT00005"),
        bgee_sources["SRPT00005"],
        layout="doc",
        experiment_id="SRPT00005",
    )
    mi.check_catalog(atlas, stored, species="Mus_musculus", experiment_id="SRPT00005", layout="doc")

    # overwrite reconverts, into a new version of SRPT00004 (the replaced version is removed)
    time.sleep(0.05)
    over = _run([bgee_sources["SRPT00004"]], atlas, overwrite=True)
    assert over[0].status == "converted", over[0].message
    new_shard = _shard(atlas, "Homo_sapiens", "SRPT00004")
    assert new_shard != shards["SRPT00004"] and not shards["SRPT00004"].exists()
    assert new_shard.stat().st_mtime_ns != before["SRPT00004"]
    assert _shard(atlas, "Mus_musculus", "SRPT00007") == shards["SRPT00007"]
    assert shards["SRPT00007"].stat().st_mtime_ns == before["SRPT00007"]
    mi.assert_no_debris(atlas)
    attrs_after = zarr.open_group(mi.store_path(atlas, "Homo_sapiens", "SRPT00004"), mode="r").attrs["bgee_dask"]
    assert attrs_after["provenance"]["source_sha256"] == attrs_before["provenance"]["source_sha256"]
    mi.check_store(
        mi.store_path(atlas, "Homo_sapiens", "SRPT00004"),
        bgee_sources["SRPT00004"],
        layout="doc",
        experiment_id="SRPT00004",
    )
    e = pd.read_parquet(mi.catalog_table(atlas, "experiments.parquet"))
    assert sorted(e["experimentId"]) == ["SRPT00004", "SRPT00005", "SRPT00007"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_failed_reconversion_keeps_the_previous_experiment(tmp_path, overwrite):
    """A source replaced by a broken file (same name) fails; the converted experiment stays listed and intact."""
    path = mi.write(mi.make_adata(200, 50, seed=5), tmp_path / "in" / mi.bgee_name("SRPT91011"))
    good = tmp_path / "good.h5ad"
    good.write_bytes(path.read_bytes())
    atlas = tmp_path / "atlas"
    assert _run([path], atlas)[0].status == "converted"
    version = mi.record(atlas, "Homo_sapiens", "SRPT91011")["version"]
    mi.bad_value(path, np.nan)  # seen only while streaming, after the store was started
    r = _run([path], atlas, overwrite=overwrite)[0]
    assert r.status == "failed" and "NaN" in r.message
    assert sorted(open_catalog(atlas).experiments["experimentId"]) == ["SRPT91011"]
    assert mi.record(atlas, "Homo_sapiens", "SRPT91011")["version"] == version
    assert mi.version_folders(atlas) == {"Homo_sapiens/SRPT91011": [version]}
    mi.assert_no_debris(atlas)
    assert check_atlas(AtlasLocation(atlas)).clean
    stored = ad.read_zarr(mi.store_path(atlas, "Homo_sapiens", "SRPT91011"))
    want = mi.expected_counts(ad.read_h5ad(good))[stored.obs["source_row"].to_numpy()]
    assert (want != stored.X).nnz == 0


def test_changed_source_with_same_name_is_reconverted(tmp_path, bgee_sources):
    atlas = tmp_path / "atlas"
    path = mi.reformat(bgee_sources["SRPT00004"], tmp_path / "in" / mi.bgee_name("SRPT91008"))
    assert _run([path], atlas)[0].status == "converted"
    a = ad.read_h5ad(path)
    a.X = a.X * 2
    mi.write(a, path)
    r = _run([path], atlas)[0]
    assert r.status == "converted", r.message
    mi.check_store(mi.store_path(atlas, "Homo_sapiens", "SRPT91008"), path, layout="doc", experiment_id="SRPT91008")


_KILL_SCRIPT = """
import sys
from bgee_dask.cli import main
sys.exit(main(["convert", sys.argv[1], "--out", sys.argv[2], "--workers", "1", "--no-progress"]))
"""


def test_killed_conversion_leaves_nothing_and_resumes(tmp_path, bgee_sources):
    atlas = tmp_path / "atlas"
    exp = "SRPT92001"
    big = mi.large_gzip(tmp_path / "big" / mi.bgee_name(exp))
    assert _run([bgee_sources["SRPT00004"]], atlas)[0].status == "converted"
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(big), str(atlas)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    parent = atlas / "experiments" / "Homo_sapiens" / exp
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if parent.is_dir() and any((p / "cells.zarr").exists() for p in parent.iterdir()):
                break  # its version folder is being written
            time.sleep(0.005)
        time.sleep(0.1)
        assert proc.poll() is None, "conversion finished before it could be killed; make the input larger"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # the killed version is debris nothing refers to: no record, not in the catalog, reported as an orphan
    killed = sorted(p.name for p in parent.iterdir())
    assert len(killed) == 1, killed
    assert not list((atlas / "catalog" / "fragments").rglob(f"*{exp}*"))
    assert exp not in json.dumps(mi.header(atlas))
    report = check_atlas(AtlasLocation(atlas))
    assert [(f.kind, f.path) for f in report.findings] == [("orphan", f"experiments/Homo_sapiens/{exp}/{killed[0]}")]
    consolidate(AtlasLocation(atlas))
    assert list(open_catalog(atlas).experiments["experimentId"]) == ["SRPT00004"]
    # the next run converts it properly and clears the leftovers
    r = _run([big, bgee_sources["SRPT00004"]], atlas)
    assert sorted(x.status for x in r) == ["converted", "skipped"], [x.message for x in r]
    mi.assert_no_debris(atlas)
    assert check_atlas(AtlasLocation(atlas)).clean
    assert not (parent / killed[0]).exists()
    stored = mi.check_store(mi.store_path(atlas, "Homo_sapiens", exp), big, layout="doc", experiment_id=exp)
    mi.check_catalog(atlas, stored, species="Homo_sapiens", experiment_id=exp, layout="doc")
    assert sorted(open_catalog(atlas).experiments["experimentId"]) == ["SRPT00004", exp]
