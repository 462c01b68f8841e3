"""Writing stores through zarr's public API: 1-D sharded arrays front to back, one whole shard per write,
and the consolidated metadata once a store is whole.

Each shard is written with ``array[a:b] = values`` over exactly its span, so zarr never has to
read back a shard to merge a partial write, and the array's last shard is the only short one.
The write itself (zarr encodes the shard's chunks on its own threads) runs on a thread of the
writer's while the caller fills the next shard: producing values (gathering or transposing
rows) and encoding them overlap.
"""

from __future__ import annotations

import warnings
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import zarr


class ShardedArrayWriter:
    """Appends values to a 1-D sharded array in order, writing each shard once it is full.

    Values are assembled in two shard-sized buffers, reused for the whole array: one is written
    in the background while the other fills. Producers that compute values in place fill
    ``writable()`` and call ``advance``; others call ``append``. ``close`` writes the last shard
    and checks that exactly the array's size arrived; ``stop`` is for failures: it returns only
    once no write of this writer is still running, so that the caller may remove the store.
    """

    def __init__(self, array: zarr.Array):
        if array.ndim != 1 or array.shards is None:
            raise ValueError("ShardedArrayWriter needs a 1-D sharded array")
        self.array = array
        self.size = int(array.shape[0])
        self.shard = int(array.shards[0])
        self.dtype = np.dtype(array.dtype)
        self._buffers: list[np.ndarray] = []  # allocated at the first values
        self._current = 0  # the buffer being filled
        self._filled = 0  # values in it
        self._next_shard = 0
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="bgee-dask-shard")
        self._pending: Future | None = None

    @property
    def written(self) -> int:
        """Values received so far."""
        return min(self._next_shard * self.shard, self.size) + self._filled

    def writable(self) -> np.ndarray:
        """Where the next values go: the free rest of the shard being assembled (empty only at the end)."""
        if not self._buffers:
            n_buffers = 2 if self.size > self.shard else 1
            self._buffers = [np.empty(min(self.size, self.shard), self.dtype) for _ in range(n_buffers)]
        start = min(self._next_shard * self.shard, self.size)
        room = min(self.shard, self.size - start) - self._filled
        return self._buffers[self._current][self._filled : self._filled + room]

    def advance(self, n: int) -> None:
        """Take the first ``n`` values of ``writable()`` as written."""
        if n < 0 or n > self.writable().size:
            raise RuntimeError(f"{self.array.path}: more values than the array's {self.size}")
        self._filled += n
        if self._filled and self._filled == min(self.shard, self.size - self._next_shard * self.shard):
            self._flush()

    def append(self, values: np.ndarray) -> None:
        """Copy ``values`` in after the values received so far."""
        values = np.asarray(values)
        if self.written + values.size > self.size:
            raise RuntimeError(f"{self.array.path}: more values than the array's {self.size}")
        pos = 0
        while pos < values.size:
            room = self.writable()
            take = min(room.size, values.size - pos)
            room[:take] = values[pos : pos + take]
            pos += take
            self.advance(take)

    def close(self) -> None:
        """Wait for the last shard's write and check that exactly ``size`` values arrived."""
        try:
            if self.written != self.size:
                raise RuntimeError(f"{self.array.path}: got {self.written} values for an array of {self.size}")
            self._wait()
        finally:
            self.stop()
            self._buffers = []

    def stop(self) -> None:
        """Wait for the shard being written, without writing more: after a failure, before the store is removed."""
        self._writer.shutdown(wait=True)

    def _wait(self) -> None:
        """Let the shard being written finish (and raise its error, if it failed)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _flush(self) -> None:
        start = self._next_shard * self.shard
        values = self._buffers[self._current][: self._filled]
        self._next_shard += 1
        self._filled = 0
        self._wait()  # one write at a time: the other buffer is then free to fill
        self._pending = self._writer.submit(self._write, start, values)
        self._current = (self._current + 1) % len(self._buffers)
        if len(self._buffers) == 1:
            self._wait()  # a single buffer is refilled only once it is written

    def _write(self, start: int, values: np.ndarray) -> None:
        self.array[start : start + values.size] = values


def consolidate(store: zarr.abc.store.Store) -> None:
    """``zarr.consolidate_metadata``: the root ``zarr.json`` then holds every node's metadata, and opening
    the store is one request. Its note that consolidated metadata is not yet in the v3 spec is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(store)
