"""The defects of the "Trust" issue, each against an independent reference (anndata, numpy, scipy).

Crashes and concurrent writers have their own suites (test_trust_crash.py, test_trust_concurrency.py).
"""

from __future__ import annotations

import json
import os
import shutil
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
import xarray as xr

import bgee_dask as bd
from bgee_dask.catalog.commit import consolidate
from bgee_dask.cli import main
from bgee_dask.format.location import AtlasLocation
from bgee_dask.query.filter import FilterTypeError
from bgee_dask.schema import BgeeInputError, InputKeyError, InputTypeError

from . import make_inputs as mi
from .trust_support import gene_sums


def _variant(src, folder, exp: str, **obs_columns) -> Path:
    """SRPT00004's counts as experiment ``exp``, with the given obs columns replaced or added."""
    a = ad.read_h5ad(src)
    for name, values in obs_columns.items():
        a.obs[name] = values
    out = Path(folder) / f"Homo_sapiens_{exp}_droplet_based.h5ad"
    out.parent.mkdir(parents=True, exist_ok=True)
    a.write_h5ad(out, compression="gzip")
    return out


def _total(path) -> float:
    return float(sp.csr_matrix(ad.read_h5ad(path).X).sum(dtype=np.float64))


# -- 1. a query with no filter covers every cell --------------------------------------------------
@pytest.mark.parametrize("no_filter", [None, "", "   "])
def test_query_without_filter_covers_every_cell(four_file_atlas, four_files, no_filter):
    sources = {Path(f).name.split("_")[2]: ad.read_h5ad(f) for f in four_files}
    n_cells = sum(a.n_obs for a in sources.values())
    q = bd.open_atlas(four_file_atlas).query(no_filter)
    x = q.to_dask()
    assert x.shape == (n_cells, len(q.plan.gene_ids))
    adata = q.to_anndata()
    assert adata.shape == x.shape
    from_dask = x.compute().tocsr()
    assert (from_dask != adata.X.astype(np.float32)).nnz == 0
    for exp, source in sources.items():
        rows = (adata.obs["experimentId"] == exp).to_numpy()
        assert rows.sum() == source.n_obs
        assert adata.X[rows].sum(dtype=np.float64) == sp.csr_matrix(source.X).sum(dtype=np.float64), exp
    assert len(q.obs()) == n_cells
    assert int(q.aggregate(by="experimentId", stats=["sum"])["n_cells"].sum()) == n_cells


# -- 2. declared catalog types ---------------------------------------------------------------------
def test_missing_numeric_and_boolean_values_in_text_columns_convert_and_filter(tmp_path, bgee_sources):
    src = bgee_sources["SRPT00004"]
    n = ad.read_h5ad(src).n_obs
    files = [
        _variant(src, tmp_path / "in", "SRPT90001", strain=np.full(n, np.nan)),  # NULL read back as float
        _variant(src, tmp_path / "in", "SRPT90002", strain=["C57BL/6"] * n),
        _variant(src, tmp_path / "in", "SRPT90003", libID=np.arange(n) % 2 + 1000, sex=np.arange(n) % 2 == 0),
    ]
    atlas = tmp_path / "atlas"
    reports = bd.convert(files, atlas, workers=1, progress=False)
    assert [r.status for r in reports] == ["converted"] * 3, [r.line() for r in reports]
    assert (atlas / "catalog" / "atlas.json").is_file()
    a = bd.open_atlas(atlas)
    assert len(a.query("strain == 'C57BL/6'").obs()) == n
    assert len(a.query("libID == '1000'").obs()) == (np.arange(n) % 2 == 0).sum()
    assert len(a.query("sex == 'True'").obs()) == (np.arange(n) % 2 == 0).sum()
    runs = pd.read_parquet(mi.catalog_table(atlas, "runs.parquet"))
    assert set(runs.loc[runs["experiment"] == "Homo_sapiens/SRPT90003", "libID"].astype(str)) == {"1000", "1001"}
    # a later, unrelated conversion into the same atlas
    more = bd.convert([bgee_sources["SRPT00007"]], atlas, workers=1, progress=False)
    assert more[0].status == "converted", more[0].line()
    assert bd.check(atlas).clean


