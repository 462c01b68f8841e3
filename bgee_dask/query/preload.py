"""A Dask worker preload: ``dask worker SCHEDULER --preload bgee_dask.query.preload``.

A worker loads the query kernels from numba's on-disk cache on its first block (about
0.25 s, and 1.3 s of imports before that): on a fresh worker that is most of a selective
query. Preloaded, the worker pays it once when it starts, and every query finds it ready.
Queries work the same without it (``Query`` asks the workers to get ready while it plans).
"""

from __future__ import annotations

from typing import Any


def dask_setup(worker: Any) -> None:
    """Called by Dask when the worker starts: import the block module and load its kernels."""
    from .blocks import prepare_worker

    prepare_worker()
