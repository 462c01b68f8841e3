"""The scripts in examples/, run as a user runs them, against the real services.

Each runs in its own process on the shared Bgee files (passed as arguments, nothing fetched); what
it writes is compared with the same query run in this process on an atlas converted here, and with
numpy on the source files.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pandas as pd
import pytest

import bgee_dask as bd

from .conftest import MARKER_GENES
from .test_s3 import _long, check_against_numpy, numpy_reference

pytestmark = pytest.mark.services

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
GENES = MARKER_GENES


@pytest.fixture(scope="module")
def files(four_files) -> list[str]:
    return four_files


@pytest.fixture(scope="module")
def reference_atlas(four_file_atlas):
    return bd.open_atlas(four_file_atlas)


def _run(script: str, *args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 300):
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**base, **(env or {})},
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, f"{script} exited {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def _same_table(csv_path: Path, ds) -> None:
    got = pd.read_csv(csv_path)
    expected = _long(ds)
    keys = [c for c in ("cellTypeId", "anatEntityId", "gene") if c in got.columns]
    got = got.astype({k: str for k in keys}).sort_values(keys).reset_index(drop=True)
    expected = expected.sort_values(keys).reset_index(drop=True)
    for c in got.columns:
        if c in keys:
            assert list(got[c]) == list(expected[c]), c
        else:
            pd.testing.assert_series_equal(got[c], expected[c], check_names=False, check_dtype=False, rtol=1e-12)


def test_quickstart_on_generated_data(tmp_path):
    workdir = tmp_path / "qs"
    r = _run("quickstart.py", "--workdir", str(workdir), "--workers", "2")
    assert "generated 4 Bgee-like experiments" in r.stdout and "4 experiments" in r.stdout
    # the reference: the generated files converted and queried again in this process
    reference = bd.convert(workdir / "h5ad", tmp_path / "reference", workers=1, progress=False)
    assert [x.status for x in reference] == ["converted"] * 4
    expected = (
        bd.open_atlas(tmp_path / "reference")
        .query("cellTypeId != 'GO:0005575'")
        .aggregate(by=["cellTypeId", "anatEntityId"], stats=["sum", "mean", "n_expressed", "frac_expressed"])
    )
    _same_table(workdir / "pseudobulk.csv", expected)


def test_s3_atlas_example(s3_server, s3_bucket, dask_cluster_procs, files, reference_atlas, tmp_path):
    url = f"s3://{s3_bucket}/atlas-{uuid.uuid4().hex[:6]}"
    out = tmp_path / "s3.csv"
    files = files[:2]  # SRPT00003, SRPT00004: conversions into S3 cost requests, not data
    r = _run(
        "s3_atlas.py", url, *files, "--scheduler", dask_cluster_procs.address, "--genes", ",".join(GENES),
        "--out", str(out), env=s3_server.env(),
    )  # fmt: skip
    assert r.stdout.count("converted ") == 2 and "2 experiments" in r.stdout
    flt = "cellTypeId != 'GO:0005575'"
    stats = ["sum", "mean", "var", "n_expressed", "frac_expressed"]
    same = f"{flt} and experimentId in ['SRPT00003', 'SRPT00004']"
    _same_table(out, reference_atlas.query(same, genes=GENES).aggregate(by=["cellTypeId"], stats=stats))
    atlas = bd.open_atlas(url, storage_options=s3_server.storage_options())
    check_against_numpy(
        atlas.query(flt, genes=GENES).aggregate(by="cellTypeId"),
        numpy_reference(files, GENES, flt=lambda obs: obs["cellTypeId"].astype(str) != "GO:0005575"),
    )


def test_slurm_example(slurm, files, reference_atlas, tmp_path):
    out = tmp_path / "slurm.csv"
    atlas_dir = tmp_path / "atlas"
    r = _run(
        "slurm_query.py", str(atlas_dir), "--sources", *files, "--jobs", "2", "--interface", "lo",
        "--queue", slurm.partition, "--memory", "2GB", "--log-directory", str(tmp_path / "logs"),
        "--genes", ",".join(GENES), "--out", str(out),
        env=slurm.env(), cwd=tmp_path,
    )  # fmt: skip
    assert "2 workers in SLURM jobs" in r.stdout, r.stdout
    assert list((tmp_path / "logs").glob("*.err")) or list((tmp_path / "logs").glob("*.out"))
    flt = "cellTypeId != 'GO:0005575'"
    stats = ["sum", "mean", "var", "n_expressed", "frac_expressed"]
    _same_table(out, reference_atlas.query(flt, genes=GENES).aggregate(by=["cellTypeId"], stats=stats))
