"""What one Dask task does with one storage block: select cells, then reduce or extract them.

These functions run on the workers: they open the store themselves (reads never pass
through the client) and return only small results.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bgee_dask._runtime import bound_heap_growth
from bgee_dask.format.experiment import OPEN_STORES, ExperimentStore
from bgee_dask.format.gene_index import GeneIndex
from bgee_dask.format.location import AtlasLocation
from bgee_dask.query.filter import Expr, evaluate
from bgee_dask.query.groups import group_codes
from bgee_dask.query.kernels import LOG1P_SCALED, RAW, SCALED, grouped_moments, grouped_moments_by_gene, select_rows
from bgee_dask.query.plan import BlockTask, GeneTask, RunGroups
from bgee_dask.query.reduction import Partial

NORMALIZE_MODES = {None: RAW, "none": RAW, "cp10k": SCALED, "log1p_cp10k": LOG1P_SCALED}


def open_store(loc: AtlasLocation, rel: str) -> ExperimentStore:
    # Every task opens a store first: the place to tune the process's allocator once. Dask's
    # nanny starts workers with a 64 KiB malloc trim threshold, which hands freed block buffers
    # back to the system at once, so the next block faults them in again: a full scan's blocks
    # took 7.1 s of worker time instead of 4.2 s.
    bound_heap_growth()
    return OPEN_STORES.get(
        (loc.url, rel), lambda: ExperimentStore(loc.zarr_store(rel, read_only=True), name=loc.full_url(rel))
    )


def open_gene_index(loc: AtlasLocation, rel: str) -> GeneIndex:
    bound_heap_growth()
    return OPEN_STORES.get(
        (loc.url, rel, "genes"), lambda: GeneIndex(loc.zarr_store(rel, read_only=True), name=loc.full_url(rel))
    )


def read_obs(store: ExperimentStore, columns: list[str], r0: int, r1: int) -> pd.DataFrame:
    """The block's rows of ``columns``; a column this experiment lacks is all missing."""
    present = set(store.obs_columns())
    data = {}
    for c in columns:
        data[c] = store.obs_column(c, r0, r1) if c in present else pd.Series([None] * (r1 - r0), dtype=object)
    return pd.DataFrame(data)


def select(
    loc: AtlasLocation, task: BlockTask, expr: Expr | None, columns: list[str]
) -> tuple[np.ndarray, pd.DataFrame]:
    """Positions (relative to ``task.r0``) of the matching cells, and their ``columns``."""
    store = open_store(loc, task.store)
    needed = list(dict.fromkeys([*columns, *(sorted(expr.columns()) if expr is not None else [])]))
    frame = read_obs(store, needed, task.r0, task.r1)
    # lenient: a literal that does not fit this experiment's column type matches none of its cells
    mask = evaluate(expr, frame, lenient=True) if expr is not None else np.ones(task.r1 - task.r0, dtype=bool)
    rows = np.flatnonzero(mask)
    if not columns:
        return rows, pd.DataFrame(index=pd.RangeIndex(rows.size))
    return rows, frame.iloc[rows][columns].reset_index(drop=True)


def _selection(loc, task, expr, by, mode, groups: RunGroups | None):
    """Matching rows of the task's span, their group codes and keys, and per-row scale factors.

    With ``groups`` (the catalog decided the rows and their groups) no metadata is read, unless
    normalizing needs the cells' total counts.
    """
    if groups is not None:
        rows, codes = groups.rows_and_codes()
        keys, totals = groups.keys, None
        if mode != RAW:
            store = open_store(loc, task.store)
            totals = store.obs_column("total_counts", task.r0, task.r1).to_numpy(dtype=np.float64)[rows]
    else:
        columns = list(by) + (["total_counts"] if mode != RAW else [])
        rows, frame = select(loc, task, expr, columns)
        if rows.size == 0:
            return rows, None, [], None
        codes, keys = group_codes(frame, by)
        totals = frame["total_counts"].to_numpy(dtype=np.float64) if mode != RAW else None
    scale = np.ones(rows.size, dtype=np.float64)
    if totals is not None:
        with np.errstate(divide="ignore"):
            scale = np.where(totals > 0, 1e4 / totals, 0.0)
    return rows, codes, keys, scale


def prepare_worker() -> None:
    """Load this module and its compiled kernels, with the argument types real blocks pass.

    numba loads a kernel from its on-disk cache on the first call in a process (0.3-0.4 s in
    a fresh worker, most of a selective query); run here, e.g. while the client plans a
    query, the first block does not wait for it.
    """
    bound_heap_growth()
    indptr, indices, rows = np.array([0, 1], np.int64), np.zeros(1, np.int32), np.zeros(1, np.int32)
    row_scale, gene_map = np.ones(1), np.zeros(1, np.int32)
    for dtype in (np.float32, np.float64):  # the two value types stores hold
        data = np.ones(1, dtype)
        sums, sumsq, nexpr = np.zeros((1, 1)), np.zeros((1, 1)), np.zeros((1, 1), np.int64)
        grouped_moments(indptr, indices, data, rows, row_scale, gene_map, RAW, sums, sumsq, nexpr)
        columns = np.zeros(1, np.int64)
        grouped_moments_by_gene(indptr, indices, data, columns, 0, rows, row_scale, RAW, sums, sumsq, nexpr)


