"""Parallel decoding of gzip-compressed HDF5 datasets.

h5py decodes chunks one at a time while holding its global lock, so a single process reads a
Bgee file on one core. The chunks themselves are plain zlib streams at addresses HDF5 lists
(``chunk_iter``), so we read them with ``os.preadv`` (no lock, a run of neighbouring chunks per
read) and inflate them with libdeflate, called through ctypes straight into the destination
array: the GIL is released for the whole inflate, and no intermediate bytes object is made
or copied. libdeflate inflates Bgee's chunks about twice as fast as zlib (0.32 s against
0.64 s for the 70 MB of one 25k-cell file's indices, one core). Once numba has loaded it, a
small kernel calls libdeflate for a whole run of chunks without the GIL (``_inflate_chunks``).
Datasets whose filter pipeline we do not understand, or files h5py does not read through the
plain file driver, are read through h5py, which is slower but always correct.
"""

from __future__ import annotations

import ctypes
import os
import threading
import zlib
from concurrent.futures import Executor

import h5py
import numpy as np
from deflate import _deflate

from .._jit import numba
from .._runtime import map_on

_DEFLATE = h5py.h5z.FILTER_DEFLATE
_SHUFFLE = h5py.h5z.FILTER_SHUFFLE
#: Chunks decoded per thread-pool task (and read with one system call when they are neighbours).
_CHUNKS_PER_TASK = 48
#: The same once the inflate kernel is loaded: a task takes the GIL a few times, not once per chunk, so
#: fewer, longer tasks wait less for it (one 25k-cell file, 2 threads, beside a thread that holds the
#: GIL: 2.1 s with 48, 1.2 s with 256; alone 0.25 s either way, 0.41 s with 512, too few tasks).
_CHUNKS_PER_JIT_TASK = 256
#: Bytes of other data between two chunks up to which they are still read in one system call.
_GAP_BYTES = 1 << 16


def _libdeflate() -> tuple[ctypes._CFuncPtr, ctypes._CFuncPtr, ctypes._CFuncPtr]:
    """libdeflate's decompressor API, from the copy the ``deflate`` package links in."""
    lib = ctypes.CDLL(_deflate.__file__)
    alloc, free, inflate = (
        lib.libdeflate_alloc_decompressor,
        lib.libdeflate_free_decompressor,
        lib.libdeflate_zlib_decompress,
    )
    alloc.argtypes, alloc.restype = [], ctypes.c_void_p
    free.argtypes, free.restype = [ctypes.c_void_p], None
    # (decompressor, in, in_nbytes, out, out_nbytes_avail, actual_out_nbytes_ret): 0 on success
    pointer, size = ctypes.c_void_p, ctypes.c_size_t
    inflate.argtypes = [pointer, pointer, size, pointer, size, pointer]
    inflate.restype = ctypes.c_int
    return alloc, free, inflate


_ALLOC_DECOMPRESSOR, _FREE_DECOMPRESSOR, _ZLIB_INFLATE = _libdeflate()

#: The same libdeflate function typed with addresses as integers, so that numba can call it with
#: array addresses (``_inflate_chunks``).
_ZLIB_INFLATE_AT = ctypes.CFUNCTYPE(ctypes.c_int, *[ctypes.c_uint64] * 6)(
    ctypes.cast(_ZLIB_INFLATE, ctypes.c_void_p).value
)


@numba.njit(nogil=True, cache=True)
def _inflate_chunks(
    inflate, decompressor, raw, src_offsets, src_sizes, out, out_offsets, chunk_bytes
):  # pragma: no cover - jit
    """Inflate chunk ``j`` from ``raw[src_offsets[j]:][:src_sizes[j]]`` to byte ``out_offsets[j]`` of ``out``.

    The whole loop runs without the GIL. Called from Python once per chunk, the inflate gave the
    GIL back and took it again for every chunk (4,128 times for one 25k-cell file), and while
    another thread reads obs and var (Python, holding the GIL) each taking waited: decoding a
    file took 0.45-0.5 s instead of 0.27 s. Returns the first chunk that failed, or -1.
    """
    src = raw.ctypes.data
    dst = out.ctypes.data
    for j in range(src_offsets.shape[0]):
        if inflate(decompressor, src + src_offsets[j], src_sizes[j], dst + out_offsets[j], chunk_bytes, 0) != 0:
            return j
    return -1


_JIT_READY = threading.Event()


