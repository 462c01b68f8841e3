"""numba, as every kernel module gets it: its error formatting no longer reassigns ``sys.stdout``.

When colorama is installed, numba formats each error message it builds inside colorama's
``init()`` / ``deinit()``, which save ``sys.stdout`` and ``sys.stderr`` in colorama's globals
and assign them back afterwards. numba builds such messages while it compiles, even when the
compile succeeds (types it tries and rejects), and our kernels compile or load on helper
threads (``bgee-dask-warm-up``, ``bgee-dask-prepare``). If another thread redirects the
streams meanwhile (a notebook's ``%%capture``, ``contextlib.redirect_stdout``, pytest's
per-test capture), the helper puts back the streams it saved: the redirection is undone, the
caller's output goes to a stale stream, or to a closed one ("I/O operation on closed file").
Seen in CI: a query's one-line summary went to the previous test's capture, during a cold
numba cache (numba#3027 and colorama#145 are the same family).

The message string is built without colorama's stream wrapping, which matters only to a
legacy Windows console printing the escape codes (there they would now show raw). The
wrapping step is replaced by a no-op, so messages read exactly as before. Done on import of
this module, whoever imported numba first (anndata and scanpy import it before us).
"""

from __future__ import annotations

import contextlib

import numba
import numba.core.errors

__all__ = ["numba"]


class _NoStreamSwap(contextlib.AbstractContextManager):
    """Stands for numba's ``ColorShell``: the same ``with`` block, without colorama's init/deinit."""

    def __exit__(self, *exc_detail: object) -> None:
        return None


def _keep_numba_off_the_streams() -> None:
    errors = numba.core.errors
    if hasattr(errors, "ColorShell"):  # only defined when colorama highlighting is active
        errors.ColorShell = _NoStreamSwap


_keep_numba_off_the_streams()
