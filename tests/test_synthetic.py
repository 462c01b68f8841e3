"""The synthetic generator must produce files a Bgee reader cannot tell from the documented layout."""

from __future__ import annotations

import re

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from bgee_dask.schema import CANONICAL_COLUMNS, parse_bgee_filename
from bgee_dask.synthetic import (
    NON_INTEGER_FRACTION,
    gene_universe,
    generate_experiment,
    generate_sources,
)

DOC_COLUMNS = [c for c in CANONICAL_COLUMNS if c != "experimentId"] + ["cellTypeAuthorAnnotation"]
SEXES = {"female", "male", "mixed", "NA", "not annotated"}

# Small but not trivial: several libraries and cell types, a few thousand genes.
SMALL = dict(n_cells=1200, n_genes_universe=4000, mean_detected_genes=600, n_libraries=3, n_cell_types=8)


@pytest.fixture(scope="module")
def human(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("syn")
    return str(generate_experiment(out, experiment_id="SRPS00001", seed=7, chunk_rows=500, **SMALL))


@pytest.fixture(scope="module")
def human_adata(human) -> ad.AnnData:
    return ad.read_h5ad(human)


def _x_arrays(path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f["X"][k][()] for k in ("data", "indices", "indptr")}


def test_file_name_and_location(human):
    assert human.endswith("Homo_sapiens/Homo_sapiens_SRPS00001_droplet_based.h5ad")
    assert parse_bgee_filename(human) == ("Homo_sapiens", "SRPS00001")


def test_reads_with_anndata_and_scanpy(human, human_adata):
    sc = pytest.importorskip("scanpy")
    a = sc.read_h5ad(human)
    assert a.shape == human_adata.shape
    assert isinstance(human_adata.X, sp.csr_matrix)
    assert human_adata.X.dtype == np.float32
    assert human_adata.X.has_sorted_indices
    backed = ad.read_h5ad(human, backed="r")
    assert backed.shape == human_adata.shape
    backed.file.close()


def test_h5_layout_matches_documented_files(human):
    with h5py.File(human, "r") as f:
        assert dict(f.attrs) == {"encoding-type": "anndata", "encoding-version": "0.1.0"}
        x = f["X"]
        assert x.attrs["encoding-type"] == "csr_matrix"
        assert x.attrs["encoding-version"] == "0.1.0"
        assert tuple(x.attrs["shape"]) == (SMALL["n_cells"], f["var/_index"].shape[0])
        assert x["data"].dtype == np.float32
        assert x["indices"].dtype == np.int32
        assert x["indptr"].dtype == np.int32
        for name in ("data", "indices", "indptr"):
            assert x[name].compression == "gzip"
            assert x[name].compression_opts == 4
            assert x[name].chunks is not None
        for key in ("layers", "obsm", "obsp", "uns", "varm", "varp"):
            assert f[key].attrs["encoding-type"] == "dict"
            assert len(f[key]) == 0
        obs = f["obs"]
        assert obs.attrs["encoding-type"] == "dataframe"
        assert list(obs.attrs["column-order"]) == DOC_COLUMNS
        assert obs["cellTypeId"].attrs["encoding-type"] == "categorical"
        assert obs["unique_cell_ids"].attrs["encoding-type"] == "string-array"
        assert obs["cellTypeId/codes"].compression == "gzip"


def test_obs_columns_and_dtypes(human_adata):
    obs = human_adata.obs
    assert list(obs.columns) == DOC_COLUMNS
    assert obs["SampleId"].dtype == np.int64
    assert obs["speciesId"].dtype == np.int64
    for col in DOC_COLUMNS:
        if col not in ("barcodes", "SampleId", "speciesId", "unique_cell_ids"):
            assert isinstance(obs[col].dtype, pd.CategoricalDtype), col
    assert (obs["speciesId"] == 9606).all()
    assert set(obs["strain"]) == {"NA"}
    assert set(obs["sex"]) <= SEXES
    assert obs["cellTypeId"].astype(str).str.fullmatch(r"CL:\d{7}|GO:0005575").all()
    assert obs["anatEntityId"].astype(str).str.fullmatch(r"UBERON:\d{7}").all()
    assert obs["stageId"].astype(str).str.fullmatch(r"(HsapDv|UBERON):\d{7}").all()
    # IDs and names map one to one.
    for id_col, name_col in (("cellTypeId", "cellTypeName"), ("anatEntityId", "anatEntityName")):
        pairs = obs[[id_col, name_col]].astype(str).drop_duplicates()
        assert pairs[id_col].is_unique and pairs[name_col].is_unique
    placeholder = obs["cellTypeId"].astype(str) == "GO:0005575"
    assert (obs.loc[placeholder, "cellTypeName"].astype(str) == "cellular_component").all()


def test_cell_identifiers(human_adata):
    obs = human_adata.obs
    assert obs.index.is_unique
    barcodes = obs["barcodes"].astype(str)
    assert barcodes.str.fullmatch(r"[ACGT]{16}").all()
    assert (obs.index == barcodes + "_" + obs["libID"].astype(str)).all()
    assert (obs["unique_cell_ids"] == barcodes + "_" + obs["SampleId"].astype(str)).all()
    assert obs["libID"].astype(str).str.fullmatch(r"SRX\d+").all()


def test_rows_stacked_by_library(human_adata):
    obs = human_adata.obs
    lib = obs["libID"].astype(str).to_numpy()
    assert obs["libID"].nunique() == SMALL["n_libraries"]
    # Each library is one contiguous run, in libID order.
    starts = np.flatnonzero(np.r_[True, lib[1:] != lib[:-1]])
    assert len(starts) == SMALL["n_libraries"]
    assert list(lib[starts]) == sorted(set(lib))
    # One tissue per library; one SampleId per (library, cell type) and vice versa.
    assert (obs.groupby("libID", observed=True)["anatEntityId"].nunique() == 1).all()
    per_sample = obs.groupby("SampleId")[["libID", "cellTypeId"]].nunique()
    assert (per_sample == 1).all().all()
    assert obs.groupby(["libID", "cellTypeId"], observed=True)["SampleId"].nunique().eq(1).all()


def test_cell_type_mixture_is_skewed(human_adata):
    freq = human_adata.obs["cellTypeId"].value_counts(normalize=True)
    assert freq.max() > 2 * freq.min()
    assert len(freq) >= 4


def test_var_genes(human_adata):
    var = human_adata.var
    assert list(var.columns) == ["gene_id", "feature_name"]
    assert (var.index == var["gene_id"]).all()
    assert var.index.str.fullmatch(r"ENSG\d{11}").all()
    assert var.index.is_monotonic_increasing and var.index.is_unique
    uni = gene_universe("Homo_sapiens", SMALL["n_genes_universe"])
    assert set(var.index) <= set(uni.gene_ids)
    frac = len(var) / SMALL["n_genes_universe"]
    assert 0.85 - 1e-3 <= frac <= 0.98 + 1e-3


def test_counts_are_whole_positive_and_type_specific(human_adata):
    x = human_adata.X
    assert (x.data > 0).all()
    assert np.array_equal(x.data, np.round(x.data))
    # Cell types differ in their profiles: mean expression correlates better within a type.
    types = human_adata.obs["cellTypeId"].astype(str).to_numpy()
    big = pd.Series(types).value_counts().index[:2]
    m0 = np.asarray(x[types == big[0]].mean(0)).ravel()
    m1 = np.asarray(x[types == big[1]].mean(0)).ravel()
    assert np.corrcoef(np.log1p(m0), np.log1p(m1))[0, 1] < 0.99


def test_detected_genes_near_target(tmp_path):
    path = generate_experiment(
        tmp_path, n_cells=600, experiment_id="SRPS00010", seed=3, mean_detected_genes=1500, n_genes_universe=20000
    )
    x = ad.read_h5ad(path).X
    detected = np.diff(x.indptr)
    assert abs(detected.mean() - 1500) < 0.1 * 1500
    assert detected.std() > 100  # library sizes vary


def test_experiments_measure_different_genes(tmp_path, human_adata):
    other = generate_experiment(tmp_path, experiment_id="SRPS00002", seed=7, **SMALL)
    var2 = ad.read_h5ad(other).var
    a, b = set(human_adata.var_names), set(var2.index)
    assert a != b and len(a & b) > 0.7 * len(a)
    # The same gene keeps its symbol in every experiment.
    both = sorted(a & b)
    assert (human_adata.var.loc[both, "feature_name"].astype(str) == var2.loc[both, "feature_name"].astype(str)).all()


def test_deterministic_for_seed(tmp_path, human):
    again = generate_experiment(tmp_path / "again.h5ad", experiment_id="SRPS00001", seed=7, chunk_rows=97, **SMALL)
    x1, x2 = _x_arrays(human), _x_arrays(again)
    for k in x1:
        assert x1[k].tobytes() == x2[k].tobytes(), k
    pd.testing.assert_frame_equal(ad.read_h5ad(human).obs, ad.read_h5ad(again).obs)
    different = generate_experiment(tmp_path / "other.h5ad", experiment_id="SRPS00001", seed=8, **SMALL)
    assert _x_arrays(different)["data"].tobytes() != x1["data"].tobytes()


def test_non_integer_values(tmp_path, human):
    path = generate_experiment(tmp_path / "frac.h5ad", experiment_id="SRPS00001", seed=7, non_integer=True, **SMALL)
    x = _x_arrays(path)
    base = _x_arrays(human)
    assert np.array_equal(x["indices"], base["indices"])  # same sparsity pattern, only values split
    frac = x["data"] != np.round(x["data"])
    assert 0.3 * NON_INTEGER_FRACTION < frac.mean() < 1.5 * NON_INTEGER_FRACTION
    assert (x["data"] > 0).all()
    halves = np.isclose(x["data"] * 2, base["data"])
    thirds = np.isclose(x["data"] * 3, base["data"], rtol=1e-6)
    assert (halves | thirds | (x["data"] == base["data"])).all()


def test_csc_reads_back_equal_to_csr(tmp_path, human_adata):
    path = generate_experiment(tmp_path / "csc.h5ad", experiment_id="SRPS00001", seed=7, x_format="csc", **SMALL)
    with h5py.File(path, "r") as f:
        assert f["X"].attrs["encoding-type"] == "csc_matrix"
        assert f["X/data"].compression == "gzip"
    a = ad.read_h5ad(path)
    assert isinstance(a.X, sp.csc_matrix) and a.X.dtype == np.float32
    assert (a.X != human_adata.X).nnz == 0
    pd.testing.assert_frame_equal(a.obs, human_adata.obs)


@pytest.mark.parametrize("dtype", ["float64", "int32"])
def test_dtype_and_no_compression(tmp_path, dtype, human_adata):
    path = generate_experiment(
        tmp_path / f"{dtype}.h5ad", experiment_id="SRPS00001", seed=7, dtype=dtype, compression=None, **SMALL
    )
    with h5py.File(path, "r") as f:
        assert f["X/data"].dtype == np.dtype(dtype)
        assert f["X/data"].compression is None
        assert f["obs/_index"].compression is None
    x = ad.read_h5ad(path).X
    assert np.array_equal(x.toarray(), human_adata.X.toarray().astype(dtype))


def test_invalid_options(tmp_path):
    with pytest.raises(ValueError, match="non_integer"):
        generate_experiment(tmp_path, n_cells=10, experiment_id="E1", dtype="int32", non_integer=True)
    with pytest.raises(ValueError, match="species"):
        generate_experiment(tmp_path, n_cells=10, experiment_id="E1", species="Canis_lupus")
    with pytest.raises(ValueError, match="x_format"):
        generate_experiment(tmp_path, n_cells=10, experiment_id="E1", x_format="coo")  # type: ignore[arg-type]


def test_generate_sources_two_species_in_parallel(tmp_path):
    paths = generate_sources(
        tmp_path,
        n_experiments=2,
        cells_per_experiment=(80, 160),
        seed=1,
        processes=2,
        n_genes_universe=3000,
        mean_detected_genes=300,
        threads=1,
    )
    assert [p.name for p in paths] == [
        "Homo_sapiens_SRPS00001_droplet_based.h5ad",
        "Mus_musculus_SRPS00002_droplet_based.h5ad",
    ]
    mouse = ad.read_h5ad(paths[1])
    assert 80 <= mouse.n_obs <= 160
    assert mouse.var_names.str.fullmatch(r"ENSMUSG\d{11}").all()
    assert (mouse.obs["speciesId"] == 10090).all()
    assert set(mouse.obs["strain"].astype(str)) <= {"C57BL/6J", "C57BL/6N", "BALB/c", "NA"}
    assert re.fullmatch(r"(MmusDv|UBERON):\d{7}", str(mouse.obs["stageId"].iloc[0]))
    # Serial generation gives the same files.
    serial = generate_sources(
        tmp_path / "serial",
        n_experiments=2,
        cells_per_experiment=(80, 160),
        seed=1,
        n_genes_universe=3000,
        mean_detected_genes=300,
    )
    for a, b in zip(paths, serial, strict=True):
        assert _x_arrays(a)["data"].tobytes() == _x_arrays(b)["data"].tobytes()
