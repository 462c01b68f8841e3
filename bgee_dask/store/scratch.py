"""Large working arrays kept from one conversion to the next in the same process.

A 25k-cell file needs ~1 GB of fresh working memory (the decoded matrix, shard buffers, the
gene-major ranges). Fresh memory costs a page fault per 4 KiB page on first touch, and on
these virtual machines that was 0.5-0.7 s of system time per file, about a third of its
conversion. A worker converting many files therefore reuses the arrays of the previous file.
What is kept is at most what one conversion needed at its peak; ``release_scratch`` gives it
back (``convert`` calls it on every worker when it is done).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

_LOCK = threading.Lock()
_FREE: list[np.ndarray] = []  # raw byte buffers, not in use


class Lease:
    """Arrays taken from the pool for one conversion; all go back when the lease ends."""

    def __init__(self) -> None:
        self._taken: list[np.ndarray] = []

    def empty(self, n: int, dtype: np.dtype | type) -> np.ndarray:
        """An uninitialised array of ``n`` values, as ``np.empty`` would give, from a kept buffer if one fits."""
        dtype = np.dtype(dtype)
        nbytes = _size_class(max(1, int(n) * dtype.itemsize))
        with _LOCK:
            fits = [b for b in _FREE if b.nbytes >= nbytes]
            raw = min(fits, key=lambda b: b.nbytes) if fits else None
            if raw is not None:
                _remove(_FREE, raw)
            elif _FREE:  # none fits: drop the largest rather than keep more buffers than any conversion used
                _remove(_FREE, max(_FREE, key=lambda b: b.nbytes))
        if raw is None:
            raw = np.empty(nbytes, dtype=np.uint8)
        self._taken.append(raw)
        return raw[: int(n) * dtype.itemsize].view(dtype)

    def give_back(self, array: np.ndarray) -> None:
        """Return one array before the lease ends, so that later requests (of this lease too) can reuse it."""
        address = array.__array_interface__["data"][0]
        for raw in self._taken:
            if raw.__array_interface__["data"][0] == address:
                _remove(self._taken, raw)
                with _LOCK:
                    _FREE.append(raw)
                return

    def close(self) -> None:
        with _LOCK:
            _FREE.extend(self._taken)
        self._taken = []


def _size_class(nbytes: int) -> int:
    """``nbytes`` rounded up to one of eight steps per power of two (at most 12.5% more).

    Files differ a little in size; without rounding, the next file's matrix is a few bytes
    larger than the kept one, which is then dropped and a fresh one page-faulted in.
    """
    step = max(1, 1 << max(0, nbytes.bit_length() - 4))
    return -(-nbytes // step) * step


def _remove(buffers: list[np.ndarray], buffer: np.ndarray) -> None:
    """``list.remove`` by identity (it would compare arrays element-wise)."""
    del buffers[next(i for i, b in enumerate(buffers) if b is buffer)]


@contextmanager
def lease() -> Iterator[Lease]:
    """Borrow working arrays for the duration of a ``with`` block."""
    taken = Lease()
    try:
        yield taken
    finally:
        taken.close()


def kept_bytes() -> int:
    """Bytes held for reuse."""
    with _LOCK:
        return sum(b.nbytes for b in _FREE)


def release_scratch() -> int:
    """Drop every kept buffer; returns how many bytes were released."""
    with _LOCK:
        freed = sum(b.nbytes for b in _FREE)
        _FREE.clear()
    return freed
