"""The store writer's parts: sharded arrays written whole shard by whole shard, the two-pass (spill) reorder, sorting,
runs."""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

import bgee_dask.converter.writer as writer
import bgee_dask.format.layout as layout
from bgee_dask.converter.array_writer import ShardedArrayWriter
from bgee_dask.converter.reorder import stream_sorted
from bgee_dask.converter.runs import runs_table
from bgee_dask.format.codec_pipeline import codec_pipeline_in_use
from bgee_dask.format.layout import DEFAULT_CODEC, BloscSettings
from bgee_dask.sources.h5ad import H5adSource

from . import make_inputs as mi

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- ShardedArrayWriter --------------------------------------------------------------------------
def _random_values(rng, dtype, n):
    if np.issubdtype(dtype, np.floating):
        return (rng.standard_normal(n) * 100).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=n, endpoint=True, dtype=dtype)


def _pieces(rng, values):
    cuts = np.sort(rng.integers(0, values.size + 1, size=int(rng.integers(0, 12))))
    return np.split(values, cuts)


CODECS = [
    DEFAULT_CODEC,
    BloscSettings(cname="lz4", clevel=5, shuffle="shuffle"),
    BloscSettings(cname="zstd", clevel=3, shuffle="noshuffle"),
]


@pytest.mark.parametrize("at_root", [False, True], ids=["nested", "root"])
@pytest.mark.parametrize("codec", CODECS, ids=lambda c: f"{c.cname}-{c.shuffle}")
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64, np.uint8, np.int16])
@pytest.mark.parametrize("seed", range(3))
def test_sharded_array_writer_reads_back_exactly(tmp_path, dtype, codec, at_root, seed):
    rng = np.random.default_rng(seed * 1000 + np.dtype(dtype).itemsize)
    chunk = int(rng.integers(1, 300))
    shard = chunk * int(rng.integers(1, 9))
    size = [0, 1, chunk, shard, 3 * shard, int(rng.integers(1, 6 * shard))][int(rng.integers(0, 6)) if seed else 5]
    store = zarr.storage.LocalStore(tmp_path / "s.zarr")
    kwargs = dict(
        shape=(size,),
        dtype=dtype,
        chunks=(chunk,),
        shards=(shard,),
        compressors=codec.zarr_codec(np.dtype(dtype)),
        fill_value=0,
    )
    if at_root:
        arr = zarr.create_array(store, **kwargs)
    else:
        arr = zarr.open_group(store, mode="w").create_group("X").create_array("data", **kwargs)
    values = _random_values(rng, dtype, size)
    w = ShardedArrayWriter(arr)
    for k, piece in enumerate(_pieces(rng, values)):
        if k % 2:  # filled in place, as the in-memory reorder does, in bites of the free room
            pos = 0
            while pos < piece.size:
                room = w.writable()
                take = min(room.size, piece.size - pos, int(rng.integers(1, 2 * shard + 2)))
                room[:take] = piece[pos : pos + take]
                w.advance(take)
                pos += take
        else:
            w.append(piece)
    assert w.writable().size == 0
    w.close()
    back = zarr.open_array(store, path="" if at_root else "X/data", mode="r")
    got = back[:]
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, values)
    for _ in range(5):  # random slices through zarr's partial shard reads
        a = int(rng.integers(0, size + 1))
        b = int(rng.integers(a, size + 1))
        np.testing.assert_array_equal(back[a:b], values[a:b])
    # one object per shard, all inside the store
    shard_dir = tmp_path / "s.zarr" / ("c" if at_root else "X/data/c")
    n_shards = -(-size // shard)
    assert sorted(p.name for p in shard_dir.glob("*")) == sorted(str(i) for i in range(n_shards))


def test_sharded_array_writer_checks_the_count(tmp_path):
    store = zarr.storage.LocalStore(tmp_path / "s.zarr")
    arr = zarr.open_group(store, mode="w").create_array(
        "v",
        shape=(100,),
        dtype=np.int32,
        chunks=(10,),
        shards=(40,),
        compressors=DEFAULT_CODEC.zarr_codec(np.dtype("i4")),
    )
    w = ShardedArrayWriter(arr)
    w.append(np.arange(99, dtype=np.int32))
    with pytest.raises(RuntimeError, match="99 values"):
        w.close()
    with pytest.raises(ValueError, match="sharded"):
        ShardedArrayWriter(zarr.open_group(store, mode="a").create_array("u", shape=(5,), dtype="i4"))
    # too many values are refused before any shard beyond the array is written
    w = ShardedArrayWriter(arr)
    w.append(np.arange(80, dtype=np.int32))
    with pytest.raises(RuntimeError, match="more values"):
        w.append(np.arange(21, dtype=np.int32))
    assert not (tmp_path / "s.zarr" / "v" / "c" / "3").exists()
    with pytest.raises(RuntimeError, match="more values"):
        w.advance(21)
    w.stop()


def test_sharded_array_writer_raises_a_failed_write_and_stops(tmp_path, monkeypatch):
    """A shard whose write fails raises at the next shard or at close; stop() returns once no write runs."""
    import threading
    import time

    arr = zarr.open_group(zarr.storage.LocalStore(tmp_path / "s.zarr"), mode="w").create_array(
        "v", shape=(100,), dtype=np.int32, chunks=(10,), shards=(20,)
    )
    w = ShardedArrayWriter(arr)
    running = threading.Event()

    def failing(start, values):
        running.set()
        time.sleep(0.2)
        raise OSError("disk full")

    monkeypatch.setattr(w, "_write", failing)
    w.append(np.arange(20, dtype=np.int32))  # handed to the writer thread
    running.wait()
    with pytest.raises(OSError, match="disk full"):
        w.append(np.arange(40, dtype=np.int32))
    w.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("bgee-dask-shard")]


