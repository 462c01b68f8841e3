"""Reading stores through zarr's public API: the gene-major copy's gene columns, whatever their order and size."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import zarr

from bgee_dask.format import gene_index as gene_index_reader
from bgee_dask.format.gene_index import GeneIndex
from bgee_dask.format.layout import ATTRS_KEY, GENE_INDEX_FORMAT, GENE_INDEX_VERSION

pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")


def _gene_index(path, matrix: sp.csc_matrix, consolidated: bool) -> zarr.storage.LocalStore:
    """A gene-major copy of ``matrix`` (cells x genes) as the spec lays it out, in small chunks and shards."""
    store = zarr.storage.LocalStore(path)
    root = zarr.open_group(store, mode="w", zarr_format=3)
    for name, values, chunk in (
        ("indptr", matrix.indptr, 8),
        ("indices", matrix.indices, 16),
        ("data", matrix.data, 16),
    ):
        arr = root.create_array(name, shape=values.shape, dtype=values.dtype, chunks=(chunk,), shards=(4 * chunk,))
        arr[:] = values
    root.attrs[ATTRS_KEY] = {
        "format": GENE_INDEX_FORMAT,
        "format_version": GENE_INDEX_VERSION,
        "shape": list(matrix.shape),
        "complete": True,
    }
    if consolidated:
        zarr.consolidate_metadata(store)
    return zarr.storage.LocalStore(path, read_only=True)


@pytest.mark.parametrize("consolidated", [True, False])
def test_read_genes_equals_the_matrix_columns(tmp_path, monkeypatch, consolidated):
    rng = np.random.default_rng(11)
    dense = rng.poisson(0.3, size=(200, 37)).astype(np.float32)
    dense[:, 5] = 0  # a gene measured nowhere
    dense[:, 9] = rng.integers(1, 5, 200)  # a gene in every cell: longer than an inner chunk
    matrix = sp.csc_matrix(dense)
    matrix.indices = matrix.indices.astype(np.int32)
    index = GeneIndex(_gene_index(tmp_path / "g.zarr", matrix, consolidated), name="g.zarr")
    assert index.shape == (200, 37)
    monkeypatch.setattr(gene_index_reader, "COORDINATES_PER_READ", 25)  # short genes in several batches
    for genes in ([], [5], [9, 3, 3, 0], list(range(37)), list(rng.permutation(37)), [36, 9, 5, 1]):
        indptr, cells, values = index.read_genes(np.asarray(genes, dtype=np.int64))
        want = matrix[:, genes] if genes else sp.csc_matrix((200, 0), dtype=np.float32)
        np.testing.assert_array_equal(indptr, want.indptr)
        np.testing.assert_array_equal(cells, want.indices)
        np.testing.assert_array_equal(values, want.data)
        assert cells.dtype == np.int32 and values.dtype == np.float32


def test_gene_index_refuses_what_it_cannot_read(tmp_path):
    matrix = sp.csc_matrix(np.eye(4, dtype=np.float32))
    store = _gene_index(tmp_path / "g.zarr", matrix, True)
    root = zarr.open_group(zarr.storage.LocalStore(tmp_path / "g.zarr"), mode="r+")
    for change, message in (
        ({"complete": False}, "not a complete bgee-dask gene index"),
        ({"format": "other"}, "not a complete bgee-dask gene index"),
        ({"format_version": "9.0"}, "gene index format 9.0 is not readable here"),
    ):
        root.attrs[ATTRS_KEY] = {
            **root.attrs[ATTRS_KEY],
            "format_version": GENE_INDEX_VERSION,
            "format": GENE_INDEX_FORMAT,
            "complete": True,
            **change,
        }
        with pytest.raises(ValueError, match=f"g.zarr: {message}"):
            GeneIndex(store, name="g.zarr")
    with pytest.raises(FileNotFoundError, match=r"none\.zarr: no zarr\.json"):
        GeneIndex(zarr.storage.LocalStore(tmp_path / "none.zarr", read_only=True), name="none.zarr")
