"""A selection of cells across an atlas, and what can be computed from it."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import dask
import numpy as np
import pandas as pd
import xarray as xr

from bgee_dask._runtime import OncePerProcess, cpu_count, current_client
from bgee_dask.catalog.reader import AtlasCatalog
from bgee_dask.query import blocks
from bgee_dask.query.filter import Expr, parse_filter
from bgee_dask.query.genes import gene_symbols, measured_frame, parse_genes, with_symbol_index
from bgee_dask.query.names import add_name_coords
from bgee_dask.query.plan import (
    BlockTask,
    GeneTask,
    QueryPlan,
    check_columns,
    check_filter_types,
    make_plan,
    run_groups,
)
from bgee_dask.query.preload import prepare_worker_soon
from bgee_dask.query.reduction import Partial, check_stats, combine, finalize, needed
from bgee_dask.schema import CANONICAL_COLUMNS, DERIVED_COLUMNS, BgeeInputError, InputTypeError

if TYPE_CHECKING:
    import anndata
    import scipy.sparse as sp

#: Partials merged per combine task of the tree reduction.
FAN_IN = 8
OBS_COLUMNS = [*CANONICAL_COLUMNS, *DERIVED_COLUMNS]


#: Loading the block kernels for this process's own threads (looked up when it starts: tests swap it).
_LOCAL_PREPARE = OncePerProcess(lambda: blocks.prepare_worker(), "bgee-dask-prepare")


def _prepare_workers(client: Any | None) -> None:
    """Have the workers load the block kernels while this process plans (see ``blocks.prepare_worker``).

    Best effort and not waited for: a worker that cannot run it loads the kernels with its
    first block instead, as it would have anyway. In this process it is done once: with a cold
    numba cache the kernels compile for seconds, and a thread per query would only queue on
    numba's compiler lock.
    """
    if client is not None:
        client.run(prepare_worker_soon, wait=False)
        return
    _LOCAL_PREPARE.start_in_background()  # Dask's threads run the blocks in this process


class Query:
    """Cells matching ``filter`` in every experiment of an atlas, restricted to ``genes``."""

    def __init__(
        self,
        catalog: AtlasCatalog,
        filter: str | None = None,
        genes: Sequence[str] | str | None = None,
        client: Any | None = None,
        progress: bool = False,
    ):
        self.catalog = catalog
        self.progress = progress
        self.location = catalog.location
        if filter is not None and not isinstance(filter, str):
            raise InputTypeError(f"filter must be a string (or None for every cell), not {type(filter).__name__}")
        self.filter_text = filter
        self.expr: Expr | None = parse_filter(filter) if filter is not None and filter.strip() else None
        if self.expr is not None:
            check_columns(catalog, sorted(self.expr.columns()), "filter")
            check_filter_types(catalog, self.expr)
        self.genes = parse_genes(genes)  # "CD19,LYZ" means ["CD19", "LYZ"]
        self.client = client
        _prepare_workers(client or current_client())
        # Planning reads only the catalog, so unknown genes fail here rather than mid-compute.
        self.plan: QueryPlan = make_plan(self.catalog, self.expr, self.genes)

    def __repr__(self) -> str:
        p = self.plan
        return (
            f"<Query filter={self.filter_text!r}: {len(p.experiments)} experiments, {len(p.tasks)} blocks, "
            f"{len(p.gene_ids)} genes>"
        )

    # -- execution -----------------------------------------------------------------------
    def _compute(self, *values: Any) -> tuple:
        client = self.client or current_client()
        if client is not None:
            futures = client.compute(list(values))
            if self.progress:
                from distributed import progress

                progress(futures)
            return tuple(client.gather(futures))
        # Dask's threaded scheduler named by its function: named by a string, dask imports
        # distributed to look for a client, which this method has done already.
        from dask.threaded import get as threaded_get

        if self.progress:
            from dask.diagnostics import ProgressBar

            with ProgressBar(out=sys.stderr):
                return dask.compute(*values, scheduler=threaded_get, num_workers=cpu_count())
        return dask.compute(*values, scheduler=threaded_get, num_workers=cpu_count())

    # -- results ---------------------------------------------------------------------------
    def obs(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The matching cells' metadata (canonical columns by default), indexed by cell name."""
        cols = list(columns) if columns is not None else OBS_COLUMNS
        check_columns(self.catalog, cols, "obs")
        plan = self.plan
        parts = [dask.delayed(_obs_block)(self.location, t, self.expr, cols) for t in plan.tasks]
        frames = self._compute(*parts) if parts else ()
        return _concat_obs(frames, cols)

    def aggregate(
        self,
        by: Sequence[str] | str,
        stats: Sequence[str] = ("sum", "mean", "var", "n_expressed", "frac_expressed"),
        normalize: str | None = None,
    ) -> xr.Dataset:
        """Pseudobulk statistics per group of cells and gene (see ``reduction.py`` for the semantics)."""
        by = [by] if isinstance(by, str) else list(by)
        stats = check_stats(stats)
        if normalize not in blocks.NORMALIZE_MODES:
            raise BgeeInputError(f"unknown normalize {normalize!r}; choose None, 'cp10k' or 'log1p_cp10k'")
        check_columns(self.catalog, by, "group-by")
        plan = self.plan
        n_exp, n_genes = len(plan.experiments), len(plan.gene_ids)
        block_tasks, gene_tasks = plan.aggregation_tasks()
        maps = _gene_map_args(plan.gene_maps, block_tasks)
        # where the catalog decides which rows match and their groups, tasks read no metadata
        spans = [(t.experiment, t.r0, t.r1) for t in [*block_tasks, *gene_tasks]]
        groups = run_groups(plan, spans, by)
        loc, expr, needs = self.location, self.expr, needed(stats)
        leaves = [
            (blocks.aggregate_block, (loc, t, expr, by, maps[t.experiment], n_exp, n_genes, normalize, needs, g))
            for t, g in zip(block_tasks, groups[: len(block_tasks)], strict=True)
        ] + [
            (blocks.aggregate_genes, (loc, t, expr, by, n_exp, n_genes, normalize, needs, g))
            for t, g in zip(gene_tasks, groups[len(block_tasks) :], strict=True)
        ]
        layer = _leaf_tasks(leaves, lambda: [_values_read(plan, t) for t in [*block_tasks, *gene_tasks]])
        while len(layer) > FAN_IN:
            layer = [dask.delayed(_combine_list)(layer[i : i + FAN_IN]) for i in range(0, len(layer), FAN_IN)]
        # the last combine runs here: one task and one transfer fewer on the critical path
        partial = combine(self._compute(*layer)) if layer else Partial.empty(n_exp, n_genes, needs)
        # ds.sel(gene_symbol="CD19") works, and id columns get their names (cellTypeId -> cellTypeName)
        return add_name_coords(with_symbol_index(_to_dataset(partial, plan, by, stats, normalize)), self.catalog)

    def pseudobulk(self, by: Sequence[str] | str, *, min_cells: int = 10) -> anndata.AnnData:
        """Summed raw counts per group of ``by`` with at least ``min_cells`` cells, as an AnnData for
        PyDESeq2 (``DeseqDataSet(adata=pb, design="~cellTypeId")``) and decoupler, with no reshaping.

        Integer counts over the genes measured in every kept group's experiments; see
        ``pseudobulk.pseudobulk`` for obs, layers and uns.
        """
        from bgee_dask.query.pseudobulk import pseudobulk

        return pseudobulk(self, by, min_cells=min_cells)

    def to_anndata(self):
        """The matching cells as an in-memory AnnData (sparse X over the query's genes).

        Genes an experiment did not measure are 0 in X, which does not mean "not expressed":
        ``varm["measured"]`` (a boolean DataFrame, genes x experiments, its columns the values
        of ``obs["experimentId"]``) says which genes each experiment measured, so
        ``adata.varm["measured"][exp]`` is the mask of the genes valid for the cells of ``exp``.
        ``var["gene_symbol"]`` holds the symbols where the atlas has them.
        """
        import anndata

        plan = self.plan
        parts = [
            dask.delayed(blocks.extract_block)(
                self.location, t, self.expr, OBS_COLUMNS, plan.gene_maps[t.experiment], len(plan.gene_ids)
            )
            for t in plan.tasks
        ]
        names = [dask.delayed(_names_block)(self.location, t, self.expr) for t in plan.tasks]
        results = self._compute(*parts, *names) if parts else ()
        pieces, name_parts = results[: len(parts)], results[len(parts) :]
        obs = _concat_obs([p[0] for p in pieces], OBS_COLUMNS)
        obs.index = pd.Index(np.concatenate(name_parts) if name_parts else [], dtype=object).astype(str)
        x = _stack_csr([p[1:] for p in pieces], len(plan.gene_ids))
        var = pd.DataFrame(index=pd.Index(plan.gene_ids, name="gene_id"))
        var["gene_symbol"] = pd.Categorical(gene_symbols(plan.gene_ids, plan.gene_symbols))
        adata = anndata.AnnData(X=x, obs=obs, var=var)
        # genes x experiments (not the transpose in uns): a column per experiment writes fast to h5ad
        adata.varm["measured"] = measured_frame(plan, var.index)
        adata.obs_names_make_unique()
        return adata

    def to_dask(self):
        """The selection as a dask array of ``sparse.COO`` blocks (one per storage block touched).

        Blocks are COO rather than scipy matrices because dask's reductions work on them.
        """
        import dask.array as da
        import sparse

        plan = self.plan
        sizes = self._compute(*[dask.delayed(_count_block)(self.location, t, self.expr) for t in plan.tasks])
        n_genes = len(plan.gene_ids)
        arrays = []
        for t, n in zip(plan.tasks, sizes, strict=True):
            if n == 0:
                continue
            block = dask.delayed(_coo_block)(self.location, t, self.expr, plan.gene_maps[t.experiment], n_genes)
            meta = sparse.COO.from_numpy(np.zeros((0, n_genes), dtype=np.float32))
            arrays.append(da.from_delayed(block, shape=(int(n), n_genes), dtype=np.float32, meta=meta))
        if not arrays:
            return da.from_array(sparse.COO.from_numpy(np.zeros((0, n_genes), dtype=np.float32)), chunks=(0, n_genes))
        return da.concatenate(arrays, axis=0)