def aggregate_genes(
    loc: AtlasLocation,
    task: GeneTask,
    expr: Expr | None,
    by: list[str],
    n_experiments: int,
    n_genes: int,
    normalize: str | None,
    groups: RunGroups | None = None,
) -> Partial:
    """chunk step from the gene-major copy: the requested genes over the experiment's matching cells."""
    mode = NORMALIZE_MODES[normalize]
    span = BlockTask(task.experiment, task.store, task.r0, task.r1)
    rows, codes, keys, scale = _selection(loc, span, expr, by, mode, groups)
    if rows.size == 0:
        return Partial.empty(n_experiments, n_genes)
    row_group = np.full(task.r1 - task.r0, -1, dtype=np.int32)
    row_group[rows] = codes
    row_scale = np.ones(task.r1 - task.r0, dtype=np.float64)
    row_scale[rows] = scale
    gindptr, cells, values = open_gene_index(loc, task.gene_index).read_genes(np.asarray(task.genes))
    g = len(keys)
    sums, sumsq = np.zeros((g, n_genes)), np.zeros((g, n_genes))
    nexpr = np.zeros((g, n_genes), dtype=np.int64)
    out_cols = np.asarray(task.columns, dtype=np.int64)
    grouped_moments_by_gene(gindptr, cells, values, out_cols, task.r0, row_group, row_scale, mode, sums, sumsq, nexpr)
    counts = np.zeros((g, n_experiments), dtype=np.int64)
    counts[:, task.experiment] = np.bincount(codes, minlength=g)
    return Partial(keys, counts, sums, sumsq, nexpr)


def aggregate_block(
    loc: AtlasLocation,
    task: BlockTask,
    expr: Expr | None,
    by: list[str],
    gene_map: np.ndarray,
    n_experiments: int,
    n_genes: int,
    normalize: str | None,
    groups: RunGroups | None = None,
) -> Partial:
    """chunk step: the block's partial sums for the groups present in it."""
    mode = NORMALIZE_MODES[normalize]
    rows, codes, keys, scale = _selection(loc, task, expr, by, mode, groups)
    if rows.size == 0:
        return Partial.empty(n_experiments, n_genes)
    first, last = int(rows[0]), int(rows[-1]) + 1
    store = open_store(loc, task.store)
    indptr, indices, data = store.read_rows(task.r0 + first, task.r0 + last)
    row_group = np.full(last - first, -1, dtype=np.int32)
    row_group[rows - first] = codes
    row_scale = np.ones(last - first, dtype=np.float64)
    row_scale[rows - first] = scale
    g = len(keys)
    sums = np.zeros((g, n_genes))
    sumsq = np.zeros((g, n_genes))
    nexpr = np.zeros((g, n_genes), dtype=np.int64)
    grouped_moments(indptr, indices, data, row_group, row_scale, gene_map, mode, sums, sumsq, nexpr)
    counts = np.zeros((g, n_experiments), dtype=np.int64)
    counts[:, task.experiment] = np.bincount(codes, minlength=g)
    return Partial(keys, counts, sums, sumsq, nexpr)


def extract_block(
    loc: AtlasLocation, task: BlockTask, expr: Expr | None, columns: list[str], gene_map: np.ndarray, n_genes: int
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """The matching cells' obs and their CSR rows over the output genes."""
    rows, frame = select(loc, task, expr, columns)
    store = open_store(loc, task.store)
    if rows.size == 0:
        return frame, np.zeros(1, np.int64), np.empty(0, np.int32), np.empty(0, np.float32)
    first, last = int(rows[0]), int(rows[-1]) + 1
    indptr, indices, data = store.read_rows(task.r0 + first, task.r0 + last)
    nnz = int(indptr[-1])
    out_indptr = np.zeros(rows.size + 1, dtype=np.int64)
    out_indices = np.empty(nnz, dtype=np.int32)
    out_data = np.empty(nnz, dtype=data.dtype)
    used = select_rows(indptr, indices, data, rows - first, gene_map, out_indptr, out_indices, out_data)
    return frame, out_indptr, out_indices[:used], out_data[:used]


def obs_names_block(loc: AtlasLocation, task: BlockTask, rows: np.ndarray) -> np.ndarray:
    return open_store(loc, task.store).obs_names(task.r0, task.r1)[rows]
