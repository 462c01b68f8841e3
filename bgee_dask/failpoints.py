"""Named points in the write path where a test can kill the process, to prove it crash-safe.

``BGEE_DASK_FAILPOINT=<name>`` makes the process kill itself with SIGKILL the first time it
reaches that point: no cleanup, no ``finally``, exactly what a power cut or the OOM killer
leaves. Unset (always, outside the crash tests), a failpoint is one dictionary lookup.
The names are listed in :data:`FAILPOINTS` so that the tests can cover every one.
"""

from __future__ import annotations

import os
import signal

ENV = "BGEE_DASK_FAILPOINT"

#: Every failpoint, in the order a conversion reaches them.
FAILPOINTS: tuple[str, ...] = (
    "store-written",  # the new version's stores and catalog share are written, nothing committed
    "lock-taken",  # the atlas's commit lock is held, nothing written under it yet
    "fragment-written",  # the experiment's catalog record points to the new version; catalog not rebuilt
    "tables-written",  # the new catalog tables are written; the header still names the old ones
    "header-written",  # the new catalog is visible; the old version is still on disk
    "old-version-removing",  # part of the old version is removed
    "committed",  # everything done but the lock's release
)


def failpoint(name: str) -> None:
    """Kill this process here when the environment names this point (see the module doc)."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
