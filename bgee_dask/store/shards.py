"""Writing whole shards of a 1-D zarr v3 array, encoding inner chunks on a thread pool.

zarr-python encodes the chunks of a shard one after another on its event-loop thread, which
caps a conversion at one core. The sharding format is small and specified (zarr v3 sharding
codec: encoded inner chunks, then an index of (offset, nbytes) pairs protected by crc32c), so
we assemble shards ourselves and hand the bytes to the array's own store. Reading stays with
zarr; tests check that zarr reads back exactly what was written.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor

import numcodecs
import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from .layout import BloscSettings
from .scratch import Lease

_EMPTY = np.uint64(2**64 - 1)


def _crc32c(payload: bytes) -> bytes:
    return numcodecs.CRC32C().encode(payload)[-4:]


class ShardWriter:
    """Appends values to a 1-D sharded array in order, writing each shard once it is full.

    The array must have been created with one ``BloscCodec`` (see ``BloscSettings``) inside a
    sharding codec whose index sits at the end with the default index codecs.

    Values are assembled in two shard-sized buffers, reused for the whole array: one is encoded
    and written in the background while the other fills. Fresh arrays of that size would cost
    a page fault per 4 KiB on every shard (measured: ~170k faults and 1.3 s of system time per
    25k-cell file before buffers were reused). Producers that can compute values in place fill
    ``writable()`` and call ``advance``; others ``append``.
    """

    def __init__(
        self,
        array: zarr.Array,
        codec: BloscSettings,
        executor: Executor | None = None,
        scratch: Lease | None = None,
    ):
        if array.ndim != 1 or array.shards is None:
            raise ValueError("ShardWriter needs a 1-D sharded array")
        self.array = array
        self.size = int(array.shape[0])
        self.shard = int(array.shards[0])
        self.chunk = int(array.chunks[0])
        self.dtype = np.dtype(array.dtype)
        self.fill = np.asarray(array.fill_value, dtype=self.dtype)
        self.codec = codec.numcodecs_codec()
        self.executor = executor
        n_buffers = 2 if self.size > self.shard else 1
        self._scratch = scratch
        allocate = scratch.empty if scratch is not None else np.empty
        self._buffers = [allocate(min(self.size, self.shard), self.dtype) for _ in range(n_buffers)]
        self._current = 0  # the buffer being filled
        self._filled = 0  # values in it
        self._next_shard = 0
        self.bytes_written = 0
        store_path = array.store_path
        self._store = store_path.store
        self._prefix = store_path.path
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="bgee-dask-shard")
        self._pending: Future | None = None
        self._out: np.ndarray | None = None  # the encoded shard, reused (bytes)

    @property
    def written(self) -> int:
        """Values received so far."""
        return self._next_shard * self.shard + self._filled

    def _wait(self) -> None:
        """Let the shard being written finish (and raise its error, if it failed)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def writable(self) -> np.ndarray:
        """Where the next values go: the free rest of the shard being assembled (never empty before the end)."""
        room = min(self.shard, self.size - self._next_shard * self.shard) - self._filled
        return self._buffers[self._current][self._filled : self._filled + room]

    def advance(self, n: int) -> None:
        """Take the first ``n`` values of ``writable()`` as written."""
        if n < 0 or n > self.writable().size:
            raise RuntimeError(f"{self.array.path}: more values than the array's {self.size}")
        self._filled += n
        if self._filled == self.shard:
            self._flush()

    def append(self, values: np.ndarray) -> None:
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
        """Write the last, partial shard and check that exactly ``size`` values arrived."""
        try:
            if self.written != self.size:
                raise RuntimeError(f"{self.array.path}: got {self.written} values for an array of {self.size}")
            if self._filled:
                self._flush()
            self._wait()
        finally:
            self._writer.shutdown(wait=True)
            if self._scratch is not None:
                for buffer in [*self._buffers, *([] if self._out is None else [self._out])]:
                    self._scratch.give_back(buffer)
            self._buffers, self._out = [], None

    def _flush(self) -> None:
        values = self._buffers[self._current][: self._filled]
        index = self._next_shard
        self._next_shard += 1
        self._filled = 0
        # One shard is encoded and written in the background while the caller fills the other
        # buffer; the caller's own work (gathering rows) then overlaps the encoding.
        self._wait()
        self._pending = self._writer.submit(self._write_shard, index, values)
        self._current = (self._current + 1) % len(self._buffers)
        if len(self._buffers) == 1:
            self._wait()  # a single buffer is refilled only once it is written

    def _write_shard(self, index: int, values: np.ndarray) -> None:
        shard_bytes = self._encode_shard(values)
        chunk_key = self.array.metadata.encode_chunk_key((index,))
        # an array at the store root has an empty path: "/c/0" would escape the store
        key = f"{self._prefix}/{chunk_key}" if self._prefix else chunk_key
        buf = default_buffer_prototype().buffer.from_bytes(shard_bytes)
        sync(self._store.set(key, buf))
        self.bytes_written += len(shard_bytes)

    def _encode_shard(self, values: np.ndarray) -> memoryview:
        """The shard's bytes, in a buffer reused for every shard (valid until the next call)."""
        per_shard = self.shard // self.chunk
        pieces = []
        for i in range(per_shard):
            part = values[i * self.chunk : (i + 1) * self.chunk]
            if part.size == 0:
                break
            if part.size < self.chunk:  # the array's last chunk is padded to full size, as zarr does
                part = np.concatenate([part, np.full(self.chunk - part.size, self.fill, dtype=self.dtype)])
            pieces.append(part)
        encode: Callable[[np.ndarray], bytes] = self.codec.encode
        if self.executor is not None and len(pieces) > 1:
            encoded = list(self.executor.map(encode, pieces))
        else:
            encoded = [encode(p) for p in pieces]
        index = np.full((per_shard, 2), _EMPTY, dtype="<u8")
        offset = 0
        for i, blob in enumerate(encoded):
            index[i] = (offset, len(blob))
            offset += len(blob)
        index_bytes = index.tobytes()
        total = offset + len(index_bytes) + 4
        if self._out is None or self._out.size < total:
            if self._out is not None and self._scratch is not None:
                self._scratch.give_back(self._out)
            # room for a whole shard that does not compress at all, so this happens once per array
            worst = per_shard * (self.chunk * self.dtype.itemsize + 32) + len(index_bytes) + 4
            allocate = self._scratch.empty if self._scratch is not None else np.empty
            self._out = allocate(max(total, worst), np.dtype(np.uint8))
        out = memoryview(self._out)
        pos = 0
        for blob in (*encoded, index_bytes, _crc32c(index_bytes)):
            out[pos : pos + len(blob)] = blob
            pos += len(blob)
        return out[:total]