# -- task helpers (top-level so that they pickle) --------------------------------------------
def _obs_block(loc, task, expr, cols) -> pd.DataFrame:
    rows, frame = blocks.select(loc, task, expr, cols)
    frame.index = blocks.obs_names_block(loc, task, rows)
    return frame


def _names_block(loc, task, expr) -> np.ndarray:
    rows, _ = blocks.select(loc, task, expr, [])
    return blocks.obs_names_block(loc, task, rows)


def _count_block(loc, task, expr) -> int:
    rows, _ = blocks.select(loc, task, expr, [])
    return int(rows.size)


def _leaf_tasks(leaves: list[tuple[Any, tuple]], sizes: Callable[[], list[float]]) -> list:
    """The chunk tasks, largest first when the client gathers them all (no combine tasks).

    Dask hands a worker its next task before the worker is free, in graph order; with a few
    tasks of unequal size, two large ones could queue on one worker while the other idled, so
    the largest go first. Over more tasks the tree's order matters more: combines must run as
    soon as their inputs exist, so partials never pile up.
    """
    # not pure: pure keys hash the arguments (gene maps of 100s of kB), more work than submitting the
    # graph, for keys no other query shares
    if len(leaves) > FAN_IN:
        return [dask.delayed(fn, pure=False)(*args) for fn, args in leaves]
    out = []
    for (fn, args), size in zip(leaves, sizes(), strict=True):
        with dask.annotate(priority=int(size)):
            out.append(dask.delayed(fn, pure=False)(*args))
    return out


