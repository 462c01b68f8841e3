"""``bgee-dask download`` and ``bgee_dask.bgee`` against a local server laid out like Bgee's FTP (tests/bgee_ftp.py).

Only 127.0.0.1 is contacted. The served H5AD files are the shared ones, so what arrives is checked
byte for byte (sha256) against them, and the atlas built on arrival against anndata/numpy on them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import bgee_dask as bd
from bgee_dask.bgee import (
    BgeeDataError,
    IncompleteDownload,
    TransferError,
    TransferPolicy,
    download,
    list_experiments,
)
from bgee_dask.bgee import transfer as transfer_module
from bgee_dask.bgee.annotation import read_annotation
from bgee_dask.bgee.download import run_download
from bgee_dask.bgee.releases import absolute_url, parse_releases
from bgee_dask.catalog.annotations import read_experiment_annotations
from bgee_dask.cli import _parser, main
from bgee_dask.format.location import AtlasLocation

from .bgee_ftp import EXPERIMENT_NAMES, LAST_MODIFIED, BgeeFtp, bgee_ftp, ftp_content, tar_gz, tsv

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.timeout(300)]

HUMAN = ["SRPT00001", "SRPT00002", "SRPT00003", "SRPT00004"]
MOUSE = ["SRPT00005", "SRPT00006", "SRPT00007"]
#: Libraries per experiment, as ../shared/data/bgee/README.md states them.
LIBRARIES = {"SRPT00001": 10, "SRPT00002": 1, "SRPT00003": 3, "SRPT00004": 1, "SRPT00005": 1, "SRPT00006": 2}
LIBRARIES["SRPT00007"] = 5
#: Tests' patience: generous for a loaded 2-core machine, short pauses between attempts.
TEST_POLICY = TransferPolicy(timeout=15.0, retries=2, backoff=0.05)


@pytest.fixture(scope="module")
def ftp_files(bgee_data: Path) -> dict:
    return ftp_content(bgee_data)


@pytest.fixture
def ftp(ftp_files: dict, monkeypatch: pytest.MonkeyPatch):
    """A fresh server (its own behaviours and log) for each test; no proxy between it and the tests."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setattr(transfer_module, "DEFAULT_POLICY", TEST_POLICY)
    with bgee_ftp(ftp_files) as server:
        yield server


