"""Getting a Dask client for the places users run: a laptop, a running cluster, an HPC queue.

The top layer: the API functions take a ``client``; this module makes one from the CLI's
``--scheduler``, ``--workers`` or ``--cluster slurm|pbs|sge|lsf --jobs N`` options.

Job-queue clusters are configured the way dask-jobqueue always is: the ``jobqueue.<kind>`` section
of Dask's configuration (``~/.config/dask/jobqueue.yaml``, ``$DASK_CONFIG``, or a file passed as
``jobqueue_config`` / ``--jobqueue-config``), then explicit options. bgee-dask only fills in what
neither sets: :data:`JOBQUEUE_DEFAULTS`, this Python, and a dashboard that listens on the chosen
interface only. See ``deploy/slurm/jobqueue.yaml`` for a commented example (SLURM, PBS, SGE and LSF).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import socket
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from bgee_dask.format.codec_pipeline import ENVIRONMENT_VARIABLE as CODEC_PIPELINE_VARIABLE

#: Per-job defaults for job-queue clusters: one worker process with one core and 4 GB per job suits
#: the per-block query tasks, whose memory does not grow with the atlas (a conversion task holds
#: one file's metadata plus one block). Scale with ``--jobs``; sites override them in jobqueue.yaml.
JOBQUEUE_DEFAULTS: dict[str, Any] = {"cores": 1, "processes": 1, "memory": "4GB", "walltime": "01:00:00"}

JOBQUEUE_CLASSES = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster", "lsf": "LSFCluster"}

#: How long ``client_for`` waits for the first batch job to start a worker (queues can be slow).
DEFAULT_WORKER_TIMEOUT = 600.0


def interface_address(interface: str) -> str:
    """The IPv4 address of a network interface of this machine (``lo`` -> ``127.0.0.1``)."""
    import psutil

    addresses = psutil.net_if_addrs()
    if interface not in addresses:
        raise ValueError(f"no network interface {interface!r} here; interfaces: {', '.join(sorted(addresses))}")
    for a in addresses[interface]:
        if a.family == socket.AF_INET:
            return a.address
    raise ValueError(f"network interface {interface!r} has no IPv4 address")


def _flatten(prefix: str, tree: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value and not dotted.endswith("scheduler-options"):
            out.update(_flatten(dotted, value))
        else:
            out[dotted] = value
    return out


def load_jobqueue_config(path: str | os.PathLike) -> dict[str, Any]:
    """A jobqueue.yaml as flat dotted Dask config keys (``jobqueue.slurm.cores`` ...).

    The file has the usual layout (``jobqueue: {slurm: {...}, pbs: {...}}``); flat keys let
    ``dask.config.set`` merge it over the defaults instead of replacing whole sections.
    """
    import yaml

    _require_jobqueue()  # its defaults must be in Dask's config before a ``dask.config.set`` over them

    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, Mapping) or not isinstance(data.get("jobqueue"), Mapping):
        raise ValueError(f"{path}: not a dask-jobqueue configuration (no top-level 'jobqueue:' section)")
    return _flatten("", {"jobqueue": data["jobqueue"]})


def _config_key(kind: str, key: str) -> Any:
    import dask

    return dask.config.get(f"jobqueue.{kind}.{key.replace('_', '-')}", default=None)


@functools.lru_cache(maxsize=1)
def _packaged_defaults() -> dict[str, Any]:
    """dask-jobqueue's own defaults (its jobqueue.yaml), to tell them from a user's configuration."""
    import yaml

    dask_jobqueue = _require_jobqueue()

    with open(os.path.join(os.path.dirname(dask_jobqueue.__file__), "jobqueue.yaml")) as fh:
        return (yaml.safe_load(fh) or {}).get("jobqueue", {})


def _configured(kind: str, key: str) -> bool:
    """Whether the user's Dask configuration sets ``key`` (dask-jobqueue's own defaults do not count)."""
    value = _config_key(kind, key)
    return value is not None and value != _packaged_defaults().get(kind, {}).get(key.replace("_", "-"))


def _worker_extra_args(kind: str, given: Mapping[str, Any]) -> list[str]:
    """The worker command's extra arguments: as given, else as Dask's configuration says (a copy to add to)."""
    return list(given.get("worker_extra_args") or _config_key(kind, "worker_extra_args") or [])


def jobqueue_kwargs(kind: str, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for the dask-jobqueue class of ``kind``: explicit ``overrides`` (``None``
    means unset), then what Dask's configuration says (left to dask-jobqueue to read), then ours."""
    if kind not in JOBQUEUE_CLASSES:
        raise ValueError(f"unknown cluster kind {kind!r}; choose one of {sorted(JOBQUEUE_CLASSES)}")
    _require_jobqueue()
    given = {k: v for k, v in overrides.items() if v is not None}
    kwargs = {k: v for k, v in JOBQUEUE_DEFAULTS.items() if k not in given and not _configured(kind, k)}
    if "python" not in given and not _configured(kind, "python"):
        kwargs["python"] = sys.executable
    kwargs.update(given)

    interface = kwargs.get("interface") or _config_key(kind, "interface")
    scheduler_options = dict(_config_key(kind, "scheduler_options") or {})
    scheduler_options.update(kwargs.get("scheduler_options") or {})
    if interface and "dashboard_address" not in scheduler_options:
        # dask-jobqueue's default is ":8787", i.e. every interface of the submitting host
        scheduler_options["dashboard_address"] = f"{interface_address(interface)}:8787"
        kwargs["scheduler_options"] = scheduler_options
    if interface == "lo":
        # single-machine queue (a laptop or a CI runner): keep the workers' HTTP servers on loopback
        extra = _worker_extra_args(kind, kwargs)
        if "--dashboard-address" not in extra:
            extra += ["--no-dashboard", "--dashboard-address", "127.0.0.1:0"]
        kwargs["worker_extra_args"] = extra
    pipeline = os.environ.get(CODEC_PIPELINE_VARIABLE)
    if pipeline:
        # the codec pipeline this process chose; not every batch system passes the submitting
        # environment to its jobs (PBS's qsub needs -V), so the job script sets it
        prologue = list(kwargs.get("job_script_prologue") or _config_key(kind, "job_script_prologue") or [])
        kwargs["job_script_prologue"] = [*prologue, f"export {CODEC_PIPELINE_VARIABLE}={shlex.quote(pipeline)}"]
    return kwargs