def _values_read(plan: QueryPlan, task: BlockTask | GeneTask) -> float:
    """About how many stored values a task reads (its rows times its experiment's values per row)."""
    row = plan.experiments.iloc[task.experiment]
    return (task.r1 - task.r0) * float(row["nnz"]) / max(1, int(row["n_cells"]))


#: Gene maps are written into the block tasks themselves while their copies stay this small.
INLINE_MAP_BYTES = 2 << 20


def _gene_map_args(gene_maps: list[np.ndarray], tasks: list) -> list:
    """Each experiment's gene map as its block tasks take it.

    A map shared as its own key costs every block a scheduler round trip before it can start,
    a large part of a selective query; written into the tasks, it is copied once per block
    instead, which only a query over many blocks cannot afford.
    """
    copies = sum(gene_maps[t.experiment].nbytes for t in tasks)
    if copies <= INLINE_MAP_BYTES:
        return list(gene_maps)
    return [dask.delayed(m, pure=True) for m in gene_maps]


def _coo_block(loc, task, expr, gene_map, n_genes):
    import scipy.sparse as sp  # here and in _stack_csr: aggregations never need scipy
    import sparse

    _, indptr, indices, data = blocks.extract_block(loc, task, expr, [], gene_map, n_genes)
    m = sp.csr_matrix((data.astype(np.float32), indices, indptr), shape=(len(indptr) - 1, n_genes))
    return sparse.COO.from_scipy_sparse(m)


