"""One key per gene across experiments, whether a file named the gene by Ensembl id or by symbol.

Bgee's newer files give Ensembl ids as ``var_names`` and the symbol in ``var['feature_name']``;
older ones give the symbol itself as ``var_names``. Keyed by ``var_names`` alone, an atlas holding
both splits MALAT1 into two columns, and an experiment that measured it reads as one that did not.

Symbols are not ids, so the rule is cautious: a symbol stands for an id only when, within the
species, the id-named experiments pair it with exactly one id, and only when that gives no
experiment two genes under one key. Everything else keeps its own name. The stores are never
changed: the key lives in the catalog, next to the ``var_names`` it came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class GeneAlignment:
    """Per row of the genes table: its key, its symbol, and whether the key came from its symbol."""

    gene_key: np.ndarray
    gene_symbol: np.ndarray  # a symbol-named row keeps its name here once its key is an id
    by_symbol: np.ndarray  # bool


def align_genes(
    experiment: np.ndarray, species: np.ndarray, gene_id: np.ndarray, gene_symbol: np.ndarray | None
) -> GeneAlignment:
    """Keys for the rows of the genes table (one row per gene of each experiment).

    A row is keyed by an id in place of its own name when all of these hold, within its species:
    its name is a symbol that some row names by id (a symbol different from that row's id), and
    every such row gives the same id; its name is not itself an id some row names; and no other
    row of its experiment ends up with the same key.
    """
    gene_id = np.asarray(gene_id, dtype=object)
    n = len(gene_id)
    symbols = (
        np.full(n, None, dtype=object)
        if gene_symbol is None
        else pd.Series(np.asarray(gene_symbol, dtype=object)).where(lambda s: s.notna(), None).to_numpy()
    )
    key = gene_id.copy()
    by_symbol = np.zeros(n, dtype=bool)
    species = np.asarray(species, dtype=object)
    for rows in pd.Series(species).groupby(species, sort=False).indices.values():
        target = _symbol_targets(gene_id[rows], symbols[rows])
        hit = pd.notna(target)
        key[rows[hit]] = target[hit]
        by_symbol[rows[hit]] = True
    # a key twice in one experiment (the id was there already, or two symbols name it): those
    # rows aligned by symbol keep their own names, which no id-named row uses
    if by_symbol.any():
        frame = pd.DataFrame({"e": np.asarray(experiment, dtype=object), "k": key})
        undo = frame.duplicated(keep=False).to_numpy() & by_symbol
        key[undo] = gene_id[undo]
        by_symbol &= ~undo
    filled = symbols.copy()
    unnamed = by_symbol & pd.isna(symbols)
    filled[unnamed] = gene_id[unnamed]
    return GeneAlignment(key, filled, by_symbol)


def _symbol_targets(gene_id: np.ndarray, symbol: np.ndarray) -> np.ndarray:
    """Per row of one species: the id its name stands for as a symbol, or NaN."""
    target = np.full(len(gene_id), np.nan, dtype=object)
    named = pd.notna(symbol) & (symbol != gene_id)
    names = pd.Index(gene_id)
    maybe = names.isin(pd.unique(symbol[named]))
    if not maybe.any():  # an atlas of id-named files only: nothing to align, and no pairs to build
        return target
    pairs = pd.DataFrame({"symbol": symbol[named], "id": gene_id[named]}).drop_duplicates()
    ids_per_symbol = pairs.groupby("symbol")["id"].transform("size")
    unique = pairs[ids_per_symbol.to_numpy() == 1].set_index("symbol")["id"]
    target[maybe] = pd.Series(gene_id[maybe]).map(unique).to_numpy(dtype=object)
    target[names.isin(pairs["id"].unique())] = np.nan  # an id stays itself
    return target
