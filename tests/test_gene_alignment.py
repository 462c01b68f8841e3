"""The rule that keys a gene named by symbol in one file by the Ensembl id other files give that symbol."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from bgee_dask.catalog.gene_alignment import align_gene_codes


@dataclass(frozen=True)
class GeneAlignment:
    """Per row of the genes table: its key, its symbol, and whether the key came from its symbol."""

    gene_key: np.ndarray
    gene_symbol: np.ndarray  # a symbol-named row keeps its name here once its key is an id
    by_symbol: np.ndarray  # bool


def align_genes(
    experiment: np.ndarray, species: np.ndarray, gene_id: np.ndarray, gene_symbol: np.ndarray | None
) -> GeneAlignment:
    """``align_gene_codes`` on text: numbers the names and symbols first, then names the answer back."""
    gene_id = np.asarray(gene_id, dtype=object)
    n = len(gene_id)
    symbols = np.full(n, None, dtype=object) if gene_symbol is None else np.asarray(gene_symbol, dtype=object)
    # one numbering for names and symbols, so that "this name is that symbol" is an integer test
    codes, values = pd.factorize(np.concatenate([gene_id, symbols]), use_na_sentinel=True)
    key, symbol, by_symbol = align_gene_codes(
        pd.factorize(np.asarray(experiment, dtype=object))[0],
        pd.factorize(np.asarray(species, dtype=object))[0],
        codes[:n],
        codes[n:],
    )
    values = np.asarray(values, dtype=object)
    named = np.full(n, None, dtype=object)
    named[symbol >= 0] = values[symbol[symbol >= 0]]
    return GeneAlignment(values[key], named, by_symbol)


# (experiment, species, gene_id, gene_symbol): e1/e2 name genes by id, s1/s2 by symbol, m1 is another species
ROWS = [
    ("e1", "hs", "ENSG1", "MALAT1"),
    ("e1", "hs", "ENSG2", "PAR"),  # PAR names two ids: ambiguous
    ("e1", "hs", "ENSG3", "PAR"),
    ("e1", "hs", "ENSG4", None),
    ("e1", "hs", "ENSG5", "OLD5"),
    ("e2", "hs", "ENSG5", "NEW5"),  # one id, two symbols (renamed between releases)
    ("e2", "hs", "ENSG6", "ENSG6"),  # symbol == id says nothing
    ("e2", "hs", "ENSG7", "CD3E"),
    ("s1", "hs", "MALAT1", None),  # -> ENSG1
    ("s1", "hs", "PAR", None),  # ambiguous: stays
    ("s1", "hs", "OLD5", None),  # OLD5 and NEW5 both -> ENSG5 in s1: both stay
    ("s1", "hs", "NEW5", None),
    ("s1", "hs", "ENSG6", None),  # an id-like name nobody pairs with a symbol: stays
    ("s1", "hs", "NOVEL", None),
    ("s2", "hs", "CD3E", "CD3E"),  # layout D: feature_name == var_names -> ENSG7
    ("s2", "hs", "ENSG7", None),  # ... but the id is already there: CD3E stays
    ("s2", "hs", "NEW5", None),  # -> ENSG5 (alone in s2)
    ("s3", "hs", "ENSG1", None),  # an id in a symbol file stays itself
    ("m1", "mm", "MALAT1", None),  # another species: not aligned to human ids
]
EXPECTED_KEY = [
    "ENSG1", "ENSG2", "ENSG3", "ENSG4", "ENSG5", "ENSG5", "ENSG6", "ENSG7",
    "ENSG1", "PAR", "OLD5", "NEW5", "ENSG6", "NOVEL",
    "CD3E", "ENSG7", "ENSG5",
    "ENSG1",
    "MALAT1",
]  # fmt: skip


def test_symbols_become_ids_only_when_unambiguous():
    exp, species, gene_id, symbol = (np.asarray(c, dtype=object) for c in zip(*ROWS, strict=True))
    aligned = align_genes(exp, species, gene_id, symbol)
    assert aligned.gene_key.tolist() == EXPECTED_KEY
    assert aligned.by_symbol.tolist() == [k != g for k, g in zip(EXPECTED_KEY, gene_id, strict=True)]
    # a row keyed by id keeps its own name as its symbol; other symbols are untouched
    assert aligned.gene_symbol[8] == "MALAT1" and aligned.gene_symbol[16] == "NEW5"
    assert aligned.gene_symbol[14] == "CD3E" and aligned.gene_symbol[9] is None and aligned.gene_symbol[3] is None
    counts = pd.Series(exp[aligned.by_symbol]).value_counts()
    assert counts.to_dict() == {"s1": 1, "s2": 1}


def test_no_experiment_gets_a_key_twice():
    exp, species, gene_id, symbol = (np.asarray(c, dtype=object) for c in zip(*ROWS, strict=True))
    aligned = align_genes(exp, species, gene_id, symbol)
    frame = pd.DataFrame({"e": exp, "k": aligned.gene_key})
    assert not frame.duplicated().any()


def test_without_any_symbols_keys_are_the_ids():
    gene_id = np.asarray(["A", "B", "A"], dtype=object)
    aligned = align_genes(np.asarray(["x", "x", "y"]), np.asarray(["hs"] * 3), gene_id, None)
    assert aligned.gene_key.tolist() == ["A", "B", "A"]
    assert not aligned.by_symbol.any()


def test_missing_symbols_as_nan_are_missing():
    aligned = align_genes(
        np.asarray(["e", "s"]), np.asarray(["hs", "hs"]), np.asarray(["ENSG1", "nan"]), np.asarray([np.nan, None])
    )
    assert aligned.gene_key.tolist() == ["ENSG1", "nan"]  # a NaN symbol names nothing, not the gene "nan"


def test_membership_by_sorting_gives_the_same_keys(monkeypatch):
    """Past a size, membership is tested by sorting instead of a table of flags: same rule, same keys."""
    from bgee_dask.catalog import gene_alignment

    monkeypatch.setattr(gene_alignment, "_FLAG_TABLE_MAX", 0)
    exp, species, gene_id, symbol = (np.asarray(c, dtype=object) for c in zip(*ROWS, strict=True))
    aligned = align_genes(exp, species, gene_id, symbol)
    assert aligned.gene_key.tolist() == EXPECTED_KEY
    assert aligned.by_symbol.tolist() == [k != g for k, g in zip(EXPECTED_KEY, gene_id, strict=True)]


def test_rows_of_no_known_species_are_not_aligned():
    aligned = align_genes(
        np.asarray(["e1", "s1", "s2"]),
        np.asarray(["hs", "hs", None], dtype=object),
        np.asarray(["ENSG1", "MALAT1", "MALAT1"], dtype=object),
        np.asarray(["MALAT1", None, None], dtype=object),
    )
    assert aligned.gene_key.tolist() == ["ENSG1", "ENSG1", "MALAT1"]
    assert aligned.by_symbol.tolist() == [False, True, False]
