"""Builders of odd and broken Bgee-like H5AD files for the converter tests.

Everything here writes with anndata or h5py directly, never with bgee_dask, so the inputs are
independent of the code under test.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import write_elem

CELL_TYPES = [
    ("CL:0000236", "B cell"),
    ("CL:0000624", "CD4-positive, alpha-beta T cell"),
    ("GO:0005575", "cellular_component"),
    ("CL:0000623", "natural killer cell"),
]
TISSUES = [("UBERON:0000178", "blood"), ("UBERON:0002371", "bone marrow")]
STAGES = [("HsapDv:0000087", "human adult stage"), ("UBERON:0000104", "life cycle")]


def random_counts(
    n_cells: int,
    n_genes: int,
    *,
    density: float = 0.1,
    seed: int = 0,
    dtype=np.float32,
    empty_rows: tuple[int, ...] = (),
    max_count: int = 30,
) -> sp.csr_matrix:
    """A CSR matrix of whole counts >= 1 at random positions (rows in ``empty_rows`` left empty)."""
    rng = np.random.default_rng(seed)
    mask = rng.random((n_cells, n_genes)) < density
    mask[list(empty_rows)] = False
    dense = np.where(mask, rng.integers(1, max_count, size=(n_cells, n_genes)), 0).astype(dtype)
    return sp.csr_matrix(dense)


def doc_obs(n_cells: int, *, seed: int = 0, species_id: int = 9606, extra: bool = True) -> pd.DataFrame:
    """Doc-layout obs with interleaved cell types, tissues, stages and libraries, so sorting moves rows."""
    rng = np.random.default_rng(seed)
    ct = rng.integers(0, len(CELL_TYPES), n_cells)
    ts = rng.integers(0, len(TISSUES), n_cells)
    st = rng.integers(0, len(STAGES), n_cells)
    lib = np.sort(rng.integers(0, 3, n_cells))  # stacked library by library, as Bgee does
    libs = np.array([f"SRXT99000{k + 1}" for k in range(3)])[lib]
    barcodes = np.array(["".join(rng.choice(list("ACGT"), 12)) for _ in range(n_cells)])
    sample = 99000 + lib * 10 + ct
    obs = pd.DataFrame(
        {
            "barcodes": barcodes,
            "SampleId": sample.astype(np.int64),
            "anatEntityId": pd.Categorical([TISSUES[i][0] for i in ts]),
            "stageId": pd.Categorical([STAGES[i][0] for i in st]),
            "cellTypeId": pd.Categorical([CELL_TYPES[i][0] for i in ct]),
            "strain": pd.Categorical(["NA"] * n_cells),
            "sex": pd.Categorical(rng.choice(["not annotated", "female", "male"], n_cells)),
            "speciesId": np.full(n_cells, species_id, dtype=np.int64),
            "anatEntityName": pd.Categorical([TISSUES[i][1] for i in ts]),
            "stageName": pd.Categorical([STAGES[i][1] for i in st]),
            "cellTypeName": pd.Categorical([CELL_TYPES[i][1] for i in ct]),
            "libID": pd.Categorical(libs),
            "unique_cell_ids": [f"{b}_{s}" for b, s in zip(barcodes, sample, strict=True)],
        },
        index=[f"{b}_{lb}_{i}" for i, (b, lb) in enumerate(zip(barcodes, libs, strict=True))],
    )
    if extra:
        obs["cellTypeAuthorAnnotation"] = pd.Categorical(rng.choice(["a", "b", "c"], n_cells))
    return obs


def make_adata(
    n_cells: int = 120,
    n_genes: int = 60,
    *,
    seed: int = 0,
    dtype=np.float32,
    x: sp.spmatrix | np.ndarray | None = None,
    empty_rows: tuple[int, ...] = (),
) -> ad.AnnData:
    """A small doc-layout AnnData with random whole counts."""
    if x is None:
        x = random_counts(n_cells, n_genes, seed=seed, dtype=dtype, empty_rows=empty_rows)
    var = pd.DataFrame(index=[f"GENE{i:05d}" for i in range(n_genes)])
    var["gene_id"] = var.index.to_numpy()
    return ad.AnnData(X=x, obs=doc_obs(n_cells, seed=seed), var=var)


def write(adata: ad.AnnData, path: str | os.PathLike, *, compression: str | None = "gzip") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.write_h5ad(path, compression=compression)
    return path


def bgee_name(exp: str, species: str = "Homo_sapiens") -> str:
    return f"{species}_{exp}_droplet_based.h5ad"


# -- variants of a real file ------------------------------------------------------------------
def reformat(src: str | os.PathLike, dst: str | os.PathLike, *, fmt: str = "csr", dtype=None, compression="gzip"):
    """Rewrite a real file with X as CSR/CSC/dense, another dtype and/or another compression."""
    adata = ad.read_h5ad(src)
    x = adata.X
    if dtype is not None:
        x = x.astype(dtype)
    if fmt == "csc":
        x = sp.csc_matrix(x)
    elif fmt == "dense":
        x = np.asarray(x.toarray())
    else:
        x = sp.csr_matrix(x)
    adata.X = x
    return write(adata, dst, compression=compression)


def cpm_bug(
    dst: str | os.PathLike,
    *,
    exp: str = "SRPT99001",
    n_cells: int = 90,
    n_genes: int = 50,
    seed: int = 3,
    fmt: str = "csr",
) -> tuple[Path, sp.csr_matrix]:
    """Bgee's writer bug: X holds CPM (row sums 1e6), layers['abundance'] holds the raw counts (B layout)."""
    raw = random_counts(n_cells, n_genes, seed=seed, density=0.3)
    adata = make_adata(n_cells, n_genes, seed=seed, x=raw)
    sums = np.asarray(raw.sum(axis=1)).ravel()
    cpm = sp.csr_matrix(sp.diags(1e6 / sums) @ raw.astype(np.float64)).astype(np.float32)
    adata.X = cpm
    adata.layers["abundance"] = raw
    if fmt == "csc":
        adata.X, adata.layers["abundance"] = sp.csc_matrix(cpm), sp.csc_matrix(raw)
    elif fmt == "dense":
        adata.X, adata.layers["abundance"] = cpm.toarray(), raw.toarray()
    adata.uns["matrix_descriptions"] = {"X": "Counts Per Million", "layers": {"abundance": "raw UMIs count"}}
    b_obs = adata.obs.rename(columns={"libID": "library_id"})
    b_obs.insert(1, "experiment_id", exp)
    adata.obs = b_obs.drop(columns=["SampleId", "unique_cell_ids"])
    return write(adata, dst), raw


