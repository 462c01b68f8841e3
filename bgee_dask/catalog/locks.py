"""The atlas's commit lock and the leases that mark a conversion as still running.

Two mechanisms, one contract:
- on local disk, an OS file lock (``flock``) on a file. The kernel releases it when the holder
  dies, however it dies, so a lock is never stale and liveness is exact.
- on an object store, a lease object written with a conditional PUT (``If-None-Match: *``).
  Its holder rewrites it every ``ttl / 4`` seconds (``If-Match`` its own ETag); a lease not
  rewritten for ``ttl`` seconds is stale, and the next writer takes it over with ``If-Match``
  the stale ETag, so of two writers racing for it exactly one wins.

A lease is judged by the object's modification time against this machine's clock: clocks must
agree within a fraction of ``ttl`` (60 s for the commit lock, 120 s for a running conversion).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator

from bgee_dask.format.location import TMP_MARK, AtlasLocation
from bgee_dask.format.paths import LOCK_FILE, LOCK_OBJECT
from bgee_dask.workdirs import flock_held

#: Seconds a lease object lives without being rewritten.
COMMIT_LEASE_TTL = 60.0
WRITER_LEASE_TTL = 120.0
#: How long a writer waits for the commit lock before giving up with an error.
LOCK_WAIT = 900.0


class LockTimeout(TimeoutError):
    """The commit lock stayed held by another writer for longer than the wait allowed."""


def _owner() -> bytes:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}).encode()


class _FileLock:
    """An exclusive ``flock`` on a local file, held until ``release``."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, _owner())
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the lock
            self.fd = None


class _ObjectLease:
    """A lease object on an object store (see the module doc), refreshed by a thread while held."""

    def __init__(self, loc: AtlasLocation, rel: str, ttl: float):
        self.loc, self.rel, self.ttl = loc, rel, ttl
        self.etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def try_acquire(self) -> bool:
        etag = self.loc.create_exclusive(self.rel, _owner())
        if etag is None:
            found = self.loc.stat(self.rel)
            if found is None or time.time() - found[1] <= self.ttl:
                return False
            etag = self.loc.replace_if(self.rel, _owner(), found[0])  # a stale lease: take it over
            if etag is None:
                return False
        self.etag = etag
        self._thread = threading.Thread(target=self._keep, name="bgee-dask-lease", daemon=True)
        self._thread.start()
        return True

    def _keep(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            etag = self.loc.replace_if(self.rel, _owner(), self.etag or "")
            if etag is None:
                self.lost = True
                return
            self.etag = etag

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.etag is not None and not self.lost:
            self.loc.remove_if(self.rel, self.etag)
        self.etag = None


def _lease(loc: AtlasLocation, rel: str, ttl: float) -> _FileLock | _ObjectLease:
    return _FileLock(loc.path(rel)) if loc.is_local else _ObjectLease(loc, rel, ttl)


@contextlib.contextmanager
def commit_lock(loc: AtlasLocation, wait: float = LOCK_WAIT) -> Iterator[None]:
    """Hold the atlas's commit lock: only one writer at a time changes the catalog."""
    lock = _lease(loc, LOCK_FILE if loc.is_local else LOCK_OBJECT, COMMIT_LEASE_TTL)
    deadline = time.monotonic() + wait
    delay = 0.02
    while not lock.try_acquire():
        if time.monotonic() > deadline:
            raise LockTimeout(f"{loc.url}: the catalog stayed locked by another writer for {wait:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def writer_lease(loc: AtlasLocation, folder: str, name: str) -> Iterator[None]:
    """Create ``folder`` marked as being written by this process (lease ``folder/name``) until the block ends.

    The folder never exists without its lease held: locally it is made under a temporary name,
    locked, then renamed into place; on an object store the lease is its first object.
    """
    if loc.is_local:
        final = loc.path(folder)
        staging = f"{final}{TMP_MARK}lease"
        lease = _FileLock(os.path.join(staging, name))
        if not lease.try_acquire():
            raise RuntimeError(f"{staging}: already held by another writer")
        os.rename(staging, final)  # the open, locked file keeps its lock across the rename
    else:
        lease = _ObjectLease(loc, f"{folder}/{name}", WRITER_LEASE_TTL)
        if not lease.try_acquire():
            raise RuntimeError(f"{loc.full_url(folder)}: already held by another writer")
    try:
        yield
    finally:
        lease.release()
        if loc.is_local:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(loc.path(folder), name))


def lease_alive(loc: AtlasLocation, rel: str, ttl: float = WRITER_LEASE_TTL) -> bool:
    """Whether a live writer holds the lease at ``rel`` (False where there is none)."""
    if loc.is_local:
        return bool(flock_held(loc.path(rel)))
    found = loc.stat(rel)
    return found is not None and time.time() - found[1] <= ttl


def commit_lock_state(loc: AtlasLocation) -> str:
    """"free", "held" or "stale" (an object-store lease its holder stopped refreshing)."""
    if loc.is_local:
        return "held" if lease_alive(loc, LOCK_FILE) else "free"
    found = loc.stat(LOCK_OBJECT)
    if found is None:
        return "free"
    return "held" if time.time() - found[1] <= COMMIT_LEASE_TTL else "stale"
