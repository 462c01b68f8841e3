"""Private scratch folders that a later run can tell from live ones, and remove.

A conversion spills to a folder under the system temp (or ``--tmp-dir``). A process killed with
SIGKILL cannot remove it, so each folder holds a lock file the owning process keeps locked
(``flock``) for the folder's life. The kernel drops that lock when the process dies, however it
dies: :func:`sweep_stale` removes exactly the folders whose lock nobody holds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator

PREFIX = "bgee-dask-"
LOCK_NAME = ".owner.lock"


@contextlib.contextmanager
def private_dir(purpose: str, parent: str | None = None) -> Iterator[str]:
    """A new folder ``bgee-dask-<purpose>-*`` under ``parent`` (default: system temp), removed on exit."""
    path = tempfile.mkdtemp(prefix=f"{PREFIX}{purpose}-", dir=parent)
    fd = os.open(os.path.join(path, LOCK_NAME), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def require_free_space(parent: str | None, need: int, what: str) -> None:
    """``OSError`` (``ENOSPC``, one line) unless ``parent`` (default: system temp) has ``need`` bytes free.

    For work that would otherwise fill the disk after hours, and fail on a file it did not name.
    """
    where = parent or tempfile.gettempdir()
    free = shutil.disk_usage(where).free
    if free < need:
        raise OSError(
            errno.ENOSPC,
            f"{what} need about {_size(need)} in {where}, which has {_size(free)} free: "
            "point --tmp-dir (tmp_dir=) at a larger folder",
        )


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def flock_held(path: str) -> bool | None:
    """Whether some open file holds an ``flock`` on ``path``; None when there is no such file.

    The probe takes the lock without waiting and drops it at once (closing its descriptor).
    """
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _owned(path: str) -> bool:
    """Whether a live process holds the folder's lock (a folder without one is not ours to judge)."""
    return flock_held(os.path.join(path, LOCK_NAME)) is not False


def sweep_stale(parent: str | None = None) -> list[str]:
    """Remove the scratch folders under ``parent`` whose owning process is gone; return their paths."""
    parent = parent or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return removed
    for name in names:
        path = os.path.join(parent, name)
        if name.startswith(PREFIX) and os.path.isdir(path) and not _owned(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
