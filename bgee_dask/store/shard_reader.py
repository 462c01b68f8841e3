"""Reading ranges of the 1-D sharded arrays that ``ShardWriter`` wrote, on the calling thread.

zarr-python decodes on its event-loop thread, so concurrent reads from Dask's worker threads
queue up behind one core (measured: two threads read slower than one). Here the I/O still
goes through the zarr store (local disk and object stores alike): one request for a shard's
index, cached, and one ranged request per contiguous run of inner chunks; decoding happens in
the thread that asked, with the GIL released by blosc.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os

import numcodecs
import numpy as np
import zarr
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.codecs import BloscCodec, BytesCodec, ShardingCodec, VLenUTF8Codec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.metadata.v3 import ArrayV3Metadata
from zarr.core.sync import sync
from zarr.storage import LocalStore

_EMPTY = 2**64 - 1


def read_local_range(path: os.PathLike, byte_range: RangeByteRequest | SuffixByteRequest | None) -> bytes | None:
    """A file's bytes in the range zarr would ask its LocalStore for (all for None); None if there is no file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    try:
        if byte_range is None:
            start, length = 0, os.fstat(fd).st_size
        elif isinstance(byte_range, SuffixByteRequest):
            size = os.fstat(fd).st_size
            start, length = max(0, size - byte_range.suffix), min(size, byte_range.suffix)
        else:
            start, length = byte_range.start, byte_range.end - byte_range.start
        return os.pread(fd, length, start)
    finally:
        os.close(fd)


def fetch(
    store: zarr.abc.store.Store, requests: list[tuple[str, RangeByteRequest | SuffixByteRequest | None]]
) -> list[bytes | None]:
    """Objects (or byte ranges of them) of a store, None for those that do not exist.

    A local store's files are read here directly: through zarr each read is two thread hand-offs
    (its event loop, then a file-reading thread), ~1 ms apiece on a busy worker. Other stores get
    all the requests in one round trip to zarr's event loop, which issues them concurrently.
    """
    if isinstance(store, LocalStore):
        return [read_local_range(store.root / key, byte_range) for key, byte_range in requests]

    async def all_of_them() -> list:
        prototype = default_buffer_prototype()
        return list(await asyncio.gather(*(store.get(k, prototype, byte_range=r) for k, r in requests)))

    return [None if b is None else b.to_bytes() for b in sync(all_of_them())]


class ConsolidatedNodes:
    """A store's root attributes and its nodes' metadata, read from the root ``zarr.json`` alone.

    Our stores consolidate every node's metadata into that one object, and a reader needs only a
    few of them; zarr's ``open_group`` parses all of them through its event loop (5-8 ms per store
    on a busy worker, a fifth of a selective query's first block). Array metadata is parsed here,
    on first use.
    """

    def __init__(self, store: zarr.abc.store.Store, name: str):
        (raw,) = fetch(store, [("zarr.json", None)])
        if raw is None:
            raise FileNotFoundError(f"{name}: no zarr.json (not a Zarr v3 store)")
        root = json.loads(raw)
        self.store, self.name = store, name
        self.attributes: dict = root.get("attributes", {})
        self._nodes = (root.get("consolidated_metadata") or {}).get("metadata")
        self._parsed: dict[str, ArrayV3Metadata] = {}

    @property
    def nodes(self) -> dict[str, dict]:
        if not isinstance(self._nodes, dict):
            raise ValueError(f"{self.name}: store has no consolidated metadata")
        return self._nodes

    def __contains__(self, path: str) -> bool:
        return path in self.nodes

    def attrs(self, path: str) -> dict:
        return dict(self.nodes[path].get("attributes", {}))

    def array_meta(self, path: str) -> ArrayV3Metadata:
        meta = self._parsed.get(path)
        if meta is None:
            node = self.nodes.get(path)
            if node is None or node.get("node_type") != "array":
                raise KeyError(f"{self.name}: no array {path}")
            meta = self._parsed[path] = ArrayV3Metadata.from_dict(node)
        return meta

    def sharded(self, path: str) -> ShardedArrayReader:
        return ShardedArrayReader(self.store, path, self.array_meta(path))