# -- the spill (two-pass) reorder against the in-memory path -------------------------------------
def _source_file(tmp_path: Path, fmt: str, dtype=np.float32) -> Path:
    adata = mi.make_adata(700, 90, seed=21, dtype=dtype, empty_rows=(0, 5, 699))
    if fmt == "csc":
        adata.X = sp.csc_matrix(adata.X)
    elif fmt == "dense":
        adata.X = adata.X.toarray()
    return mi.write(adata, tmp_path / fmt / mi.bgee_name("SRPT94001"))


def _write(source_path: Path, out: Path, spill: dict | None, monkeypatch, executor=None) -> Path:
    if spill is None:
        monkeypatch.setattr(writer, "stream_sorted", stream_sorted)
    else:
        monkeypatch.setattr(writer, "stream_sorted", functools.partial(stream_sorted, **spill))
    with H5adSource(source_path) as src:
        ws = writer.write_experiment(
            src, zarr.storage.LocalStore(out), provenance={"source_name": source_path.name}, executor=executor
        )
    assert ws.nnz == mi.expected_counts(ad.read_h5ad(source_path)).nnz
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


SPILLS = {
    "many-buckets": {"in_memory_nnz": 0, "bucket_nnz": 97, "read_nnz": 61},
    "tiny": {"in_memory_nnz": 0, "bucket_nnz": 3, "read_nnz": 5},
    "one-bucket": {"in_memory_nnz": 0, "bucket_nnz": 1 << 30, "read_nnz": 400},
}


@pytest.mark.parametrize("spill", list(SPILLS))
@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
def test_spill_path_writes_the_same_store(tmp_path, monkeypatch, fmt, spill):
    # small shards so that the store has several, and a partial last one
    monkeypatch.setattr(layout, "VALUES_CHUNK", 256)
    monkeypatch.setattr(layout, "VALUES_SHARD", 1024)
    src = _source_file(tmp_path, fmt)
    mem = _write(src, tmp_path / "mem.zarr", None, monkeypatch)
    with ThreadPoolExecutor(2) as pool:
        spilled = _write(src, tmp_path / "spill.zarr", SPILLS[spill], monkeypatch, executor=pool)
    a, b = _files(mem), _files(spilled)
    assert len([k for k in a if k.startswith("X/data/c/")]) > 3
    assert a.keys() == b.keys()
    # zarrs's Blosc compresses a chunk's blocks on several threads and stores them in the order they
    # finish: the same values, not the same bytes. zarr's own pipeline writes the same bytes.
    same_bytes = codec_pipeline_in_use() == "zarr"
    for key in a:
        if same_bytes or "/c/" not in key:
            assert a[key] == b[key], f"{key} differs between the in-memory and spill paths"
    compared = set()
    for name, array in zarr.open_group(mem, mode="r").members(max_depth=None):
        if isinstance(array, zarr.Array):
            other = zarr.open_array(spilled / name, mode="r")
            np.testing.assert_array_equal(array[...], other[...], err_msg=name)
            compared.add(name)
    assert {"X/indptr", "X/indices", "X/data"} <= compared
    sa, sb = ad.read_zarr(mem), ad.read_zarr(spilled)
    pd.testing.assert_frame_equal(sa.obs, sb.obs)
    pd.testing.assert_frame_equal(sa.var, sb.var)
    # and both are the source, reordered
    want = mi.expected_counts(ad.read_h5ad(src))[sa.obs["source_row"].to_numpy()]
    assert (want != sb.X).nnz == 0
    np.testing.assert_array_equal(sb.X.indptr, want.indptr)
    np.testing.assert_array_equal(sb.obs["n_genes"].to_numpy(), np.diff(want.indptr))