def test_integer_column_with_text_fails_that_file_before_anything_is_written(tmp_path, bgee_sources):
    src = bgee_sources["SRPT00004"]
    n = ad.read_h5ad(src).n_obs
    bad = _variant(src, tmp_path / "in", "SRPT90004", SampleId=["abc"] * n)
    atlas = tmp_path / "atlas"
    reports = {r.source: r for r in bd.convert([bad, bgee_sources["SRPT00007"]], atlas, workers=1, progress=False)}
    assert reports[str(bgee_sources["SRPT00007"])].status == "converted"
    failed = reports[str(bad)]
    assert failed.status == "failed" and str(bad) in failed.message and "SampleId" in failed.message
    assert "\n" not in failed.message
    assert list(mi.version_folders(atlas)) == ["Mus_musculus/SRPT00007"]


def test_a_share_that_cannot_be_consolidated_is_left_out_and_blocks_nothing(tmp_path, bgee_sources):
    atlas = tmp_path / "atlas"
    bd.convert([bgee_sources["SRPT00004"], bgee_sources["SRPT00005"]], atlas, workers=1, progress=False)
    record = mi.record(atlas, "Homo_sapiens", "SRPT00004")
    (atlas / record["runs"]).write_bytes(b"not parquet")  # damaged by hand, or by a bug elsewhere
    reports = bd.convert([bgee_sources["SRPT00007"]], atlas, workers=1, progress=False)
    assert reports[0].status == "converted", reports[0].line()
    a = bd.open_atlas(atlas)
    assert sorted(a.experiments["experimentId"]) == ["SRPT00005", "SRPT00007"]
    assert [x["experiment"] for x in a.catalog.left_out] == ["Homo_sapiens/SRPT00004"]
    report = bd.check(atlas)
    assert [(f.kind, f.path) for f in report.findings] == [("left-out", "Homo_sapiens/SRPT00004")]
    # converting it again replaces the damaged version
    again = bd.convert([bgee_sources["SRPT00004"]], atlas, workers=1, progress=False, overwrite=True)
    assert again[0].status == "converted"
    assert bd.check(atlas).clean


# -- 5. ids that cannot address another experiment's files ------------------------------------------
def test_experiment_ids_shaped_like_store_names_do_not_collide(tmp_path, bgee_sources):
    src = bgee_sources["SRPT00004"]
    atlas = tmp_path / "atlas"
    ids = ["X", "X.by_gene", "X.zarr.partial-y", "X.zarr"]
    for exp in ids:
        (r,) = bd.convert([src], atlas, workers=1, progress=False, experiment_id=exp, species="Homo_sapiens")
        assert r.status == "converted", r.line()
    reference = gene_sums(src)
    a = bd.open_atlas(atlas)
    assert sorted(a.experiments["experimentId"]) == sorted(ids)
    ds = a.query().aggregate(by="experimentId", stats=["sum"])
    for i, exp in enumerate(ds["experimentId"].values):
        found = dict(zip(ds["gene"].values.astype(str), ds["sum"].values[i], strict=True))
        assert {g: found[g] for g in reference} == reference, exp
    assert bd.check(atlas).clean


# -- 6. disk full ------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB tmpfs (root only: CI and the developers' machines run as root)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True)
    assert done.returncode == 0, done.stderr
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_names_each_file_and_leaves_a_consistent_atlas(small_disk, bgee_sources, tmp_path):
    atlas = small_disk / "atlas"
    files = [bgee_sources["SRPT00004"], bgee_sources["SRPT00001"], bgee_sources["SRPT00007"]]
    reports = bd.convert(files, atlas, workers=1, progress=False)
    failed = [r for r in reports if r.status == "failed"]
    assert failed, "the 6 MB disk should not hold SRPT00001"
    for r in failed:
        assert r.message.startswith(str(r.source)) and "No space left on device" in r.message, r.message
        assert "\n" not in r.message
    converted = [r for r in reports if r.status == "converted"]
    report = bd.check(atlas) if (atlas / "catalog" / "atlas.json").exists() else None
    if converted:
        assert report is not None and report.clean, [f.line() for f in report.findings]
        for r in converted:
            sums = (
                bd.open_atlas(atlas)
                .query(f"experimentId == '{r.experiment_id}'")
                .aggregate(by="experimentId", stats=["sum"])
            )
            assert float(np.nansum(sums["sum"].values)) == _total(r.source)
    assert not [p for p in atlas.rglob("*") if ".tmp-" in p.name]
    assert not [p for p in small_disk.rglob("bgee-dask-*")]
    # with room again, a re-run converges
    shutil.copytree(atlas, tmp_path / "atlas") if atlas.exists() else None
    again = bd.convert(files, tmp_path / "atlas", workers=1, progress=False)
    assert all(r.ok for r in again), [r.line() for r in again]
    assert bd.check(tmp_path / "atlas").clean


