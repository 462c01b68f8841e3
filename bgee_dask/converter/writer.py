"""Writing one experiment store: AnnData-compatible Zarr v3, cells sorted by metadata.

The store is a plain AnnData zarr group (``anndata.read_zarr`` opens it) with our own
attributes under ``bgee_dask``: format and version, provenance, the row blocks a query
schedules as tasks, and ``complete``, which is written last together with the consolidated
metadata, so that a store interrupted mid-write never claims to be whole.

Everything is written through public APIs: X's arrays with ``zarr`` (sharded arrays, one whole
shard per write, see ``array_writer``), obs, var and the empty mappings with anndata's
``write_elem``, the consolidated metadata with ``zarr.consolidate_metadata``.
"""

from __future__ import annotations

import contextlib
import gc
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import zarr

from bgee_dask._runtime import map_on, release_free_heap
from bgee_dask.cancellation import check_cancelled
from bgee_dask.converter.array_writer import ShardedArrayWriter, consolidate
from bgee_dask.converter.gene_index_builder import GeneIndexBuilder, gene_spill_bytes
from bgee_dask.converter.reorder import (
    IN_MEMORY_NNZ,
    InMemoryMatrix,
    row_spill_bytes,
    start_decoding,
    stream_sorted,
)
from bgee_dask.converter.runs import runs_table
from bgee_dask.format.layout import (
    ATTRS_KEY,
    DEFAULT_CODEC,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_CODEC,
    VALUES_CHUNK,
    BloscSettings,
    create_values_array,
    row_blocks,
    write_indptr_array,
)
from bgee_dask.schema import DERIVED_COLUMNS, SORT_COLUMNS, value_kind
from bgee_dask.sources import value_check
from bgee_dask.sources.h5ad import H5adSource
from bgee_dask.workdirs import require_free_space

#: Rows per chunk of every obs and var array: a query block (at most 65,536 rows) reads one or
#: two chunks of a column.
FRAME_CHUNK_ROWS = 1 << 16
#: Values gathered per task when a shard of X is gathered from the in-memory matrix.
GATHER_PIECE = 8 * VALUES_CHUNK


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
        indices: ShardedArrayWriter,
        data: ShardedArrayWriter,
        genes: GeneIndexBuilder | None,
        on_write: Callable[[int], None] | None = None,
        executor: Executor | None = None,
    ):
        self.indices, self.data, self.genes, self.on_write = indices, data, genes, on_write
        self.executor = executor

    def begin(self, dest_indptr: np.ndarray, gene_nnz: np.ndarray) -> None:
        self.gene_nnz = gene_nnz
        if self.genes is not None:
            self.genes.begin(dest_indptr, gene_nnz)

    def matrix(self, matrix: InMemoryMatrix) -> None:
        """Gather X one shard at a time (both arrays cut alike), straight into the writers' shard buffers.

        A shard is gathered in pieces on the executor's threads (the kernel releases the GIL),
        while the writers' threads write the previous shard.
        """
        while (room_indices := self.indices.writable()).size:
            check_cancelled()
            n = room_indices.size
            room_data = self.data.writable()[:n]
            start = self.indices.written

            def gather(a: int, start: int = start, ri: np.ndarray = room_indices, rd: np.ndarray = room_data) -> None:
                b = min(a + GATHER_PIECE, ri.size)
                matrix.fill_sorted(start + a, ri[a:b], rd[a:b])

            map_on(self.executor, gather, range(0, n, GATHER_PIECE))
            self.indices.advance(n)
            self.data.advance(n)
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


def _rows_in_order(frame: pd.DataFrame, order: np.ndarray) -> pd.DataFrame:
    """``frame.iloc[order]``, built a column at a time, each column dropped from ``frame`` once
    copied (``frame`` is left with none): a million cells' metadata is never held twice."""
    index = frame.index.take(order)
    columns = {}
    for name in list(frame.columns):
        columns[name] = frame[name].array.take(order)
        del frame[name]
    return pd.DataFrame(columns, index=index)


