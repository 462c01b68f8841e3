"""Finding or starting a Dask client; the lowest layer, so that the API functions can default to one."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def current_client() -> Any | None:
    """The ``distributed.Client`` this process is using, if any."""
    if "distributed" not in sys.modules:  # no client without it, and not imported just to ask
        return None
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


@contextlib.contextmanager
def local_client(n_workers: int | None = None, threads_per_worker: int = 1, **kwargs: Any) -> Iterator[Any]:
    """A throw-away local cluster of worker processes, closed on exit (``kwargs``: LocalCluster's, e.g. preload)."""
    from distributed import Client, LocalCluster

    n = n_workers or os.cpu_count() or 1
    kwargs.setdefault("dashboard_address", None)
    kwargs.setdefault("host", "127.0.0.1")
    cluster = LocalCluster(n_workers=n, threads_per_worker=threads_per_worker, processes=True, **kwargs)
    with cluster, Client(cluster) as client:
        yield client


def map_on(executor: Executor | None, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(x) for x in items]``, on ``executor``'s threads when there is one and more than one item."""
    if executor is not None and len(items) > 1:
        return list(executor.map(fn, items))
    return [fn(x) for x in items]


def cpu_count() -> int:
    """Cores this process may use (respects affinity masks, unlike ``os.cpu_count``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class OncePerProcess:
    """Set-up that a process needs once (loading numba kernels), asked for from many places.

    Each caller may ask for it, on a daemon thread or on its own; only the first claim starts
    it, so that a thread per request does not queue on numba's compiler lock.
    """

    def __init__(self, target: Callable[[], None], thread_name: str):
        self.target, self.thread_name = target, thread_name
        self.started = False
        self._lock = threading.Lock()

    def claim(self) -> bool:
        """Whether this call is the first to ask (and now owns the set-up)."""
        with self._lock:
            first, self.started = not self.started, True
        return first

    def start_in_background(self) -> None:
        if self.claim():
            threading.Thread(target=self.target, name=self.thread_name, daemon=True).start()


_HEAP_TUNED = False


def bound_heap_growth() -> None:
    """Keep large temporary arrays out of glibc's heap arenas (Linux only, once per process).

    Earns its place, with ``release_free_heap``: a conversion's peak RSS is 21% lower at 300k
    cells with both than with neither (benchmarks/README.md, the heap A/B).

    glibc raises its mmap threshold after big arrays are freed, so later blocks of the same size
    come from the heap, fragment it and make a long conversion's RSS creep up with the file
    size (measured: 979 MB instead of 802 MB for a 300k-cell file). A fixed 4 MiB threshold
    returns every block's memory to the system when it is freed. (1 MiB is too low: Blosc's
    scratch space for one 512 KiB chunk is above it, so every encoded chunk would map fresh pages
    and fault them in.)

    Fixing that threshold also pins the heap's trim threshold at 128 KiB, which gives back the
    top of a heap as soon as a few small buffers are freed there: the codecs' scratch buffers
    and h5py's raw chunks were then page-faulted in again on every use (half of a conversion's
    page faults). Up to 32 MiB of free heap is kept instead (8 MiB still let many of those
    faults back; 32 MiB costs ~50 MB of peak RSS on a 300k-cell file).
    """
    global _HEAP_TUNED
    if _HEAP_TUNED:
        return
    _HEAP_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 32 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def arrow_on_system_heap() -> None:
    """Have Arrow allocate from the system's heap (malloc), as numpy does, in this process.

    Earns its place: converting one 4M-cell file peaks at 1.46 GB instead of 2.02 GB (its obs
    holds two columns of 4M unique strings; benchmarks/README.md, the Arrow heap A/B). Arrow's own allocator keeps what it frees for
    Arrow alone, and numpy's freed memory is no use to it either; reading, sorting and writing
    a large obs frees hundreds of MB in each, so each heap grows to the other's peak.
    """
    import pyarrow

    if pyarrow.default_memory_pool().backend_name != "system":
        pyarrow.set_memory_pool(pyarrow.system_memory_pool())


def release_free_heap() -> None:
    """Give the heaps' free memory back to the system: glibc's (``malloc_trim``) and Arrow's.

    Decoding a file leaves thousands of freed chunk-sized buffers in the threads' malloc arenas:
    about 200 MB of RSS that nothing uses, measured while a 25k-cell matrix is held in memory.
    Arrow keeps what its allocator (mimalloc) freed as well: the text columns of a 1M-cell obs
    left 123 MB there once the frame was dropped, which took a 1M-cell conversion's peak over
    1 GB (1,044 MB; 229 MB instead of 352 MB of RSS right after opening such a file).
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    arrow = sys.modules.get("pyarrow")  # only if something imported it: nothing of Arrow's to free otherwise
    if arrow is not None:
        arrow.default_memory_pool().release_unused()