def _sha(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _cli(ftp: BgeeFtp, capsys, *args: str, progress: bool = False) -> tuple[int, str, str]:
    argv = ["download", *map(str, args), "--base-url", ftp.base_url]
    code = main(argv if progress else [*argv, "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("bgee-dask: error: ")]


def _folder(out: Path, species: str) -> Path:
    return out / "15.2" / species


def _h5ad(folder: Path, species: str, exp: str) -> Path:
    return folder / f"{species}_{exp}_droplet_based.h5ad"


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_ino, p.stat().st_size) for p in root.rglob("*") if p.is_file()}


# -- the command line ------------------------------------------------------------------------------
def test_help_names_every_option_with_a_text(capsys):
    with pytest.raises(SystemExit) as info:
        main(["download", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--experiment", "--release", "--base-url", "--list", "--json", "--out", "--atlas", "--jobs"):
        assert flag in out
    for flag in ("--scheduler", "--cluster", "--jobqueue-config", "SPECIES"):
        assert flag in out
    sub = next(a for a in _parser()._actions if a.dest == "command").choices["download"]
    for action in sub._actions:
        assert action.help, f"no help text for {action.option_strings or action.dest}"


def test_out_is_required_without_list(ftp, capsys):
    code, _, err = _cli(ftp, capsys, "Homo_sapiens")
    assert code == 2
    assert _errors(err) == ["bgee-dask: error: --out DIR is required (unless --list)"]


# -- listing ---------------------------------------------------------------------------------------
def test_list_text_and_json(ftp, capsys, bgee_sources):
    code, out, err = _cli(ftp, capsys, "Homo_sapiens", "--list")
    assert code == 0, err
    rows = [line.split("\t") for line in out.splitlines()]
    assert rows == [[e, EXPERIMENT_NAMES[e], str(LIBRARIES[e])] for e in HUMAN]
    # no file was fetched or written: only the three tables were asked for
    assert all(not r.path.endswith(".h5ad") for r in ftp.log)

    code, out, err = _cli(ftp, capsys, "Homo_sapiens", "--list", "--json")
    assert code == 0, err
    records = json.loads(out)
    assert [r["experimentId"] for r in records] == HUMAN
    for r in records:
        exp = r["experimentId"]
        obs = ad.read_h5ad(bgee_sources[exp], backed="r").obs
        assert r["name"] == EXPERIMENT_NAMES[exp]
        assert r["library_count"] == LIBRARIES[exp] == obs["libID"].nunique()
        assert r["data_source"] == "SRA"
        assert r["data_source_url"] == f"https://www.ncbi.nlm.nih.gov/sra/?term={exp}"
        assert r["description"].startswith(f"Homo_sapiens test experiment {exp}: ")
        assert r["Cell count"] == str(len(obs))  # a column Bgee may add is kept under its own name
        assert (r["species"], r["release"]) == ("Homo_sapiens", "15.2")


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        ("Homo_sapiens", HUMAN),
        ("Homo sapiens", HUMAN),
        ("homo_sapiens", HUMAN),
        ("human", HUMAN),
        ("9606", HUMAN),
        ("Mus musculus", MOUSE),
        ("mouse", MOUSE),
        ("10090", MOUSE),
    ],
)
def test_species_by_name_common_name_or_taxon(ftp, spelling, expected):
    frame = list_experiments(spelling, base_url=ftp.base_url)
    assert frame["experimentId"].tolist() == expected
    assert set(frame["species"]) == {"Homo_sapiens" if expected == HUMAN else "Mus_musculus"}


def test_releases_by_name_and_unknown_ones(ftp, capsys):
    for spelling in ("15.2", "15_2", "bgee_v15_2"):
        code, out, err = _cli(ftp, capsys, "mouse", "--list", "--release", spelling)
        assert code == 0, err
        assert [line.split("\t")[0] for line in out.splitlines()] == MOUSE

    code, out, err = _cli(ftp, capsys, "mouse", "--list", "--release", "13.0")
    assert code == 2 and out == ""
    assert _errors(err) == [
        f"bgee-dask: error: unknown release '13.0'; {ftp.base_url}/release_v2.tsv lists 15.2, 15.1, 14.2"
    ]
    assert err.count("\n") == 1

    code, _, err = _cli(ftp, capsys, "mouse", "--list", "--release", "14.2")
    assert code == 2
    (line,) = _errors(err)
    assert "Bgee 14.2 publishes no droplet-based single-cell data" in line


def test_cut_short_species_table_is_refused(ftp, capsys, tmp_path):
    code, out, err = _cli(ftp, capsys, "mouse", "--release", "15.1", "--out", tmp_path / "bgee")
    assert code == 2 and out == ""
    (line,) = _errors(err)
    assert f"{ftp.base_url}/bgee_v15_1/rPackageSpeciesInfo.tsv" in line and "cut short" in line
    assert not (tmp_path / "bgee").exists()


def test_unknown_species_and_species_without_droplet_data(ftp, capsys):
    code, _, err = _cli(ftp, capsys, "Gallus gallus", "--list")
    assert code == 2
    (line,) = _errors(err)
    assert line.startswith("bgee-dask: error: unknown species 'Gallus gallus' in Bgee 15.2")
    assert "Homo_sapiens (human, 9606), Mus_musculus (mouse, 10090)" in line

    for spelling in ("zebrafish", "7955", "Danio rerio"):
        code, _, err = _cli(ftp, capsys, spelling, "--list")
        assert code == 2
        (line,) = _errors(err)
        assert "Danio_rerio (zebrafish, 7955) has no droplet-based single-cell data in Bgee 15.2" in line


def test_release_table_urls(ftp):
    releases = parse_releases(ftp.body("/ftp/release_v2.tsv").decode(), "release_v2.tsv", ftp.base_url)
    assert [r.name for r in releases] == ["15.2", "15.1", "14.2"]
    v151 = releases[1]  # its FTP URL and patterns are relative
    assert v151.ftp_url == f"{ftp.base_url}/bgee_v15_1/"
    assert v151.species_table_url == f"{ftp.base_url}/bgee_v15_1/rPackageSpeciesInfo.tsv"
    assert v151.h5ad_url("Mus_musculus", "SRPT00005") == (
        f"{ftp.base_url}/bgee_v15_1/download/h5ad/droplet_based/Mus_musculus/Mus_musculus_SRPT00005_droplet_based.h5ad"
    )
    assert not releases[2].has_droplet_data()
    assert absolute_url("ftp://ftp.bgee.org/bgee_v15_2/x.tsv", "https://www.bgee.org/ftp") == (
        "https://www.bgee.org/ftp/bgee_v15_2/x.tsv"
    )


# -- transfers -------------------------------------------------------------------------------------
def test_cut_transfer_resumes_with_range(ftp, capsys, tmp_path, bgee_sources):
    path = ftp.url_path("Homo_sapiens", "SRPT00003")
    ftp.behaviours[path] = {"cut": 1}
    out_dir = tmp_path / "bgee"
    code, out, err = _cli(ftp, capsys, "Homo_sapiens", "--experiment", "SRPT00003", "--out", out_dir, progress=True)
    assert code == 0, err
    folder = _folder(out_dir, "Homo_sapiens")
    dest = _h5ad(folder, "Homo_sapiens", "SRPT00003")
    source = bgee_sources["SRPT00003"]
    assert _sha(dest) == _sha(source)
    size = source.stat().st_size
    first, second = ftp.requests_for(path)
    assert (first.range, first.status) == (None, 200)
    assert (second.range, second.if_range, second.status) == (f"bytes={size // 2}-", ftp.etag(path), 206)
    assert f"downloaded {dest} ({size:,} bytes, resumed, 2 attempts)" in out.splitlines()
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [dest.name, "manifest.json", "Homo_sapiens_Droplet-Based_SC_RNA-Seq_experiments_libraries.tar.gz"]
    )
    # the progress bar counts bytes and shows their rate
    assert "downloading" in err and re.search(r"\d(\.\d+)?[kMG]?B/s", err)