class _Collect:
    """A row sink that keeps what it is given."""

    def __init__(self):
        self.began: list[tuple[np.ndarray, np.ndarray]] = []
        self.calls: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []

    def begin(self, dest_indptr, gene_nnz):
        self.began.append((np.array(dest_indptr), np.array(gene_nnz)))

    def matrix(self, matrix):
        raise AssertionError("a spilled stream must hand over rows, not a matrix")

    def rows(self, row_start, indptr, indices, data):
        self.calls.append((int(row_start), np.array(indptr), np.array(indices), np.array(data)))


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
def test_stream_sorted_spills_into_many_buckets(tmp_path, fmt):
    """Direct check of the two passes: many read blocks, many buckets, rows in ``perm`` order."""
    path = _source_file(tmp_path, fmt, dtype=np.float64)
    want = mi.expected_counts(ad.read_h5ad(path))
    rng = np.random.default_rng(3)
    perm = rng.permutation(want.shape[0])
    sink = _Collect()
    reads = []
    with H5adSource(path) as src:
        for name in ("iter_csr_blocks", "iter_csc_blocks"):
            original = getattr(src, name)

            def counting(*args, _original=original, **kwargs):
                for block in _original(*args, **kwargs):
                    reads.append(block)
                    yield block

            setattr(src, name, counting)
        spill_dir = tmp_path / "spill"
        spill_dir.mkdir()
        res = stream_sorted(
            src,
            perm,
            sink,
            out_dtype=np.dtype(np.float64),
            spill_dir=str(spill_dir),
            in_memory_nnz=0,
            bucket_nnz=50,
            read_nnz=40,
        )
    assert res.spilled
    assert len(sink.calls) > 20 and len(reads) > 20
    assert list(spill_dir.iterdir()) == []  # spill files cleaned up
    reordered = want[perm]
    # begin() announces the whole shape first
    assert len(sink.began) == 1
    np.testing.assert_array_equal(sink.began[0][0], reordered.indptr)
    np.testing.assert_array_equal(sink.began[0][1], np.bincount(want.indices, minlength=want.shape[1]))
    # then consecutive row ranges whose local offsets match the destination offsets
    next_row = 0
    for row_start, indptr, indices, _ in sink.calls:
        n_rows = indptr.size - 1
        if row_start > next_row:  # a range of empty rows may be skipped
            assert reordered.indptr[row_start] == reordered.indptr[next_row]
        assert row_start >= next_row
        np.testing.assert_array_equal(
            indptr, reordered.indptr[row_start : row_start + n_rows + 1] - reordered.indptr[row_start]
        )
        assert indices.size == indptr[-1]
        next_row = row_start + n_rows
    assert reordered.indptr[next_row] == reordered.nnz
    np.testing.assert_array_equal(res.indptr, reordered.indptr)
    np.testing.assert_array_equal(np.concatenate([c[2] for c in sink.calls]), reordered.indices)
    np.testing.assert_array_equal(np.concatenate([c[3] for c in sink.calls]), reordered.data)
    np.testing.assert_array_equal(res.total_counts, np.asarray(want.sum(axis=1)).ravel())
    np.testing.assert_array_equal(res.n_genes, np.diff(want.indptr))
    assert res.nnz == want.nnz
    if fmt != "csc":  # buckets hold at most bucket_nnz values, or one longer row
        longest = int(np.diff(want.indptr).max())
        assert max(c[2].size for c in sink.calls) <= max(50, longest)


