"""Planning a query from the catalog alone: which experiments, which blocks, which genes.

The filter is first evaluated on the catalog's runs table with three-valued logic: runs that
certainly fail are dropped, and with them every block and experiment holding none of the
rest. What remains is one task per storage block touched, narrowed to the rows that may
match; the tasks decide the remaining uncertainty cell by cell.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bgee_dask.catalog.reader import AtlasCatalog
from bgee_dask.query.filter import PARTIAL_FALSE, PARTIAL_TRUE, Expr, check_literals_fit, evaluate_partial
from bgee_dask.query.genes import gene_vocabulary, unknown_genes_message
from bgee_dask.query.groups import group_codes
from bgee_dask.schema import CANONICAL_COLUMNS, DERIVED_COLUMNS, InputKeyError


@dataclass(frozen=True)
class BlockTask:
    """Rows ``[r0, r1)`` of one experiment's store, inside one storage block."""

    experiment: int  # position in QueryPlan.experiments
    store: str
    r0: int
    r1: int


@dataclass(frozen=True)
class GeneTask:
    """All requested genes of one experiment, read from its gene-major copy, over rows ``[r0, r1)``."""

    experiment: int
    store: str
    gene_index: str
    r0: int
    r1: int
    genes: tuple[int, ...]  # positions in the experiment's var
    columns: tuple[int, ...]  # matching output gene columns


#: The gene-major copy is used when it reads fewer values than this share of the row blocks'.
GENE_PATH_SHARE = 0.25


@dataclass
class QueryPlan:
    experiments: pd.DataFrame  # catalog rows of the experiments that may hold matching cells
    tasks: list[BlockTask]
    gene_ids: pd.Index  # output genes
    gene_symbols: np.ndarray | None
    gene_maps: list[np.ndarray]  # per experiment: its var position -> output gene column, or -1
    measured: np.ndarray  # (n_experiments, n_genes) bool
    gene_tasks: dict[int, GeneTask]  # experiments whose aggregation reads the gene-major copy instead
    runs: CandidateRuns

    def aggregation_tasks(self) -> tuple[list[BlockTask], list[GeneTask]]:
        """Row-block tasks for the experiments that scan, gene tasks for the others."""
        return [t for t in self.tasks if t.experiment not in self.gene_tasks], list(self.gene_tasks.values())


def check_columns(catalog: AtlasCatalog, columns: Sequence[str], what: str) -> None:
    """Every referenced column must exist in some experiment; otherwise name it and its near misses."""
    # the canonical and derived columns exist in every store (all missing where a file lacks one)
    known: set[str] = {*CANONICAL_COLUMNS, *DERIVED_COLUMNS}
    known |= set(catalog.runs.columns) - {"experiment", "row_start", "row_stop"}
    if "obs_columns" in catalog.experiments:
        for cols in catalog.experiments["obs_columns"]:
            known.update(list(cols))
    unknown = [c for c in columns if c not in known]
    if unknown:
        hints = {c: difflib.get_close_matches(c, sorted(known), n=3) for c in unknown}
        detail = "; ".join(f"{c!r}" + (f" (did you mean {', '.join(h)}?)" if h else "") for c, h in hints.items())
        raise InputKeyError(f"unknown {what} column {detail}")


def check_filter_types(catalog: AtlasCatalog, expr: Expr) -> None:
    """Every literal must fit its column's type in at least one experiment (see ``filter.evaluate``)."""
    if "obs_kinds" not in catalog.experiments:
        return
    check_literals_fit(expr, [json.loads(k) for k in catalog.experiments["obs_kinds"] if isinstance(k, str)])