def test_connection_resets_are_retried(ftp, capsys, tmp_path, bgee_sources):
    path = ftp.url_path("Homo_sapiens", "SRPT00004")
    ftp.behaviours[path] = {"reset": 2}
    code, _, err = _cli(ftp, capsys, "9606", "--experiment", "SRPT00004", "--out", tmp_path)
    assert code == 0, err
    assert [r.status for r in ftp.requests_for(path)] == [-1, -1, 200]
    assert _sha(_h5ad(_folder(tmp_path, "Homo_sapiens"), "Homo_sapiens", "SRPT00004")) == _sha(
        bgee_sources["SRPT00004"]
    )


def test_server_without_range_support_restarts_from_zero(ftp, capsys, tmp_path, bgee_sources):
    path = ftp.url_path("Homo_sapiens", "SRPT00003")
    ftp.behaviours[path] = {"cut": 1, "no_range": True}
    code, out, err = _cli(ftp, capsys, "human", "--experiment", "SRPT00003", "--out", tmp_path)
    assert code == 0, err
    first, second = ftp.requests_for(path)
    size = bgee_sources["SRPT00003"].stat().st_size
    # asked for the rest, answered with the whole file: taken from its first byte
    assert (first.status, second.range, second.status) == (200, f"bytes={size // 2}-", 200)
    dest = _h5ad(_folder(tmp_path, "Homo_sapiens"), "Homo_sapiens", "SRPT00003")
    assert _sha(dest) == _sha(bgee_sources["SRPT00003"])
    assert f"downloaded {dest} ({size:,} bytes, 2 attempts)" in out.splitlines()


