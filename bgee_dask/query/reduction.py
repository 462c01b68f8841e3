"""Grouped gene statistics as a chunk / combine / finalize reduction, declared as data.

- chunk (``blocks.chunk_partial``): one storage block -> a ``Partial`` holding, for the groups
  present in the block, the *intermediates* the requested statistics need;
- combine: partials merge group by group, each intermediate with its own operation, so they can
  be merged in any tree;
- finalize: each statistic from the combined intermediates and ``n_measured``, the number of
  the group's cells that *measured* each gene (``counts @ measured``: an experiment measures a
  gene set, and a cell of it says nothing about the other genes).

``INTERMEDIATES`` and ``STATISTICS`` are the two tables: a statistic built from existing
intermediates is one more ``Statistic`` entry, and nothing else changes. Every array is
(groups, genes) except ``counts``, (groups, experiments). Everything accumulates in float64 or
int64. Partials are small: a block holds few groups because stores are sorted by metadata.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from bgee_dask.schema import BgeeInputError


@dataclass(frozen=True)
class Intermediate:
    """A per-group array that chunks produce and partials carry.

    ``per`` names its second axis (``"gene"`` or ``"experiment"``); ``combine`` merges two
    partials' rows for the same group and ``identity`` is the value of a group with no cells.
    """

    name: str
    dtype: type
    per: str = "gene"
    combine: np.ufunc = np.add
    identity: int = 0


@dataclass(frozen=True)
class Statistic:
    """One output statistic: the intermediates it reads and how it is computed from them.

    ``finalize(values, n_measured)`` gets the combined intermediates by name and the (groups,
    genes) int64 ``n_measured``; it returns a new (groups, genes) array and must not modify its
    inputs (statistics share them).
    """

    name: str
    needs: tuple[str, ...]
    finalize: Callable[[Mapping[str, np.ndarray], np.ndarray], np.ndarray]


INTERMEDIATES: dict[str, Intermediate] = {
    i.name: i
    for i in [
        Intermediate("counts", np.int64, per="experiment"),  # selected cells per group and experiment
        Intermediate("sum", np.float64),  # sum of the cells' values
        Intermediate("sumsq", np.float64),  # sum of their squares
        Intermediate("nexpr", np.int64),  # cells with a value > 0
    ]
}

#: Always carried: ``n_cells`` and ``n_measured`` come from it.
COUNTS = "counts"


def ratio(numerator: np.ndarray, denominator: np.ndarray, where: np.ndarray) -> np.ndarray:
    """``numerator / denominator`` as float64 where ``where``, NaN elsewhere (one new array)."""
    out = np.full(np.shape(numerator), np.nan)
    np.divide(numerator, denominator, out=out, where=where)
    return out


def _sum(x: Mapping[str, np.ndarray], n_measured: np.ndarray) -> np.ndarray:
    out = x["sum"].copy()
    out[n_measured == 0] = np.nan
    return out


def _mean(x: Mapping[str, np.ndarray], n_measured: np.ndarray) -> np.ndarray:
    return ratio(x["sum"], n_measured, n_measured > 0)


def _var(x: Mapping[str, np.ndarray], n_measured: np.ndarray) -> np.ndarray:
    """Sample variance over the measuring cells: (sumsq - sum * mean) / (n - 1), clipped at 0
    (rounding can leave a small negative), NaN below two cells."""
    some = n_measured > 0
    ssd = np.zeros(x["sum"].shape)
    np.divide(x["sum"], n_measured, out=ssd, where=some)  # the mean
    np.multiply(ssd, x["sum"], out=ssd, where=some)
    np.subtract(x["sumsq"], ssd, out=ssd)
    np.maximum(ssd, 0.0, out=ssd)
    return ratio(ssd, n_measured - 1, n_measured > 1)


def _n_expressed(x: Mapping[str, np.ndarray], n_measured: np.ndarray) -> np.ndarray:
    return x["nexpr"]


def _frac_expressed(x: Mapping[str, np.ndarray], n_measured: np.ndarray) -> np.ndarray:
    return ratio(x["nexpr"], n_measured, n_measured > 0)


STATISTICS: dict[str, Statistic] = {
    s.name: s
    for s in [
        Statistic("sum", ("sum",), _sum),  # NaN where no cell measured the gene
        Statistic("mean", ("sum",), _mean),
        Statistic("var", ("sum", "sumsq"), _var),
        Statistic("n_expressed", ("nexpr",), _n_expressed),  # 0 (not NaN) where unmeasured
        Statistic("frac_expressed", ("nexpr",), _frac_expressed),
    ]
}


def check_stats(stats: Sequence[str]) -> list[str]:
    """``stats`` without repeats, or ``BgeeInputError`` naming the unknown ones."""
    unknown = [s for s in stats if s not in STATISTICS]
    if unknown:
        raise BgeeInputError(f"unknown statistic(s) {unknown}; choose from {list(STATISTICS)}")
    return list(dict.fromkeys(stats))


def needed(stats: Sequence[str]) -> tuple[str, ...]:
    """The intermediates ``stats`` need, ``counts`` first, in table order."""
    wanted = {COUNTS, *(n for s in stats for n in STATISTICS[s].needs)}
    return tuple(n for n in INTERMEDIATES if n in wanted)


def allocate(names: Sequence[str], n_groups: int, n_experiments: int, n_genes: int) -> dict[str, np.ndarray]:
    """Each named intermediate for ``n_groups`` groups with no cells yet (its identity)."""
    sizes = {"gene": n_genes, "experiment": n_experiments}
    out = {}
    for name in names:
        spec = INTERMEDIATES[name]
        out[name] = np.full((n_groups, sizes[spec.per]), spec.identity, dtype=spec.dtype)
    return out


@dataclass
class Partial:
    """Intermediates for some groups: ``values[name][i]`` belongs to the group ``keys[i]``."""

    keys: list[tuple]  # one tuple of `by` values per local group, distinct
    values: dict[str, np.ndarray]  # intermediate name -> (len(keys), genes or experiments)

    @classmethod
    def empty(cls, n_experiments: int, n_genes: int, names: Sequence[str]) -> Partial:
        return cls([], allocate(names, 0, n_experiments, n_genes))

    def take(self, order: Sequence[int]) -> Partial:
        """The groups at positions ``order``, in that order."""
        return Partial([self.keys[i] for i in order], {n: v[list(order)] for n, v in self.values.items()})


def combine(parts: Sequence[Partial]) -> Partial:
    """Merge partials group by group (the union of their groups); they carry the same intermediates."""
    parts = [p for p in parts if p.keys] or list(parts[:1])
    if len(parts) == 1:
        return parts[0]
    index: dict[tuple, int] = {}
    for p in parts:
        for k in p.keys:
            index.setdefault(k, len(index))
    first = parts[0].values
    n_experiments, n_genes = first[COUNTS].shape[1], next((v.shape[1] for n, v in first.items() if n != COUNTS), 0)
    out = Partial(list(index), allocate(list(first), len(index), n_experiments, n_genes))
    for p in parts:
        rows = np.fromiter((index[k] for k in p.keys), dtype=np.int64, count=len(p.keys))
        for name, acc in out.values.items():
            # A partial's keys are distinct, so a fancy-indexed update is exact: ufunc.at is
            # only needed for repeated indices.
            acc[rows] = INTERMEDIATES[name].combine(acc[rows], p.values[name])
    return out


def finalize(partial: Partial, measured: np.ndarray, stats: Sequence[str]) -> dict[str, np.ndarray]:
    """``n_cells`` (groups,), ``n_measured`` (groups, genes) and each of ``stats``, NaN where undefined.

    ``measured`` is the (experiments, genes) bool matrix of the genes each experiment measured.
    """
    counts = partial.values[COUNTS]
    n_measured = counts @ measured.astype(np.int64)  # (g, E) @ (E, genes)
    out: dict[str, np.ndarray] = {"n_cells": counts.sum(axis=1), "n_measured": n_measured}
    for s in stats:
        out[s] = STATISTICS[s].finalize(partial.values, n_measured)
    return out
