"""Reading Bgee H5AD files: the parallel chunk decoder and the validating source, against h5py/anndata."""

from __future__ import annotations

import itertools
import zlib
from concurrent.futures import ThreadPoolExecutor

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from bgee_dask.schema import BgeeInputError, detect_layout, parse_bgee_filename
from bgee_dask.sources import frame_reader, value_check
from bgee_dask.sources.chunks import ChunkedReader
from bgee_dask.sources.h5ad import H5adSource

from . import make_inputs as mi

DTYPES = [np.float32, np.float64, np.int32, np.int64, np.uint16, np.int8]
FILTERS = {
    "gzip": {"compression": "gzip", "compression_opts": 4},
    "gzip+shuffle": {"compression": "gzip", "compression_opts": 6, "shuffle": True},
    "gzip+shuffle+fletcher32": {"compression": "gzip", "shuffle": True, "fletcher32": True},
    "lzf": {"compression": "lzf"},
    "uncompressed-chunked": {},
    "contiguous": None,
}
FAST = {"gzip", "gzip+shuffle"}


def _ranges(rng: np.random.Generator, n: int, chunk: int) -> list[tuple[int, int]]:
    out = [(0, n), (0, 0), (n, n), (0, 1), (n - 1, n), (-5, 3), (n - 3, n + 10), (chunk - 1, chunk + 1)]
    out += [(chunk, 2 * chunk), (chunk * 2 + 1, chunk * 2 + 2)]
    for _ in range(40):
        a = int(rng.integers(0, n))
        out.append((a, int(rng.integers(a, min(n, a + 5 * chunk) + 1))))
    return out


def _values(rng: np.random.Generator, dtype, n: int) -> np.ndarray:
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(n).astype(dtype) * 1000
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=n, endpoint=True, dtype=dtype)