def test_transfer_still_cut_after_retries_leaves_no_file_and_the_rest_is_done(ftp, capsys, tmp_path, bgee_sources):
    path = ftp.url_path("Homo_sapiens", "SRPT00003")
    ftp.behaviours[path] = {"always_cut": True, "no_range": True}
    code, _, err = _cli(
        ftp, capsys, "Homo_sapiens", "--experiment", "SRPT00003", "--experiment", "SRPT00004", "--out", tmp_path
    )
    assert code == 1
    (line,) = _errors(err)
    size = bgee_sources["SRPT00003"].stat().st_size
    assert line.startswith(f"bgee-dask: error: {ftp.base_url}/bgee_v15_2/download/h5ad/")
    # the first attempt brought half the file; the next three nothing new (retries=2 after the first of them)
    cut = f"transfer cut short: {size // 2} of {size} bytes"
    assert line.endswith(f"gave up after 4 attempts, the last 3 without a new byte ({cut})")
    folder = _folder(tmp_path, "Homo_sapiens")
    dest = _h5ad(folder, "Homo_sapiens", "SRPT00003")
    assert not dest.exists()
    assert len(ftp.requests_for(path)) == 4
    # the rest was done
    assert _sha(_h5ad(folder, "Homo_sapiens", "SRPT00004")) == _sha(bgee_sources["SRPT00004"])
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    assert dest.name not in manifest and _h5ad(folder, "Homo_sapiens", "SRPT00004").name in manifest
    # the part stays, and the next run resumes it once the server serves ranges again
    assert Path(f"{dest}.part").stat().st_size == size // 2
    ftp.behaviours[path] = {}
    code, _, err = _cli(ftp, capsys, "Homo_sapiens", "--experiment", "SRPT00003", "--out", tmp_path)
    assert code == 0, err
    assert ftp.requests_for(path)[-1].range == f"bytes={size // 2}-" and ftp.requests_for(path)[-1].status == 206
    assert _sha(dest) == _sha(bgee_sources["SRPT00003"])
    assert not Path(f"{dest}.part").exists() and not Path(f"{dest}.part.json").exists()


def test_part_of_a_file_changed_on_the_server_is_not_resumed(ftp, capsys, tmp_path, bgee_sources):
    path = ftp.url_path("Homo_sapiens", "SRPT00003")
    old_etag = ftp.etag(path)
    ftp.behaviours[path] = {"always_cut": True, "no_range": True}
    code, _, _ = _cli(ftp, capsys, "Homo_sapiens", "--experiment", "SRPT00003", "--out", tmp_path)
    assert code == 1
    dest = _h5ad(_folder(tmp_path, "Homo_sapiens"), "Homo_sapiens", "SRPT00003")
    assert Path(f"{dest}.part").exists()
    # Bgee republishes the file (here: other bytes under the same name) before the next run
    ftp.content[path] = bgee_sources["SRPT00001"]
    ftp.behaviours[path] = {}
    code, _, err = _cli(ftp, capsys, "Homo_sapiens", "--experiment", "SRPT00003", "--out", tmp_path)
    assert code == 0, err
    last = ftp.requests_for(path)[-1]
    assert (last.if_range, last.status) == (old_etag, 200)  # If-Range: not the same file, so all of it
    assert _sha(dest) == _sha(bgee_sources["SRPT00001"])


def test_404_and_unknown_experiment_are_reported_and_the_rest_is_done(ftp, capsys, tmp_path, bgee_sources):
    missing = ftp.url_path("Homo_sapiens", "SRPT00002")
    del ftp.content[missing]
    code, _, err = _cli(
        ftp,
        capsys,
        "Homo_sapiens",
        *("--experiment", "SRPT09999", "--experiment", "SRPT00002", "--experiment", "SRPT00004"),
        *("--out", tmp_path),
    )
    assert code == 1
    errors = _errors(err)
    assert errors[0] == (
        "bgee-dask: error: experiment SRPT09999 is not in the Homo_sapiens annotation of Bgee 15.2 "
        "(it lists SRPT00001, SRPT00002, SRPT00003, SRPT00004)"
    )
    assert errors[1] == f"bgee-dask: error: {ftp.base_url}{missing.removeprefix('/ftp')}: HTTP 404 Not Found"
    assert len(errors) == 2
    assert [r.status for r in ftp.requests_for(missing)] == [404]  # not retried
    folder = _folder(tmp_path, "Homo_sapiens")
    assert not list(folder.glob("*SRPT00002*"))
    assert _sha(_h5ad(folder, "Homo_sapiens", "SRPT00004")) == _sha(bgee_sources["SRPT00004"])

    with pytest.raises(IncompleteDownload) as info:
        download("human", ["SRPT00002", "SRPT00004"], out=tmp_path, base_url=ftp.base_url, progress=False)
    assert info.value.failures == [errors[1].removeprefix("bgee-dask: error: ")]
    assert info.value.paths == [_h5ad(folder, "Homo_sapiens", "SRPT00004")]