# -- sorting and runs ----------------------------------------------------------------------------
def test_sort_order_missing_last_ties_in_source_order():
    obs = pd.DataFrame(
        {
            "cellTypeId": ["CL:2", None, "CL:1", "CL:2", "CL:1", None, "CL:10"],
            "anatEntityId": pd.Categorical(
                ["U:b", "U:a", "U:b", "U:a", "U:b", "U:a", "U:a"], categories=["U:b", "U:a"]
            ),
            "libID": ["L2", "L1", "L1", "L1", "L1", "L1", "L1"],
        }
    )
    order = writer.sort_order(obs, ("cellTypeId", "anatEntityId", "libID"))
    # plain string order (not the categorical's own order), missing last, then source order
    assert order.tolist() == [2, 4, 6, 3, 0, 1, 5]


def test_runs_table_covers_rows():
    obs = pd.DataFrame(
        {
            "cellTypeId": pd.Categorical(["a", "a", "b", "b", "b", None]),
            "libID": ["x", "y", "y", "y", "y", "y"],
            "speciesId": pd.array([9606] * 6, dtype="Int64"),
        }
    )
    runs = runs_table(obs)
    assert runs["row_start"].tolist() == [0, 1, 2, 5]
    assert runs["row_stop"].tolist() == [1, 2, 5, 6]
    assert mi.as_str(runs["cellTypeId"]) == ["a", "a", "b", None]
    assert mi.as_str(runs["libID"]) == ["x", "y", "y", "y"]


def test_runs_table_same_runs_for_categorical_and_text_columns():
    """Categorical columns are compared by code, text ones by value: the runs are the same, and match a plain loop."""
    rng = np.random.default_rng(5)
    values = {c: rng.choice(["u", "v", None], size=400, p=[0.45, 0.45, 0.1]).tolist() for c in ("cellTypeId", "sex")}
    as_text = pd.DataFrame(values)
    as_categories = pd.DataFrame({c: pd.Categorical(v, categories=["v", "u", "w"]) for c, v in values.items()})
    rows = list(zip(*values.values(), strict=True))
    starts = [i for i in range(len(rows)) if i == 0 or rows[i] != rows[i - 1]]
    for frame in (as_text, as_categories):
        runs = runs_table(frame)
        assert runs["row_start"].tolist() == starts
        assert runs["row_stop"].tolist() == [*starts[1:], len(rows)]
        assert mi.as_str(runs["cellTypeId"]) == [values["cellTypeId"][i] for i in starts]


def test_prefetch_passes_errors_and_stops_with_its_consumer():
    import threading
    import time

    from bgee_dask.converter.reorder import prefetch

    assert list(prefetch(iter(range(5)))) == [0, 1, 2, 3, 4]

    def failing():
        yield 1
        raise ValueError("bad block")

    with pytest.raises(ValueError, match="bad block"):
        list(prefetch(failing()))
    it = prefetch(iter(range(100)))
    assert next(it) == 0
    it.close()  # the consumer stops early, as on an error in the conversion
    time.sleep(0.3)
    assert not [t for t in threading.enumerate() if t.name == "bgee-dask-prefetch"]


# -- the gene-major copy, built from the matrix in memory and from the spilled row stream -------
def _shuffled_rows(path: Path, seed: int = 5) -> Path:
    """The same file with each row's values stored in a random gene order (valid CSR, unsorted)."""
    import h5py

    rng = np.random.default_rng(seed)
    with h5py.File(path, "r+") as f:
        indptr, indices, data = f["X/indptr"][:], f["X/indices"][:], f["X/data"][:]
        for r in range(len(indptr) - 1):
            a, b = indptr[r], indptr[r + 1]
            order = rng.permutation(b - a)
            indices[a:b], data[a:b] = indices[a:b][order], data[a:b][order]
        f["X/indices"][:] = indices
        f["X/data"][:] = data
    return path