def test_a_spill_folder_too_small_fails_the_file_at_once_saying_how_much_it_needs(
    small_disk, bgee_sources, tmp_path, monkeypatch
):
    """A file too large to reorder in memory, spilling to a 6 MB folder: one line before any work."""
    import bgee_dask.api.convert as conv
    from bgee_dask.converter.writer import spill_bytes
    from bgee_dask.sources.h5ad import H5adSource

    real_convert_file = conv.convert_file
    monkeypatch.setattr(conv, "convert_file", lambda *a, **k: real_convert_file(*a, in_memory_nnz=0, **k))
    src = bgee_sources["SRPT00001"]
    with H5adSource(src) as source:
        need = spill_bytes(source, gene_index=True)
    assert need == 2702861 * 12  # each value: its cell and gene (int32) and itself (float32)
    t0 = time.monotonic()
    (r,) = bd.convert([src], tmp_path / "atlas", workers=1, progress=False, tmp_dir=str(small_disk))
    assert r.status == "failed"
    assert r.message.startswith(str(src)) and "\n" not in r.message
    assert "No space left" not in r.message  # not found out by filling the disk
    assert f"need about 32 MB in {small_disk}, which has 6 MB free" in r.message, r.message
    assert "--tmp-dir" in r.message
    assert time.monotonic() - t0 < 30
    assert not list(small_disk.iterdir())  # nothing spilled
    assert not list((tmp_path / "atlas").rglob("cells.zarr"))  # nor written


def test_a_spill_write_on_a_full_disk_names_the_file_and_the_cause(small_disk):
    from bgee_dask.converter.spill_records import append_record

    path = small_disk / "bucket-000001.bin"
    with pytest.raises(OSError, match=rf"spill file {path}: No space left on device") as info:
        append_record(str(path), [1 << 21], [np.ones(1 << 21, dtype=np.float32)] * 2)  # 16 MB on a 6 MB disk
    assert info.value.errno == 28


# -- 7. SIGTERM and SIGKILL: no spill folder survives ---------------------------------------------
SPILLING_CONVERT = """
import functools, sys
import bgee_dask.api.convert as c
c.convert_file = functools.partial(c.convert_file, in_memory_nnz=20_000)  # force the spill path
from bgee_dask.cli import main
sys.exit(main(["convert", sys.argv[1], "--out", sys.argv[2], "--tmp-dir", sys.argv[3], "--workers", "1",
              "--no-progress"]))
"""


def _start_spilling(source, atlas, spill) -> subprocess.Popen:
    spill.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", SPILLING_CONVERT, str(source), str(atlas), str(spill)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list(spill.glob("bgee-dask-*")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no spill folder appeared"
        time.sleep(0.005)
    return proc


@pytest.fixture(scope="module")
def large_source(tmp_path_factory) -> Path:
    return mi.large_gzip(tmp_path_factory.mktemp("large") / mi.bgee_name("SRPT91100"), n_cells=40_000)


def test_sigterm_stops_cleanly_and_leaves_no_spill_folder(tmp_path, large_source):
    spill, atlas = tmp_path / "spill", tmp_path / "atlas"
    proc = _start_spilling(large_source, atlas, spill)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, (out, err)
    assert "interrupted by SIGTERM" in err
    assert not list(spill.iterdir())
    assert not mi.version_folders(atlas)


def test_sigkill_spill_folders_are_swept_by_the_next_convert(tmp_path, large_source, bgee_sources):
    spill, atlas = tmp_path / "spill", tmp_path / "atlas"
    proc = _start_spilling(large_source, atlas, spill)
    proc.kill()
    proc.communicate(timeout=60)
    left = list(spill.glob("bgee-dask-*"))
    assert left  # what SIGKILL leaves
    reports = bd.convert([bgee_sources["SRPT00004"]], atlas, workers=1, progress=False, tmp_dir=str(spill))
    assert reports[0].status == "converted"
    assert not list(spill.glob("bgee-dask-*"))
    assert bd.check(atlas).clean  # the killed run's version folder is gone too
    mi.assert_no_debris(atlas)