@dataclass
class CandidateRuns:
    """The catalog runs that may hold matching cells, indexed for planning.

    ``frame`` keeps the catalog's row order; ``order`` sorts it by experiment position in the
    plan, then row, and ``bounds[e]:bounds[e + 1]`` are experiment ``e``'s runs in that order
    (disjoint and sorted, as runs are). ``certain`` (in frame order): every cell of the run matches.
    """

    frame: pd.DataFrame
    certain: np.ndarray
    order: np.ndarray
    bounds: np.ndarray
    starts: np.ndarray  # row_start in sorted order
    stops: np.ndarray


def _candidate_runs(catalog: AtlasCatalog, expr: Expr | None) -> tuple[pd.DataFrame, np.ndarray]:
    """The runs that may hold matching cells, and which of them certainly match in every cell."""
    runs = catalog.runs
    if expr is None or runs.empty:
        return runs, np.ones(len(runs), dtype=bool)
    available = set(runs.columns) - {"row_start", "row_stop"}
    state = np.asarray(evaluate_partial(expr, runs, available))
    maybe = state != PARTIAL_FALSE
    return runs[maybe], state[maybe] == PARTIAL_TRUE


def _index_runs(runs: pd.DataFrame, certain: np.ndarray, experiments: pd.DataFrame) -> CandidateRuns:
    position_of = {key: e for e, key in enumerate(experiments["experiment"])}
    column = runs["experiment"]
    if isinstance(column.dtype, pd.CategoricalDtype):
        table = np.asarray([position_of.get(k, -1) for k in column.cat.categories], dtype=np.int64)
        position = table[column.cat.codes.to_numpy()] if len(table) else np.zeros(0, np.int64)
    else:
        position = np.asarray([position_of.get(k, -1) for k in column], dtype=np.int64)
    starts, stops = runs["row_start"].to_numpy(np.int64), runs["row_stop"].to_numpy(np.int64)
    order = np.lexsort((starts, position))
    bounds = np.searchsorted(position[order], np.arange(len(experiments) + 1))
    return CandidateRuns(runs, certain, order, bounds, starts[order], stops[order])


def resolve_genes(catalog: AtlasCatalog, experiments: pd.DataFrame, genes: Sequence[str] | None):
    """Output gene ids (and symbols) for the query; unknown names are an error listing them.

    Names are looked up as ids first, then as symbols, among the queried experiments' genes.
    Everything runs on the catalog's gene lookup (integer codes), the same one the all-genes
    path and ``make_plan`` use: no pass over the genes table as strings.
    """
    codes, symbols = resolve_gene_codes(catalog, experiments, genes)
    return pd.Index(catalog.gene_lookup.ids[codes]), symbols