@pytest.mark.parametrize("with_pool", [False, True], ids=["serial", "pool"])
@pytest.mark.parametrize("filters", list(FILTERS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_chunked_reader_equals_h5py(tmp_path, dtype, filters, with_pool):
    rng = np.random.default_rng(zlib.crc32(f"{np.dtype(dtype).name}/{filters}".encode()))
    n = int(rng.integers(1000, 6000))
    chunk = int(rng.integers(50, 700))
    values = _values(rng, dtype, n)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        opts = FILTERS[filters]
        if opts is None:
            f.create_dataset("v", data=values)
        else:
            f.create_dataset("v", data=values, chunks=(chunk,), **opts)
    pool = ThreadPoolExecutor(3) if with_pool else None
    try:
        with h5py.File(tmp_path / "d.h5", "r") as f:
            ds = f["v"]
            reader = ChunkedReader(ds, pool)
            assert reader.fast == (filters in FAST)
            for a, b in _ranges(rng, n, chunk):
                got = reader.read(a, b)
                want = ds[max(0, a) : min(n, b)] if b > a else ds[0:0]
                assert got.dtype == ds.dtype
                np.testing.assert_array_equal(got, want, err_msg=f"range {a}:{b}")
                np.testing.assert_array_equal(got, values[max(0, a) : min(n, max(a, b))])
                # decoding into a slice of a bigger array touches that slice only
                lo = min(max(0, a), n)
                hi = max(lo, min(n, b))
                big = np.full(hi - lo + 7, 3, dtype=ds.dtype)
                assert reader.read_into(a, b, big[5 : 5 + hi - lo]) is not None
                np.testing.assert_array_equal(big[5 : 5 + hi - lo], want)
                assert (big[:5] == 3).all() and (big[5 + hi - lo :] == 3).all()
            with pytest.raises(ValueError, match="read_into"):
                reader.read_into(0, 10, np.empty(9, dtype=ds.dtype))
    finally:
        if pool:
            pool.shutdown()


@pytest.mark.parametrize("shuffle", [False, True])
def test_chunked_reader_unwritten_and_unfiltered_chunks(tmp_path, shuffle):
    """Chunks never written read as the fill value; chunks stored with deflate skipped read raw."""
    chunk, n = 100, 1050
    with h5py.File(tmp_path / "d.h5", "w") as f:
        ds = f.create_dataset(
            "v", shape=(n,), dtype=np.float32, chunks=(chunk,), compression="gzip", shuffle=shuffle, fillvalue=7.5
        )
        ds[0:chunk] = np.arange(chunk, dtype=np.float32)
        ds[5 * chunk : 6 * chunk] = np.arange(chunk, dtype=np.float32) * 2
        ds[1000:1050] = -1.0  # the partial last chunk
        # chunk 3 written raw with every filter marked as skipped
        raw = (np.arange(chunk, dtype=np.float32) + 0.25).tobytes()
        n_filters = ds.id.get_create_plist().get_nfilters()
        ds.id.write_direct_chunk((3 * chunk,), raw, filter_mask=(1 << n_filters) - 1)
    with h5py.File(tmp_path / "d.h5", "r") as f:
        ds = f["v"]
        full = ds[:]
        assert full[2 * chunk] == np.float32(7.5)
        np.testing.assert_array_equal(full[3 * chunk : 4 * chunk], np.arange(chunk, dtype=np.float32) + 0.25)
        for pool in (None, ThreadPoolExecutor(2)):
            reader = ChunkedReader(ds, pool)
            assert reader.fast
            np.testing.assert_array_equal(reader.read(0, n), full)
            np.testing.assert_array_equal(reader.read(250, 420), full[250:420])
            np.testing.assert_array_equal(reader.read(1020, 1050), full[1020:1050])
            if pool:
                pool.shutdown()


def test_chunked_reader_reads_past_a_user_block_and_after_close(tmp_path):
    """A user block before the HDF5 data does not shift the chunks read; ``close`` leaves the reader usable."""
    values = np.arange(10_000, dtype=np.float32) * 1.5
    with h5py.File(tmp_path / "u.h5", "w", userblock_size=1024) as f:
        f.create_dataset("v", data=values, chunks=(333,), compression="gzip")
    with h5py.File(tmp_path / "u.h5", "r") as f, ThreadPoolExecutor(2) as pool:
        reader = ChunkedReader(f["v"], pool)
        assert reader.fast
        np.testing.assert_array_equal(reader.read(0, values.size), values)
        np.testing.assert_array_equal(reader.read(400, 5000), values[400:5000])
        reader.close()
        np.testing.assert_array_equal(reader.read(10, 20), values[10:20])
        reader.close()


def test_chunked_reader_interleaved_chunks_and_a_corrupt_one(tmp_path):
    """Chunks of two datasets written in turns (far apart in the file) read right; a damaged chunk
    raises zlib's error, and ranges without it still read."""
    chunk, n = 20_000, 400_000  # random values: ~80 kB a chunk, so the other dataset's turns are wide gaps
    rng = np.random.default_rng(5)
    a_values = rng.standard_normal(n).astype(np.float32)
    b_values = rng.integers(0, 2**31 - 1, n, dtype=np.int32)
    with h5py.File(tmp_path / "i.h5", "w", rdcc_nbytes=0) as f:  # no chunk cache: chunks land as written
        a = f.create_dataset("a", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(chunk,), compression="gzip")
        b = f.create_dataset("b", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(chunk,), compression="gzip")
        for start in range(0, n, 4 * chunk):  # blocks of 4 chunks each, in turns
            stop = min(n, start + 4 * chunk)
            for ds, values in ((a, a_values), (b, b_values)):
                ds.resize((stop,))
                ds[start:stop] = values[start:stop]
    with h5py.File(tmp_path / "i.h5", "r") as f, ThreadPoolExecutor(2) as pool:
        starts = sorted(f["a"].id.get_chunk_info(i).byte_offset for i in range(f["a"].id.get_num_chunks()))
        assert max(np.diff(starts)) > 4 * chunk * 4  # the other dataset's chunks lie between
        for name, values in (("a", a_values), ("b", b_values)):
            reader = ChunkedReader(f[name], pool)
            assert reader.fast
            np.testing.assert_array_equal(reader.read(0, n), values)
            np.testing.assert_array_equal(reader.read(777, 315_321), values[777:315_321])
            reader.close()
        bad = f["a"].id.get_chunk_info_by_coord((7 * chunk,))
    with open(tmp_path / "i.h5", "r+b") as fh:  # overwrite the middle of chunk 7's deflate stream
        fh.seek(bad.byte_offset + bad.size // 2)
        fh.write(b"\xff" * 16)
    with h5py.File(tmp_path / "i.h5", "r") as f, ThreadPoolExecutor(2) as pool:
        reader = ChunkedReader(f["a"], pool)
        with pytest.raises(zlib.error):
            reader.read(0, n)
        np.testing.assert_array_equal(reader.read(0, 7 * chunk), a_values[: 7 * chunk])
        np.testing.assert_array_equal(reader.read(8 * chunk, n), a_values[8 * chunk :])
        reader.close()


def test_chunked_reader_rejects_2d(tmp_path):
    with h5py.File(tmp_path / "d.h5", "w") as f:
        ds = f.create_dataset("m", data=np.zeros((3, 3)))
        with pytest.raises(ValueError, match="1-D"):
            ChunkedReader(ds)


def test_chunked_reader_on_shared_files(bgee_sources):
    """The gzip chunks of the real files decode like h5py decodes them."""
    with h5py.File(bgee_sources["SRPT00001"], "r") as f, ThreadPoolExecutor(2) as pool:
        for name in ("X/data", "X/indices", "X/indptr"):
            ds = f[name]
            reader = ChunkedReader(ds, pool)
            assert reader.fast
            np.testing.assert_array_equal(reader.read(0, ds.shape[0]), ds[:])
            np.testing.assert_array_equal(reader.read(12345, 987654), ds[12345:987654])


# -- the validating source -------------------------------------------------------------------------
EXPECTED_LAYOUT = {"SRPT00002.B": "B", "SRPT00003.C": "C", "SRPT00005.D": "D"}


@pytest.mark.parametrize(
    "name",
    [f"SRPT0000{i}" for i in range(1, 8)] + list(EXPECTED_LAYOUT),
)
def test_source_opens_shared_files(bgee_sources, name):
    path = bgee_sources[name]
    with h5py.File(path, "r") as f:
        shape = tuple(int(s) for s in f["X"].attrs["shape"])
        nnz = f["X/data"].shape[0]
        indptr, indices, data = f["X/indptr"][:], f["X/indices"][:], f["X/data"][:]
    with H5adSource(path) as src:
        assert src.layout == EXPECTED_LAYOUT.get(name, "doc")
        assert (src.n_obs, src.n_vars) == shape
        assert src.nnz == nnz and src.format == "csr"
        assert src.counts_key == "X" and src.cpm_in_x is False
        assert src.experiment_id == name.split(".")[0]
        assert src.species == path.name.rsplit("_SRPT", 1)[0]
        assert list(src.obs.columns[:14]) == list(mi.CANONICAL)
        assert list(src.obs.index) == list(ad.read_h5ad(path, backed="r").obs_names)
        # streamed blocks put back together equal the h5py arrays
        blocks = list(src.iter_csr_blocks(nnz_per_block=100_000))
        assert blocks[0].row_start == 0 and blocks[-1].row_stop == src.n_obs
        assert all(a.row_stop == b.row_start for a, b in itertools.pairwise(blocks))
        np.testing.assert_array_equal(np.concatenate([b.indices for b in blocks]), indices)
        np.testing.assert_array_equal(np.concatenate([b.data for b in blocks]), data)
        lengths = np.concatenate([np.diff(b.indptr) for b in blocks])
        np.testing.assert_array_equal(lengths, np.diff(indptr))


def test_source_csc_blocks_equal_h5py(tmp_path, bgee_sources):
    path = mi.reformat(bgee_sources["SRPT00004"], tmp_path / mi.bgee_name("SRPT93001"), fmt="csc")
    want = sp.csc_matrix(ad.read_h5ad(path).X)
    with H5adSource(path) as src:
        assert src.format == "csc"
        blocks = list(src.iter_csc_blocks(nnz_per_block=300))
        assert len(blocks) > 5
        got = sp.hstack(
            [sp.csc_matrix((b.data, b.indices, b.indptr), shape=(src.n_obs, b.col_stop - b.col_start)) for b in blocks]
        ).tocsc()
        assert (got != want).nnz == 0
        with pytest.raises(RuntimeError):
            next(src.iter_csr_blocks())


def test_dense_source_blocks(tmp_path, bgee_sources):
    path = mi.reformat(bgee_sources["SRPT00004"], tmp_path / mi.bgee_name("SRPT93002"), fmt="dense")
    want = np.asarray(ad.read_h5ad(path).X)
    with H5adSource(path) as src:
        assert src.format == "dense" and src.nnz is None
        blocks = list(src.iter_csr_blocks(nnz_per_block=1000))
        assert len(blocks) > 3
        got = sp.vstack(
            [sp.csr_matrix((b.data, b.indices, b.indptr), shape=(b.row_stop - b.row_start, src.n_vars)) for b in blocks]
        )
        np.testing.assert_array_equal(got.toarray(), want)


def test_cpm_detection(tmp_path):
    path, raw = mi.cpm_bug(tmp_path / "Homo_sapiens_SC_RNA-Seq_read_counts_CPM_SRPT93003.h5ad", exp="SRPT93003")
    with H5adSource(path) as src:
        assert src.cpm_in_x is True and src.counts_key == "layers/abundance"
        assert src.layout == "B" and src.experiment_id == "SRPT93003"
        blocks = list(src.iter_csr_blocks())
        np.testing.assert_array_equal(np.concatenate([b.data for b in blocks]), raw.data)


def test_cpm_detection_with_empty_last_rows(tmp_path):
    """A B file whose last sampled cells have no counts (regression: np.add.reduceat IndexError)."""
    adata = mi.make_adata(40, 30, seed=2, empty_rows=(38, 39))
    adata.layers["abundance"] = adata.X.copy()
    path = mi.write(adata, tmp_path / mi.bgee_name("SRPT93004"))
    with H5adSource(path) as src:
        assert src.cpm_in_x is False and src.counts_key == "X"


def test_cpm_in_x_without_integral_layer_is_refused(tmp_path):
    path, _ = mi.cpm_bug(tmp_path / mi.bgee_name("SRPT93005"), exp="SRPT93005")
    with h5py.File(path, "r+") as f:
        f["layers/abundance/data"][...] = f["layers/abundance/data"][:] + np.float32(0.5)
    with pytest.raises(BgeeInputError, match="CPM") as info:
        H5adSource(path)
    assert str(path) in str(info.value)


def test_b_layout_recognised_by_columns_without_layers(tmp_path):
    """B files name their library column library_id; without layers/uns that still says B, not doc."""
    path, adata = mi.b_layout(tmp_path / "x.h5ad", exp="SRPT93006")
    a = ad.read_h5ad(path)
    del a.layers["abundance"]
    a.uns = {}
    mi.write(a, path)
    with H5adSource(path) as src:
        assert src.layout == "B"
        assert src.experiment_id == "SRPT93006"
        assert mi.as_str(src.obs["libID"]) == mi.as_str(adata.obs["library_id"])


def test_detect_layout_rules():
    doc = list(mi.CANONICAL[:-1])
    assert detect_layout(doc, set(), set()) == "doc"
    assert detect_layout(doc, set(), {"abundance"}) == "B"
    assert detect_layout([*doc, "anatId"], set(), set()) == "C"
    assert detect_layout(["barcode", "tissue_ontology_term_id"], set(), set()) == "D"
    assert detect_layout(["barcode"], {"schema_version"}, set()) == "D"
    with pytest.raises(ValueError, match="unknown layout"):
        detect_layout(["cell", "batch"], set(), set())


def test_parse_bgee_filename():
    assert parse_bgee_filename("/x/Homo_sapiens_SRP123_droplet_based.h5ad") == ("Homo_sapiens", "SRP123")
    assert parse_bgee_filename("Mus_musculus_SRP1_droplet_based.D.h5ad") == ("Mus_musculus", "SRP1")
    assert parse_bgee_filename("Danio_rerio_SC_RNA-Seq_read_counts_CPM_ERP42.h5ad") == ("Danio_rerio", "ERP42")
    assert parse_bgee_filename("my_download.h5ad") is None


@pytest.mark.parametrize(
    ("kind", "word"),
    [
        ("truncated", "truncated"),
        ("not_hdf5", "not an HDF5"),
        ("no_x", "no X"),
        ("shapes", "disagrees"),
        ("duplicates", "duplicate cell names"),
        ("unknown_layout", "unknown layout"),
    ],
)
def test_source_rejects_bad_files_on_open(tmp_path, bgee_sources, kind, word):
    real = bgee_sources["SRPT00004"]
    dst = tmp_path / mi.bgee_name("SRPT93007")
    path = {
        "truncated": lambda: mi.truncated(real, dst),
        "not_hdf5": lambda: mi.not_hdf5(dst),
        "no_x": lambda: mi.without_x(real, dst),
        "shapes": lambda: mi.obs_shorter_than_x(real, dst),
        "duplicates": lambda: mi.duplicate_cell_names(real, dst),
        "unknown_layout": lambda: mi.unknown_layout(dst),
    }[kind]()
    with pytest.raises(BgeeInputError) as info:
        H5adSource(path)
    msg = str(info.value)
    assert msg.startswith(str(path)) and word.lower() in msg.lower() and "\n" not in msg


@pytest.mark.parametrize(("value", "word"), [(-2.0, "negative"), (np.nan, "NaN"), (np.inf, "infinite")])
def test_source_rejects_bad_values_while_streaming(tmp_path, value, word):
    path = mi.bad_value(tmp_path / mi.bgee_name("SRPT93008"), value)
    with H5adSource(path) as src, pytest.raises(BgeeInputError, match=word) as info:
        list(src.iter_csr_blocks(nnz_per_block=50))
    assert str(path) in str(info.value)
    # the whole-matrix reader (decoding in place) checks the same
    with H5adSource(path) as src, pytest.raises(BgeeInputError, match=word):
        src.read_csr_into(np.empty(src.nnz, np.int32), np.empty(src.nnz, src.out_dtype), nnz_per_block=50)


@pytest.mark.parametrize(
    ("data", "indices", "code"),
    [
        ([0.0, 1.5, 3.0], [0, 4, 9], value_check.OK),
        ([0.0, np.nan, -1.0], [0, 1, 2], value_check.NAN),
        ([0.0, np.inf, 1.0], [0, 1, 2], value_check.INFINITE),
        ([0.0, -np.inf, 1.0], [0, 1, 2], value_check.NEGATIVE),
        ([2.0, 1.0, -0.5], [0, 1, 2], value_check.NEGATIVE),
        ([2.0, 1.0], [0, 10], value_check.INDEX_OUT_OF_RANGE),
        ([2.0, 1.0], [-1, 3], value_check.INDEX_OUT_OF_RANGE),
    ],
)
def test_first_problem_matches_numpy(data, indices, code):
    for dtype in (np.float32, np.float64):
        d, i = np.asarray(data, dtype=dtype), np.asarray(indices, dtype=np.int32)
        got, pos = value_check.first_problem(d, i, 10)
        assert got == code
        if code == value_check.OK:
            assert pos == -1
        else:  # numpy's view of the same block: the reported position is the first bad one
            bad = ~np.isfinite(d) | (d < 0) | (i < 0) | (i >= 10)
            assert pos == int(np.flatnonzero(bad)[0])


def test_first_problem_integer_counts_beyond_float32():
    d = np.array([3, 1 << 24, 5], dtype=np.int64)
    assert value_check.first_problem(d, np.zeros(3, np.int32), 1) == (value_check.TOO_LARGE, 1)
    assert value_check.first_problem(d.astype(np.float64), np.zeros(3, np.int32), 1) == (value_check.OK, -1)


# -- obs and var without anndata -------------------------------------------------------------------
def test_frame_reader_equals_anndata_on_every_layout(bgee_sources):
    """Every shared file (all layouts): obs and var read directly equal anndata's reader, exactly."""
    for name, path in bgee_sources.items():
        with h5py.File(path, "r") as f:
            for part in ("obs", "var"):
                direct = frame_reader._read_known(f[part])
                assert direct is not None, f"{name}/{part} fell back to anndata"
                pd.testing.assert_frame_equal(direct, ad.io.read_elem(f[part]), check_exact=True)


def _write_classic_frame(f: h5py.File, name: str, frame: pd.DataFrame) -> None:
    """``frame`` in the encodings of Bgee's files (what anndata wrote before pandas' own string dtype)."""

    def encoded(node, kind):
        node.attrs.update({"encoding-type": kind, "encoding-version": "0.2.0"})

    def strings(group, key, values):
        data = np.asarray(values, dtype=object)
        encoded(group.create_dataset(key, data=data, dtype=h5py.string_dtype()), "string-array")

    group = f.create_group(name)
    encoded(group, "dataframe")
    group.attrs["_index"] = frame.index.name
    group.attrs["column-order"] = list(frame.columns)
    strings(group, frame.index.name, list(frame.index))
    for col, values in frame.items():
        if isinstance(values.dtype, pd.CategoricalDtype):
            sub = group.create_group(col)
            encoded(sub, "categorical")
            sub.attrs["ordered"] = bool(values.cat.ordered)
            encoded(sub.create_dataset("codes", data=values.cat.codes.to_numpy()), "array")
            strings(sub, "categories", list(values.cat.categories))
        elif values.dtype.kind in "biuf":
            encoded(group.create_dataset(col, data=values.to_numpy()), "array")
        else:
            strings(group, col, list(values))


def test_frame_reader_hands_other_encodings_to_anndata(tmp_path):
    """Nullable columns, a named index and ordered categories: read as anndata reads them."""
    frame = pd.DataFrame(
        {
            "n": pd.array([1, None, 3], dtype="Int64"),
            "c": pd.Categorical(["b", "a", "b"], categories=["b", "a"], ordered=True),
            "x": np.array([0.5, 1.5, 2.5]),
            "flag": np.array([True, False, True]),
            "s": ["u", "v", "w"],
        },
        index=pd.Index(["c1", "c2", "c3"], name="cell"),
    )
    with h5py.File(tmp_path / "f.h5", "w") as f:
        ad.io.write_elem(f, "nullable", frame)
        _write_classic_frame(f, "plain", frame.drop(columns="n"))
    with h5py.File(tmp_path / "f.h5", "r") as f:
        assert frame_reader._read_known(f["nullable"]) is None  # not ours: anndata reads it
        pd.testing.assert_frame_equal(frame_reader.read_frame(f["nullable"]), ad.io.read_elem(f["nullable"]))
        plain = frame_reader._read_known(f["plain"])
        assert plain is not None and plain.index.name == "cell" and plain["c"].cat.ordered
        pd.testing.assert_frame_equal(plain, ad.io.read_elem(f["plain"]), check_exact=True)


def test_on_matrix_runs_before_the_frames_are_read(bgee_sources):
    """The hook sees an open, checked matrix (shape, counts) while obs and var are still unread."""
    seen = {}

    def on_matrix(src: H5adSource):
        seen.update(shape=(src.n_obs, src.n_vars), nnz=src.nnz, has_obs=hasattr(src, "obs"), var=src.var)
        return None

    path = bgee_sources["SRPT00004"]
    with H5adSource(path, on_matrix=on_matrix) as src:
        reference = ad.read_h5ad(path)
        assert seen == {"shape": reference.shape, "nnz": reference.X.nnz, "has_obs": False, "var": None}
        assert src.obs.shape[0] == reference.n_obs and src.var.index.equals(reference.var.index)


def test_failed_open_stops_the_callers_reading_before_closing(tmp_path, bgee_sources):
    """Duplicate cell names are found after the hook ran: what it returned runs while the file is still open."""
    path = mi.duplicate_cell_names(bgee_sources["SRPT00004"], tmp_path / mi.bgee_name("SRPT93009"))
    events = []

    def on_matrix(src: H5adSource):
        def stop() -> None:
            # the matrix is still readable here: a decode running meanwhile would end cleanly
            events.append(("stop", int(src._data.read(0, 3).size)))

        return stop

    with pytest.raises(BgeeInputError, match="duplicate cell names"):
        H5adSource(path, on_matrix=on_matrix)
    assert events == [("stop", 3)]


def test_frame_reader_text_as_arrow_holds_anndatas_values(tmp_path, monkeypatch):
    """obs is read with its text as Arrow strings, a few rows at a time (here 2): the values anndata reads."""
    frame = pd.DataFrame(
        {
            "c": pd.Categorical(["b", "a", "b", "a", "b"]),
            "x": np.arange(5, dtype=np.float32),
            "s": ["u", "vé", "w", "", "z"],
        },
        index=pd.Index([f"cell-{i}" for i in range(5)], name="_index"),
    )
    with h5py.File(tmp_path / "f.h5", "w") as f:
        _write_classic_frame(f, "plain", frame)
    monkeypatch.setattr(frame_reader, "TEXT_ROWS", 2)
    with h5py.File(tmp_path / "f.h5", "r") as f:
        got = frame_reader.read_frame(f["plain"], text_as_arrow=True)
        want = ad.io.read_elem(f["plain"])
    assert got["s"].dtype == "string[pyarrow]" and got.index.dtype == "string[pyarrow]"
    assert isinstance(got["c"].dtype, pd.CategoricalDtype)
    assert got["c"].cat.categories.dtype == want["c"].cat.categories.dtype
    assert got.index.tolist() == want.index.tolist() and got["s"].tolist() == want["s"].tolist()
    pd.testing.assert_frame_equal(got[["c", "x"]], want[["c", "x"]], check_index_type=False)
