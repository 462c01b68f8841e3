"""Several ``convert`` processes into one atlas at once: every experiment listed, every store exact.

Each trial starts three conversion processes together, two of them converting the same file
as well as their own. Afterwards every experiment a process reported converted or skipped is
in the catalog, its per-gene sums equal numpy's over its source, ``check`` is clean and no
debris is left. Locally (a file lock) and on the S3 test server (a conditional-write lease).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import bgee_dask as bd
from bgee_dask.catalog.reader import forget_cached_tables

from . import make_inputs as mi
from .trust_support import convert_in_child

LOCAL_TRIALS = 3
S3_TRIALS = 2


def _reference(path) -> tuple[int, np.ndarray]:
    a = ad.read_h5ad(path)
    return a.n_obs, np.sort(np.asarray(sp.csr_matrix(a.X).sum(axis=0), dtype=np.float64).ravel())


def _atlas_answers(atlas, storage_options=None) -> dict[str, tuple[int, np.ndarray]]:
    """Per experiment: cells, and its measured genes' sums sorted (independent of how genes are keyed)."""
    forget_cached_tables()
    ds = bd.open_atlas(atlas, storage_options).query().aggregate(by="experimentId", stats=["sum"])
    out = {}
    for i, exp in enumerate(ds["experimentId"].values):
        sums = ds["sum"].values[i]
        out[str(exp)] = (int(ds["n_cells"].values[i]), np.sort(sums[~np.isnan(sums)]))
    return out


def _run_trial(atlas, groups, env=None, storage_options=None) -> None:
    procs = [convert_in_child(atlas, files, env=env, wait=False) for files in groups]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out + err
    reported = set()
    for out, _ in outputs:
        for line in out.splitlines():
            status, source = line.split()[:2]
            assert status in ("converted", "skipped"), line
            reported.add(source)
    answers = _atlas_answers(atlas, storage_options)
    for source in reported:
        exp = source.rsplit("/", 1)[1].split("_")[2]
        assert exp in answers, f"{exp} reported {source} but is not in the catalog"
        n_cells, sums = _reference(source)
        assert answers[exp][0] == n_cells, exp
        np.testing.assert_array_equal(answers[exp][1], sums, err_msg=exp)
    report = bd.check(atlas, storage_options=storage_options)
    assert report.clean, [f.line() for f in report.findings]


@pytest.mark.parametrize("trial", range(LOCAL_TRIALS))
def test_concurrent_converts_local(tmp_path, bgee_sources, trial):
    s = {k: str(v) for k, v in bgee_sources.items()}
    groups = [
        [s["SRPT00001"], s["SRPT00004"]],
        [s["SRPT00005"], s["SRPT00006"], s["SRPT00004"]],  # SRPT00004 twice at once
        [s["SRPT00003"], s["SRPT00007"], s["SRPT00002"]],
    ]
    atlas = tmp_path / "atlas"
    _run_trial(atlas, groups)
    mi.assert_no_debris(atlas)
    assert len(mi.header(atlas)["experiments"]) == 7


@pytest.mark.services
@pytest.mark.parametrize("trial", range(S3_TRIALS))
def test_concurrent_converts_s3(s3_server, s3_bucket, bgee_sources, trial):
    s = {k: str(v) for k, v in bgee_sources.items()}
    groups = [[s["SRPT00003"], s["SRPT00004"]], [s["SRPT00005"], s["SRPT00004"]], [s["SRPT00007"]]]
    atlas = f"s3://{s3_bucket}/atlas-{trial}"
    _run_trial(atlas, groups, env=s3_server.env(), storage_options=s3_server.storage_options())
    fs = s3_server.filesystem()
    header = bd.open_atlas(atlas, s3_server.storage_options()).catalog.header
    assert sorted(header["experiments"]) == [
        "Homo_sapiens/SRPT00003",
        "Homo_sapiens/SRPT00004",
        "Mus_musculus/SRPT00005",
        "Mus_musculus/SRPT00007",
    ]
    versions = fs.ls(f"{s3_bucket}/atlas-{trial}/experiments/Homo_sapiens/SRPT00004", detail=False, refresh=True)
    assert len(versions) == 1, versions  # the other writer's version of the same file is gone
    assert not fs.exists(f"{s3_bucket}/atlas-{trial}/catalog/lock.json")