def b_layout(dst: str | os.PathLike, *, exp: str | None = "SRPT99002", seed: int = 4) -> tuple[Path, ad.AnnData]:
    """A small B-layout file: raw X, CPM in layers['abundance'], experiment_id/library_id columns."""
    adata = make_adata(70, 40, seed=seed)
    raw = adata.X
    sums = np.maximum(np.asarray(raw.sum(axis=1)).ravel(), 1)
    adata.layers["abundance"] = sp.csr_matrix(sp.diags(1e6 / sums) @ raw).astype(np.float32)
    adata.uns["matrix_descriptions"] = {"X": "raw UMIs count", "layers": {"abundance": "Counts Per Million"}}
    obs = adata.obs.rename(columns={"libID": "library_id"}).drop(columns=["SampleId", "unique_cell_ids"])
    if exp is not None:
        obs.insert(1, "experiment_id", exp)
    adata.obs = obs
    write(adata, dst)
    return Path(dst), adata


# -- broken files ----------------------------------------------------------------------------
def _parent(dst) -> Path:
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    return dst


def truncated(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    dst = _parent(dst)
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: len(data) // 2])
    return Path(dst)


def not_hdf5(dst: str | os.PathLike) -> Path:
    dst = _parent(dst)
    Path(dst).write_text("barcode\tcount\nAAAC\t3\n")
    return Path(dst)


def _copy(src, dst) -> Path:
    dst = _parent(dst)
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o644)
    return Path(dst)