# -- 8. a column numeric in one experiment and text in another -------------------------------------
def test_filter_on_a_column_numeric_here_and_text_there(tmp_path, bgee_sources):
    src = bgee_sources["SRPT00004"]
    n = ad.read_h5ad(src).n_obs
    donors_num, donors_txt = np.arange(n) % 3, np.asarray([f"d{i % 2}" for i in range(n)])
    files = [
        _variant(src, tmp_path / "in", "SRPT90011", donor=donors_num),
        _variant(src, tmp_path / "in", "SRPT90012", donor=donors_txt),
    ]
    atlas = tmp_path / "atlas"
    assert all(r.status == "converted" for r in bd.convert(files, atlas, workers=1, progress=False))
    a = bd.open_atlas(atlas)
    obs = a.query("donor == 'd1'").obs(["experimentId", "donor"])
    assert set(obs["experimentId"]) == {"SRPT90012"} and len(obs) == (donors_txt == "d1").sum()
    obs = a.query("donor == 1").obs(["experimentId"])
    assert set(obs["experimentId"]) == {"SRPT90011"} and len(obs) == (donors_num == 1).sum()
    obs = a.query("donor in [2, 'd0']").obs(["experimentId"])
    assert len(obs) == (donors_num == 2).sum() + (donors_txt == "d0").sum()
    with pytest.raises(FilterTypeError, match="donor"):
        a.query("donor == True")


# -- 9. the smaller ones -----------------------------------------------------------------------------
def test_nc_output_on_the_base_dependencies(four_file_atlas, tmp_path, capsys):
    out = tmp_path / "r.nc"
    assert main(["query", str(four_file_atlas), "--by", "cellTypeId", "--genes", "CD19,LYZ", "--out", str(out)]) == 0
    ds = bd.open_atlas(four_file_atlas).query(genes=["CD19", "LYZ"]).aggregate(by="cellTypeId")
    back = xr.open_dataset(out, engine="h5netcdf")
    np.testing.assert_array_equal(back["sum"].values, ds["sum"].values)
    deps = Path(__file__).resolve().parents[1].joinpath("pyproject.toml").read_text().split("[project.optional")[0]
    assert '"h5netcdf' in deps


