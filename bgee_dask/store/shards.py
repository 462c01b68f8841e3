"""Writing whole shards of a 1-D zarr v3 array, encoding inner chunks on a thread pool.

zarr-python encodes the chunks of a shard one after another on its event-loop thread, which
caps a conversion at one core. The sharding format is small and specified (zarr v3 sharding
codec: encoded inner chunks, then an index of (offset, nbytes) pairs protected by crc32c), so
we assemble shards ourselves and hand the bytes to the array's own store. Reading stays with
zarr; tests check that zarr reads back exactly what was written.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor

import numcodecs
import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from .._runtime import map_on
from .layout import BloscSettings
from .scratch import Lease

_EMPTY = np.uint64(2**64 - 1)
#: O_DIRECT needs buffers, lengths and offsets aligned to the device's block size; 4 KiB covers them.
_ALIGN = 4096
#: Inner chunks encoded per thread-pool task.
_PIECES_PER_TASK = 8
#: Whether to try O_DIRECT; turned off for the process at the first file system that refuses it.
_DIRECT = {"ok": hasattr(os, "O_DIRECT")}


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
    ``writable()`` and call ``advance``; others ``append``. Those that can produce any range of
    values on demand use ``write_gathered_shard``, which needs no shard buffers at all.
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
        self._scratch = scratch
        self._buffers: list[np.ndarray] = []  # allocated at the first values given one by one (writable, append)
        self._current = 0  # the buffer being filled
        self._filled = 0  # values in it
        self._next_shard = 0
        self.bytes_written = 0
        store_path = array.store_path
        self._store = store_path.store
        self._prefix = store_path.path
        # shards of a local store are written by us, with O_DIRECT where the file system allows
        self._local_root = str(self._store.root) if isinstance(self._store, zarr.storage.LocalStore) else None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="bgee-dask-shard")
        self._pending: Future | None = None
        self._out: np.ndarray | None = None  # the encoded shard, reused (bytes)

    @property
    def _handed(self) -> int:
        """Values of the shards handed to the writer thread (all full but the array's last)."""
        return min(self._next_shard * self.shard, self.size)

    @property
    def written(self) -> int:
        """Values received so far."""
        return self._handed + self._filled

    def _shard_buffers(self) -> list[np.ndarray]:
        if not self._buffers:
            allocate = self._scratch.empty if self._scratch is not None else np.empty
            n_buffers = 2 if self.size > self.shard else 1
            self._buffers = [allocate(min(self.size, self.shard), self.dtype) for _ in range(n_buffers)]
        return self._buffers

    def _wait(self) -> None:
        """Let the shard being written finish (and raise its error, if it failed)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def writable(self) -> np.ndarray:
        """Where the next values go: the free rest of the shard being assembled (never empty before the end)."""
        room = min(self.shard, self.size - self._handed) - self._filled
        return self._shard_buffers()[self._current][self._filled : self._filled + room]

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

    def stop(self) -> None:
        """Wait for the shard being written, without writing more: after a failure, before the store is removed."""
        self._writer.shutdown(wait=True)

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

    def _put_encoded(self, encoded: list[bytes], n: int) -> None:
        """Take the next shard as its ``n`` values' encoded chunks (see ``write_gathered_shard``)."""
        if self._filled or self.written + n > self.size:
            raise RuntimeError(f"{self.array.path}: a whole shard cannot follow a partial one, nor overflow")
        index = self._next_shard
        self._next_shard += 1
        self._wait()
        self._pending = self._writer.submit(self._write_encoded, index, encoded)

    def _write_shard(self, index: int, values: np.ndarray) -> None:
        self._write_encoded(index, self._encode_pieces(values))

    def _write_encoded(self, index: int, encoded: list[bytes]) -> None:
        room, size = self._assemble(encoded)
        chunk_key = self.array.metadata.encode_chunk_key((index,))
        # an array at the store root has an empty path: "/c/0" would escape the store
        key = f"{self._prefix}/{chunk_key}" if self._prefix else chunk_key
        if self._local_root is not None:
            write_file(os.path.join(self._local_root, key), room, size)
        else:
            buf = default_buffer_prototype().buffer.from_bytes(room[:size])
            sync(self._store.set(key, buf))
        self.bytes_written += size

    def _encode_pieces(self, values: np.ndarray) -> list[bytes]:
        """The shard's values as encoded chunks, encoded on the executor's threads."""
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
        # a few pieces per task: one task per 512 KiB piece cost a thread wake-up per piece
        groups = [pieces[i : i + _PIECES_PER_TASK] for i in range(0, len(pieces), _PIECES_PER_TASK)]
        return [blob for group in map_on(self.executor, lambda g: [encode(p) for p in g], groups) for blob in group]

    def _assemble(self, encoded: list[bytes]) -> tuple[memoryview, int]:
        """The shard's bytes, at the start of a buffer reused for every shard (valid until the next
        call), and their number. The buffer starts on a 4 KiB boundary and has room beyond the
        bytes up to the next one (see ``write_file``)."""
        per_shard = self.shard // self.chunk
        index = np.full((per_shard, 2), _EMPTY, dtype="<u8")
        offset = 0
        for i, blob in enumerate(encoded):
            index[i] = (offset, len(blob))
            offset += len(blob)
        index_bytes = index.tobytes()
        total = offset + len(index_bytes) + 4
        if self._out is None or self._out.size < total + 2 * _ALIGN:
            if self._out is not None and self._scratch is not None:
                self._scratch.give_back(self._out)
            # room for a whole shard that does not compress at all, so this happens once per array
            worst = per_shard * (self.chunk * self.dtype.itemsize + 32) + len(index_bytes) + 4
            allocate = self._scratch.empty if self._scratch is not None else np.empty
            self._out = allocate(max(total, worst) + 2 * _ALIGN, np.dtype(np.uint8))
        out = memoryview(self._out)[-self._out.ctypes.data % _ALIGN :]
        pos = 0
        for blob in (*encoded, index_bytes, _crc32c(index_bytes)):
            out[pos : pos + len(blob)] = blob
            pos += len(blob)
        return out, total


_CHUNK_BUFFERS = threading.local()


def _chunk_buffer(slot: int, chunk: int, dtype: np.dtype) -> np.ndarray:
    """A chunk-sized array of this thread's, kept for its later chunks (a file's pool threads end with the file)."""
    buffers = getattr(_CHUNK_BUFFERS, "arrays", None)
    if buffers is None:
        buffers = _CHUNK_BUFFERS.arrays = {}
    key = (slot, chunk, dtype.str)
    if key not in buffers:
        buffers[key] = np.empty(chunk, dtype=dtype)
    return buffers[key]


def write_gathered_shard(writers: Sequence[ShardWriter], fill: Callable[[int, list[np.ndarray]], None]) -> int:
    """Write the next shard of each writer, produced chunk by chunk; the number of values per array (0 at the end).

    ``fill(start, outs)`` puts values ``[start, start + len(outs[0]))`` of each array into
    ``outs``. Each chunk is gathered into small arrays of the thread's and encoded at once, while
    it is in the core's cache, instead of gathering a whole shard into memory (two 32 MB buffers
    per array, fresh memory for a process's first file) and reading it back to encode it. The
    writers' arrays must have the same length, shard and chunk sizes, and no values given to
    them one by one yet.
    """
    first = writers[0]
    if any((w.size, w.shard, w.chunk) != (first.size, first.shard, first.chunk) for w in writers):
        raise ValueError("write_gathered_shard needs arrays cut alike")
    start, chunk = first.written, first.chunk
    n = min(first.shard, first.size - start)
    if n <= 0:
        return 0

    def encode(chunk_starts: range) -> list[list[bytes]]:
        outs = [_chunk_buffer(i, chunk, w.dtype) for i, w in enumerate(writers)]
        blobs: list[list[bytes]] = []
        for c0 in chunk_starts:
            m = min(chunk, start + n - c0)
            fill(c0, [out[:m] for out in outs])
            for w, out in zip(writers, outs, strict=True):
                out[m:] = w.fill  # the array's last chunk is padded to full size, as zarr does
            blobs.append([w.codec.encode(out) for w, out in zip(writers, outs, strict=True)])
        return blobs

    starts = range(start, start + n, chunk)
    groups = [starts[i : i + _PIECES_PER_TASK] for i in range(0, len(starts), _PIECES_PER_TASK)]
    encoded = [blobs for group in map_on(first.executor, encode, groups) for blobs in group]
    for i, w in enumerate(writers):
        w._put_encoded([blobs[i] for blobs in encoded], n)
    return n


def write_file(path: str, room: memoryview, size: int) -> None:
    """Write the first ``size`` bytes of ``room`` as the file ``path``.

    With O_DIRECT where the file system takes it: the bytes go from our reused buffer to the
    device instead of being copied into freshly allocated page-cache pages. On these virtual
    machines that copy ran at ~0.5 GB/s and was a tenth of a conversion's CPU (dd: 0.43 GB/s
    buffered, 1.2 GB/s direct); a direct write costs almost no CPU and waits on the writer
    thread. O_DIRECT needs the buffer, length and offset aligned to the device's block size:
    ``room`` starts on a 4 KiB boundary, the write is padded to a multiple of 4 KiB from the
    room beyond ``size``, and the file is then cut back to ``size``. A file system that refuses
    O_DIRECT (tmpfs) or the alignment gets an ordinary write, and so do the later files.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if _DIRECT["ok"]:
        padded = -(-size // _ALIGN) * _ALIGN
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            _DIRECT["ok"] = False
        else:
            try:
                written = 0
                while written < padded:
                    written += os.write(fd, room[written:padded])
                os.ftruncate(fd, size)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                _DIRECT["ok"] = False
            finally:
                os.close(fd)
    with open(path, "wb") as fh:
        fh.write(room[:size])
