"""Stopping long work cleanly on SIGINT and SIGTERM.

SLURM at walltime, ``kill`` and Ctrl-C send a signal to the main thread, while conversions run on
worker threads. A handler that raised in the main thread would leave those threads writing.
Instead the handler only records the request; the work checks it at each block
(:func:`check_cancelled`) and unwinds through its own cleanup, and the command exits non-zero
once every thread has stopped. A second signal interrupts at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_REQUESTED = threading.Event()
_SIGNAL: list[int] = []


class Cancelled(Exception):
    """The work was asked to stop (SIGINT or SIGTERM); cleanup has run by the time it reaches the caller."""

    def __init__(self, signum: int | None = None):
        self.signum = signum
        name = signal.Signals(signum).name if signum else "a request"
        super().__init__(f"interrupted by {name}")


def check_cancelled() -> None:
    """Raise :class:`Cancelled` when a stop was requested."""
    if _REQUESTED.is_set():
        raise Cancelled(_SIGNAL[0] if _SIGNAL else None)


def request_cancel(signum: int | None = None) -> None:
    if signum is not None and not _SIGNAL:
        _SIGNAL.append(signum)
    _REQUESTED.set()


def reset() -> None:
    """Forget an earlier request (a new command in the same process starts afresh)."""
    _REQUESTED.clear()
    _SIGNAL.clear()


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Within the block, the first SIGINT/SIGTERM requests a clean stop; a second one interrupts at once.

    Only the main thread can install handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    reset()

    def handle(signum, _frame) -> None:
        if _REQUESTED.is_set():
            raise KeyboardInterrupt
        request_cancel(signum)

    previous = {s: signal.signal(s, handle) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
