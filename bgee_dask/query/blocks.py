"""What one Dask task does with one storage block: select cells, then reduce or extract them.

These functions run on the workers: they open the store themselves (reads never pass
through the client) and return only small results.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from bgee_dask._runtime import bound_heap_growth
from bgee_dask.format.experiment import OPEN_STORES, ExperimentStore
from bgee_dask.format.gene_index import GeneIndex
from bgee_dask.format.location import AtlasLocation
from bgee_dask.query.filter import Expr, evaluate
from bgee_dask.query.groups import group_codes
from bgee_dask.query.kernels import LOG1P_SCALED, RAW, SCALED, grouped_moments, select_rows, warm_up
from bgee_dask.query.plan import BlockTask, GeneTask, RunGroups
from bgee_dask.query.reduction import COUNTS, Partial, allocate

NORMALIZE_MODES = {None: RAW, "none": RAW, "cp10k": SCALED, "log1p_cp10k": LOG1P_SCALED}


def open_store(loc: AtlasLocation, rel: str) -> ExperimentStore:
    # Every task opens a store first: the place to tune the process's allocator once. Dask's
    # nanny starts workers with a 64 KiB malloc trim threshold, which hands freed block buffers
    # back to the system at once, so the next block faults them in again (a full scan's worker
    # time grows by more than half without this: the bench_query.py full scan shows it).
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
    """Bound the heap and load the compiled kernels (``kernels.warm_up``) ahead of the first block.

    Run while the client plans a query, or when a worker starts; otherwise the first block
    loads the kernels itself.
    """
    bound_heap_growth()
    warm_up()


#: Passed to the kernel for an intermediate the query does not need.
_NOT_WANTED = {"sum": np.zeros((0, 0)), "sumsq": np.zeros((0, 0)), "nexpr": np.zeros((0, 0), np.int64)}


def chunk_partial(
    sparse: tuple[np.ndarray, np.ndarray, np.ndarray],
    by_gene: bool,
    gene_map: np.ndarray,
    row0: int,
    row_group: np.ndarray,
    row_scale: np.ndarray,
    keys: list[tuple],
    experiment: int,
    n_experiments: int,
    n_genes: int,
    mode: int,
    needs: Sequence[str],
) -> Partial:
    """The chunk step proper: the intermediates ``needs`` over one experiment's selected cells.

    ``sparse`` is (indptr, indices, data) of the cells' values, cell- or gene-major, and the
    other arguments are the kernel's (see ``kernels.grouped_moments``): ``row_group[r]`` is the
    code (a position in ``keys``) of cell position ``row0 + r``, or -1 for a cell not selected.
    """
    values = allocate(needs, len(keys), n_experiments, n_genes)
    acc = [values.get(name, _NOT_WANTED[name]) for name in ("sum", "sumsq", "nexpr")]
    indptr, indices, data = sparse
    grouped_moments(indptr, indices, data, by_gene, gene_map, row0, row_group, row_scale, mode, *acc)
    values[COUNTS][:, experiment] = np.bincount(row_group[row_group >= 0], minlength=len(keys))
    return Partial(keys, values)


def _window(rows: np.ndarray, codes: np.ndarray, scale: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, ...]:
    """Group codes and scale factors of rows ``[lo, hi)`` of a task (-1 and 1 for rows not selected)."""
    row_group = np.full(hi - lo, -1, dtype=np.int32)
    row_group[rows - lo] = codes
    row_scale = np.ones(hi - lo, dtype=np.float64)
    row_scale[rows - lo] = scale
    return row_group, row_scale


def aggregate_block(
    loc: AtlasLocation,
    task: BlockTask,
    expr: Expr | None,
    by: list[str],
    gene_map: np.ndarray,
    n_experiments: int,
    n_genes: int,
    normalize: str | None,
    needs: Sequence[str],
    groups: RunGroups | None = None,
) -> Partial:
    """chunk step from the cell-major store: the partial of the block's groups, genes mapped by ``gene_map``."""
    mode = NORMALIZE_MODES[normalize]
    rows, codes, keys, scale = _selection(loc, task, expr, by, mode, groups)
    if rows.size == 0:
        return Partial.empty(n_experiments, n_genes, needs)
    first, last = int(rows[0]), int(rows[-1]) + 1  # read only the span of the matching rows
    sparse = open_store(loc, task.store).read_rows(task.r0 + first, task.r0 + last)
    row_group, row_scale = _window(rows, codes, scale, first, last)
    return chunk_partial(
        sparse, False, gene_map, 0, row_group, row_scale, keys, task.experiment, n_experiments, n_genes, mode, needs
    )


def aggregate_genes(
    loc: AtlasLocation,
    task: GeneTask,
    expr: Expr | None,
    by: list[str],
    n_experiments: int,
    n_genes: int,
    normalize: str | None,
    needs: Sequence[str],
    groups: RunGroups | None = None,
) -> Partial:
    """chunk step from the gene-major copy: the requested genes over the experiment's matching cells."""
    mode = NORMALIZE_MODES[normalize]
    span = BlockTask(task.experiment, task.store, task.r0, task.r1)
    rows, codes, keys, scale = _selection(loc, span, expr, by, mode, groups)
    if rows.size == 0:
        return Partial.empty(n_experiments, n_genes, needs)
    sparse = open_gene_index(loc, task.gene_index).read_genes(np.asarray(task.genes))
    columns = np.asarray(task.columns, dtype=np.int32)  # the i-th gene read -> its output column
    row_group, row_scale = _window(rows, codes, scale, 0, task.r1 - task.r0)
    return chunk_partial(
        sparse, True, columns, task.r0, row_group, row_scale, keys, task.experiment, n_experiments, n_genes, mode, needs
    )


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
