"""Getting a Dask client for the places users run: a laptop, a running cluster, an HPC queue.

The top layer: the API functions take a ``client``; this module makes one from the CLI's
``--scheduler``, ``--workers`` or ``--cluster slurm|pbs|sge --jobs N`` options.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

#: Per-worker defaults for job-queue clusters: one core and 4 GB each suits the per-block tasks,
#: whose memory does not grow with the atlas. Users override them in their jobqueue.yaml.
JOBQUEUE_DEFAULTS: dict[str, Any] = {"cores": 1, "processes": 1, "memory": "4GB", "walltime": "01:00:00"}

JOBQUEUE_CLASSES = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster", "lsf": "LSFCluster"}


def make_jobqueue_cluster(kind: str, **overrides: Any):
    """A dask-jobqueue cluster; options come from ``~/.config/dask/jobqueue.yaml``, then ``overrides``.

    Only keys the user did not configure get our defaults, so a site's jobqueue.yaml wins.
    """
    try:
        import dask
        import dask_jobqueue
    except ImportError:  # pragma: no cover - depends on the install
        raise RuntimeError("--cluster needs dask-jobqueue: pip install 'bgee-dask[hpc]'") from None
    if kind not in JOBQUEUE_CLASSES:
        raise ValueError(f"unknown cluster kind {kind!r}; choose one of {sorted(JOBQUEUE_CLASSES)}")
    cls = getattr(dask_jobqueue, JOBQUEUE_CLASSES[kind])
    configured = dask.config.get(f"jobqueue.{kind}", default={}) or {}
    kwargs = {k: v for k, v in JOBQUEUE_DEFAULTS.items() if configured.get(k) is None}
    if configured.get("python") is None:
        kwargs["python"] = sys.executable
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**kwargs)


@contextlib.contextmanager
def client_for(
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    cluster: str | None = None,
    jobs: int | None = None,
    memory_limit: str | None = None,
    jobqueue_options: dict[str, Any] | None = None,
) -> Iterator[Any]:
    """A client for the chosen place, closed (and its jobs cancelled) on exit.

    With no option at all, a local cluster of worker processes is started.
    """
    from distributed import Client

    if sum(x is not None for x in (scheduler, cluster)) > 1:
        raise ValueError("choose one of --scheduler and --cluster")
    if scheduler:
        with Client(scheduler, timeout="30s") as client:
            yield client
        return
    if cluster:
        jq = make_jobqueue_cluster(cluster, **(jobqueue_options or {}))
        with jq, Client(jq) as client:
            jq.scale(jobs=jobs or 1)
            client.wait_for_workers(1, timeout=300)
            yield client
        return
    from ._runtime import local_client

    kwargs = {"memory_limit": memory_limit} if memory_limit else {}
    with local_client(workers, **kwargs) as client:
        yield client
