"""obs and var as the store writer writes them (anndata's ``write_elem``), read back by anndata itself."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import zarr
from anndata.io import read_elem

from bgee_dask.converter.writer import FRAME_CHUNK_ROWS, _append_obs_columns, _compact, _write_anndata_elements


def _frame(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "cellTypeId": pd.Categorical(rng.choice(["CL:0000236", "CL:0000084", "CL:0000057"], n)),
            "barcodes": pd.Categorical([f"AC{i % 70_001:06d}" for i in range(n)]),  # more than int16 codes
            "sex": pd.Categorical(np.where(rng.random(n) < 0.2, None, rng.choice(["female", "male"], n))),
            "stage": pd.Categorical(rng.choice(["early", "late"], n), categories=["early", "late"], ordered=True),
            "unique_cell_ids": np.array([f"cell-{i}" for i in range(n)], dtype=object),
            "speciesId": pd.array(np.where(rng.random(n) < 0.1, None, 9606).tolist(), dtype="Int64"),
            "total": rng.random(n) * 1e4,
            "n_genes": rng.integers(0, 3000, n).astype(np.int32),
            "flag": rng.random(n) < 0.5,
            "small": rng.integers(0, 5, n).astype(np.uint8),
        },
        index=pd.Index([f"AAAC-{i}" for i in range(n)], dtype=object),
    )


def _as_read(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` as anndata reads it back: unique text (a string-array) as object, also where pandas 3 made it str."""
    return df.astype({"unique_cell_ids": object})


def _arrays(node: zarr.Array | zarr.Group) -> list[zarr.Array]:
    """The arrays of one encoded column: itself, or those of its group."""
    if isinstance(node, zarr.Array):
        return [node]
    return [a for _, a in node.arrays()]


def _group_with(elements: dict) -> zarr.Group:
    store = zarr.storage.MemoryStore()
    _write_anndata_elements(zarr.open_group(store, mode="w", zarr_format=3), elements)
    return zarr.open_group(store, mode="r")


@pytest.mark.parametrize("n", [0, 1, 3, FRAME_CHUNK_ROWS, 2 * FRAME_CHUNK_ROWS + 17])
def test_frame_reads_back_through_anndata(n):
    df = _frame(n)
    group = _group_with({"obs": df, "obsm": {}})
    # an empty category list comes back from anndata 0.13 with pandas 3 with another dtype (object / str):
    # with no categories there is nothing to compare there; unique text is written as a string-array, which
    # anndata reads back as object (pandas 3 makes the original a str column)
    back = read_elem(group["obs"])
    assert back["unique_cell_ids"].dtype == object
    pd.testing.assert_frame_equal(back, _as_read(df), check_index_type=False, check_categorical=n > 0)
    assert read_elem(group["obsm"]) == {}
    # chunked by rows, so that a query block reads a piece of a column, not all of it (a column is one
    # array or, depending on anndata's version and the pandas dtype, a group of arrays: codes, values, mask)
    for column in ("unique_cell_ids", "cellTypeId", "speciesId", "total"):
        arrays = _arrays(group["obs"][column])
        assert arrays, column
        for array in arrays:
            if array.ndim == 1 and array.shape[0] == n:
                assert array.chunks == (max(1, min(n, FRAME_CHUNK_ROWS)),), (column, array.path)
                assert array.shards is None


@pytest.mark.parametrize(
    "column",
    [
        pd.array(["a", None, "c", "d"], dtype="string"),  # text with missing values
        pd.array([True, None, False, True], dtype="boolean"),
        pd.Categorical([1, 2, 1, 2]),  # categories that are not text
    ],
    ids=["nullable-string", "nullable-boolean", "int-categories"],
)
def test_other_column_kinds_read_back(column):
    import anndata

    df = _frame(4)
    df["other"] = column
    with anndata.settings.override(allow_write_nullable_strings=True):
        group = _group_with({"obs": df})
    pd.testing.assert_frame_equal(read_elem(group["obs"]), _as_read(df), check_index_type=False)


def test_named_index_kept_and_repeated_columns_refused():
    named = _frame(5)
    named.index.name = "cell_id"
    back = read_elem(_group_with({"obs": named})["obs"])
    pd.testing.assert_frame_equal(back, _as_read(named), check_index_type=False)
    assert back.index.name == "cell_id"
    repeated = _frame(5)
    repeated.columns = ["x", "x", *repeated.columns[2:]]
    with pytest.raises(ValueError, match="repeated column names"):
        _group_with({"obs": repeated})


def test_appended_columns_join_the_frame_in_order():
    df = _frame(70_000)
    store = zarr.storage.MemoryStore()
    root = zarr.open_group(store, mode="w", zarr_format=3)
    _write_anndata_elements(root, {"obs": df})
    extra = {"source_row": np.arange(len(df))[::-1].copy(), "total_counts": np.linspace(0, 1, len(df))}
    _append_obs_columns(root, extra)
    back = read_elem(zarr.open_group(store, mode="r")["obs"])
    pd.testing.assert_frame_equal(back, _as_read(df.assign(**extra)), check_index_type=False)


def test_compacted_text_with_missing_values_is_written_and_read_back():
    """Mostly unique text with missing values (anndata refuses nullable strings by default) and other text
    columns: written, and read back by anndata with the same values."""
    n = 40
    source = pd.DataFrame(
        {
            "mostly_unique_with_gaps": [f"cell-{i}" if i % 7 else None for i in range(n)],
            "unique": [f"u{i}" for i in range(n)],
            "repeated": pd.array(["a", "b"] * (n // 2), dtype="string"),
            "all_missing": [None] * n,
        },
        index=[f"c{i}" for i in range(n)],
    )
    back = read_elem(_group_with({"obs": _compact(source.copy())})["obs"])
    for col in source.columns:
        got = back[col].astype(object).where(back[col].notna(), None).tolist()
        want = source[col].astype(object).where(source[col].notna(), None).tolist()
        assert got == want, col
    assert list(back.index) == list(source.index)


@pytest.mark.parametrize("n", [3, 2 * FRAME_CHUNK_ROWS + 17])
def test_arrow_text_is_written_as_string_arrays(n, monkeypatch):
    """A frame whose unique text (index, cell ids) is Arrow-backed, as the converter reads it, is written
    (a few rows converted at a time: here 1000) as the same string arrays and values as its object twin."""
    import bgee_dask.converter.writer as writer

    monkeypatch.setattr(writer, "TEXT_ROWS", 1000)
    df = _frame(n)
    arrow = df.astype({"unique_cell_ids": "string[pyarrow]"})
    arrow.index = df.index.astype("string[pyarrow]")
    group = _group_with({"obs": _compact(arrow)})
    assert group["obs"].attrs["column-order"] == list(df.columns)
    for key in ("_index", "unique_cell_ids"):
        assert group["obs"][key].attrs["encoding-type"] == "string-array", key
        assert group["obs"][key].chunks == (max(1, min(n, FRAME_CHUNK_ROWS)),), key
    back = read_elem(group["obs"])
    pd.testing.assert_frame_equal(back, _as_read(df), check_index_type=False)
    assert back.index.astype(object).tolist() == df.index.tolist()
