"""Reading ranges of the 1-D sharded arrays that ``ShardWriter`` wrote, on the calling thread.

zarr-python decodes on its event-loop thread, so concurrent reads from Dask's worker threads
queue up behind one core (measured: two threads read slower than one). Here the I/O still
goes through the zarr store (local disk and object stores alike): one request for a shard's
index, cached, and one ranged request per contiguous run of inner chunks; decoding happens in
the thread that asked, with the GIL released by blosc.
"""

from __future__ import annotations

import functools

import numcodecs
import numpy as np
import zarr
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.codecs import BloscCodec, BytesCodec, ShardingCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

_EMPTY = 2**64 - 1


class ShardedArrayReader:
    """Values ``[a, b)`` of a 1-D sharded array of our own layout."""

    def __init__(self, array: zarr.Array):
        codecs = array.metadata.codecs
        if array.ndim != 1 or len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            raise ValueError(f"{array.path}: not a 1-D sharded array")
        inner = codecs[0].codecs
        if not (len(inner) == 2 and isinstance(inner[0], BytesCodec) and isinstance(inner[1], BloscCodec)):
            raise ValueError(f"{array.path}: inner codecs {inner} are not bytes+blosc")
        self.size = int(array.shape[0])
        self.shard = int(array.shards[0])
        self.chunk = int(array.chunks[0])
        self.per_shard = self.shard // self.chunk
        self.dtype = np.dtype(array.dtype.to_native_dtype() if hasattr(array.dtype, "to_native_dtype") else array.dtype)
        self.fill = array.fill_value
        self._store = array.store_path.store
        self._prefix = array.store_path.path
        self._meta = array.metadata
        self._codec = numcodecs.Blosc()
        self._index = functools.lru_cache(maxsize=64)(self._load_index)
        self.requests = 0
        self.bytes_read = 0

    def _key(self, shard: int) -> str:
        chunk_key = self._meta.encode_chunk_key((shard,))
        return f"{self._prefix}/{chunk_key}" if self._prefix else chunk_key  # an array at the store root

    def _get(self, key: str, byte_range) -> bytes | None:
        buf = sync(self._store.get(key, default_buffer_prototype(), byte_range=byte_range))
        self.requests += 1
        if buf is None:
            return None
        raw = buf.to_bytes()
        self.bytes_read += len(raw)
        return raw

    def _load_index(self, shard: int) -> np.ndarray | None:
        nbytes = 16 * self.per_shard + 4
        raw = self._get(self._key(shard), SuffixByteRequest(nbytes))
        if raw is None:
            return None
        return np.frombuffer(raw[: 16 * self.per_shard], dtype="<u8").reshape(self.per_shard, 2)

    def read(self, start: int, stop: int) -> np.ndarray:
        start, stop = max(0, int(start)), min(self.size, int(stop))
        out = np.empty(max(0, stop - start), dtype=self.dtype)
        if stop <= start:
            return out
        first, last = start // self.chunk, (stop - 1) // self.chunk
        c = first
        while c <= last:
            shard = c // self.per_shard
            c_end = min(last, (shard + 1) * self.per_shard - 1)  # inner chunks of this shard we need
            self._read_shard_chunks(shard, c, c_end, start, stop, out)
            c = c_end + 1
        return out

    def _read_shard_chunks(self, shard: int, c0: int, c1: int, start: int, stop: int, out: np.ndarray) -> None:
        index = self._index(shard)
        local = np.arange(c0, c1 + 1) - shard * self.per_shard
        entries = None if index is None else index[local]
        present = entries is not None and bool(np.all(entries[:, 0] != _EMPTY))
        blob = b""
        base = 0
        if present:
            base = int(entries[:, 0].min())
            end = int((entries[:, 0] + entries[:, 1]).max())
            blob = self._get(self._key(shard), RangeByteRequest(base, end)) or b""
        view = memoryview(blob)
        for i, c in enumerate(range(c0, c1 + 1)):
            lo, hi = max(start, c * self.chunk), min(stop, (c + 1) * self.chunk)
            target = out[lo - start : hi - start]
            if not present:
                target[:] = self.fill
                continue
            off, n = int(entries[i, 0]) - base, int(entries[i, 1])
            if hi - lo == self.chunk:
                # a whole chunk: decode straight into the result, no temporary (allocations are
                # costly in dask workers, which run with a low malloc trim threshold)
                self._codec.decode(view[off : off + n], out=target)
            else:
                values = np.frombuffer(self._codec.decode(view[off : off + n]), dtype=self.dtype)
                target[:] = values[lo - c * self.chunk : hi - c * self.chunk]