def test_content_that_is_not_hdf5_is_refused(ftp, capsys, tmp_path):
    path = ftp.url_path("Homo_sapiens", "SRPT00004")
    ftp.content[path] = b"<!DOCTYPE html><html><body>Service temporarily moved</body></html>\n"
    code, _, err = _cli(ftp, capsys, "Homo_sapiens", "--experiment", "SRPT00004", "--out", tmp_path)
    assert code == 1
    (line,) = _errors(err)
    assert line.endswith("not an HDF5 file: no HDF5 signature (looks like an HTML page)")
    assert not list(_folder(tmp_path, "Homo_sapiens").glob("*SRPT00004*"))


def test_silent_server_times_out_within_the_bound(ftp, tmp_path):
    policy = TransferPolicy(timeout=1.0, retries=1, backoff=0.05)
    path = ftp.url_path("Homo_sapiens", "SRPT00004")
    ftp.behaviours[path] = {"slow": 120}
    start = time.monotonic()
    result = run_download("human", ["SRPT00004"], out=tmp_path, base_url=ftp.base_url, policy=policy, progress=False)
    elapsed = time.monotonic() - start
    assert elapsed < 20  # 2 attempts of 1 s, plus the tables; the server would stay silent for 120 s
    (line,) = result.failures
    assert line.endswith("gave up after 2 attempts, the last 2 without a new byte (no answer (time-out))")
    assert len(ftp.requests_for(path)) == 2
    assert not list(_folder(tmp_path, "Homo_sapiens").glob("*SRPT00004*"))

    ftp.behaviours["/ftp/release_v2.tsv"] = {"slow": 120}
    start = time.monotonic()
    with pytest.raises(TransferError, match=r"release_v2\.tsv: gave up after 2 attempts"):
        list_experiments("human", base_url=ftp.base_url, policy=policy)
    assert time.monotonic() - start < 20


def test_default_patience_for_a_silent_server_is_about_a_minute():
    p = TransferPolicy()
    bound = (p.retries + 1) * p.timeout + sum(p.backoff * 2**k for k in range(p.retries))
    assert 45 <= bound <= 75


# -- the annotation archive -------------------------------------------------------------------------
def _archive_with(member: str, bgee_sources, link: str | None = None) -> bytes:
    """Mouse's annotation with its libraries table stored as ``member`` (or a link to ``link``)."""
    experiments = pd.DataFrame({"Experiment ID": MOUSE, "Experiment name": [EXPERIMENT_NAMES[e] for e in MOUSE]})
    libraries = pd.DataFrame({"Experiment ID": ["SRPT00005"], "Library ID": ["SRXT050001"]})
    if link is None:
        return tar_gz(
            {
                "Mus_musculus_Droplet-Based_SC_RNA-Seq_experiments.tsv": tsv(experiments),
                member: tsv(libraries),
            }
        )
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in (
            ("Mus_musculus_Droplet-Based_SC_RNA-Seq_experiments.tsv", tsv(experiments)),
            ("Mus_musculus_Droplet-Based_SC_RNA-Seq_libraries.tsv", tsv(libraries)),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        info = tarfile.TarInfo(member)
        info.type, info.linkname = tarfile.SYMTYPE, link
        tar.addfile(info)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("member", "link"),
    [
        ("../Mus_musculus_Droplet-Based_SC_RNA-Seq_libraries.tsv", None),
        ("annotation/../../Mus_musculus_Droplet-Based_SC_RNA-Seq_libraries.tsv", None),
        ("/tmp/Mus_musculus_Droplet-Based_SC_RNA-Seq_libraries.tsv", None),
        ("annotation/link", "../../etc/passwd"),
    ],
)
def test_archive_members_leaving_their_folder_are_refused(member, link, bgee_sources):
    payload = _archive_with(member, bgee_sources, link)
    with pytest.raises(BgeeDataError, match=rf"archive refused: member '{re.escape(member)}' leaves"):
        read_annotation(payload, "Mus_musculus", "x.tar.gz")


