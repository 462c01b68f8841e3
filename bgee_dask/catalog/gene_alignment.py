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

import numpy as np


def align_gene_codes(
    experiment: np.ndarray, species: np.ndarray, name: np.ndarray, symbol: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rule on numbered rows: (key, symbol, by_symbol) per row.

    ``experiment`` and ``species`` are codes per row; ``name`` (the gene's own name) and
    ``symbol`` (-1 where missing) are codes into one list of strings shared by both, so that a
    name equal to a symbol has the same code. A row is keyed by an id in place of its name when
    all of these hold, within its species: its name is a symbol that some row names by id (a
    symbol different from that row's id), and every such row gives the same id; its name is not
    itself an id some row names; and no other row of its experiment ends up with the same key.
    The returned symbol is the row's, or its own name when it was keyed by symbol without one.

    Integer codes instead of strings: the catalog reads them from Arrow dictionaries, and a
    96-experiment atlas (2.8M rows) no longer turns its names into Python strings to align them.
    """
    experiment, species, name, symbol = (np.asarray(a, dtype=np.int64) for a in (experiment, species, name, symbol))
    n = len(name)
    width = int(max(name.max(initial=-1), symbol.max(initial=-1))) + 1
    size = (int(species.max(initial=-1)) + 1) * width  # (species, string) pairs as one integer
    if size * width >= 2**63:
        raise ValueError(f"too many distinct gene names to align ({width})")
    known = species >= 0  # a row of no known species is never aligned
    named = known & (symbol >= 0) & (symbol != name)
    named_symbol = species[named] * width + symbol[named]
    named_id = species[named] * width + name[named]
    row_name = np.where(known, species, 0) * width + name
    # rows whose name is a symbol some row pairs with an id, and is not itself such an id
    candidate = known & _member(row_name, named_symbol, size) & ~_member(row_name, named_id, size)
    if not candidate.any():  # an atlas of id-named files only: nothing to align, no pairs to build
        return name.copy(), symbol.copy(), np.zeros(n, dtype=bool)
    # the distinct (symbol, id) pairs of the symbols candidates use; a symbol with one id stands for it
    wanted = _member(named_symbol, row_name[candidate], size)
    pairs = np.unique(named_symbol[wanted] * width + name[named][wanted])
    pair_symbol, first, ids_per_symbol = np.unique(pairs // width, return_index=True, return_counts=True)
    single = ids_per_symbol == 1
    symbol_keys, symbol_ids = pair_symbol[single], (pairs % width)[first[single]]

    rows = np.flatnonzero(candidate)
    place = np.minimum(np.searchsorted(symbol_keys, row_name[rows]), max(0, len(symbol_keys) - 1))
    hit = symbol_keys[place] == row_name[rows] if len(symbol_keys) else np.zeros(len(rows), dtype=bool)
    by_symbol = np.zeros(n, dtype=bool)
    by_symbol[rows[hit]] = True
    key = name.copy()
    key[rows[hit]] = symbol_ids[place[hit]]
    if by_symbol.any():
        # a key twice in one experiment (the id was there already, or two symbols name it): those
        # rows aligned by symbol keep their own names, which no id-named row uses
        involved = np.flatnonzero(_member(experiment, experiment[by_symbol], int(experiment.max()) + 1))
        pair = experiment[involved] * width + key[involved]
        _, where, count = np.unique(pair, return_inverse=True, return_counts=True)
        undo = involved[(count[where] > 1) & by_symbol[involved]]
        key[undo] = name[undo]
        by_symbol[undo] = False
    filled = np.where(by_symbol & (symbol < 0), name, symbol)
    return key, filled, by_symbol


#: Membership tests by a table of flags up to this many possible values (one byte each), else by sorting.
_FLAG_TABLE_MAX = 1 << 26


def _member(values: np.ndarray, members: np.ndarray, size: int) -> np.ndarray:
    """``np.isin(values, members)`` for integers in ``[0, size)``: a table of flags is O(n) where isin sorts."""
    if size > _FLAG_TABLE_MAX:
        return np.isin(values, members)
    flags = np.zeros(size, dtype=bool)
    flags[members] = True
    return flags[values]