def _compact(frame: pd.DataFrame) -> pd.DataFrame:
    """Repeated strings become categoricals, as anndata's own writer does for Bgee files (in place).

    Other text becomes plain strings, the form every anndata version reads back; mostly unique
    text with missing values becomes a categorical too (anndata writes nullable string arrays
    only when told to, and older versions cannot read them).
    """
    out = frame
    if not isinstance(out.index.dtype, (np.dtype, pd.StringDtype)):
        out.index = out.index.astype(object)
    for col in out.columns:
        s = out[col]
        if isinstance(s.dtype, pd.CategoricalDtype):
            continue
        if isinstance(s.dtype, pd.StringDtype) and not s.isna().any() and s.nunique() >= max(2, len(s) // 2):
            continue  # mostly unique text stays in Arrow; _write_frame writes it as a string array
        if s.dtype == object or pd.api.types.is_string_dtype(s.dtype):
            values = s.astype(object).where(s.notna(), None)
            missing = values.isna()
            if missing.any() or values.nunique(dropna=True) < max(2, len(values) // 2):
                out[col] = pd.Categorical(values)
            else:
                out[col] = values.astype(str)
    return out


@contextlib.contextmanager
def _anndata_writing() -> Iterator[None]:
    """anndata's writer set to zarr v3 without autosharding (each array's chunks are ours), its notes silenced."""
    import anndata  # imported where elements are written: the planning process never needs it

    settings: dict[str, Any] = {"zarr_write_format": 3}
    if hasattr(anndata.settings, "auto_shard_zarr_v3"):
        settings["auto_shard_zarr_v3"] = False
    with anndata.settings.override(**settings), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)
        yield


def _frame_chunks(n_rows: int) -> dict[str, Any]:
    """``write_elem``'s array options for a frame of ``n_rows`` rows: chunks of ``FRAME_CHUNK_ROWS`` rows.

    anndata passes the same options to every array of a frame, category lists included; a
    chunk is cut to the frame's length so that a short frame is not padded out to a full chunk.
    """
    return {"chunks": (max(1, min(n_rows, FRAME_CHUNK_ROWS)),)}


def _write_anndata_elements(group: zarr.Group, elements: dict[str, Any]) -> None:
    """Write anndata elements (obs, var, empty mappings) into ``group`` with anndata's ``write_elem``."""
    from anndata.io import write_elem

    with _anndata_writing():
        for name, value in elements.items():
            if isinstance(value, pd.DataFrame):
                _write_frame(group, name, value)
            else:
                write_elem(group, name, value)


#: Rows of an Arrow text column turned into Python strings at a time while it is written.
TEXT_ROWS = 1 << 18


def _string_array(values: pd.api.extensions.ExtensionArray | pd.Index) -> np.ndarray:
    """Text as a numpy ``StringDType`` array (what anndata writes as a string-array), filled a slice at a time."""
    out = np.empty(len(values), dtype=np.dtypes.StringDType())
    for i in range(0, len(values), TEXT_ROWS):
        out[i : i + TEXT_ROWS] = np.asarray(values[i : i + TEXT_ROWS], dtype=object)
    return out


def _write_frame(group: zarr.Group, name: str, frame: pd.DataFrame) -> None:
    """``frame`` in anndata's dataframe encoding, through ``write_elem``.

    Arrow-backed text columns with no missing value and the index (millions of unique cell names,
    say) are written one at a time as string arrays, each converted from Arrow a slice at a time:
    handed to anndata inside the frame, each would first become an array of Python strings
    (~100 bytes a cell), all at once.
    """
    from anndata.io import write_elem

    kwargs = _frame_chunks(len(frame))
    text = [c for c, s in frame.items() if isinstance(s.dtype, pd.StringDtype) and not s.isna().any()]
    text_index = isinstance(frame.index.dtype, pd.StringDtype) and frame.index.name not in frame.columns
    if not frame.columns.is_unique or (not text and not text_index):  # anndata refuses repeated names
        write_elem(group, name, frame, dataset_kwargs=kwargs)
        return
    rest = frame.drop(columns=text)
    if text_index:  # a stand-in index, replaced below under the same key
        rest.index = pd.RangeIndex(len(frame), name=frame.index.name)
    write_elem(group, name, rest, dataset_kwargs=kwargs)
    node = group[name]
    assert isinstance(node, zarr.Group)
    for c in text:
        write_elem(node, str(c), _string_array(frame[c].array), dataset_kwargs=kwargs)
    if text_index:
        write_elem(node, str(node.attrs["_index"]), _string_array(frame.index), dataset_kwargs=kwargs)
    node.attrs["column-order"] = [str(c) for c in frame.columns]


#: From this many cells on, the dropped obs frames are collected before the matrix streams: a full
#: collection pays for itself only when the frames are large.
COLLECT_OBS_CELLS = 100_000


def _append_obs_columns(root: zarr.Group, columns: dict[str, np.ndarray]) -> None:
    """Add numeric columns to the obs data frame already in ``root`` (anndata's encoding: one array per
    column, then the group's column order, rewritten last)."""
    from anndata.io import write_elem

    obs = root["obs"]
    assert isinstance(obs, zarr.Group)
    with _anndata_writing():
        for name, values in columns.items():
            write_elem(obs, name, values, dataset_kwargs=_frame_chunks(len(values)))
    obs.attrs["column-order"] = [*obs.attrs["column-order"], *columns]


def load_conversion_kernels() -> None:
    """The numba kernels of a conversion, loaded on this thread before its first file (``value_check.load_kernels``)."""
    from bgee_dask.converter import csr_kernels

    value_check.load_kernels()
    csr_kernels.load_kernels()


@dataclass
class MatrixDecoding:
    """A source matrix being decoded on a thread of its own."""

    future: Future | None  # None when the matrix is too large for memory and will be streamed


@contextlib.contextmanager
def decode_matrix(source: H5adSource, *, in_memory_nnz: int = IN_MEMORY_NNZ) -> Iterator[MatrixDecoding]:
    """Start decoding ``source``'s matrix; leaving the block waits for the decode to end."""
    value_check.warm_up_in_background()
    with ThreadPoolExecutor(1, thread_name_prefix="bgee-dask-decode") as decoder:
        future = start_decoding(source, decoder, out_dtype=source.out_dtype, in_memory_nnz=in_memory_nnz)
        yield MatrixDecoding(future)  # (the decoder's exit waits for the decode)


def spill_bytes(source: H5adSource, *, gene_index: bool) -> int:
    """About the most a streamed conversion's spill files hold at once.

    The row buckets hold each value with its cell index, plus a header per row; with the
    gene-major copy, its gene buckets (cell, gene, value) fill as the row buckets are read back
    and deleted, so the larger of the two is the peak.
    """
    nnz = source.nnz if source.nnz is not None else source.n_obs * source.n_vars
    rows = row_spill_bytes(nnz, source.n_obs, source.out_dtype)
    return max(rows, gene_spill_bytes(nnz, source.out_dtype)) if gene_index else rows


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
    matrix, and they are added at the end, so a million cells' metadata is not held while the
    matrix streams. A matrix small enough to be reordered in memory is decoded meanwhile, on a
    thread of its own: reading and sorting obs holds the GIL (h5py, pandas) while decoding
    barely needs it, so the two overlap. ``decoding`` is that decode when the caller started it
    already (``decode_matrix``), while the source was still being opened. ``provenance`` may be
    a function, called only when the attributes are written at the end: the source's checksum
    can still be computing until then.

    On failure, no thread of this call is still writing into either store when the error is
    raised: the caller may remove them at once.
    """
    with contextlib.ExitStack() as stack:
        if decoding is None:
            decoding = stack.enter_context(decode_matrix(source, in_memory_nnz=in_memory_nnz))
        if decoding.future is None:  # too large to reorder in memory: the matrix goes through spill files
            need = spill_bytes(source, gene_index=gene_index_store is not None)
            require_free_space(spill_dir, need, "the spill files of this conversion")
        obs = source.take_obs()
        perm = sort_order(obs)
        obs = _compact(_rows_in_order(obs, perm))
        runs = runs_table(obs)
        obs_columns = [*(str(c) for c in obs.columns), *DERIVED_COLUMNS]
        obs_kinds = {str(c): value_kind(obs[c])[0] for c in obs.columns} | dict.fromkeys(DERIVED_COLUMNS, "number")
        out_dtype = source.out_dtype
        nnz_total = source.nnz
        root = zarr.open_group(store, mode="w", zarr_format=3)
        root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        var = _compact(source.var.copy())
        elements = {"obs": obs, "var": var, **{k: {} for k in ("obsm", "varm", "obsp", "varp", "layers", "uns")}}
        _write_anndata_elements(root, elements)
        del obs, elements
        if source.n_obs >= COLLECT_OBS_CELLS:
            # pandas frames hold reference cycles, which wait for the collector's rare full
            # collection: collect now, then hand the freed heap back, before the matrix needs it.
            gc.collect()
            release_free_heap()
        x = root.create_group("X")

        # Sizes of data/indices are only known up front for sparse sources; dense ones are counted first.
        if nnz_total is None:
            nnz_total = sum(int(b.indptr[-1]) for b in source.iter_csr_blocks())

        data = create_values_array(x, "data", nnz_total, out_dtype, codec)
        indices = create_values_array(x, "indices", nnz_total, np.dtype(np.int32), index_codec)
        data_writer, indices_writer = ShardedArrayWriter(data), ShardedArrayWriter(indices)
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
            )
        sink = _StoreSink(indices_writer, data_writer, genes, on_write, executor)
        try:
            result = stream_sorted(
                source,
                perm,
                sink,
                out_dtype=out_dtype,
                spill_dir=spill_dir,
                in_memory_nnz=in_memory_nnz,
                decoded=decoding.future,
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
    _append_obs_columns(root, {name: derived[name] for name in DERIVED_COLUMNS})

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
    consolidate(store)  # what makes opening one request
    return WrittenStore(
        n_cells=source.n_obs,
        n_genes=source.n_vars,
        nnz=result.nnz,
        x_bytes=data.nbytes_stored() + indices.nbytes_stored(),
        row_blocks=blocks,
        runs=runs,
        var=source.var,
        obs_columns=obs_columns,
        obs_kinds=obs_kinds,
        gene_nnz=getattr(sink, "gene_nnz", np.zeros(source.n_vars, dtype=np.int64)),
        attrs=attrs,
    )
