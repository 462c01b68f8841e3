"""The conversion benchmark's floors do the work they stand for.

A floor that skipped part of its work would make every ratio against it look better than it
is, so its output is checked here against scipy on a generated file: the decoded arrays, the
cells in the floor's order and the gene-major copy. The floor's encoder is swapped for one that
keeps what it is given, in order (no executor: one thread, a fixed order).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from bgee_dask.synthetic import generate_experiment

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_convert.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_convert", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("floors")
    small = dict(n_cells=900, n_genes_universe=3000, mean_detected_genes=400, n_libraries=2, n_cell_types=5)
    return str(generate_experiment(out, experiment_id="SRPS00001", seed=3, chunk_rows=200, **small))


@pytest.fixture()
def kept(monkeypatch, bench) -> list[np.ndarray]:
    """What the floors encode, in the order they encode it; small pieces and windows, so there are many."""
    given: list[np.ndarray] = []

    class Keeper:
        def encode(self, values: np.ndarray) -> bytes:
            given.append(np.array(values))
            return b"."

    monkeypatch.setattr(bench, "_numcodecs", lambda settings: Keeper())
    monkeypatch.setattr(bench, "PIECE", 1000)
    monkeypatch.setattr(bench, "GENE_WINDOW", 7000)
    return given


def _matrix(path: str) -> sp.csr_matrix:
    with h5py.File(path, "r") as f:
        shape = tuple(f["X"].attrs["shape"])
        return sp.csr_matrix((f["X/data"][:], f["X/indices"][:], f["X/indptr"][:]), shape=shape)


def _decoded(bench, path: str) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {name: bench._decode_dataset(f[name], None) for name in ("X/data", "X/indices", "X/indptr")}


def test_the_floor_decodes_what_h5py_reads(bench, source):
    m = _matrix(source)
    arrays = _decoded(bench, source)
    np.testing.assert_array_equal(arrays["X/data"], m.data)
    np.testing.assert_array_equal(arrays["X/indices"], m.indices)
    np.testing.assert_array_equal(arrays["X/indptr"], m.indptr)


def test_gene_major_floor_encodes_scipys_transposition(bench, source, kept):
    m = _matrix(source)
    bench._floor_gene_major(_decoded(bench, source), m.shape[1], None)
    cells, values = [], []
    pieces = iter(kept)
    for v0 in range(0, m.nnz, bench.GENE_WINDOW):
        n_pieces = -(-min(bench.GENE_WINDOW, m.nnz - v0) // bench.PIECE)
        cells += [next(pieces) for _ in range(n_pieces)]
        values += [next(pieces) for _ in range(n_pieces)]
    assert next(pieces, None) is None
    by_gene = m.tocsc()
    by_gene.sort_indices()
    assert m.nnz > 3 * bench.GENE_WINDOW  # several windows, genes cut by their edges
    np.testing.assert_array_equal(np.concatenate(cells), by_gene.indices)
    np.testing.assert_array_equal(np.concatenate(values), by_gene.data)


def test_required_work_floor_encodes_the_reordered_cells(bench, source, kept):
    m = _matrix(source)
    bench._floor_required(source, _decoded(bench, source), m.shape[1], None)
    indices, data = kept[0::2], kept[1::2]
    assert len(indices) == -(-m.nnz // bench.PIECE)
    perm = np.random.default_rng(bench.ROW_ORDER_SEED).permutation(m.shape[0])
    reordered = m[perm]
    np.testing.assert_array_equal(np.concatenate(indices), reordered.indices)
    np.testing.assert_array_equal(np.concatenate(data), reordered.data)