def warm_up_inflate() -> None:
    """Load ``_inflate_chunks``'s machine code (numba's cache), then let decoding use it.

    Until then chunks are inflated from Python: the first call of a process, with numba's own
    start, costs 0.3-0.4 s, which the first file's decode would otherwise wait for.
    """
    if _JIT_READY.is_set():
        return
    data = np.arange(4, dtype=np.uint8)
    # writable, as the decoder's buffers are: a read-only array would load a second specialization
    packed = np.frombuffer(zlib.compress(data.tobytes()), dtype=np.uint8).copy()
    out = np.zeros(4, dtype=np.uint8)
    decompressor = _ALLOC_DECOMPRESSOR()
    try:
        one = np.zeros(1, dtype=np.int64)
        failed = _inflate_chunks(
            _ZLIB_INFLATE_AT, decompressor, packed, one, np.full(1, packed.size, np.int64), out, one, 4
        )
    finally:
        _FREE_DECOMPRESSOR(decompressor)
    if failed == -1 and np.array_equal(out, data):
        _JIT_READY.set()


def _filter_ids(ds: h5py.Dataset) -> list[int]:
    plist = ds.id.get_create_plist()
    return [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]


class ChunkedReader:
    """Reads ranges of a 1-D HDF5 dataset, decoding its chunks on a thread pool.

    ``close`` releases the file descriptor the fast path reads through.
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
        # The fast path needs deflate (optionally after shuffle) and nothing else, in a plain file.
        self.fast = (
            bool(self.chunk)
            and _DEFLATE in filters
            and set(filters) <= {_DEFLATE, _SHUFFLE}
            and ds.file.driver == "sec2"
        )
        self._fd: int | None = None
        self._table: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

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
        self._open()
        first, last = start // self.chunk, (stop - 1) // self.chunk
        per_task = _CHUNKS_PER_JIT_TASK if _JIT_READY.is_set() else _CHUNKS_PER_TASK
        runs = [(i, min(last + 1, i + per_task)) for i in range(first, last + 1, per_task)]

        map_on(self.executor, lambda run: self._decode_run(run[0], run[1], start, stop, out), runs)
        return out

    def _open(self) -> None:
        """The file descriptor and the chunk table (address, size, filter mask per chunk), once."""
        if self._fd is None:
            self._fd = os.open(self.ds.file.filename, os.O_RDONLY)
        if self._table is not None:
            return
        n_chunks = -(-self.size // self.chunk)
        offsets = np.zeros(n_chunks, dtype=np.int64)
        sizes = np.full(n_chunks, -1, dtype=np.int64)  # -1: never written (reads as the fill value)
        masks = np.zeros(n_chunks, dtype=np.int64)

        def visit(info) -> None:
            i = info.chunk_offset[0] // self.chunk
            offsets[i], sizes[i], masks[i] = info.byte_offset, info.size, info.filter_mask

        # chunk_iter walks the chunk index once; get_chunk_info(i) per chunk would be quadratic.
        self.ds.id.chunk_iter(visit)
        self._table = offsets, sizes, masks

    def _decode_run(self, i0: int, i1: int, start: int, stop: int, out: np.ndarray) -> None:
        """Chunks ``[i0, i1)``, clipped to ``[start, stop)``, into ``out`` (which holds ``start`` onwards)."""
        assert self._table is not None and self._fd is not None
        offsets, sizes, masks = (a[i0:i1] for a in self._table)
        raw, at = self._read_raw(offsets, sizes)
        itemsize = self.dtype.itemsize
        direct_ok = out.flags.c_contiguous
        decompressor = _ALLOC_DECOMPRESSOR()
        if not decompressor:
            raise MemoryError("libdeflate could not allocate a decompressor")
        try:
            todo = range(i0, i1)
            if direct_ok and _JIT_READY.is_set():
                todo = self._inflate_plain(decompressor, raw, at, i0, i1, start, stop, out)
            if not todo:
                return
            scratch = np.empty(self.chunk, dtype=self.dtype)
            unshuffled = np.empty(self.chunk, dtype=self.dtype) if self._shuffle else None
            for i in todo:
                j = i - i0
                c0 = i * self.chunk
                a, b = max(start, c0), min(stop, c0 + self.chunk)
                size, mask = int(sizes[j]), int(masks[j])
                shuffled = self._shuffle and size >= 0 and not mask & self._shuffle_bit
                whole = direct_ok and a == c0 and b == c0 + self.chunk and not shuffled
                target = out[a - start : b - start] if whole else scratch
                if size < 0:
                    target[:] = self.ds.fillvalue
                else:
                    self._inflate_into(decompressor, raw[int(at[j]) : int(at[j]) + size], target, mask)
                if shuffled:
                    assert unshuffled is not None
                    unshuffled.view(np.uint8).reshape(-1, itemsize)[:] = scratch.view(np.uint8).reshape(itemsize, -1).T
                    target = unshuffled
                if not whole:
                    out[a - start : b - start] = target[a - c0 : b - c0]
        finally:
            _FREE_DECOMPRESSOR(decompressor)

    def _read_raw(self, offsets: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The stored bytes of these chunks in one buffer, and where in it each chunk starts.

        Neighbouring chunks (the usual case) come in one read; a gap of more than ``_GAP_BYTES``
        (other datasets' chunks in between: files written block by block) starts another read
        into the same buffer. Chunks never written (size -1) get position 0 and are not read.
        """
        at = np.zeros(len(offsets), dtype=np.int64)
        stored = np.flatnonzero(sizes >= 0)
        if not stored.size:
            return np.empty(0, dtype=np.uint8), at
        order = stored[np.argsort(offsets[stored], kind="stable")]
        begin, end = offsets[order], offsets[order] + sizes[order]
        reach = np.maximum.accumulate(end)
        new_read = np.ones(len(order), dtype=bool)
        new_read[1:] = begin[1:] > reach[:-1] + _GAP_BYTES
        first = np.flatnonzero(new_read)
        last_end = np.maximum.reduceat(end, first)
        spans = last_end - begin[first]
        raw = np.empty(int(spans.sum()), dtype=np.uint8)
        place = np.concatenate([[0], np.cumsum(spans)[:-1]])
        for read_start, span, pos in zip(begin[first].tolist(), spans.tolist(), place.tolist(), strict=True):
            self._pread(raw[pos : pos + span], read_start)
        read_of = np.cumsum(new_read) - 1
        at[order] = place[read_of] + (begin - begin[first][read_of])
        return raw, at

    def _inflate_plain(
        self,
        decompressor: int,
        raw: np.ndarray,
        at: np.ndarray,
        i0: int,
        i1: int,
        start: int,
        stop: int,
        out: np.ndarray,
    ) -> list[int]:
        """Inflate the run's plain chunks (whole, deflated, not shuffled) in one GIL-free call.

        Returns the chunks left for the per-chunk path: the run's edges, chunks stored as they
        are or never written, shuffled ones, and, if one fails to inflate, it and those after it
        (that path raises the error with zlib's message).
        """
        assert self._table is not None
        _, sizes, masks = (a[i0:i1] for a in self._table)
        first_value = np.arange(i0, i1, dtype=np.int64) * self.chunk
        plain = (sizes >= 0) & (first_value >= start) & (first_value + self.chunk <= stop)
        plain &= (masks & self._deflate_bit) == 0
        if self._shuffle:
            plain &= (masks & self._shuffle_bit) != 0  # shuffle skipped for this chunk
        which = np.flatnonzero(plain)
        failed = -1
        if which.size:
            failed = _inflate_chunks(
                _ZLIB_INFLATE_AT,
                decompressor,
                raw,
                at[which],
                sizes[which],
                out.view(np.uint8),
                (first_value[which] - start) * self.dtype.itemsize,
                self._chunk_bytes,
            )
        if failed >= 0:
            plain[which[failed] :] = False
        return (np.flatnonzero(~plain) + i0).tolist()

    def _pread(self, buf: np.ndarray, offset: int) -> np.ndarray:
        assert self._fd is not None
        got = os.preadv(self._fd, [buf], offset)
        if got != buf.size:
            raise OSError(f"{self.ds.file.filename}: {self.ds.name} ends early (truncated file?)")
        return buf

    def _inflate_into(self, decompressor: int, src: np.ndarray, target: np.ndarray, mask: int) -> None:
        """One stored chunk's bytes, decoded, into ``target`` (exactly one chunk of values)."""
        n = self._chunk_bytes
        if mask & self._deflate_bit:  # deflate was skipped: the chunk is stored as it is
            if src.size != n:
                raise OSError(f"{self.ds.file.filename}: {self.ds.name} has a chunk of {src.size} bytes, not {n}")
            target.view(np.uint8)[:] = src
            return
        rc = _ZLIB_INFLATE(decompressor, src.ctypes.data, src.size, target.ctypes.data, n, None)
        if rc != 0:
            # zlib's message says what is wrong with the stream (or it decodes a stream that
            # libdeflate, stricter, rejects)
            decoded = zlib.decompress(src.tobytes())
            if len(decoded) != n:
                raise OSError(f"{self.ds.file.filename}: {self.ds.name} has a chunk of {len(decoded)} bytes, not {n}")
            target.view(np.uint8)[:] = np.frombuffer(decoded, dtype=np.uint8)
