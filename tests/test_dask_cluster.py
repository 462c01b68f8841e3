"""Converting and querying through real ``dask scheduler`` / ``dask worker`` processes.

* the command line's ``--scheduler`` and the API's ``client=`` give exactly the in-process results;
* a worker killed (SIGKILL) in the middle of a query costs time, not correctness;
* a query over an atlas several times larger than a worker's memory limit completes without a
  worker being restarted, its peak memory staying under the limit.

The big atlas is generated (``bgee_dask.synthetic``): 180,000 cells, about 265 million values, so
its X (values and column indices) is about 2.1 GB uncompressed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pandas as pd
import pytest

import bgee_dask as bd

from .test_s3 import _long, assert_same_result, check_against_numpy, numpy_reference

pytestmark = pytest.mark.services

ALL = ("SRPT00001", "SRPT00002", "SRPT00003", "SRPT00004", "SRPT00005", "SRPT00006", "SRPT00007")
BIG = {"n_experiments": 6, "cells_per_experiment": 30_000, "n_genes_universe": 20_000, "mean_detected_genes": 1500}
BIG_QUERY = {"filter": None, "by": ["cellTypeId"], "stats": ["sum", "mean", "var", "n_expressed"]}
#: A worker's limit. Its nanny kills it at 95% of this. A worker's peak in the full scan below is
#: ~290 MB of imports and loaded kernels (pandas, numba, zarr) plus one block (2^23 values) being
#: read and reduced (~110 MB) plus the partials it holds: 450-570 MB measured, with either codec
#: pipeline, the high end on CI's machines.
WORKER_MEMORY = 700e6


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bgee_dask.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _task_prefixes(client) -> set[str]:
    return set(client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes)))


# ------------------------------------------------------------------------------------ shared data


@pytest.fixture(scope="module")
def files(bgee_sources) -> list[str]:
    return [str(bgee_sources[k]) for k in ALL]


@pytest.fixture(scope="module")
def cluster_atlas(tmp_path_factory, dask_cluster_procs, files):
    """The 7 shared files converted by the command line on the real scheduler's workers."""
    atlas_dir = tmp_path_factory.mktemp("cluster-atlas") / "atlas"
    r = _cli("convert", *files, "--out", str(atlas_dir), "--scheduler", dask_cluster_procs.address, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "7 converted, 0 skipped, 0 failed" in r.stderr
    return atlas_dir


@pytest.fixture(scope="module")
def big_atlas(tmp_path_factory, dask_cluster_procs):
    """180k generated cells converted on the session's real workers; the H5ADs are deleted afterwards."""
    from bgee_dask.synthetic import generate_sources

    root = tmp_path_factory.mktemp("big")
    t0 = time.perf_counter()
    generate_sources(root / "h5ad", seed=11, processes=2, compression=None, **BIG)
    generated = time.perf_counter() - t0
    with dask_cluster_procs.client() as client:
        reports = bd.convert(root / "h5ad", root / "atlas", client=client, progress=False, gene_index=False)
    assert [r.status for r in reports] == ["converted"] * BIG["n_experiments"], [r.message for r in reports]
    shutil.rmtree(root / "h5ad")
    atlas = bd.open_atlas(root / "atlas")
    e = atlas.experiments
    print(
        f"\nbig atlas: {int(e['n_cells'].sum()):,} cells, {int(e['nnz'].sum()):,} values, "
        f"{int(e['bytes'].sum()) / 1e6:.0f} MB stored; generated in {generated:.0f}s, "
        f"converted in {time.perf_counter() - t0 - generated:.0f}s"
    )
    return atlas


@pytest.fixture(scope="module")
def big_reference(big_atlas):
    """The big query computed in this process with Dask's threaded scheduler."""
    t0 = time.perf_counter()
    ds = big_atlas.query(BIG_QUERY["filter"]).aggregate(by=BIG_QUERY["by"], stats=BIG_QUERY["stats"])
    print(f"\nbig query in-process: {time.perf_counter() - t0:.1f}s")
    return ds


def _x_bytes(atlas) -> int:
    """Uncompressed size of the atlas's X: values, column indices and row pointers."""
    e = atlas.experiments
    return int(sum(nnz * (4 + 4) + (n + 1) * 8 for nnz, n in zip(e["nnz"], e["n_cells"], strict=True)))


# ------------------------------------------------------------------------------------ exact results


def test_cli_convert_and_query_through_scheduler(dask_cluster_procs, files, cluster_atlas, tmp_path):
    atlas = bd.open_atlas(cluster_atlas)
    for f, row in zip(files, atlas.experiments.itertuples(), strict=True):
        with h5py.File(f, "r") as h5:
            assert (row.n_cells, row.nnz) == (h5["X/indptr"].shape[0] - 1, h5["X/data"].shape[0])
    flt = "cellTypeId != 'GO:0005575' and libID != 'SRXT010003'"
    out = tmp_path / "r.parquet"
    r = _cli(
        "query", str(cluster_atlas), "--filter", flt, "--by", "cellTypeId,experimentId", "--out", str(out),
        "--scheduler", dask_cluster_procs.address, "--no-progress",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    # the reference: the same query in this process, without any distributed client
    expected = _long(atlas.query(flt).aggregate(by=["cellTypeId", "experimentId"]))
    got = pd.read_parquet(out)
    got = got.astype({c: str for c in got.columns if got[c].dtype == object})
    pd.testing.assert_frame_equal(got, expected[got.columns], check_exact=True, check_dtype=False)
    with dask_cluster_procs.client() as client:
        prefixes = _task_prefixes(client)
    assert {"convert", "aggregate_block"} <= prefixes, prefixes  # both ran through this scheduler


def test_api_client_on_real_workers(dask_cluster_procs, cluster_atlas, files):
    atlas = bd.open_atlas(cluster_atlas)
    genes = ["CD19", "MS4A1", "CD3E", "LYZ"]
    with dask_cluster_procs.client() as client:
        got = atlas.query("speciesId == 9606", genes=genes, client=client).aggregate(by="cellTypeId")
        check_against_numpy(got, numpy_reference(files[:4], genes))
        flt = "cellTypeId in ['CL:0000236', 'CL:0000624']"
        got = atlas.query(flt, client=client).aggregate(by=["cellTypeId", "libID"], normalize="log1p_cp10k")
        obs = atlas.query("cellTypeId == 'CL:0000236'", client=client).obs()
    assert_same_result(got, atlas.query(flt).aggregate(by=["cellTypeId", "libID"], normalize="log1p_cp10k"))
    pd.testing.assert_frame_equal(obs, atlas.query("cellTypeId == 'CL:0000236'").obs())


# ------------------------------------------------------------------------------------ failures


def _wait_for_running_tasks(client, deadline: float, min_done: int = 1) -> None:
    """Until some aggregate tasks have finished and others are running on every worker."""

    def state(dask_scheduler):
        done = sum(
            1 for ts in dask_scheduler.tasks.values() if ts.prefix.name == "aggregate_block" and ts.state == "memory"
        )
        busy = {ws.name: len(ws.processing) for ws in dask_scheduler.workers.values()}
        return done, busy

    while time.monotonic() < deadline:
        done, busy = client.run_on_scheduler(state)
        if done >= min_done and busy and all(n > 0 for n in busy.values()):
            return
        time.sleep(0.05)
    raise AssertionError(f"the query never got going: {done} tasks done, processing {busy}")


def test_worker_killed_mid_query_gives_the_exact_result(dask_cluster_factory, big_atlas, big_reference):
    cluster = dask_cluster_factory(n_workers=2, nthreads=1, memory_limit="2GB", nanny=False)
    with cluster.client() as client:
        result: dict = {}

        def run():
            try:
                q = big_atlas.query(BIG_QUERY["filter"], client=client)
                result["ds"] = q.aggregate(by=BIG_QUERY["by"], stats=BIG_QUERY["stats"])
            except BaseException as exc:  # pragma: no cover - reported below
                result["error"] = exc

        t0 = time.monotonic()
        thread = threading.Thread(target=run)
        thread.start()
        _wait_for_running_tasks(client, deadline=time.monotonic() + 60)
        killed = cluster.kill_worker("w0")
        killed_at = time.monotonic() - t0
        thread.join(300)
        assert not thread.is_alive(), "query did not finish after the worker was killed"
        assert "error" not in result, result.get("error")
        print(
            f"\nworker w0 (pid {killed}) killed {killed_at:.1f}s into the query; done in {time.monotonic() - t0:.1f}s"
        )
        assert sorted(cluster.worker_pids) == ["w1"]
    assert_same_result(result["ds"], big_reference)


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_query_over_atlas_many_times_a_workers_memory(dask_cluster_factory, big_atlas, big_reference):
    x_bytes = _x_bytes(big_atlas)
    assert x_bytes > 2.5 * WORKER_MEMORY, x_bytes
    cluster = dask_cluster_factory(n_workers=2, nthreads=1, memory_limit=f"{int(WORKER_MEMORY)}", nanny=True)
    before = cluster.worker_pids
    with cluster.client() as client:
        t0 = time.monotonic()
        ds = big_atlas.query(BIG_QUERY["filter"], client=client).aggregate(by=BIG_QUERY["by"], stats=BIG_QUERY["stats"])
        seconds = time.monotonic() - t0
        peaks = client.run(_peak_rss)
        limits = {w["name"]: w["memory_limit"] for w in client.scheduler_info(n_workers=-1)["workers"].values()}
    assert cluster.worker_pids == before, "a worker was restarted (memory limit exceeded?)"
    assert all(limit == int(WORKER_MEMORY) for limit in limits.values()), limits
    assert max(peaks.values()) < 0.95 * WORKER_MEMORY, peaks  # below the nanny's kill threshold
    logs = "\n".join(p.read_text() for p in cluster.log_paths.values())
    assert "exceeded 95% memory budget" not in logs
    print(
        f"\nX {x_bytes / 1e9:.2f} GB uncompressed ({x_bytes / WORKER_MEMORY:.1f}x a worker's "
        f"{WORKER_MEMORY / 1e6:.0f} MB); "
        f"query {seconds:.1f}s; worker peak RSS {', '.join(f'{v / 1e6:.0f} MB' for v in peaks.values())}"
    )
    assert_same_result(ds, big_reference)


def test_demo_through_a_scheduler(dask_cluster_procs, tmp_path, monkeypatch, capsys):
    """The demo (a smaller one) converts and queries on the given scheduler's workers."""
    import bgee_dask.demo as demo
    from bgee_dask.cli import main

    monkeypatch.setattr(demo, "DEMO_EXPERIMENTS", 2)
    monkeypatch.setattr(demo, "DEMO_CELLS", (300, 600))
    monkeypatch.setattr(demo, "DEMO_GENES", 1500)
    with dask_cluster_procs.client() as client:
        before = client.run_on_scheduler(_tasks_ever)
    assert main(["demo", "--dir", str(tmp_path / "demo"), "--scheduler", dask_cluster_procs.address]) == 0
    assert "4/4 pseudobulk" in capsys.readouterr().out
    assert (tmp_path / "demo" / "pseudobulk_human.csv").stat().st_size > 0
    with dask_cluster_procs.client() as client:
        after = client.run_on_scheduler(_tasks_ever)
    assert after["convert"] > before.get("convert", 0), (before, after)
    assert after["aggregate_block"] > before.get("aggregate_block", 0), (before, after)


def _tasks_ever(dask_scheduler) -> dict[str, int]:
    """A count per key prefix that only grows while the scheduler runs tasks of that prefix."""
    return {name: sum(tp.state_counts.values()) for name, tp in dask_scheduler.task_prefixes.items()}


def _worker_readiness() -> dict:
    """On a worker: whether the block kernels are loaded and the allocator tuned."""
    import sys

    from bgee_dask import _runtime

    kernels = sys.modules.get("bgee_dask.query.kernels")
    return {
        "kernels": bool(kernels and kernels.grouped_moments.signatures),
        "heap_tuned": _runtime._HEAP_TUNED,
    }


def test_fresh_workers_get_ready_while_the_client_plans(dask_cluster_factory, cluster_atlas):
    """Creating a query starts the workers' preparation (imports, numba kernels, allocator) without computing."""
    cluster = dask_cluster_factory(n_workers=2, nthreads=1, memory_limit="2GB", nanny=True)
    with cluster.client() as client:
        before = client.run(_worker_readiness)
        assert not any(s["kernels"] or s["heap_tuned"] for s in before.values()), before
        t0 = time.monotonic()
        q = bd.open_atlas(cluster_atlas).query("cellTypeId != 'nothing'", client=client)
        planned = time.monotonic() - t0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = client.run(_worker_readiness)
            if all(s["kernels"] and s["heap_tuned"] for s in states.values()):
                break
            time.sleep(0.1)
        assert all(s["kernels"] and s["heap_tuned"] for s in states.values()), states
        # no query task ran: preparing is not computing
        assert not client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.task_prefixes))
    print(f"\nplanned in {planned:.2f}s; workers ready {time.monotonic() - t0:.1f}s after the query was created")
    assert len(q.plan.tasks) > 0


def test_dask_worker_preload_readies_workers_at_start(dask_cluster_factory, cluster_atlas):
    """``dask worker --preload bgee_dask.query.preload`` (as deploy/ runs workers): ready before any query,
    and queries give the same numbers."""
    from bgee_dask.query.preload import PRELOAD_MODULE

    cluster = dask_cluster_factory(
        n_workers=2, nthreads=1, memory_limit="2GB", nanny=True, extra_worker_args=("--preload", PRELOAD_MODULE)
    )
    with cluster.client() as client:
        states = client.run(_worker_readiness)
        assert len(states) == 2 and all(s["kernels"] and s["heap_tuned"] for s in states.values()), states
        got = bd.open_atlas(cluster_atlas).query("sex == 'female'", client=client).aggregate(by="cellTypeId")
    want = bd.open_atlas(cluster_atlas).query("sex == 'female'").aggregate(by="cellTypeId")
    for v in ("n_cells", "n_measured", "sum", "var", "n_expressed"):
        np.testing.assert_array_equal(got[v].values, want[v].values)