@pytest.mark.services
def test_s3_lock_left_by_a_killed_writer_is_reported_stale_and_taken_over(
    s3_server, s3_bucket, bgee_sources, monkeypatch
):
    """A writer killed while holding the object-store lock: check says so; the next writer takes the lease over."""
    import time

    from bgee_dask.catalog import locks
    from bgee_dask.format.location import AtlasLocation

    atlas = f"s3://{s3_bucket}/atlas"
    options = s3_server.storage_options()
    assert bd.convert([bgee_sources["SRPT00004"]], atlas, storage_options=options, workers=1, progress=False)[0].ok
    loc = AtlasLocation(atlas, options)
    assert loc.create_exclusive("catalog/lock.json", b'{"pid": -1}') is not None  # held, never refreshed
    assert locks.commit_lock_state(loc) == "held"
    monkeypatch.setattr(locks, "COMMIT_LEASE_TTL", 1.0)
    time.sleep(1.5)
    report = bd.check(atlas, storage_options=options)
    assert [(f.kind, f.path) for f in report.findings] == [("stale-lock", "catalog/lock.json")]
    reports = bd.convert([bgee_sources["SRPT00007"]], atlas, storage_options=options, workers=1, progress=False)
    assert reports[0].status == "converted", reports[0].line()
    assert bd.check(atlas, storage_options=options).clean
    assert sorted(bd.open_atlas(atlas, options).experiments["experimentId"]) == ["SRPT00004", "SRPT00007"]


@pytest.mark.services
def test_s3_reconversion_leaves_one_version_and_no_empty_folders(s3_server, s3_bucket, bgee_sources):
    """A replaced version is gone from every listing, also on a server that keeps emptied folders.

    SeaweedFS, like any S3 server built on a file tree, still lists a folder once its objects are
    deleted: the replaced version showed up as an orphan in ``check``. Empty folders that an
    interrupted removal left (made here by deleting only the objects) are removed by ``--repair``.
    """
    atlas = f"s3://{s3_bucket}/atlas"
    options = s3_server.storage_options()
    for _ in range(2):
        reports = bd.convert(
            [bgee_sources["SRPT00004"]], atlas, storage_options=options, workers=1, progress=False, overwrite=True
        )
        assert reports[0].status == "converted", reports[0].line()
    client = s3_server.boto3_client()
    experiment = "atlas/experiments/Homo_sapiens/SRPT00004/"

    def listed(prefix: str) -> list[str]:
        page = client.list_objects_v2(Bucket=s3_bucket, Prefix=prefix, Delimiter="/")
        return [p["Prefix"] for p in page.get("CommonPrefixes", [])] + [o["Key"] for o in page.get("Contents", [])]

    header = bd.open_atlas(atlas, options).catalog.header
    assert listed(experiment) == [f"{experiment}{header['experiments']['Homo_sapiens/SRPT00004']}/"]
    assert bd.check(atlas, storage_options=options).clean
    # a folder tree whose objects are gone but whose folders the server still lists
    for key in ("v-left/cells.zarr/X/zarr.json", "v-left/runs.parquet"):
        client.put_object(Bucket=s3_bucket, Key=f"{experiment}{key}", Body=b"{}")
        client.delete_object(Bucket=s3_bucket, Key=f"{experiment}{key}")
    assert f"{experiment}v-left/" in listed(experiment)
    report = bd.check(atlas, storage_options=options)
    assert [(f.kind, f.path) for f in report.findings] == [("orphan", "experiments/Homo_sapiens/SRPT00004/v-left")]
    bd.check(atlas, storage_options=options, repair=True)
    assert f"{experiment}v-left/" not in listed(experiment)
    assert bd.check(atlas, storage_options=options).clean
