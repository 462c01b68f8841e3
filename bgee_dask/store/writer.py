"""Writing one experiment store: AnnData-compatible Zarr v3, cells sorted by metadata.

The store is a plain AnnData zarr group (``anndata.read_zarr`` opens it) with our own
attributes under ``bgee_dask``: format and version, provenance, the row blocks a query
schedules as tasks, and ``complete``, which is written last together with the consolidated
metadata, so that a store interrupted mid-write never claims to be whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import zarr
from zarr.core.buffer import cpu, default_buffer_prototype
from zarr.core.sync import sync

from .._runtime import release_free_heap
from ..cancellation import check_cancelled
from ..h5ad import value_check
from ..h5ad.source import H5adSource
from ..schema import DERIVED_COLUMNS, SORT_COLUMNS, value_kind
from . import scratch
from .consolidation import consolidate_written_store
from .frame_encoding import encode_arrays, encode_empty_mapping, encode_frame
from .gene_index import GeneIndexBuilder
from .layout import (
    ATTRS_KEY,
    DEFAULT_CODEC,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_CODEC,
    BloscSettings,
    create_values_array,
    row_blocks,
    write_indptr_array,
)
from .reorder import IN_MEMORY_NNZ, InMemoryMatrix, start_decoding, stream_sorted
from .runs import runs_table
from .shards import ShardWriter, write_gathered_shard


@dataclass
class WrittenStore:
    """What the catalog needs to know about a store just written."""

    n_cells: int
    n_genes: int
    nnz: int
    x_bytes: int
    row_blocks: list[int]
    runs: pd.DataFrame
    var: pd.DataFrame
    obs_columns: list[str]
    obs_kinds: dict[str, str]  # column -> schema.value_kind, which filter literals it can meet
    gene_nnz: np.ndarray  # values stored per gene, for the query planner
    attrs: dict[str, Any]


class _StoreSink:
    """Writes the sorted rows into X and, when asked, into the gene-major copy as well."""

    def __init__(
        self,
        indices: ShardWriter,
        data: ShardWriter,
        genes: GeneIndexBuilder | None,
        on_write: Callable[[int], None] | None = None,
    ):
        self.indices, self.data, self.genes, self.on_write = indices, data, genes, on_write

    def begin(self, dest_indptr: np.ndarray, gene_nnz: np.ndarray) -> None:
        self.gene_nnz = gene_nnz
        if self.genes is not None:
            self.genes.begin(dest_indptr, gene_nnz)

    def matrix(self, matrix: InMemoryMatrix) -> None:
        """Gather X chunk by chunk and encode each chunk at once, one shard at a time (both arrays cut alike).

        Chunks are gathered and encoded on the writers' executor threads (the kernels release the GIL):
        on the calling thread alone, gathering was the longest step no other core could help with.
        """
        while n := write_gathered_shard(
            [self.indices, self.data], lambda start, outs: matrix.fill_sorted(start, outs[0], outs[1])
        ):
            check_cancelled()
            if self.on_write is not None:
                self.on_write(n)
        if self.genes is not None:
            self.genes.matrix(matrix)

    def rows(self, row_start: int, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> None:
        check_cancelled()
        self.indices.append(indices)
        self.data.append(data)
        if self.genes is not None:
            self.genes.rows(row_start, indptr, indices, data)
        if self.on_write is not None:
            self.on_write(int(indices.size))


def sort_order(obs: pd.DataFrame, columns: tuple[str, ...] = SORT_COLUMNS) -> np.ndarray:
    """Source rows in stored order: sorted by ``columns`` (missing values last), ties in source order."""
    keys = []
    for col in reversed(columns):
        if col not in obs:
            continue
        values = obs[col]
        cat = pd.Categorical(values.astype(object).where(values.notna(), None))
        codes = cat.codes.astype(np.int64)
        codes[codes < 0] = len(cat.categories)
        keys.append(codes)
    if not keys:
        return np.arange(len(obs), dtype=np.int64)
    return np.lexsort(keys).astype(np.int64)


def _compact(frame: pd.DataFrame) -> pd.DataFrame:
    """Repeated strings become categoricals, as anndata's own writer does for Bgee files (in place).

    Other text becomes plain strings, the form every anndata version reads back; mostly unique
    text with missing values becomes a categorical too (anndata writes nullable string arrays
    only when told to, and older versions cannot read them).
    """
    out = frame
    if not isinstance(out.index.dtype, np.dtype):
        out.index = out.index.astype(object)
    for col in out.columns:
        s = out[col]
        if isinstance(s.dtype, pd.CategoricalDtype):
            continue
        if s.dtype == object or pd.api.types.is_string_dtype(s.dtype):
            values = s.astype(object).where(s.notna(), None)
            missing = values.isna()
            if missing.any() or values.nunique(dropna=True) < max(2, len(values) // 2):
                out[col] = pd.Categorical(values)
            else:
                out[col] = values.astype(str)
    return out


def _write_anndata_elements(store: zarr.abc.store.Store, elements: dict[str, Any]) -> None:
    """Write anndata elements (obs, var, empty mappings) at the root of ``store``, all objects at once.

    Data frames of the column kinds Bgee files hold are encoded directly (``frame_encoding``);
    any other element goes through anndata's own writer, into memory first: it writes one small
    array per column and category list, each a few round trips through zarr's event loop (0.25 s
    per Bgee file, and hundreds of sequential requests on an object store).
    """
    objects: dict[str, bytes] = {}
    rest: dict[str, Any] = {}
    for name, value in elements.items():
        encoded = None
        if isinstance(value, pd.DataFrame):
            encoded = encode_frame(value, name)
        elif isinstance(value, dict) and not value:
            encoded = encode_empty_mapping(name)
        if encoded is None:
            rest[name] = value
        else:
            objects.update(encoded)
    if rest:
        import anndata  # imported only here: it costs ~0.7 s, and Bgee's frames never need it
        from anndata.io import write_elem

        mem = zarr.storage.MemoryStore()
        group = zarr.open_group(mem, mode="w", zarr_format=3)
        with anndata.settings.override(zarr_write_format=3), warnings.catch_warnings():
            # anndata announces a future default (autosharding) on every element; ours are explicit.
            warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)
            for name, value in rest.items():
                write_elem(group, name, value)
        objects.update(_memory_objects(mem))
    _put_all(store, objects)


def _memory_objects(mem: zarr.storage.MemoryStore) -> dict[str, bytes]:
    """Every object of an in-memory store but its root metadata (the real store has its own)."""

    async def read() -> dict[str, bytes]:
        prototype = default_buffer_prototype()
        keys = [k async for k in mem.list() if k != "zarr.json"]
        values = await asyncio.gather(*(mem.get(k, prototype) for k in keys))
        return {k: v.to_bytes() for k, v in zip(keys, values, strict=True)}

    return sync(read())


def _put_all(store: zarr.abc.store.Store, objects: dict[str, bytes]) -> None:
    """Write the objects concurrently (one round trip to zarr's event loop; parallel requests on S3)."""

    async def put() -> None:
        await asyncio.gather(*(store.set(k, cpu.Buffer.from_bytes(v)) for k, v in objects.items()))

    sync(put())


#: From this many cells on, the dropped obs frames are collected before the matrix streams: a full
#: collection costs ~0.1 s, which pays at 1M cells (~300 MB back) but not for a 25k-cell file (~15 MB).
COLLECT_OBS_CELLS = 100_000


def _append_obs_columns(store: zarr.abc.store.Store, columns: dict[str, np.ndarray]) -> None:
    """Add numeric columns to the obs data frame already in ``store`` (anndata's encoding: arrays plus
    the group's column-order, rewritten last)."""
    meta_key = "obs/zarr.json"
    doc = json.loads(sync(store.get(meta_key, default_buffer_prototype())).to_bytes())
    doc["attributes"]["column-order"] = [*doc["attributes"]["column-order"], *columns]
    _put_all(store, encode_arrays(columns, "obs"))
    _put_all(store, {meta_key: json.dumps(doc).encode()})


def load_conversion_kernels() -> None:
    """The numba kernels of a conversion, loaded on this thread before its first file (``value_check.load_kernels``)."""
    from . import csr_kernels

    value_check.load_kernels()
    csr_kernels.load_kernels()


@dataclass
class MatrixDecoding:
    """A source matrix being decoded on a thread of its own, into buffers of a scratch lease."""

    lease: scratch.Lease
    future: Future | None  # None when the matrix is too large for memory and will be streamed


@contextlib.contextmanager
def decode_matrix(source: H5adSource, *, in_memory_nnz: int = IN_MEMORY_NNZ) -> Iterator[MatrixDecoding]:
    """Start decoding ``source``'s matrix; leaving the block waits for the decode to end.

    The scratch lease lives as long as the decode, since the decoded arrays are its buffers.
    """
    value_check.warm_up_in_background()
    with scratch.lease() as working, ThreadPoolExecutor(1, thread_name_prefix="bgee-dask-decode") as decoder:
        future = start_decoding(
            source, decoder, out_dtype=source.out_dtype, in_memory_nnz=in_memory_nnz, allocate=working.empty
        )
        yield MatrixDecoding(working, future)  # (the decoder's exit waits for the decode)


def write_experiment(
    source: H5adSource,
    store: zarr.abc.store.Store,
    *,
    provenance: dict[str, Any] | Callable[[], dict[str, Any]],
    executor: Executor | None = None,
    codec: BloscSettings = DEFAULT_CODEC,
    index_codec: BloscSettings = INDEX_CODEC,
    spill_dir: str | None = None,
    in_memory_nnz: int = IN_MEMORY_NNZ,
    gene_index_store: zarr.abc.store.Store | None = None,
    on_write: Callable[[int], None] | None = None,
    decoding: MatrixDecoding | None = None,
) -> WrittenStore:
    """Write ``source`` into an empty ``store`` (and its gene-major copy into ``gene_index_store``).

    obs and var are written first and let go of: only three derived obs columns need the
    matrix, and they are added at the end. A million cells' metadata held through the matrix
    streaming made the peak memory grow with the file (1.28 GB at 1M cells). A matrix small
    enough to be reordered in memory is decoded meanwhile, on a thread of its own: reading and
    sorting obs holds the GIL (h5py, pandas) while decoding barely needs it, so the two overlap.
    ``decoding`` is that decode when the caller started it already (``decode_matrix``), while the
    source was still being opened. ``provenance`` may be a function, called only when the
    attributes are written at the end: the source's checksum can still be computing until then.
    """
    with contextlib.ExitStack() as stack:
        if decoding is None:
            decoding = stack.enter_context(decode_matrix(source, in_memory_nnz=in_memory_nnz))
        working, decoded = decoding.lease, decoding.future
        obs = source.take_obs()
        perm = sort_order(obs)
        obs = _compact(obs.iloc[perm])  # the unsorted frame is dropped here
        runs = runs_table(obs)
        obs_columns = [*(str(c) for c in obs.columns), *DERIVED_COLUMNS]
        obs_kinds = {str(c): value_kind(obs[c])[0] for c in obs.columns} | dict.fromkeys(DERIVED_COLUMNS, "number")
        out_dtype = source.out_dtype
        nnz_total = source.nnz
        root = zarr.open_group(store, mode="w", zarr_format=3)
        root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        var = _compact(source.var.copy())
        elements = {"obs": obs, "var": var, **{k: {} for k in ("obsm", "varm", "obsp", "varp", "layers", "uns")}}
        _write_anndata_elements(store, elements)
        del obs, elements
        if source.n_obs >= COLLECT_OBS_CELLS:
            # pandas frames hold reference cycles, and a conversion runs with the cyclic collector
            # paused: collect now, then hand the freed heap back, before the matrix needs its memory.
            gc.collect()
            release_free_heap()
        x = root.create_group("X")

        # Sizes of data/indices are only known up front for sparse sources; dense ones are counted first.
        if nnz_total is None:
            nnz_total = sum(int(b.indptr[-1]) for b in source.iter_csr_blocks())

        data_writer = ShardWriter(create_values_array(x, "data", nnz_total, out_dtype, codec), codec, executor, working)
        indices = create_values_array(x, "indices", nnz_total, np.dtype(np.int32), index_codec)
        indices_writer = ShardWriter(indices, index_codec, executor, working)
        genes = None
        if gene_index_store is not None:
            genes = GeneIndexBuilder(
                gene_index_store,
                source.n_obs,
                source.n_vars,
                out_dtype,
                codec=codec,
                index_codec=index_codec,
                executor=executor,
                spill_dir=spill_dir,
                scratch=working,
            )
        sink = _StoreSink(indices_writer, data_writer, genes, on_write)
        try:
            result = stream_sorted(
                source,
                perm,
                sink,
                out_dtype=out_dtype,
                spill_dir=spill_dir,
                in_memory_nnz=in_memory_nnz,
                allocate=working.empty,
                decoded=decoded,
            )
            data_writer.close()
            indices_writer.close()
            if genes is not None:
                genes.close({"experiment_id": source.experiment_id, "species": source.species})
        except BaseException:
            # no writer thread may still be writing when the caller removes the store
            data_writer.stop()
            indices_writer.stop()
            raise
        finally:
            if genes is not None:
                genes.discard()
    write_indptr_array(x, "indptr", result.indptr, codec)
    x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [source.n_obs, source.n_vars]})

    derived = {
        "source_row": perm,
        "total_counts": result.total_counts[perm],
        "n_genes": result.n_genes[perm],
    }
    _append_obs_columns(store, {name: derived[name] for name in DERIVED_COLUMNS})

    blocks = row_blocks(result.indptr).tolist()
    attrs = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "experiment_id": source.experiment_id,
        "species": source.species,
        "layout": source.layout,
        "counts_source": source.counts_key,
        "cpm_in_x": source.cpm_in_x,
        "sorted_by": list(SORT_COLUMNS),
        "row_blocks": blocks,
        "nnz": result.nnz,
        "codec": asdict(codec),
        "index_codec": asdict(index_codec),
        "provenance": provenance() if callable(provenance) else provenance,
        "complete": True,
    }
    root.attrs[ATTRS_KEY] = attrs
    consolidate_written_store(store)  # what makes opening one request
    return WrittenStore(
        n_cells=source.n_obs,
        n_genes=source.n_vars,
        nnz=result.nnz,
        x_bytes=data_writer.bytes_written + indices_writer.bytes_written,
        row_blocks=blocks,
        runs=runs,
        var=source.var,
        obs_columns=obs_columns,
        obs_kinds=obs_kinds,
        gene_nnz=getattr(sink, "gene_nnz", np.zeros(source.n_vars, dtype=np.int64)),
        attrs=attrs,
    )