def test_refused_archive_over_the_wire(ftp, capsys, tmp_path, bgee_sources):
    member = "../Mus_musculus_Droplet-Based_SC_RNA-Seq_libraries.tsv"
    archive = ftp.annotation_path("Mus_musculus")
    ftp.content[archive] = _archive_with(member, bgee_sources)
    code, out, err = _cli(ftp, capsys, "mouse", "--list")
    assert code == 2 and out == ""
    (line,) = _errors(err)
    assert f"archive refused: member '{member}' leaves the archive's folder" in line

    # with the experiments named, they are still fetched; the archive is not kept
    code, out, err = _cli(ftp, capsys, "mouse", "--experiment", "SRPT00005", "--out", tmp_path)
    assert code == 1
    (line,) = _errors(err)
    assert line.startswith(f"bgee-dask: error: {ftp.base_url}{archive.removeprefix('/ftp')}: archive refused")
    folder = _folder(tmp_path, "Mus_musculus")
    assert sorted(p.name for p in folder.iterdir()) == ["Mus_musculus_SRPT00005_droplet_based.h5ad", "manifest.json"]
    assert _sha(_h5ad(folder, "Mus_musculus", "SRPT00005")) == _sha(bgee_sources["SRPT00005"])


# -- re-runs and the manifest -----------------------------------------------------------------------
def test_rerun_skips_complete_files_and_rewrites_nothing(ftp, capsys, tmp_path, bgee_sources):
    code, out, err = _cli(ftp, capsys, "Mus_musculus", "--out", tmp_path, "--jobs", "3")
    assert code == 0, err
    folder = _folder(tmp_path, "Mus_musculus")
    archive_name = "Mus_musculus_Droplet-Based_SC_RNA-Seq_experiments_libraries.tar.gz"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == "bgee-dask/download-manifest"
    files = manifest["files"]
    assert sorted(files) == sorted([archive_name] + [_h5ad(folder, "Mus_musculus", e).name for e in MOUSE])
    for name, entry in files.items():
        url_path = (
            ftp.annotation_path("Mus_musculus")
            if name == archive_name
            else ftp.url_path("Mus_musculus", name.split("_")[2])
        )
        body = ftp.body(url_path)
        source = bgee_sources[name.split("_")[2]] if name != archive_name else None
        if source is not None:
            assert body == source.read_bytes()
        assert entry["url"] == ftp.base_url + url_path.removeprefix("/ftp")
        assert entry["bytes"] == len(body) == (folder / name).stat().st_size
        assert entry["sha256"] == hashlib.sha256(body).hexdigest() == _sha(folder / name)
        assert entry["etag"] == ftp.etag(url_path)
        assert entry["last_modified"] == LAST_MODIFIED

    before = _snapshot(tmp_path)
    ftp.log.clear()
    code, out, err = _cli(ftp, capsys, "Mus_musculus", "--out", tmp_path)
    assert code == 0, err
    assert _snapshot(tmp_path) == before
    assert sum(line.startswith("skipped ") for line in out.splitlines()) == 4
    assert not any(r.path.endswith((".h5ad", ".tar.gz")) for r in ftp.log)  # the server was not asked again


# -- converting on arrival --------------------------------------------------------------------------
def _reference(bgee_sources, experiments):
    return {e: ad.read_h5ad(bgee_sources[e]) for e in experiments}