def without_x(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    dst = _copy(src, dst)
    with h5py.File(dst, "r+") as f:
        del f["X"]
    return dst


def obs_shorter_than_x(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """obs has one cell fewer than X has rows."""
    obs = ad.read_h5ad(src, backed="r").obs.copy()
    dst = _copy(src, dst)
    with h5py.File(dst, "r+") as f:
        del f["obs"]
        write_elem(f, "obs", obs.iloc[:-1])
    return dst


def duplicate_cell_names(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    dst = _copy(src, dst)
    with h5py.File(dst, "r+") as f:
        key = f["obs"].attrs["_index"]
        names = f["obs"][key]
        names[5] = names[2]
    return dst


def bad_value(dst: str | os.PathLike, value: float, *, position: int = -1, seed: int = 5) -> Path:
    """A small valid-looking file with one stored value replaced (e.g. NaN, inf, -1)."""
    adata = make_adata(200, 50, seed=seed)
    adata.X.data[position] = value
    return write(adata, dst)


def unknown_layout(dst: str | os.PathLike) -> Path:
    adata = make_adata(30, 20, seed=6)
    adata.obs = pd.DataFrame(
        {"cell_label": pd.Categorical(["x", "y"] * 15), "batch": ["b1"] * 30}, index=adata.obs_names
    )
    return write(adata, dst)


# -- a larger file for the kill test ---------------------------------------------------------
def large_gzip(dst: str | os.PathLike, n_cells: int = 50_000, n_genes: int = 5_000, per_cell: int = 120, seed: int = 7):
    """~50k cells x 5k genes, gzip, written by anndata; rows with ``per_cell`` random genes each."""
    rng = np.random.default_rng(seed)
    cols = rng.integers(0, n_genes, size=(n_cells, per_cell), dtype=np.int64)
    cols.sort(axis=1)
    keep = np.ones_like(cols, dtype=bool)
    keep[:, 1:] = cols[:, 1:] != cols[:, :-1]
    lengths = keep.sum(axis=1)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = cols[keep].astype(np.int32)
    data = rng.integers(1, 50, size=indices.size).astype(np.float32)
    x = sp.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes))
    obs = doc_obs(n_cells, seed=seed, extra=False)
    var = pd.DataFrame(index=[f"GENE{i:05d}" for i in range(n_genes)])
    return write(ad.AnnData(X=x, obs=obs, var=var), dst)


# -- independent references: what a store must hold, computed from the source with anndata/h5py --
#: Bgee's documented columns plus experimentId, written out here rather than imported from bgee_dask.
CANONICAL = (
    "barcodes",
    "SampleId",
    "anatEntityId",
    "stageId",
    "cellTypeId",
    "strain",
    "sex",
    "speciesId",
    "anatEntityName",
    "stageName",
    "cellTypeName",
    "libID",
    "unique_cell_ids",
    "experimentId",
)
SORTED_BY = ["cellTypeId", "anatEntityId", "stageId", "sex", "strain", "libID"]
_SAME = {c: c for c in CANONICAL if c != "experimentId"}
#: canonical column -> source column, per layout (None: the layout does not have it)
LAYOUT_COLUMNS: dict[str, dict[str, str | None]] = {
    "doc": {**_SAME, "experimentId": None},
    "B": {**_SAME, "SampleId": None, "unique_cell_ids": None, "libID": "library_id", "experimentId": "experiment_id"},
    "C": {
        **_SAME,
        "barcodes": "barcode",
        "SampleId": None,
        "anatEntityId": "anatId",
        "libID": "rnaSeqLibraryId",
        "unique_cell_ids": None,
        "experimentId": None,
    },
    "D": {
        "barcodes": "barcode",
        "SampleId": None,
        "anatEntityId": "tissue_ontology_term_id",
        "stageId": "development_stage_ontology_term_id",
        "cellTypeId": "cell_type_ontology_term_id",
        "strain": "strain_or_genetic_background",
        "sex": "bgeeSex",
        "speciesId": "speciesId",
        "anatEntityName": "tissue",
        "stageName": "development_stage",
        "cellTypeName": "cell_type",
        "libID": "rnaSeqLibraryId",
        "unique_cell_ids": None,
        "experimentId": "experiment_id",
    },
}
#: source columns kept under another name because their name is taken by a canonical column
KEPT_AS = {"D": {"sex": "sex_ontology_label"}}


def as_str(values) -> list[str | None]:
    """Values as strings, missing values as None (ints and categoricals compare by their text)."""
    return [None if pd.isna(v) else str(v) for v in pd.Series(values).astype(object)]


def expected_counts(source: ad.AnnData, counts: str = "X") -> sp.csr_matrix:
    x = source.X if counts == "X" else source.layers[counts.split("/")[-1]]
    m = sp.csr_matrix(x)
    m.sort_indices()
    return m


def check_store(
    store: str | os.PathLike,
    source_path: str | os.PathLike,
    *,
    layout: str,
    experiment_id: str,
    counts: str = "X",
) -> ad.AnnData:
    """Assert that a converted store holds exactly the source file, by anndata/h5py/numpy alone."""
    import datetime as dt
    import hashlib

    import zarr

    stored = ad.read_zarr(store)
    source = ad.read_h5ad(source_path)
    # cells: same set of names, genes: same names in the same order
    assert stored.n_obs == source.n_obs
    assert set(stored.obs_names) == set(source.obs_names)
    assert list(stored.var_names) == list(source.var_names)
    pos = source.obs_names.get_indexer(stored.obs_names)
    assert (pos >= 0).all()
    # source_row recovers the source order
    np.testing.assert_array_equal(stored.obs["source_row"].to_numpy(), pos)
    # counts, exactly, structure included
    want = expected_counts(source, counts)[pos]
    got = stored.X
    assert sp.issparse(got) and got.format == "csr"
    assert got.has_sorted_indices
    want_dtype = np.float64 if want.dtype == np.float64 else np.float32
    assert got.dtype == want_dtype, (got.dtype, want.dtype)
    np.testing.assert_array_equal(got.indptr, want.indptr)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.data.astype(np.float64), want.data.astype(np.float64))
    # derived columns against numpy
    w64 = want.astype(np.float64)
    sums = np.asarray(w64.sum(axis=1)).ravel()
    if np.array_equal(w64.data, np.round(w64.data)):  # whole counts: sums are exact in any order
        np.testing.assert_array_equal(stored.obs["total_counts"].to_numpy(), sums)
    else:  # summation order may differ in the last bit
        np.testing.assert_allclose(stored.obs["total_counts"].to_numpy(), sums, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(stored.obs["n_genes"].to_numpy(), np.asarray((w64 > 0).sum(axis=1)).ravel())
    # canonical columns, mapped per layout
    src_obs = source.obs.iloc[pos]
    mapping = LAYOUT_COLUMNS[layout]
    for col in CANONICAL:
        assert col in stored.obs, f"canonical column {col} missing"
        src_col = mapping[col]
        got_col = as_str(stored.obs[col])
        if col == "experimentId":
            assert got_col == [experiment_id] * stored.n_obs
            if src_col is not None and src_col in src_obs:
                assert as_str(src_obs[src_col]) == got_col
        elif (src_col is None or src_col not in src_obs) and col == "speciesId":
            assert len(set(got_col)) == 1  # taken from the species in the file name, or missing
        elif src_col is None or src_col not in src_obs:
            assert all(v is None for v in got_col), f"{col} should be missing values"
        else:
            want_col = as_str(src_obs[src_col])
            if layout == "D" and col in ("cellTypeId", "cellTypeName"):
                placeholder = "GO:0005575" if col == "cellTypeId" else "cellular_component"
                want_col = [placeholder if v == "unknown" else v for v in want_col]
            assert got_col == want_col, f"column {col} (from {src_col}) differs"
    # extra columns kept, under their own name unless it is taken
    used = {v for v in mapping.values() if v is not None}
    for col in source.obs.columns:
        if col in used:
            continue
        target = KEPT_AS.get(layout, {}).get(col, col)
        assert target in stored.obs, f"extra column {col} lost"
        assert as_str(stored.obs[target]) == as_str(src_obs[col]), f"extra column {col} differs"
    # cells sorted by the sort columns (missing values last), ties in source order
    attrs = zarr.open_group(store, mode="r").attrs["bgee_dask"]
    assert attrs["sorted_by"][: len(SORTED_BY)] == SORTED_BY
    keys = [as_str(stored.obs[c]) for c in attrs["sorted_by"]]
    rows = stored.obs["source_row"].to_numpy()
    prev = None
    for i in range(stored.n_obs):
        key = (*((1, "") if k[i] is None else (0, k[i]) for k in keys), (0, int(rows[i])))
        assert prev is None or prev < key, f"cells not sorted at stored row {i}"
        prev = key
    # store attributes and provenance against the file itself
    assert attrs["format"] == "bgee-dask/experiment"
    assert str(attrs["format_version"]).split(".")[0] == "1"
    assert attrs["layout"] == layout
    prov = attrs["provenance"]
    assert prov["source_name"] == os.path.basename(source_path)
    assert prov["source_size"] == os.path.getsize(source_path)
    assert prov["source_sha256"] == hashlib.sha256(Path(source_path).read_bytes()).hexdigest()
    assert str(prov["converter"]).startswith("bgee-dask")
    when = dt.datetime.fromisoformat(prov["converted_at"])
    assert abs((dt.datetime.now(dt.UTC) - when).total_seconds()) < 24 * 3600
    return stored


def record(atlas: str | os.PathLike, species: str, exp: str) -> dict:
    """The experiment's committed record, ``catalog/fragments/<species>/<exp>.json`` (read with json)."""
    import json

    return json.loads((Path(atlas) / "catalog" / "fragments" / species / f"{exp}.json").read_text())


def store_path(atlas: str | os.PathLike, species: str, exp: str, kind: str = "cells") -> Path:
    """The current version's store (``kind="cells"``) or gene-major copy (``kind="genes"``), as its record names it."""
    rec = record(atlas, species, exp)
    key, name = {"cells": ("store", "cells.zarr"), "genes": ("gene_index", "genes.zarr")}[kind]
    assert rec[key] == f"experiments/{species}/{exp}/{rec['version']}/{name}", rec
    return Path(atlas) / rec[key]


def header(atlas: str | os.PathLike) -> dict:
    """The catalog header, ``catalog/atlas.json`` (read with json)."""
    import json

    return json.loads((Path(atlas) / "catalog" / "atlas.json").read_text())


def catalog_table(atlas: str | os.PathLike, name: str) -> Path:
    """A table (``experiments.parquet``, ``runs.parquet``, ...) of the tables folder the header names."""
    return Path(atlas) / header(atlas)["tables"] / name


def version_folders(atlas: str | os.PathLike) -> dict[str, list[str]]:
    """``<species>/<exp>`` -> the version folders on disk under ``experiments/``."""
    root = Path(atlas) / "experiments"
    if not root.is_dir():
        return {}
    return {
        f"{s.name}/{e.name}": sorted(v.name for v in e.iterdir())
        for s in sorted(root.iterdir())
        for e in sorted(s.iterdir())
    }


def assert_no_debris(atlas: str | os.PathLike) -> None:
    """Every version folder on disk is the current one its record names, and no temporary file remains."""
    atlas = Path(atlas)
    for key, versions in version_folders(atlas).items():
        species, exp = key.split("/")
        assert (atlas / "catalog" / "fragments" / species / f"{exp}.json").is_file(), f"{key}: no record"
        assert versions == [record(atlas, species, exp)["version"]], (key, versions)
    assert not [p for p in atlas.rglob("*") if ".tmp-" in p.name]


def check_catalog(atlas: str | os.PathLike, stored: ad.AnnData, *, species: str, experiment_id: str, layout: str):
    """The consolidated catalog (read with pandas) agrees with the store's obs."""
    atlas = Path(atlas)
    head = header(atlas)
    experiments = pd.read_parquet(catalog_table(atlas, "experiments.parquet"))
    row = experiments[(experiments["experimentId"] == experiment_id) & (experiments["species"] == species)]
    assert len(row) == 1, experiments[["experimentId", "species"]]
    row = row.iloc[0]
    assert row["experiment"] == f"{species}/{experiment_id}"
    assert head["experiments"][row["experiment"]] == record(atlas, species, experiment_id)["version"]
    assert row["layout"] == layout
    assert int(row["n_cells"]) == stored.n_obs
    assert int(row["n_genes"]) == stored.n_vars
    assert int(row["nnz"]) == stored.X.nnz
    runs = pd.read_parquet(catalog_table(atlas, "runs.parquet"))
    runs = runs[runs["experiment"].astype(str) == row["experiment"]].sort_values("row_start")
    assert len(runs) >= 1
    starts, stops = runs["row_start"].to_numpy(), runs["row_stop"].to_numpy()
    assert starts[0] == 0 and stops[-1] == stored.n_obs
    np.testing.assert_array_equal(starts[1:], stops[:-1])
    assert (stops > starts).all()
    value_cols = [c for c in runs.columns if c not in ("experiment", "row_start", "row_stop")]
    assert {"cellTypeId", "anatEntityId", "libID"} <= set(value_cols)
    obs_str = {c: np.array(as_str(stored.obs[c]), dtype=object) for c in value_cols}
    previous = None
    for run in runs.itertuples(index=False):
        run = run._asdict()
        key = []
        for c in value_cols:
            want = None if pd.isna(run[c]) else str(run[c])
            assert set(obs_str[c][run["row_start"] : run["row_stop"]].tolist()) == {want}, (c, run)
            key.append(want)
        assert key != previous, "adjacent runs should differ"
        previous = key
    return row
