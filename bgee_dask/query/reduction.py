"""Grouped gene statistics as a chunk / combine / finalize reduction.

- chunk: one storage block -> a ``Partial`` holding, for the groups present in the block,
  cell counts per experiment and per-gene sum, sum of squares and expressing-cell count;
- combine: partials add up, keyed by group values, so they can be merged in any tree;
- finalize: means, sample variances and fractions over the cells that *measured* each gene,
  which needs the experiments' gene sets: ``n_measured = counts @ measured``.

Everything accumulates in float64. Partials are small: a block holds few groups because
stores are sorted by metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

STATS = ("sum", "mean", "var", "n_expressed", "frac_expressed")


@dataclass
class Partial:
    keys: list[tuple]  # one tuple of `by` values per local group
    counts: np.ndarray  # (g, n_experiments) int64: cells per group and experiment
    sums: np.ndarray  # (g, n_genes) float64
    sumsq: np.ndarray  # (g, n_genes) float64
    nexpr: np.ndarray  # (g, n_genes) int64

    @classmethod
    def empty(cls, n_experiments: int, n_genes: int) -> Partial:
        return cls(
            [],
            np.zeros((0, n_experiments), np.int64),
            np.zeros((0, n_genes)),
            np.zeros((0, n_genes)),
            np.zeros((0, n_genes), np.int64),
        )


def combine(parts: Sequence[Partial]) -> Partial:
    """Sum partials group by group (the union of their groups)."""
    parts = [p for p in parts if p.keys] or list(parts[:1])
    if len(parts) == 1:
        return parts[0]
    index: dict[tuple, int] = {}
    for p in parts:
        for k in p.keys:
            index.setdefault(k, len(index))
    g = len(index)
    first = parts[0]
    out = Partial(
        list(index),
        np.zeros((g, first.counts.shape[1]), np.int64),
        np.zeros((g, first.sums.shape[1])),
        np.zeros((g, first.sums.shape[1])),
        np.zeros((g, first.sums.shape[1]), np.int64),
    )
    for p in parts:
        rows = np.fromiter((index[k] for k in p.keys), dtype=np.int64, count=len(p.keys))
        np.add.at(out.counts, rows, p.counts)
        np.add.at(out.sums, rows, p.sums)
        np.add.at(out.sumsq, rows, p.sumsq)
        np.add.at(out.nexpr, rows, p.nexpr)
    return out


def finalize(partial: Partial, measured: np.ndarray, stats: Sequence[str]) -> dict[str, np.ndarray]:
    """The statistics asked for, plus ``n_cells`` and ``n_measured``; NaN where undefined."""
    counts = partial.counts
    n_cells = counts.sum(axis=1)
    n_measured = counts @ measured.astype(np.int64)  # (g, E) @ (E, genes)
    out: dict[str, np.ndarray] = {"n_cells": n_cells, "n_measured": n_measured}
    with np.errstate(invalid="ignore", divide="ignore"):
        nm = n_measured.astype(np.float64)
        mean = np.where(n_measured > 0, partial.sums / nm, np.nan)
        if "sum" in stats:
            out["sum"] = np.where(n_measured > 0, partial.sums, np.nan)
        if "mean" in stats:
            out["mean"] = mean
        if "var" in stats:
            # Sum of squared deviations from the sums; clipped because rounding can leave -0.
            ssd = np.maximum(partial.sumsq - partial.sums * mean, 0.0)
            out["var"] = np.where(n_measured > 1, ssd / (nm - 1.0), np.nan)
        if "n_expressed" in stats:
            out["n_expressed"] = partial.nexpr
        if "frac_expressed" in stats:
            out["frac_expressed"] = np.where(n_measured > 0, partial.nexpr / nm, np.nan)
    return out


def check_stats(stats: Sequence[str]) -> list[str]:
    unknown = [s for s in stats if s not in STATS]
    if unknown:
        raise ValueError(f"unknown statistic(s) {unknown}; choose from {list(STATS)}")
    return list(dict.fromkeys(stats))