def resolve_gene_codes(
    catalog: AtlasCatalog, experiments: pd.DataFrame, genes: Sequence[str] | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """``resolve_genes`` as positions in the gene lookup's ids (what planning maps columns with)."""
    lookup = catalog.gene_lookup
    rows = lookup.rows_of(experiments["experiment"])
    present = np.zeros(len(lookup.ids), dtype=bool)
    present[lookup.code[rows]] = True
    if genes is None:  # the union of the experiments' genes
        codes = np.flatnonzero(present)
        if lookup.symbol_of_id is None or not (lookup.symbol_of_id[codes] >= 0).any():
            return codes, None
        return codes, lookup.symbols_of(codes)
    wanted = list(dict.fromkeys(str(g) for g in genes))
    by_id = {g for g in wanted if (code := _code_of(lookup.ids, g)) is not None and present[code]}
    missing = [g for g in wanted if g not in by_id]
    sym_to_ids: dict[str, list[str]] = {}
    if missing and lookup.symbol_code is not None:
        position = {str(v): i for i, v in enumerate(lookup.symbol_values)}
        asked = {position[m]: m for m in missing if m in position}
        hit = rows[np.isin(lookup.symbol_code[rows], list(asked))] if asked else rows[:0]
        for sym_code, gene_code in zip(lookup.symbol_code[hit].tolist(), lookup.code[hit].tolist(), strict=True):
            sym_to_ids.setdefault(asked[sym_code], set()).add(str(lookup.ids[gene_code]))
        sym_to_ids = {sym: sorted(found) for sym, found in sym_to_ids.items()}
    unknown = [g for g in missing if g not in sym_to_ids]
    if unknown:
        raise InputKeyError(unknown_genes_message(unknown, gene_vocabulary(lookup, rows)))
    ordered = [i for g in wanted for i in ([g] if g in by_id else sym_to_ids[g])]
    codes = np.asarray([_code_of(lookup.ids, g) for g in dict.fromkeys(ordered)], dtype=np.int64)
    symbols_out = None
    if lookup.symbol_code is not None:
        # each gene's symbol: the first one given among the queried experiments, in catalog order
        named = rows[np.isin(lookup.code[rows], codes) & (lookup.symbol_code[rows] >= 0)]
        first_code, first_at = np.unique(lookup.code[named], return_index=True)
        symbol_of = dict(
            zip(first_code.tolist(), lookup.symbol_values[lookup.symbol_code[named[first_at]]], strict=True)
        )
        if symbol_of:
            symbols_out = np.asarray([symbol_of.get(int(c)) for c in codes], dtype=object)
    return codes, symbols_out


def _code_of(sorted_ids: np.ndarray, name: str) -> int | None:
    """Position of ``name`` in the sorted gene ids, or None."""
    pos = int(np.searchsorted(sorted_ids, name))
    return pos if pos < len(sorted_ids) and sorted_ids[pos] == name else None


def make_plan(catalog: AtlasCatalog, expr: Expr | None, genes: Sequence[str] | None) -> QueryPlan:
    runs, certain = _candidate_runs(catalog, expr)
    exps = catalog.experiments
    keep = exps["experiment"].isin(runs["experiment"].unique()) if len(runs) else exps["experiment"].isin([])
    experiments = exps[keep].reset_index(drop=True)
    candidate = _index_runs(runs, certain, experiments)
    gene_codes, gene_symbols = resolve_gene_codes(catalog, experiments if len(experiments) else exps, genes)
    lookup = catalog.gene_lookup
    gene_ids = pd.Index(lookup.ids[gene_codes])
    # output column of every gene id of the catalog (-1: not asked for)
    column_of_code = np.full(len(lookup.ids), -1, dtype=np.int64)
    column_of_code[gene_codes] = np.arange(len(gene_codes))
    no_rows = slice(0, 0)
    gene_maps, measured = [], np.zeros((len(experiments), len(gene_ids)), dtype=bool)
    tasks: list[BlockTask] = []
    gene_tasks: dict[int, GeneTask] = {}
    for e, row in experiments.iterrows():
        rows = lookup.rows.get(row["experiment"], no_rows)
        cols = column_of_code[lookup.code[rows]]
        hit = cols >= 0
        cols = cols[hit]
        positions = lookup.gene_index[rows][hit]
        gmap = np.full(int(row["n_genes"]), -1, dtype=np.int32)
        gmap[positions] = cols.astype(np.int32)
        measured[e, cols] = True
        gene_maps.append(gmap)
        mine_runs = slice(candidate.bounds[e], candidate.bounds[e + 1])
        blocks = np.asarray(row["row_blocks"], dtype=np.int64)
        mine = _block_tasks(int(e), row["store"], candidate.starts[mine_runs], candidate.stops[mine_runs], blocks)
        tasks.extend(mine)
        if genes is not None and mine and row.get("gene_index") and lookup.gene_nnz is not None:
            # exact sizes from the catalog: values of the requested genes vs values of the blocks touched
            gene_values = int(lookup.gene_nnz[rows][hit].sum())
            span = (mine[0].r0, mine[-1].r1)
            row_values = _values_in_rows(row, [(t.r0, t.r1) for t in mine])
            if gene_values < GENE_PATH_SHARE * row_values:
                gene_tasks[int(e)] = GeneTask(
                    int(e),
                    row["store"],
                    row["gene_index"],
                    span[0],
                    span[1],
                    tuple(int(x) for x in positions),
                    tuple(int(x) for x in cols),
                )
    return QueryPlan(experiments, tasks, gene_ids, gene_symbols, gene_maps, measured, gene_tasks, candidate)


@dataclass(frozen=True)
class RunGroups:
    """A task's matching rows and their groups, decided by the catalog: segments of rows relative
    to the task's ``r0`` (runs of cells sharing their metadata) with a group number each."""

    starts: np.ndarray
    stops: np.ndarray
    codes: np.ndarray
    keys: list[tuple]

    def rows_and_codes(self) -> tuple[np.ndarray, np.ndarray]:
        lengths = self.stops - self.starts
        rows = np.repeat(self.stops - lengths.cumsum(), lengths) + np.arange(int(lengths.sum()))
        return rows, np.repeat(self.codes, lengths).astype(np.int32)


def run_groups(plan: QueryPlan, spans: Sequence[tuple[int, int, int]], by: Sequence[str]) -> list[RunGroups | None]:
    """For each (experiment, r0, r1) span: its matching rows and groups when the catalog alone decides
    them, else None (its task then reads the cells' metadata).

    The catalog decides when every candidate run in the span certainly matches the filter and has
    a value for every ``by`` column. Only text columns qualify: a catalog number column may have
    been widened to float by concatenation, and its keys would then differ in type from the
    store's. Such a task reads no obs column at all.
    """
    out: list[RunGroups | None] = [None] * len(spans)
    runs, by = plan.runs, list(by)
    frame = runs.frame
    if frame.empty or any(c not in frame or not _is_text(frame[c]) for c in by):
        return out
    codes, keys = group_codes(frame, by)  # once for all runs; each span renumbers its own
    decided = runs.certain
    if by:
        decided = decided & ~frame[by].isna().to_numpy().any(axis=1)
    codes, decided = codes[runs.order], decided[runs.order]
    starts, stops, bounds = runs.starts, runs.stops, runs.bounds
    for i, (e, r0, r1) in enumerate(spans):
        a, b = bounds[e], bounds[e + 1]  # an experiment's runs are sorted and disjoint
        lo = a + int(np.searchsorted(stops[a:b], r0, side="right"))
        hi = a + int(np.searchsorted(starts[a:b], r1, side="left"))
        if lo >= hi or not decided[lo:hi].all():
            continue
        present, local = np.unique(codes[lo:hi], return_inverse=True)
        out[i] = RunGroups(
            np.maximum(starts[lo:hi], r0) - r0,
            np.minimum(stops[lo:hi], r1) - r0,
            local.reshape(-1).astype(np.int32),
            [keys[k] for k in present],
        )
    return out


def _is_text(column: pd.Series) -> bool:
    values = column.dtype.categories if isinstance(column.dtype, pd.CategoricalDtype) else column
    return pd.api.types.infer_dtype(values, skipna=True) in ("string", "empty")


def _values_in_rows(row: pd.Series, spans: list[tuple[int, int]]) -> float:
    """Values stored in these row spans, estimated from the experiment's mean per row."""
    per_row = float(row["nnz"]) / max(1, int(row["n_cells"]))
    return per_row * sum(b - a for a, b in spans)


def _block_tasks(e: int, store: str, starts: np.ndarray, stops: np.ndarray, blocks: np.ndarray) -> list[BlockTask]:
    """One task per block overlapping a candidate run, covering only the candidate rows' span."""
    out = []
    for b0, b1 in zip(blocks[:-1].tolist(), blocks[1:].tolist(), strict=True):
        inside = (starts < b1) & (stops > b0)
        if not inside.any():
            continue
        r0 = max(b0, int(starts[inside].min()))
        r1 = min(b1, int(stops[inside].max()))
        out.append(BlockTask(e, store, r0, r1))
    return out