@pytest.mark.parametrize(
    "flag, path",
    [("--out", "missing-folder/r.csv"), ("--out", "r.xlsx"), ("--plot", "missing-folder/dots.png")],
)
def test_output_paths_are_checked_before_any_compute(four_file_atlas, tmp_path, monkeypatch, capsys, flag, path):
    from bgee_dask.api.query import Query

    def refuse(*_a, **_k):
        raise AssertionError("computed before the output path was checked")

    monkeypatch.setattr(Query, "aggregate", refuse)
    monkeypatch.setattr(Query, "__init__", refuse)
    args = ["query", str(four_file_atlas), "--by", "cellTypeId", "--out", str(tmp_path / "r.csv")]
    if flag == "--out":
        args[-1] = str(tmp_path / path)
    else:
        args += ["--plot", str(tmp_path / path)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bgee-dask: error:") and str(tmp_path / path) in err and "\n" not in err


def test_convert_that_converts_nothing_creates_no_atlas(tmp_path, capsys):
    bad = mi.not_hdf5(tmp_path / "in" / mi.bgee_name("SRPT91201"))
    out = tmp_path / "atlas"
    assert main(["convert", str(bad), "--out", str(out), "--no-progress"]) == 1
    assert not out.exists()
    assert str(bad) in capsys.readouterr().err


def test_empty_atlas_gives_empty_results(tmp_path, capsys):
    atlas = tmp_path / "empty"
    consolidate(AtlasLocation(atlas))  # a catalog with no experiment
    q = bd.open_atlas(atlas).query()
    assert len(q.obs()) == 0
    assert q.aggregate(by="cellTypeId").sizes["group"] == 0
    assert q.to_anndata().n_obs == 0
    assert main(["query", str(atlas), "--by", "cellTypeId", "--out", str(tmp_path / "r.csv"), "--no-progress"]) == 0
    assert "0 groups" in capsys.readouterr().out
    assert main(["info", str(atlas)]) == 0


@pytest.mark.parametrize("damaged", ["header", "experiments"])
def test_a_damaged_catalog_file_is_named(four_file_atlas, tmp_path, capsys, damaged):
    atlas = tmp_path / "atlas"
    shutil.copytree(four_file_atlas, atlas)
    target = atlas / "catalog" / "atlas.json" if damaged == "header" else mi.catalog_table(atlas, "experiments.parquet")
    target.write_bytes(b"\x00garbage")
    from bgee_dask.catalog.reader import forget_cached_tables

    forget_cached_tables()
    assert main(["info", str(atlas)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bgee-dask: error:") and str(target) in err and "\n" not in err


def test_api_input_errors_are_bgee_input_errors_of_the_builtin_type(four_file_atlas):
    a = bd.open_atlas(four_file_atlas)
    with pytest.raises(InputTypeError) as info:
        a.query(filter=123)
    assert isinstance(info.value, TypeError) and isinstance(info.value, bd.BgeeInputError)
    with pytest.raises(InputKeyError) as info:
        a.query("nosuchcolumn == 'x'")
    assert isinstance(info.value, KeyError) and "nosuchcolumn" in str(info.value)
    with pytest.raises(InputKeyError):
        a.query(genes=["NOSUCHGENE1"])
    with pytest.raises(BgeeInputError) as info:
        a.query().aggregate(by="cellTypeId", stats=["median"])
    assert isinstance(info.value, ValueError)
    assert bd.BgeeInputError is BgeeInputError
    assert issubclass(bd.StorageAccessError, OSError)


def test_cli_check_exit_status_and_json(four_file_atlas, tmp_path, capsys):
    atlas = tmp_path / "atlas"
    shutil.copytree(four_file_atlas, atlas)
    assert main(["check", str(atlas)]) == 0
    assert "clean" in capsys.readouterr().out
    shard = next(p for p in mi.store_path(atlas, "Homo_sapiens", "SRPT00003").rglob("c/*") if p.is_file())
    shard.unlink()
    # a store missing a shard still opens; one missing its metadata does not
    (mi.store_path(atlas, "Homo_sapiens", "SRPT00003") / "X" / "data" / "zarr.json").unlink()
    (atlas / "experiments" / "Homo_sapiens" / "SRPT00004" / "20000101T000000Z-deadbeef").mkdir()
    (atlas / "catalog" / "fragments" / "Homo_sapiens" / "SRPT00004.json.tmp-0badf00d").write_text("{")
    assert main(["check", str(atlas), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    kinds = sorted((f["kind"], f["path"]) for f in report["findings"])
    assert kinds == [
        ("damaged", "Homo_sapiens/SRPT00003"),
        ("debris", "catalog/fragments/Homo_sapiens/SRPT00004.json.tmp-0badf00d"),
        ("orphan", "experiments/Homo_sapiens/SRPT00004/20000101T000000Z-deadbeef"),
    ]
    assert main(["check", str(atlas), "--repair"]) == 1  # a damaged store cannot be repaired
    out = capsys.readouterr().out
    assert "damaged: Homo_sapiens/SRPT00003" in out and "orphan" not in out.split("repaired")[-1].split("\n", 1)[-1]
    assert not (atlas / "experiments" / "Homo_sapiens" / "SRPT00004" / "20000101T000000Z-deadbeef").exists()
    assert os.path.exists(mi.store_path(atlas, "Homo_sapiens", "SRPT00004"))


def test_writing_where_commits_cannot_be_made_atomic_is_refused_in_one_line(tmp_path, bgee_sources):
    with pytest.raises(bd.StorageAccessError, match=r"gs://.*can be read"):
        bd.convert([bgee_sources["SRPT00004"]], "gs://some-bucket/atlas", workers=1, progress=False)


def test_memory_atlas_commits_like_any_other(bgee_sources):
    """memory:// emulates the conditional writes in-process: a commit is never reported without its catalog."""
    import uuid

    url = f"memory://bgee-{uuid.uuid4().hex[:8]}/atlas"
    reports = bd.convert([bgee_sources["SRPT00004"], bgee_sources["SRPT00007"]], url, workers=1, progress=False)
    assert [r.status for r in reports] == ["converted", "converted"]
    a = bd.open_atlas(url)
    assert sorted(a.experiments["experimentId"]) == ["SRPT00004", "SRPT00007"]
    assert bd.check(url).clean
    assert a.query("experimentId == 'SRPT00004'").aggregate(by="experimentId", stats=["sum"])["sum"].sum() == _total(
        bgee_sources["SRPT00004"]
    )