class ShardedArrayReader:
    """Values ``[a, b)`` of a 1-D sharded array of our own layout."""

    def __init__(self, store: zarr.abc.store.Store, path: str, meta: object):
        codecs = getattr(meta, "codecs", ())
        if not isinstance(meta, ArrayV3Metadata) or len(meta.shape) != 1 or len(codecs) != 1:
            raise ValueError(f"{path}: not a 1-D sharded array")
        if not isinstance(codecs[0], ShardingCodec) or not isinstance(meta.chunk_grid, RegularChunkGrid):
            raise ValueError(f"{path}: not a 1-D sharded array")
        inner = codecs[0].codecs
        if not (len(inner) == 2 and isinstance(inner[0], BytesCodec) and isinstance(inner[1], BloscCodec)):
            raise ValueError(f"{path}: inner codecs {inner} are not bytes+blosc")
        self.size = int(meta.shape[0])
        self.shard = int(meta.chunk_grid.chunk_shape[0])
        self.chunk = int(codecs[0].chunk_shape[0])
        self.per_shard = self.shard // self.chunk
        self.dtype = np.dtype(meta.data_type.to_native_dtype())
        self.fill = meta.fill_value
        self._store = store
        self._prefix = path
        self._meta = meta
        self._codec = numcodecs.Blosc()
        self._index = functools.lru_cache(maxsize=64)(self._load_index)
        self.requests = 0
        self.bytes_read = 0

    def _key(self, shard: int) -> str:
        chunk_key = self._meta.encode_chunk_key((shard,))
        return f"{self._prefix}/{chunk_key}" if self._prefix else chunk_key  # an array at the store root

    def _get(self, key: str, byte_range: RangeByteRequest | SuffixByteRequest) -> bytes | None:
        self.requests += 1
        (raw,) = fetch(self._store, [(key, byte_range)])
        if raw is not None:
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


class ChunkedArrayReader:
    """Values ``[a, b)`` of a 1-D, regularly chunked, unsharded array stored as anndata writes obs
    columns (``bytes`` or ``vlen-utf8``, then ``zstd``), read with ``fetch`` and decoded here.

    A query block reads a few obs columns; through zarr's API each is a handful of round trips to
    its event loop. ``for_array`` returns None for any other layout, which the caller then reads
    through zarr.
    """

    def __init__(self, store: zarr.abc.store.Store, path: str, meta: ArrayV3Metadata, text: bool, dtype: np.dtype):
        self._store, self._path, self._meta = store, path, meta
        self.size = int(meta.shape[0])
        self.chunk = int(meta.chunk_grid.chunk_shape[0])
        self.text, self.dtype, self.fill = text, dtype, meta.fill_value
        self._zstd = numcodecs.Zstd()
        self._vlen = numcodecs.VLenUTF8() if text else None

    @classmethod
    def for_array(cls, store: zarr.abc.store.Store, path: str, meta: object) -> ChunkedArrayReader | None:
        if not isinstance(meta, ArrayV3Metadata) or len(meta.shape) != 1:
            return None
        if not isinstance(meta.chunk_grid, RegularChunkGrid) or len(meta.codecs) != 2:
            return None
        first, second = meta.codecs
        if not isinstance(second, ZstdCodec):
            return None
        if isinstance(first, VLenUTF8Codec):
            return cls(store, path, meta, True, np.dtype(object))
        if isinstance(first, BytesCodec):
            dtype = np.dtype(meta.data_type.to_native_dtype())
            if dtype.kind not in "biuf":
                return None
            if dtype.itemsize > 1:
                dtype = dtype.newbyteorder(">" if first.endian is not None and first.endian.value == "big" else "<")
            return cls(store, path, meta, False, dtype)
        return None

    def _key(self, i: int) -> str:
        return f"{self._path}/{self._meta.encode_chunk_key((i,))}"

    def read(self, start: int, stop: int) -> np.ndarray:
        start, stop = max(0, int(start)), min(self.size, int(stop))
        native = self.dtype if self.text else self.dtype.newbyteorder("=")
        if stop <= start:
            return np.empty(0, dtype=native)
        first, last = start // self.chunk, (stop - 1) // self.chunk
        raws = fetch(self._store, [(self._key(i), None) for i in range(first, last + 1)])
        pieces = []
        for i, raw in zip(range(first, last + 1), raws, strict=True):
            if raw is None:  # never written: the fill value
                values = np.full(self.chunk, self.fill, dtype=self.dtype)
            elif self.text:
                values = self._vlen.decode(self._zstd.decode(raw))
            else:
                values = np.frombuffer(self._zstd.decode(raw), dtype=self.dtype)
            c0 = i * self.chunk
            pieces.append(values[max(start, c0) - c0 : min(stop, c0 + self.chunk) - c0])
        out = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        return out.astype(native, copy=False)
