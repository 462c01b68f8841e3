"""Parallel decoding of gzip-compressed HDF5 datasets.

h5py decodes chunks one at a time while holding its global lock, so a single process reads a
Bgee file on one core. The chunks themselves are plain zlib streams: reading them raw
(``read_direct_chunk``) is nearly free, and inflating releases the GIL, so a thread pool
decodes one file on every core. Inflating is most of a conversion's work, so it goes through
libdeflate, which inflates Bgee's chunks about twice as fast as zlib (0.32 s against 0.64 s
for the 70 MB of one 25k-cell file's indices, one core). Datasets whose filter pipeline we do
not understand are read through h5py, which is slower but always correct.
"""

from __future__ import annotations

import zlib
from concurrent.futures import Executor

import deflate
import h5py
import numpy as np

_DEFLATE = h5py.h5z.FILTER_DEFLATE
_SHUFFLE = h5py.h5z.FILTER_SHUFFLE
#: Chunks decoded per thread-pool task.
_CHUNKS_PER_TASK = 16


def _filter_ids(ds: h5py.Dataset) -> list[int]:
    plist = ds.id.get_create_plist()
    return [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]


class ChunkedReader:
    """Reads ranges of a 1-D HDF5 dataset, decoding its chunks on a thread pool."""

    def __init__(self, ds: h5py.Dataset, executor: Executor | None = None):
        if ds.ndim != 1:
            raise ValueError(f"{ds.name}: expected a 1-D dataset, got shape {ds.shape}")
        self.ds = ds
        self.size = int(ds.shape[0])
        self.dtype = ds.dtype
        self.executor = executor
        filters = _filter_ids(ds) if ds.chunks else []
        self.chunk = int(ds.chunks[0]) if ds.chunks else 0
        self._shuffle = _SHUFFLE in filters
        # bit i of a chunk's filter mask says filter i of the pipeline was skipped for it
        self._deflate_bit = 1 << filters.index(_DEFLATE) if _DEFLATE in filters else 0
        self._shuffle_bit = 1 << filters.index(_SHUFFLE) if self._shuffle else 0
        # The fast path needs deflate (optionally after shuffle) and nothing else.
        self.fast = bool(self.chunk) and _DEFLATE in filters and set(filters) <= {_DEFLATE, _SHUFFLE}
        self._stored_chunks: set[int] | None = None

    def _decode(self, raw: bytes, filter_mask: int) -> np.ndarray:
        itemsize = self.dtype.itemsize
        buf = raw if filter_mask & self._deflate_bit else _inflate(raw, self.chunk * itemsize)
        arr = np.frombuffer(buf, dtype=np.uint8)
        if self._shuffle and not filter_mask & self._shuffle_bit:
            arr = arr.reshape(itemsize, -1).T.reshape(-1)
        return arr.view(self.dtype)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Values ``[start, stop)`` as a new array."""
        start, stop = max(0, int(start)), min(self.size, int(stop))
        if stop <= start:
            return np.empty(0, dtype=self.dtype)
        if not self.fast:
            return self.ds[start:stop]
        return self.read_into(start, stop, np.empty(stop - start, dtype=self.dtype))

    def read_into(self, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        """Values ``[start, stop)`` written into ``out`` (of this dataset's dtype), which is returned.

        Decoding into the caller's array saves a copy and, more, the page faults of a fresh array.
        """
        start, stop = max(0, int(start)), min(self.size, int(stop))
        if out.shape != (max(0, stop - start),) or out.dtype != self.dtype:
            raise ValueError(f"{self.ds.name}: read_into needs {stop - start} values of {self.dtype}")
        if stop <= start:
            return out
        if not self.fast:
            self.ds.read_direct(out, np.s_[start:stop])
            return out
        first, last = start // self.chunk, (stop - 1) // self.chunk

        def place(jobs: list[tuple[int, tuple[int, bytes | None]]]) -> None:
            for i, raw in jobs:
                chunk = self._decode_raw(raw)
                c0 = i * self.chunk
                lo, hi = max(start, c0), min(stop, c0 + self.chunk)
                out[lo - start : hi - start] = chunk[lo - c0 : hi - c0]

        # Fetching raw bytes goes through h5py's lock; do it here, decode and place in the pool,
        # a run of chunks per task (one task per ~70 KB chunk spent more in futures than in work).
        jobs = [(i, self._raw(i)) for i in range(first, last + 1)]
        if self.executor is not None and len(jobs) > 1:
            runs = [jobs[k : k + _CHUNKS_PER_TASK] for k in range(0, len(jobs), _CHUNKS_PER_TASK)]
            for _ in self.executor.map(place, runs):
                pass
        else:
            place(jobs)
        return out

    def _raw(self, index: int) -> tuple[int, bytes | None]:
        if self._stored_chunks is None:
            self._stored_chunks = self._list_stored_chunks()
        if index not in self._stored_chunks:
            return 0, None
        return self.ds.id.read_direct_chunk((index * self.chunk,))

    def _list_stored_chunks(self) -> set[int]:
        # chunk_iter walks the chunk index once; get_chunk_info(i) per chunk would be quadratic.
        stored: set[int] = set()
        self.ds.id.chunk_iter(lambda info: stored.add(info.chunk_offset[0] // self.chunk))
        return stored

    def _decode_raw(self, item: tuple[int, bytes | None]) -> np.ndarray:
        filter_mask, raw = item
        if raw is None:
            return np.full(self.chunk, self.ds.fillvalue, dtype=self.dtype)
        return self._decode(raw, filter_mask)


def _inflate(raw: bytes, size: int) -> bytes | bytearray:
    """A chunk's bytes; HDF5 chunks inflate to at most ``size`` bytes.

    A stream libdeflate rejects goes to zlib, whose error message says what is wrong with it
    (or which decodes it, should libdeflate be stricter than zlib about some valid stream).
    """
    try:
        return deflate.zlib_decompress(raw, size)
    except deflate.DeflateError:
        return zlib.decompress(raw)
