"""The aggregation tables against pandas: chunk (both store orientations), combine in any tree, finalize.

Cells of three experiments in random groups; experiment 1 did not measure gene 2, one group
has a single cell, another has cells only in experiment 1. The reference computes each
statistic per group and gene from the cells themselves, over the cells that measured the gene.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from bgee_dask.query import reduction
from bgee_dask.query.blocks import chunk_partial
from bgee_dask.query.kernels import LOG1P_SCALED, RAW, SCALED
from bgee_dask.query.reduction import Partial, Statistic, check_stats, combine, finalize, needed

N_EXP, N_GENES = 3, 6
MEASURED = np.ones((N_EXP, N_GENES), dtype=bool)
MEASURED[1, 2] = False
STATS = ["sum", "mean", "var", "n_expressed", "frac_expressed"]


def _cells(seed: int) -> pd.DataFrame:
    """One row per cell: experiment, group key, total counts and the values of every gene."""
    rng = np.random.default_rng(seed)
    n = 300
    exp = rng.integers(0, N_EXP, n)
    group = rng.choice(["a", "b", "c", "d"], n).astype(object)
    exp[:5], group[:5] = 1, "only_in_1"  # the group never measured gene 2
    exp[5], group[5] = 2, "single"  # one cell: var is NaN
    values = rng.poisson(1.5, (n, N_GENES)).astype(np.float64) * rng.random((n, N_GENES))
    values[rng.random((n, N_GENES)) < 0.4] = 0.0
    values[exp == 1, 2] = 0.0  # not stored where not measured
    values[exp == 0] = values[exp == 0].astype(np.float32)  # experiment 0 stores float32
    frame = pd.DataFrame(values, columns=[f"g{j}" for j in range(N_GENES)])
    frame.insert(0, "group", group)
    frame.insert(0, "experiment", exp)
    frame.insert(2, "total", rng.integers(100, 5000, n).astype(np.float64))
    return frame


def _transform(frame: pd.DataFrame, mode: int) -> pd.DataFrame:
    values = frame[[f"g{j}" for j in range(N_GENES)]].to_numpy()
    scale = (1e4 / frame["total"].to_numpy())[:, None]
    if mode == SCALED:
        values = values * scale
    elif mode == LOG1P_SCALED:
        values = np.log1p(values * scale)
    return pd.DataFrame(values, columns=range(N_GENES))


def _reference(frame: pd.DataFrame, mode: int) -> dict[str, pd.DataFrame]:
    """Each statistic as a (group x gene) frame, computed cell by cell with pandas."""
    values = _transform(frame, mode)
    out: dict[str, dict] = {s: {} for s in [*STATS, "n_measured"]}
    for j in range(N_GENES):
        measuring = MEASURED[frame["experiment"].to_numpy(), j]
        v = values.loc[measuring, j].groupby(frame.loc[measuring, "group"])
        out["sum"][j], out["mean"][j], out["var"][j] = v.sum(), v.mean(), v.var(ddof=1)
        out["n_measured"][j] = v.size()
        out["n_expressed"][j] = values.loc[:, j].gt(0).groupby(frame["group"]).sum()
        out["frac_expressed"][j] = (v.apply(lambda s: (s > 0).sum()) / v.size()).astype(float)
    groups = sorted(frame["group"].unique())
    ref = {s: pd.DataFrame(cols).reindex(index=groups, columns=range(N_GENES)) for s, cols in out.items()}
    ref["n_measured"] = ref["n_measured"].fillna(0)
    ref["n_cells"] = frame.groupby("group").size().reindex(groups)
    return ref


def _chunks(frame: pd.DataFrame, mode: int, names: tuple[str, ...], rng: np.random.Generator) -> list[Partial]:
    """Partials of random runs of cells, each from one experiment, read cell- or gene-major.

    An experiment stores only the genes it measured (its gene map says where they go).
    """
    parts = []
    for e in range(N_EXP):
        mine = frame[frame["experiment"] == e].reset_index(drop=True)
        stored = np.flatnonzero(MEASURED[e])
        gene_map = np.full(N_GENES, -1, np.int32)
        gene_map[: stored.size] = stored  # stored position k -> output column
        x = mine[[f"g{j}" for j in stored]].to_numpy(dtype=np.float32 if e == 0 else np.float64)
        totals = mine["total"].to_numpy()
        special = mine["group"].isin(["only_in_1", "single"]).to_numpy()
        cuts = np.sort(rng.choice(np.arange(1, len(mine)), size=3, replace=False))
        for lo, hi in zip([0, *cuts], [*cuts, len(mine)], strict=True):
            drop = (rng.random(hi - lo) > 0.9) & ~special[lo:hi]
            keep = np.flatnonzero(~drop) + lo  # a filter drops some cells...
            dropped = frame.index[frame["experiment"] == e][np.setdiff1d(np.arange(lo, hi), keep)]
            frame.loc[dropped, "group"] = None  # ...and the reference with them
            if keep.size == 0:
                continue
            keys, codes = np.unique(mine.loc[keep, "group"].to_numpy(), return_inverse=True)
            row_group = np.full(hi - lo, -1, np.int32)
            row_group[keep - lo] = codes
            row_scale = np.ones(hi - lo)
            row_scale[keep - lo] = 1e4 / totals[keep]
            if rng.random() < 0.5:  # cell-major, cell positions from 0
                block = sp.csr_matrix(x[lo:hi])
                sparse = (block.indptr.astype(np.int64), block.indices, block.data)
                by_gene, row0, gmap = False, 0, gene_map
            else:  # gene-major, cell positions as store rows (offset by lo), genes read: the stored ones
                csc = sp.csc_matrix(x[lo:hi])
                sparse = (csc.indptr.astype(np.int64), (csc.indices + lo).astype(np.int32), csc.data)
                by_gene, row0, gmap = True, lo, stored.astype(np.int32)
            keys = [(k,) for k in keys]
            args = (row_group, row_scale, keys, e, N_EXP, N_GENES, mode, names)
            parts.append(chunk_partial(sparse, by_gene, gmap, row0, *args))
    return parts


def _tree(parts: list[Partial], rng: np.random.Generator) -> Partial:
    layer = [parts[i] for i in rng.permutation(len(parts))]
    while len(layer) > 1:
        k = int(rng.integers(2, 4))
        layer = [combine(layer[i : i + k]) for i in range(0, len(layer), k)]
    return layer[0]


def _as_frame(partial: Partial, values: np.ndarray) -> pd.DataFrame:
    index = [k[0] for k in partial.keys]
    return pd.DataFrame(values, index=index).sort_index()


@pytest.mark.parametrize("mode", [RAW, SCALED, LOG1P_SCALED])
def test_statistics_equal_pandas_whatever_the_combine_order(mode):
    rng = np.random.default_rng(mode)
    frame = _cells(mode)
    parts = _chunks(frame, mode, needed(STATS), rng)
    frame = frame[frame["group"].notna()].reset_index(drop=True)
    ref = _reference(frame, mode)
    assert ref["n_measured"].loc["only_in_1", 2] == 0 and ref["n_cells"]["single"] == 1
    for _ in range(3):
        partial = _tree(parts, rng)
        got = finalize(partial, MEASURED, STATS)
        np.testing.assert_array_equal(_as_frame(partial, got["n_cells"])[0], ref["n_cells"])
        np.testing.assert_array_equal(_as_frame(partial, got["n_measured"]), ref["n_measured"])
        for s in STATS:
            assert got[s].shape == (len(partial.keys), N_GENES)
            np.testing.assert_allclose(_as_frame(partial, got[s]), ref[s], rtol=1e-9, atol=1e-12, err_msg=s)
    got = _as_frame(partial, finalize(partial, MEASURED, ["var", "sum", "mean", "frac_expressed"])["var"])
    assert got.loc["single"].isna().all()  # one cell: no sample variance
    assert np.isnan(got.loc["only_in_1", 2])  # never measured: NaN, not 0


def test_only_the_needed_intermediates_are_computed_and_carried():
    assert needed(["n_expressed"]) == ("counts", "nexpr")
    assert needed(["mean", "frac_expressed"]) == ("counts", "sum", "nexpr")
    assert needed(["var"]) == ("counts", "sum", "sumsq")
    rng = np.random.default_rng(5)
    frame = _cells(5)
    parts = _chunks(frame, RAW, needed(["frac_expressed"]), rng)
    assert all(set(p.values) == {"counts", "nexpr"} for p in parts)
    partial = _tree(parts, rng)
    full = _tree(_chunks(_cells(5), RAW, needed(STATS), np.random.default_rng(5)), np.random.default_rng(0))
    for s in ["n_expressed", "frac_expressed"]:
        a = _as_frame(partial, finalize(partial, MEASURED, [s])[s])
        b = _as_frame(full, finalize(full, MEASURED, [s])[s])
        np.testing.assert_array_equal(a, b)


def test_a_new_statistic_is_one_table_entry(monkeypatch):
    """A statistic from existing intermediates: one ``Statistic`` added, combine/finalize untouched."""

    def mean_expressed(x, n_measured):  # mean over the expressing cells only
        return reduction.ratio(x["sum"], x["nexpr"], x["nexpr"] > 0)

    table = {**reduction.STATISTICS, "mean_expressed": Statistic("mean_expressed", ("sum", "nexpr"), mean_expressed)}
    monkeypatch.setattr(reduction, "STATISTICS", table)
    assert check_stats(["mean_expressed", "mean"]) == ["mean_expressed", "mean"]
    assert needed(["mean_expressed"]) == ("counts", "sum", "nexpr")
    rng = np.random.default_rng(3)
    frame = _cells(3)
    partial = _tree(_chunks(frame, RAW, needed(["mean_expressed"]), rng), rng)
    frame = frame[frame["group"].notna()]
    got = _as_frame(partial, finalize(partial, MEASURED, ["mean_expressed"])["mean_expressed"])
    values = _transform(frame.reset_index(drop=True), RAW)
    want = values.where(values > 0).groupby(frame["group"].to_numpy()).mean()
    np.testing.assert_allclose(got, want.reindex(got.index), rtol=1e-9)


def test_unknown_statistics_are_named():
    from bgee_dask.schema import BgeeInputError

    with pytest.raises(BgeeInputError, match="median"):
        check_stats(["mean", "median"])
    assert check_stats(["mean", "var", "mean"]) == ["mean", "var"]