def _require_jobqueue():
    try:
        import dask_jobqueue
    except ImportError:  # pragma: no cover - depends on the install
        raise RuntimeError("--cluster needs dask-jobqueue: pip install 'bgee-dask[hpc]'") from None
    return dask_jobqueue


def make_jobqueue_cluster(kind: str, **overrides: Any):
    """A dask-jobqueue cluster (no jobs submitted yet); options as in :func:`jobqueue_kwargs`."""
    dask_jobqueue = _require_jobqueue()
    kwargs = jobqueue_kwargs(kind, **overrides)
    return getattr(dask_jobqueue, JOBQUEUE_CLASSES[kind])(**kwargs)


@contextlib.contextmanager
def client_for(
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    cluster: str | None = None,
    jobs: int | None = None,
    memory_limit: str | None = None,
    jobqueue_options: dict[str, Any] | None = None,
    jobqueue_config: str | os.PathLike | None = None,
    worker_timeout: float | None = None,
    preload: Sequence[str] = (),
) -> Iterator[Any]:
    """A client for the chosen place, closed (and its batch jobs cancelled) on exit.

    ``preload``: Dask preload modules for the workers started here (local processes or batch
    jobs), e.g. ``bgee_dask.query.preload``; a running scheduler's workers are its own.

    ``scheduler``: a running scheduler's address. ``cluster`` (``slurm``, ``pbs``, ``sge``, ``lsf``):
    start ``jobs`` batch jobs with dask-jobqueue, configured by ``jobqueue_config`` (a jobqueue.yaml),
    Dask's configuration and ``jobqueue_options`` (``interface``, ``queue``, ``cores``, ``walltime``
    ...); ``memory_limit`` is then each job's memory. With neither, a local cluster of ``workers``
    processes (``memory_limit`` each) is started.
    """
    from distributed import Client

    if scheduler and cluster:
        raise ValueError("choose one of --scheduler and --cluster")
    if scheduler and memory_limit:
        raise ValueError("memory_limit applies to workers started here, not to a running scheduler's workers")
    if scheduler:
        with Client(scheduler, timeout="30s") as client:
            yield client
        return
    if cluster:
        import dask

        _require_jobqueue()
        settings = load_jobqueue_config(jobqueue_config) if jobqueue_config else {}
        options = dict(jobqueue_options or {})
        if preload:
            extra = _worker_extra_args(cluster, options)
            for module in preload:
                if module not in extra:
                    extra += ["--preload", module]
            options["worker_extra_args"] = extra
        if memory_limit:
            options.setdefault("memory", memory_limit)
        timeout = DEFAULT_WORKER_TIMEOUT if worker_timeout is None else worker_timeout
        with dask.config.set(settings):
            jq = make_jobqueue_cluster(cluster, **options)
            failure: TimeoutError | None = None
            try:
                with Client(jq) as client:
                    jq.scale(jobs=jobs or 1)
                    try:
                        client.wait_for_workers(1, timeout=timeout)
                    except TimeoutError:
                        where = getattr(getattr(jq, "_dummy_job", None), "log_directory", None)
                        failure = TimeoutError(
                            f"no {cluster} batch job started a Dask worker within {timeout:.0f} s; check the "
                            f"queue and the job logs ({where or 'in the submission folder'})"
                        )
                    if failure is None:
                        yield client
            finally:
                if failure is None:
                    jq.close()
                else:  # jobs that never started can make closing complain too: report the cause
                    with contextlib.suppress(Exception):
                        jq.close()
            if failure is not None:
                raise failure
        return
    from bgee_dask._runtime import local_client

    kwargs: dict[str, Any] = {"memory_limit": memory_limit} if memory_limit else {}
    if preload:
        kwargs["preload"] = list(preload)
    with local_client(workers, **kwargs) as client:
        yield client
