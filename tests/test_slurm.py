"""dask-jobqueue on the real single-node SLURM of the ``slurm`` fixture.

Workers arrive as SLURM jobs (checked with squeue and with each worker's SLURM_JOB_ID), queries
through them give exactly the in-process result, and ``deploy/slurm/bgee-dask.sbatch`` runs a
conversion and a query as a batch job (``sbatch --wait``). PBS and SGE cannot run here: their job
scripts, built from ``deploy/slurm/jobqueue.yaml``, are checked instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import dask
import pandas as pd
import pytest

import bgee_dask as bd
from bgee_dask.cluster import client_for, load_jobqueue_config, make_jobqueue_cluster
from bgee_dask.query.preload import PRELOAD_MODULE

from .conftest import MARKER_GENES
from .test_s3 import _long, assert_same_result, check_against_numpy, numpy_reference

pytestmark = pytest.mark.services

REPO = Path(__file__).resolve().parents[1]
JOBQUEUE_YAML = REPO / "deploy" / "slurm" / "jobqueue.yaml"
SBATCH = REPO / "deploy" / "slurm" / "bgee-dask.sbatch"
GENES = MARKER_GENES


@pytest.fixture(scope="module")
def files(four_files) -> list[str]:
    return four_files


@pytest.fixture(scope="module")
def atlas_dir(four_file_atlas) -> Path:
    return four_file_atlas


def _jobs_gone(slurm, job_ids: set[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [j for j in slurm.jobs() if j["id"] in job_ids and j["state"] not in {"COMPLETED", "CANCELLED"}]
        if not left:
            return
        time.sleep(0.5)
    raise AssertionError(f"jobs still there: {left}\n{slurm.log_tail()}")


def test_query_on_slurm_workers(slurm, atlas_dir, tmp_path, files):
    atlas = bd.open_atlas(atlas_dir)
    options = {"interface": "lo", "queue": slurm.partition, "log_directory": str(tmp_path / "logs")}
    with client_for(
        cluster="slurm", jobs=2, memory_limit="2GB", jobqueue_options=options, preload=(PRELOAD_MODULE,)
    ) as client:
        client.wait_for_workers(2, timeout=120)
        on_workers = client.run(lambda: os.environ.get("SLURM_JOB_ID"))
        # the batch jobs' workers ran the preload: query kernels loaded before any task
        loaded = client.run(lambda: len(sys.modules["bgee_dask.query.blocks"].grouped_moments.signatures))
        assert set(loaded.values()) == {2}, loaded
        job_ids = set(on_workers.values())
        running = {j["id"]: j["state"] for j in slurm.jobs()}
        assert len(job_ids) == 2 and job_ids <= set(running), (on_workers, running)
        assert {running[j] for j in job_ids} == {"RUNNING"}
        assert all(addr.startswith("tcp://127.0.0.1:") for addr in on_workers)
        assert client.dashboard_link.startswith("http://127.0.0.1:")
        got = atlas.query("speciesId == 9606", genes=GENES, client=client).aggregate(by="cellTypeId")
        flt = "cellTypeId != 'GO:0005575'"
        got_all = atlas.query(flt, client=client).aggregate(by=["cellTypeId", "anatEntityId"])
        # the jobs' own memory and cores: bgee-dask's defaults, as the job script says
        script = client.cluster.job_script()
    assert "#SBATCH --mem=2G" in script and "#SBATCH --cpus-per-task=1" in script and sys.executable in script
    assert f"--preload {PRELOAD_MODULE}" in script
    check_against_numpy(got, numpy_reference(files[:2], GENES))
    assert_same_result(got, atlas.query("speciesId == 9606", genes=GENES).aggregate(by="cellTypeId"))
    assert_same_result(got_all, atlas.query(flt).aggregate(by=["cellTypeId", "anatEntityId"]))
    _jobs_gone(slurm, job_ids)  # closing the client cancelled the jobs


def test_cli_cluster_slurm_with_jobqueue_yaml(slurm, atlas_dir, tmp_path):
    out = tmp_path / "r.parquet"
    r = subprocess.run(
        [
            sys.executable, "-m", "bgee_dask.cli", "query", str(atlas_dir), "--filter", "speciesId == 10090",
            "--by", "cellTypeId", "--out", str(out), "--no-progress",
            "--cluster", "slurm", "--jobs", "2", "--jobqueue-config", str(JOBQUEUE_YAML),
            "--interface", "lo", "--queue", slurm.partition, "--memory-limit", "2GB", "--walltime", "00:10:00",
        ],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, cwd=tmp_path,
        env={**os.environ, **slurm.env()},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "slurm cluster: dashboard http://127.0.0.1:" in r.stderr
    expected = _long(bd.open_atlas(atlas_dir).query("speciesId == 10090").aggregate(by="cellTypeId"))
    got = pd.read_parquet(out)
    got = got.astype({c: str for c in got.columns if got[c].dtype == object})
    pd.testing.assert_frame_equal(got, expected[got.columns], check_exact=True, check_dtype=False)
    # the jobs ran with the yaml's job name, wrote their logs into the submission folder, and are gone
    logs = list(tmp_path.glob("slurm-*.out"))
    assert logs, sorted(p.name for p in tmp_path.iterdir())
    assert any("Registered to:" in p.read_text() for p in logs)
    assert not [j for j in slurm.jobs() if j["name"] == "bgee-dask-worker" and j["state"] == "RUNNING"]


def test_sbatch_script_converts_and_queries(slurm, files, atlas_dir, tmp_path):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    env = {
        **os.environ,
        **slurm.env(),
        "SOURCES": " ".join(files[:3]),
        "ATLAS": str(job_dir / "atlas"),
        "OUT": str(job_dir / "result.parquet"),
        "FILTER": "cellTypeId != 'GO:0005575'",
        "BY": "cellTypeId,anatEntityId",
        "COMPUTE": "--workers 1",
        "BGEE_DASK": f"{sys.executable} -m bgee_dask.cli",
    }
    r = subprocess.run(
        ["sbatch", "--wait", "--parsable", "--chdir", str(job_dir), "--mem=4G", str(SBATCH)],
        capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    job_id = r.stdout.strip().split(";")[0]
    log = job_dir / f"bgee-dask-{job_id}.out"
    text = log.read_text() if log.exists() else "(no log)"
    assert r.returncode == 0, f"{r.stderr}\n{text}\n{slurm.log_tail()}"
    assert f"job {job_id}" in text and "3 converted, 0 skipped, 0 failed" in text, text
    # the job's atlas and result against the same files converted and queried in this process
    job_atlas = bd.open_atlas(job_dir / "atlas")
    flt = "cellTypeId != 'GO:0005575' and experimentId in ['SRPT00003', 'SRPT00004', 'SRPT00005']"
    expected = _long(bd.open_atlas(atlas_dir).query(flt).aggregate(by=["cellTypeId", "anatEntityId"]))
    assert list(job_atlas.experiments["experimentId"]) == ["SRPT00003", "SRPT00004", "SRPT00005"]
    got = pd.read_parquet(job_dir / "result.parquet")
    got = got.astype({c: str for c in got.columns if got[c].dtype == object})
    pd.testing.assert_frame_equal(got, expected[got.columns], check_exact=True, check_dtype=False)


@pytest.mark.parametrize(
    "kind, directive, expected",
    [
        ("slurm", "#SBATCH", ["#SBATCH -J bgee-dask-worker", "#SBATCH --mem=4G", "#SBATCH -t 01:00:00"]),
        ("pbs", "#PBS", ["#PBS -N bgee-dask-worker", "#PBS -l select=1:ncpus=1:mem=", "#PBS -l walltime=01:00:00"]),
        ("sge", "#$", ["#$ -N bgee-dask-worker", "#$ -l h_rt=01:00:00"]),
        ("lsf", "#BSUB", ["#BSUB -J bgee-dask-worker", "#BSUB -n 1", "#BSUB -W 01:00"]),
    ],
)
def test_pbs_sge_and_lsf_by_configuration(kind, directive, expected):
    with dask.config.set(load_jobqueue_config(JOBQUEUE_YAML)):
        cluster = make_jobqueue_cluster(kind, interface="lo", queue="bgee-test")
        try:
            script = cluster.job_script()
        finally:
            cluster.close()
    for line in expected:
        assert line in script, script
    assert f"{directive} -q bgee-test" in script or f"{directive} -p bgee-test" in script, script
    assert f"{sys.executable} -m distributed.cli.dask_worker" in script
    assert "--nthreads 1" in script and "--interface lo" in script
    assert "--dashboard-address 127.0.0.1:0" in script  # nothing off loopback with interface lo


@pytest.mark.parametrize("kind", ["slurm", "pbs", "sge", "lsf"])
def test_job_scripts_carry_the_codec_pipeline_this_process_chose(kind, monkeypatch):
    """Batch jobs decode with the pipeline the submitting process chose, even where the batch system
    does not pass the environment on (PBS without -V)."""
    line = "export ZARR_CODEC_PIPELINE__PATH=zarrs.ZarrsCodecPipeline"
    scripts = {}
    for chosen in (None, "zarrs.ZarrsCodecPipeline"):
        if chosen is None:
            monkeypatch.delenv("ZARR_CODEC_PIPELINE__PATH", raising=False)
        else:
            monkeypatch.setenv("ZARR_CODEC_PIPELINE__PATH", chosen)
        with dask.config.set({f"jobqueue.{kind}.job-script-prologue": ["module load python"]}):
            cluster = make_jobqueue_cluster(kind, interface="lo")
            try:
                scripts[chosen] = cluster.job_script()
            finally:
                cluster.close()
    assert line not in scripts[None] and "module load python" in scripts[None]
    script = scripts["zarrs.ZarrsCodecPipeline"]
    assert "module load python" in script  # the site's prologue is kept, ours comes after it
    assert script.index("module load python") < script.index(line) < script.index("distributed.cli.dask_worker")


def test_jobqueue_defaults_and_overrides():
    from bgee_dask.cluster import JOBQUEUE_DEFAULTS, jobqueue_kwargs

    kwargs = jobqueue_kwargs("slurm")
    assert {k: kwargs[k] for k in JOBQUEUE_DEFAULTS} == JOBQUEUE_DEFAULTS
    assert kwargs["python"] == sys.executable and "interface" not in kwargs
    kwargs = jobqueue_kwargs("slurm", cores=4, memory="16GB", interface="lo")
    assert (kwargs["cores"], kwargs["memory"]) == (4, "16GB")
    assert kwargs["scheduler_options"]["dashboard_address"] == "127.0.0.1:8787"
    with dask.config.set({"jobqueue.slurm.memory": "7GB", "jobqueue.slurm.walltime": "02:00:00"}):
        kwargs = jobqueue_kwargs("slurm")  # the site's configuration wins over our defaults
    assert "memory" not in kwargs and "walltime" not in kwargs
    with pytest.raises(ValueError, match="unknown cluster kind"):
        jobqueue_kwargs("htcondor")


def test_jobs_that_never_start_are_a_clear_error(slurm, tmp_path):
    t0 = time.monotonic()
    options = {"interface": "lo", "queue": "no-such-partition", "log_directory": str(tmp_path)}
    jobs = client_for(cluster="slurm", jobs=1, jobqueue_options=options, worker_timeout=10)
    with pytest.raises(TimeoutError, match="no slurm batch job started a Dask worker within 10 s") as ei, jobs:
        pass
    assert time.monotonic() - t0 < 60
    assert str(tmp_path) in str(ei.value) and len(str(ei.value).splitlines()) == 1
