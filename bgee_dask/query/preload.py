"""Getting Dask workers ready for query blocks: when they start, or while a client plans.

A worker loads the query kernels from numba's on-disk cache on its first block, after the
imports they need: on a fresh worker that is most of a selective query. Started with
``dask worker SCHEDULER --preload bgee_dask.query.preload``, a worker pays it once at start
(``dask_setup``). Without that, ``Query`` sends the workers ``prepare_worker_soon`` while it
plans, and the first block finds them ready or nearly so.

This module is deliberately light: ``client.run`` unpickles its function on each worker's
event loop, so naming a heavy module there would make the client wait for the worker's
imports. The imports and the kernel loading run on a helper thread instead.
"""

from __future__ import annotations

import asyncio
from typing import Any

#: The module to name in ``--preload`` (and in LocalCluster's ``preload=``).
PRELOAD_MODULE = __name__


def _prepare() -> None:
    from bgee_dask.query.blocks import prepare_worker

    prepare_worker()


def dask_setup(worker: Any) -> None:
    """Called by Dask when the worker starts: import the block module and load its kernels."""
    _prepare()


async def prepare_worker_soon() -> None:
    """``blocks.prepare_worker`` on a helper thread (``client.run(..., wait=False)`` takes coroutines only)."""
    await asyncio.get_running_loop().run_in_executor(None, _prepare)