@pytest.mark.parametrize("small_shards", [False, True], ids=["one-shard", "many-shards"])
@pytest.mark.parametrize("unsorted", [False, True])
@pytest.mark.parametrize("spill", [None, "many-buckets"])
def test_gene_index_is_the_transposed_store(tmp_path, monkeypatch, spill, unsorted, small_shards):
    from bgee_dask.converter import gene_index_builder as gi
    from bgee_dask.format.gene_index import GeneIndex

    monkeypatch.setattr(gi, "GENE_BUCKET_NNZ", 211)  # many gene ranges
    if small_shards:  # many shards: genes cut by shard edges are written by both neighbours
        monkeypatch.setattr(layout, "VALUES_CHUNK", 64)
        monkeypatch.setattr(layout, "VALUES_SHARD", 320)
    src = _source_file(tmp_path, "csr")
    if unsorted:
        _shuffled_rows(src)
    if spill is None:
        monkeypatch.setattr(writer, "stream_sorted", stream_sorted)
    else:
        monkeypatch.setattr(writer, "stream_sorted", functools.partial(stream_sorted, **SPILLS[spill]))
    with H5adSource(src) as source, ThreadPoolExecutor(2) as pool:
        writer.write_experiment(
            source,
            zarr.storage.LocalStore(tmp_path / "e.zarr"),
            provenance={},
            executor=pool,
            gene_index_store=zarr.storage.LocalStore(tmp_path / "e.by_gene.zarr"),
        )
    stored = ad.read_zarr(tmp_path / "e.zarr")
    want = mi.expected_counts(ad.read_h5ad(src))[stored.obs["source_row"].to_numpy()].tocsc()
    want.sort_indices()
    index = GeneIndex(zarr.storage.LocalStore(tmp_path / "e.by_gene.zarr", read_only=True))
    assert index.shape == want.shape
    genes = np.arange(want.shape[1])
    indptr, cells, values = index.read_genes(genes)
    np.testing.assert_array_equal(indptr, want.indptr)
    np.testing.assert_array_equal(cells, want.indices)  # each gene's cells increasing
    np.testing.assert_array_equal(values, want.data)


def test_experiment_store_reads_what_anndata_reads_and_refuses_other_stores(tmp_path, monkeypatch):
    """X rows and obs columns equal anndata's reading of the same store, with or without consolidated
    metadata; a store that is not ours, incomplete, of another format version or missing is a one-line
    error naming it."""
    import json

    from bgee_dask.format.experiment import ExperimentStore

    out = _write(_source_file(tmp_path, "csr"), tmp_path / "e.zarr", None, monkeypatch)
    zarr.consolidate_metadata(zarr.storage.LocalStore(out))
    ref = ad.read_zarr(out)
    root_json = out / "zarr.json"
    original = json.loads(root_json.read_text())

    def reads_as_anndata() -> None:
        store = ExperimentStore(zarr.storage.LocalStore(out, read_only=True), name="e")
        assert store.shape == ref.shape
        indptr, indices, data = store.read_rows(100, 400)
        got = sp.csr_matrix((data, indices, indptr), shape=(300, ref.n_vars))
        np.testing.assert_array_equal(got.toarray(), ref.X[100:400].toarray())
        for col in ("cellTypeId", "anatEntityId", "total_counts", "n_genes", "SampleId"):
            got_col = store.obs_column(col, 50, 600)
            assert got_col.dtype == ref.obs[col].dtype, col
            np.testing.assert_array_equal(
                got_col.astype(object).to_numpy(), ref.obs[col].iloc[50:600].astype(object).to_numpy()
            )
        assert list(store.obs_column("cellTypeId", 0, 1).cat.categories) == list(ref.obs["cellTypeId"].cat.categories)
        names = store.obs_names(0, 700)
        assert names.dtype == object and all(isinstance(n, str) for n in names[:3])
        np.testing.assert_array_equal(names, ref.obs_names.to_numpy())
        np.testing.assert_array_equal(store.var_names(), ref.var_names)
        assert store.obs_columns() == list(ref.obs.columns)
        with pytest.raises(KeyError):
            store.obs_column("no_such_column", 0, 10)

    reads_as_anndata()
    unconsolidated = json.loads(json.dumps(original))
    unconsolidated.pop("consolidated_metadata")
    root_json.write_text(json.dumps(unconsolidated))
    reads_as_anndata()  # each node's own zarr.json instead

    def opened_with(change) -> str:
        doc = json.loads(json.dumps(original))
        change(doc)
        root_json.write_text(json.dumps(doc))
        with pytest.raises((ValueError, FileNotFoundError)) as err:
            ExperimentStore(zarr.storage.LocalStore(out, read_only=True), name="e.zarr")
        return str(err.value)

    assert "incomplete" in opened_with(lambda d: d["attributes"]["bgee_dask"].update(complete=False))
    assert "not a bgee-dask" in opened_with(lambda d: d["attributes"].pop("bgee_dask"))
    assert "format 9.0" in opened_with(lambda d: d["attributes"]["bgee_dask"].update(format_version="9.0"))
    root_json.unlink()
    with pytest.raises(FileNotFoundError, match=r"e\.zarr: no zarr\.json"):
        ExperimentStore(zarr.storage.LocalStore(out, read_only=True), name="e.zarr")


