"""The on-disk layout of one experiment store (see docs/store-format.md).

Every size here is a trade-off written down once: inner chunks small enough for cheap partial
reads from an object store, shards large enough that a store is a few hundred objects rather
than millions, and row blocks (the unit of one Dask task) about one shard of values each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zarr
from zarr.codecs import BloscCodec

#: What a store says it is, and which version of this spec it follows.
FORMAT_NAME = "bgee-dask/experiment"
FORMAT_VERSION = "1.0"
ATTRS_KEY = "bgee_dask"
#: The same for an experiment's gene-major copy (``genes.zarr``).
GENE_INDEX_FORMAT = "bgee-dask/gene-index"
GENE_INDEX_VERSION = "1.0"

#: Elements per inner chunk of X/data and X/indices (512 KiB of float32 before compression).
VALUES_CHUNK = 1 << 17
#: Elements per shard object of X/data and X/indices (64 inner chunks, ~8 MB compressed).
VALUES_SHARD = 1 << 23
#: Rows per inner chunk and per shard of X/indptr.
INDPTR_CHUNK = 1 << 16
INDPTR_SHARD = 1 << 20
#: Target values per row block: one Dask task reads about one shard.
BLOCK_NNZ = VALUES_SHARD
#: Upper bound on cells per row block, so that per-block metadata stays small for sparse data.
BLOCK_MAX_ROWS = 1 << 16


@dataclass(frozen=True)
class BloscSettings:
    """The Blosc setting of an array's inner chunks, recorded in the store's attributes too.

    The default, LZ4 with bitshuffle, encodes and decodes Bgee counts faster than zstd, for
    somewhat more bytes; converting and scanning are bound by the codec, so that is the better
    trade here.
    """

    cname: str = "lz4"
    clevel: int = 9
    shuffle: str = "bitshuffle"

    def zarr_codec(self, dtype: np.dtype) -> BloscCodec:
        """The codec as zarr declares it for an array of ``dtype``."""
        return BloscCodec(cname=self.cname, clevel=self.clevel, shuffle=self.shuffle, typesize=dtype.itemsize)


DEFAULT_CODEC = BloscSettings()

#: The codec of the int32 index arrays (X/indices and the gene-major copy's cell positions): byte
#: shuffle instead of bitshuffle, which decodes and encodes sorted positions faster for about the
#: same size; for the float values bitshuffle compresses better and encodes faster.
INDEX_CODEC = BloscSettings(shuffle="shuffle")


def row_blocks(indptr: np.ndarray, block_nnz: int = BLOCK_NNZ, max_rows: int = BLOCK_MAX_ROWS) -> np.ndarray:
    """Row boundaries ``[0, ..., n_rows]`` cutting a CSR matrix into blocks of about ``block_nnz`` values."""
    n = len(indptr) - 1
    bounds = [0]
    while bounds[-1] < n:
        r0 = bounds[-1]
        r1 = int(np.searchsorted(indptr, indptr[r0] + block_nnz, side="right")) - 1
        bounds.append(min(n, max(r1, r0 + 1), r0 + max_rows))
    return np.asarray(bounds, dtype=np.int64)


def create_values_array(
    group: zarr.Group, name: str, size: int, dtype: np.dtype, codec: BloscSettings = DEFAULT_CODEC
) -> zarr.Array:
    """A 1-D array of ``size`` values (X/data, X/indices and their gene-major copies), sharded as above.

    Every inner chunk is stored, even one that holds only zeros (``write_empty_chunks``): the
    array is written whole, and a shard's chunks are then all present, as readers of earlier
    stores found them.
    """
    return group.create_array(
        name,
        shape=(size,),
        dtype=dtype,
        chunks=(VALUES_CHUNK,),
        shards=(VALUES_SHARD,),
        compressors=codec.zarr_codec(np.dtype(dtype)),
        fill_value=0,
        config={"write_empty_chunks": True},
    )


def write_indptr_array(group: zarr.Group, name: str, indptr: np.ndarray, codec: BloscSettings = DEFAULT_CODEC) -> None:
    """An int64 offsets array (X/indptr and the gene index's), written whole: it is small."""
    arr = group.create_array(
        name,
        shape=(len(indptr),),
        dtype=np.int64,
        chunks=(INDPTR_CHUNK,),
        shards=(INDPTR_SHARD,),
        compressors=codec.zarr_codec(np.dtype(np.int64)),
        fill_value=0,
    )
    arr[:] = indptr
