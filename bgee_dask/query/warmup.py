"""Getting Dask workers ready for query blocks while the client plans.

This module is deliberately light: ``client.run`` unpickles the function on each worker's
event loop, so naming a heavy module there would make the client wait for the worker's
imports. Here the imports and the kernel loading run on a helper thread instead.
"""

from __future__ import annotations

import asyncio


def _prepare() -> None:
    from .blocks import prepare_worker

    prepare_worker()


async def prepare_worker_soon() -> None:
    """``blocks.prepare_worker`` on a helper thread (``client.run(..., wait=False)`` takes coroutines only)."""
    await asyncio.get_running_loop().run_in_executor(None, _prepare)