def test_index_arrays_use_the_index_codec(tmp_path, monkeypatch):
    """X/indices and the gene-major cell positions are written with INDEX_CODEC (byte shuffle), values with the
    default codec; the store says which, and both read back as anndata reads the source."""
    from bgee_dask.format.layout import INDEX_CODEC

    source = _source_file(tmp_path, "csr")
    out, genes = tmp_path / "e.zarr", tmp_path / "e.by_gene.zarr"
    with H5adSource(source) as src:
        writer.write_experiment(
            src,
            zarr.storage.LocalStore(out),
            provenance={"source_name": source.name},
            gene_index_store=zarr.storage.LocalStore(genes),
        )
    assert INDEX_CODEC.shuffle != DEFAULT_CODEC.shuffle
    for path, name, want in [
        (out, "X/indices", INDEX_CODEC),
        (out, "X/data", DEFAULT_CODEC),
        (genes, "indices", INDEX_CODEC),
    ]:
        inner = zarr.open_array(zarr.storage.LocalStore(path), path=name, mode="r").metadata.codecs[0].codecs[1]
        # enums up to zarr 3.3, plain strings from 3.4 on: read the setting's text either way
        found = (getattr(inner.cname, "value", inner.cname), getattr(inner.shuffle, "value", inner.shuffle))
        assert found == (want.cname, want.shuffle), (path, name)
    attrs = zarr.open_group(zarr.storage.LocalStore(out), mode="r").attrs["bgee_dask"]
    assert attrs["index_codec"]["shuffle"] == "shuffle" and attrs["codec"]["shuffle"] == "bitshuffle"
    stored, ref = ad.read_zarr(out), ad.read_h5ad(source)
    order = pd.Index(stored.obs_names).get_indexer(ref.obs_names)
    np.testing.assert_array_equal(stored.X[order].toarray(), mi.expected_counts(ref).toarray())


# -- consolidated metadata -----------------------------------------------------------------------


def assert_consolidated(store: zarr.abc.store.Store) -> None:
    """The root's consolidated metadata names every node of the store (opening it is then one request)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        consolidated = zarr.open_consolidated(store, mode="r").metadata.consolidated_metadata
        walked = zarr.open_group(store, mode="r", use_consolidated=False)
        nodes = {path for path, _ in walked.members(max_depth=None)}
    assert consolidated is not None and len(nodes) >= 3  # the gene-major copy has three arrays
    assert set(consolidated.flattened_metadata) == nodes


@pytest.mark.parametrize("where", ["local", "fsspec-memory"])
def test_stores_are_consolidated(tmp_path, bgee_sources, where):
    import uuid

    import bgee_dask as bd
    from bgee_dask.catalog.commit import read_record
    from bgee_dask.format.location import AtlasLocation

    # the doc layout (categorical groups inside obs) and variant C (other column names)
    sources = [bgee_sources["SRPT00004"], bgee_sources["SRPT00003.C"]]
    out = str(tmp_path / "atlas") if where == "local" else f"memory://bgee-{uuid.uuid4().hex[:8]}/atlas"
    reports = bd.convert(sources, out, workers=1, progress=False)
    assert [r.status for r in reports] == ["converted", "converted"], [r.message for r in reports]
    loc = AtlasLocation(out)
    for r in reports:
        record = read_record(loc, r.species, r.experiment_id)  # the committed version's stores
        version = f"experiments/{r.species}/{r.experiment_id}/{record['version']}"
        assert (record["store"], record["gene_index"]) == (f"{version}/cells.zarr", f"{version}/genes.zarr")
        assert r.store == record["store"]
        for target in (record["store"], record["gene_index"]):
            assert_consolidated(loc.zarr_store(target))
