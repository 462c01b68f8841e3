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

_EMPTY = np.uint64(2**64 - 1)


def _crc32c(payload: bytes) -> bytes:
    return numcodecs.CRC32C().encode(payload)[-4:]


class ShardWriter:
    """Appends values to a 1-D sharded array in order, writing each shard once it is full.

    The array must have been created with one ``BloscCodec`` (see ``BloscSettings``) inside a
    sharding codec whose index sits at the end with the default index codecs.
    """

    def __init__(self, array: zarr.Array, codec: BloscSettings, executor: Executor | None = None):
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
        self._carry: list[np.ndarray] = []
        self._carried = 0
        self._next_shard = 0
        self.bytes_written = 0
        store_path = array.store_path
        self._store = store_path.store
        self._prefix = store_path.path
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="bgee-dask-shard")
        self._pending: Future | None = None

    def _wait(self) -> None:
        """Let the shard being written finish (and raise its error, if it failed)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def append(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)
        if self._next_shard * self.shard + self._carried + values.size > self.size:
            raise RuntimeError(f"{self.array.path}: more values than the array's {self.size}")
        while values.size:
            take = min(values.size, self.shard - self._carried)
            self._carry.append(values[:take])
            self._carried += take
            values = values[take:]
            if self._carried == self.shard:
                self._flush()

    def close(self) -> None:
        """Write the last, partial shard and check that exactly ``size`` values arrived."""
        try:
            written = self._next_shard * self.shard + self._carried
            if written != self.size:
                raise RuntimeError(f"{self.array.path}: got {written} values for an array of {self.size}")
            if self._carried:
                self._flush()
            self._wait()
        finally:
            self._writer.shutdown(wait=True)

    def _flush(self) -> None:
        values = np.concatenate(self._carry) if len(self._carry) > 1 else self._carry[0]
        self._carry, self._carried = [], 0
        index = self._next_shard
        self._next_shard += 1
        # One shard is encoded and written in the background while the caller prepares the
        # next: the caller's own work (gathering rows) then overlaps the encoding.
        self._wait()
        self._pending = self._writer.submit(self._write_shard, index, values)

    def _write_shard(self, index: int, values: np.ndarray) -> None:
        shard_bytes = self._encode_shard(values)
        chunk_key = self.array.metadata.encode_chunk_key((index,))
        # an array at the store root has an empty path: "/c/0" would escape the store
        key = f"{self._prefix}/{chunk_key}" if self._prefix else chunk_key
        buf = default_buffer_prototype().buffer.from_bytes(shard_bytes)
        sync(self._store.set(key, buf))
        self.bytes_written += len(shard_bytes)

    def _encode_shard(self, values: np.ndarray) -> bytes:
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
        return b"".join([*map(bytes, encoded), index_bytes, _crc32c(index_bytes)])