def test_atlas_converts_on_arrival_and_answers_like_anndata(ftp, capsys, tmp_path, bgee_sources):
    atlas_dir = tmp_path / "atlas"
    code, out, err = _cli(ftp, capsys, "mouse", "--out", tmp_path / "bgee", "--atlas", atlas_dir, "--jobs", "3")
    assert code == 0, err
    assert sum(line.startswith("converted ") for line in out.splitlines()) == 3
    refs = _reference(bgee_sources, MOUSE)

    atlas = bd.open_atlas(atlas_dir)
    obs = atlas.query().obs()
    assert len(obs) == sum(a.n_obs for a in refs.values()) == 10_469
    assert obs["experimentId"].astype(str).value_counts().to_dict() == {e: a.n_obs for e, a in refs.items()}

    # per cell type: cells and the sum over all genes, against numpy on the sources' X
    ds = atlas.query().aggregate(by="cellTypeId", stats=["sum"])
    expected: dict[str, list[float]] = {}
    for a in refs.values():
        totals = np.asarray(a.X.sum(axis=1)).ravel()
        for ct, idx in a.obs.groupby(a.obs["cellTypeId"].astype(str), observed=True).indices.items():
            slot = expected.setdefault(ct, [0, 0.0])
            slot[0] += len(idx)
            slot[1] += float(totals[idx].sum())
    got = {
        str(ct): [int(n), float(np.nansum(s))]
        for ct, n, s in zip(ds["cellTypeId"].values, ds["n_cells"].values, ds["sum"].values, strict=True)
    }
    assert got.keys() == expected.keys()
    for ct, (n, total) in expected.items():
        assert got[ct][0] == n
        assert got[ct][1] == pytest.approx(total, rel=1e-9)

    # per gene, for the Ensembl-named experiment: the sums of its X's columns
    a = refs["SRPT00006"]
    one = atlas.query("experimentId == 'SRPT00006'", genes=list(a.var_names)).aggregate(
        by="experimentId", stats=["sum"]
    )
    assert list(one["gene"].values) == list(a.var_names)
    np.testing.assert_allclose(one["sum"].values[0], np.asarray(a.X.sum(axis=0)).ravel(), rtol=1e-9)

    # Bgee's annotations are in the catalog
    notes = atlas.annotations()
    assert notes["experimentId"].tolist() == MOUSE
    assert notes["name"].tolist() == [EXPERIMENT_NAMES[e] for e in MOUSE]
    assert notes["library_count"].tolist() == [LIBRARIES[e] for e in MOUSE]
    assert notes["data_source_url"].tolist() == [f"https://www.ncbi.nlm.nih.gov/sra/?term={e}" for e in MOUSE]
    assert set(notes["species"]) == {"Mus_musculus"} and set(notes["release"]) == {"15.2"}
    libraries = atlas.annotations(of="libraries")
    with pytest.raises(ValueError, match="choose 'experiments' or 'libraries'"):
        atlas.annotations(of="genes")
    for e, ref in refs.items():
        rows = libraries[libraries["experimentId"] == e]
        assert set(rows["libraryId"]) == set(ref.obs["libID"].astype(str))
        assert rows["Number of cells"].astype(int).sum() == ref.n_obs

    # bgee-dask info shows each experiment's name on its row
    assert main(["info", str(atlas_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    for e in MOUSE:
        (row,) = [line for line in lines if line.startswith(e)]
        assert row.endswith(EXPERIMENT_NAMES[e])
    assert main(["info", str(atlas_dir), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["experiments"]
    assert {r["experimentId"]: r["name"] for r in rows} == {e: EXPERIMENT_NAMES[e] for e in MOUSE}

    # again: nothing fetched or converted again, the annotations and files not rewritten
    kept = {k: v for k, v in _snapshot(tmp_path).items() if "/bgee/" in k or "/catalog/annotations/" in k}
    code, out, err = _cli(ftp, capsys, "mouse", "--out", tmp_path / "bgee", "--atlas", atlas_dir)
    assert code == 0, err
    assert sum("unchanged (same sha256)" in line for line in out.splitlines()) == 3
    assert {k: v for k, v in _snapshot(tmp_path).items() if k in kept} == kept


def test_workers_fetch_and_convert_with_scheduler(ftp, capsys, tmp_path, bgee_sources, dask_cluster_procs):
    atlas_dir = tmp_path / "atlas"
    exps = ["SRPT00003", "SRPT00004"]
    code, out, err = _cli(
        ftp,
        capsys,
        "Homo sapiens",
        *("--experiment", exps[0], "--experiment", exps[1]),
        *("--out", tmp_path / "bgee", "--atlas", atlas_dir, "--scheduler", dask_cluster_procs.address),
    )
    assert code == 0, err
    with dask_cluster_procs.client() as client:
        workers = set(client.scheduler_info()["workers"])
    folder = _folder(tmp_path / "bgee", "Homo_sapiens")
    for e in exps:
        dest = _h5ad(folder, "Homo_sapiens", e)
        (line,) = [line for line in out.splitlines() if line.startswith(f"downloaded {dest} ")]
        assert line.rsplit(" on ", 1)[1] in workers  # fetched by a worker, not by this process
        assert _sha(dest) == _sha(bgee_sources[e])
    assert sum(line.startswith("converted ") for line in out.splitlines()) == 2
    refs = _reference(bgee_sources, exps)
    obs = bd.open_atlas(atlas_dir).query().obs()
    assert obs["experimentId"].astype(str).value_counts().to_dict() == {e: a.n_obs for e, a in refs.items()}
    notes = read_experiment_annotations(AtlasLocation(atlas_dir))
    assert notes["experimentId"].tolist() == HUMAN  # the species' whole annotation