def _combine_list(parts: list[Partial]) -> Partial:
    return combine(parts)


def _concat_obs(frames, cols) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in cols})
    for f in frames:  # categoricals with different categories would turn into object anyway
        for c in f.columns:
            if isinstance(f[c].dtype, pd.CategoricalDtype):
                f[c] = f[c].astype(object)
    out = pd.concat(frames)
    for c in out.columns:
        if out[c].dtype == object and out[c].nunique(dropna=True) < max(2, len(out) // 2):
            out[c] = out[c].astype("category")
    return out


def _stack_csr(pieces, n_genes: int) -> sp.csr_matrix:
    import scipy.sparse as sp

    mats = [sp.csr_matrix((d, i, p), shape=(len(p) - 1, n_genes)) for p, i, d in pieces if len(p) > 1]
    if not mats:
        return sp.csr_matrix((0, n_genes), dtype=np.float32)
    return sp.vstack(mats, format="csr")


def _sort_key(key: tuple) -> tuple:
    return tuple((v is None, str(v) if not isinstance(v, (int, float)) else v) for v in key)


def _to_dataset(partial: Partial, plan: QueryPlan, by: list[str], stats: list[str], normalize) -> xr.Dataset:
    order = sorted(range(len(partial.keys)), key=lambda i: _sort_key(partial.keys[i]))
    partial = partial.take(order)
    values = finalize(partial, plan.measured, stats)
    coords: dict[str, Any] = {"gene": ("gene", np.asarray(plan.gene_ids, dtype=object))}
    coords["gene_symbol"] = ("gene", gene_symbols(plan.gene_ids, plan.gene_symbols))
    for i, col in enumerate(by):
        coords[col] = ("group", np.asarray([k[i] for k in partial.keys], dtype=object))
    data_vars = {"n_cells": (("group",), values["n_cells"])}
    data_vars["n_measured"] = (("group", "gene"), values["n_measured"])
    for s in stats:
        data_vars[s] = (("group", "gene"), values[s])
    ds = xr.Dataset(data_vars, coords=coords)
    ds.attrs.update({"by": list(by), "stats": list(stats), "normalize": str(normalize)})
    return ds
