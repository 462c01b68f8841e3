"""Parallel decoding of gzip-compressed HDF5 datasets, through h5py's and libdeflate's public APIs.

h5py decodes chunks one at a time while holding its global lock, so slicing a dataset reads a
Bgee file on one core. Instead each chunk's stored bytes are fetched with h5py's public
``DatasetID.read_direct_chunk`` (a short read under that lock) and inflated with the ``deflate``
package's ``zlib_decompress`` (libdeflate, which releases the GIL), on the executor's threads (on the caller's
when there is none). Datasets whose filter pipeline is anything but deflate, optionally after
shuffle, are read through h5py slicing, which decodes on one core but is always correct.
"""

from __future__ import annotations

import zlib
from concurrent.futures import Executor

import deflate
import h5py
import numpy as np

from bgee_dask._runtime import map_on

_DEFLATE = h5py.h5z.FILTER_DEFLATE
_SHUFFLE = h5py.h5z.FILTER_SHUFFLE
#: Chunks decoded per thread-pool task: enough work per task that scheduling is noise, and enough
#: tasks that the threads share a range evenly.
_CHUNKS_PER_TASK = 64


def _filter_ids(ds: h5py.Dataset) -> list[int]:
    plist = ds.id.get_create_plist()
    return [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]


class ChunkedReader:
    """Reads ranges of a 1-D HDF5 dataset, decoding its chunks on ``executor``'s threads.

    ``fast`` says whether chunks are decoded here (deflate, optionally after shuffle, and no other
    filter); otherwise ranges are read through h5py. The reader holds no resource of its own:
    ``close`` exists for callers that release readers explicitly, and does nothing.
    """

    def __init__(self, ds: h5py.Dataset, executor: Executor | None = None):
        if ds.ndim != 1:
            raise ValueError(f"{ds.name}: expected a 1-D dataset, got shape {ds.shape}")
        self.ds = ds
        self.size = int(ds.shape[0])
        self.dtype = ds.dtype
        self.executor = executor
        filters = _filter_ids(ds) if ds.chunks else []
        self.chunk = int(ds.chunks[0]) if ds.chunks else 0
        self._chunk_bytes = self.chunk * self.dtype.itemsize
        self._shuffle = _SHUFFLE in filters
        # bit i of a chunk's filter mask says filter i of the pipeline was skipped for it
        self._deflate_bit = 1 << filters.index(_DEFLATE) if _DEFLATE in filters else 0
        self._shuffle_bit = 1 << filters.index(_SHUFFLE) if self._shuffle else 0
        self.fast = bool(self.chunk) and _DEFLATE in filters and set(filters) <= {_DEFLATE, _SHUFFLE}

    def close(self) -> None:
        """Nothing to release (see the class docstring)."""

    def read(self, start: int, stop: int) -> np.ndarray:
        """Values ``[start, stop)`` (clipped to the dataset) as a new array."""
        start, stop = max(0, int(start)), min(self.size, int(stop))
        if stop <= start:
            return np.empty(0, dtype=self.dtype)
        if not self.fast:
            return self.ds[start:stop]
        return self.read_into(start, stop, np.empty(stop - start, dtype=self.dtype))

    def read_into(self, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        """Values ``[start, stop)`` (clipped) written into ``out``, which is returned.

        ``out`` must hold exactly that many values of this dataset's dtype (``ValueError``
        otherwise). A damaged deflate stream raises ``zlib.error``.
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
        runs = [(i, min(last + 1, i + _CHUNKS_PER_TASK)) for i in range(first, last + 1, _CHUNKS_PER_TASK)]
        map_on(self.executor, lambda run: self._decode_run(run[0], run[1], start, stop, out), runs)
        return out

    def _decode_run(self, i0: int, i1: int, start: int, stop: int, out: np.ndarray) -> None:
        """Chunks ``[i0, i1)``, clipped to ``[start, stop)``, into ``out`` (which holds ``start`` onwards)."""
        for i in range(i0, i1):
            c0 = i * self.chunk
            a, b = max(start, c0), min(stop, c0 + self.chunk)
            out[a - start : b - start] = self._chunk_values(c0)[a - c0 : b - c0]

    def _chunk_values(self, c0: int) -> np.ndarray:
        """The decoded values of the chunk starting at value ``c0`` (a whole chunk's worth)."""
        try:
            mask, raw = self.ds.id.read_direct_chunk((c0,))
        except RuntimeError:
            if self.ds.id.get_chunk_info_by_coord((c0,)).byte_offset is not None:
                raise
            return np.full(self.chunk, self.ds.fillvalue, dtype=self.dtype)  # never written
        if mask & self._deflate_bit:  # deflate was skipped: the chunk is stored as it is
            data = raw
        else:
            try:
                data = deflate.zlib_decompress(raw, self._chunk_bytes)
            except deflate.DeflateError:
                # zlib's message says what is wrong with the stream (or it decodes a stream that
                # libdeflate, stricter, rejects)
                data = zlib.decompress(raw)
        if len(data) != self._chunk_bytes:
            where = f"{self.ds.file.filename}: {self.ds.name}"
            raise OSError(f"{where} has a chunk of {len(data)} bytes, not {self._chunk_bytes}")
        values = np.frombuffer(data, dtype=self.dtype)
        if self._shuffle and not mask & self._shuffle_bit:
            itemsize = self.dtype.itemsize
            bytes_ = np.frombuffer(data, dtype=np.uint8).reshape(itemsize, -1).T
            values = np.ascontiguousarray(bytes_).view(self.dtype).reshape(-1)
        return values
