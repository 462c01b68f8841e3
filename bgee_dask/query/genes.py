"""Genes as users write them: comma-separated text or lists, and suggestions for names not found.

Resolution itself (ids first, then symbols, over the queried experiments) is ``plan.resolve_gene_codes``;
this module only prepares its input and explains its failures.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import xarray as xr

from bgee_dask.catalog.reader import GeneLookup

if TYPE_CHECKING:
    from bgee_dask.query.plan import QueryPlan

#: Suggestions offered per unknown name.
MAX_SUGGESTIONS = 4


def parse_genes(genes: Sequence[str] | str | None) -> list[str] | None:
    """``"CD19,LYZ"``, ``"CD19, LYZ"`` and ``["CD19", "LYZ"]`` all mean the same two genes.

    A string is split on commas (no gene id or symbol in Bgee contains one); list items are
    split too, so ``["CD19,LYZ"]`` from a command line reads the same. Blank names are dropped,
    order is kept and repeats removed. None stays None (every gene); an empty result is an
    empty list (no gene: only cell counts).
    """
    if genes is None:
        return None
    items = [genes] if isinstance(genes, str) else list(genes)
    names = [part.strip() for item in items for part in str(item).split(",")]
    return list(dict.fromkeys(n for n in names if n))


def gene_vocabulary(lookup: GeneLookup, rows: np.ndarray) -> list[str]:
    """Every id and symbol of the given rows of the gene lookup (the names a query could resolve)."""
    names = set(lookup.ids[np.unique(lookup.code[rows])].tolist()) if len(rows) else set()
    if lookup.symbol_code is not None and len(rows):
        codes = np.unique(lookup.symbol_code[rows])
        names.update(lookup.symbol_values[codes[codes >= 0]].tolist())
    return sorted(str(n) for n in names)


def suggest(unknown: Iterable[str], vocabulary: Sequence[str], n: int = MAX_SUGGESTIONS) -> dict[str, list[str]]:
    """Near matches for each unknown name: same name in another case first, then similar spellings.

    Matching ignores case because symbols differ by case between species (human ``CD19``,
    mouse ``Cd19``) and users type either; similar spellings come from ``difflib`` on the
    upper-cased names, so ``Cd19x`` still finds ``CD19`` and ``Cd19``.
    """
    by_upper: dict[str, list[str]] = {}
    for name in vocabulary:
        by_upper.setdefault(name.upper(), []).append(name)
    uppers = list(by_upper)
    out: dict[str, list[str]] = {}
    for name in unknown:
        key = name.upper()
        found = list(by_upper.get(key, []))
        if len(found) < n:
            for close in difflib.get_close_matches(key, uppers, n=n, cutoff=0.75):
                found.extend(by_upper[close])
        out[name] = [f for f in dict.fromkeys(found) if f != name][:n]
    return out


def unknown_genes_message(unknown: Sequence[str], vocabulary: Sequence[str]) -> str:
    """The error text for genes no queried experiment has, with near matches where there are some."""
    hints = suggest(unknown[:20], vocabulary)
    parts = [f"{g!r}" + (f" (did you mean {', '.join(hints[g])}?)" if hints.get(g) else "") for g in unknown[:20]]
    more = f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
    return f"unknown gene(s) {'; '.join(parts)}{more}: not in any queried experiment"


#: Gene ids as the gene databases write them (Ensembl, FlyBase, WormBase), with an optional version.
DATABASE_ID = re.compile(r"^(ENS[A-Z]*G\d{6,}|FBgn\d+|WBGene\d+)(\.\d+)?$")


def gene_symbols(ids: Sequence[str], symbols: Sequence[str | None] | None) -> np.ndarray:
    """A symbol per gene (None where unknown): the catalog's, else the gene's own name unless it is a database id.

    Files that name genes by symbol give the catalog no separate symbol; where no other file of
    the species maps that symbol to an id, the gene keeps the symbol as its name, and that name is
    what a user looks it up by.
    """
    out = np.full(len(ids), None, dtype=object)
    for i, gene in enumerate(ids):
        known = symbols[i] if symbols is not None else None
        if known is not None and known == known and str(known):
            out[i] = str(known)
        elif not DATABASE_ID.match(str(gene)):
            out[i] = str(gene)
    return out


def with_symbol_index(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with an index on its ``gene_symbol`` coordinate, so that ``ds.sel(gene_symbol="CD19")`` works.

    The ``gene`` dimension stays indexed by id; a symbol several genes share selects all of them.
    """
    if "gene_symbol" in ds.coords and "gene_symbol" not in ds.xindexes:
        return ds.set_xindex("gene_symbol")
    return ds


def measured_frame(plan: QueryPlan, genes: pd.Index) -> pd.DataFrame:
    """Which genes each queried experiment measured: genes x experiments, columns named by ``experimentId``.

    Keyed as cells are (``obs["experimentId"]``), so a cell's valid genes are its experiment's column.
    """
    ids = plan.experiments["experimentId"].astype(str).tolist() if len(plan.experiments) else []
    frame = pd.DataFrame(np.asarray(plan.measured, dtype=bool).T.reshape(len(genes), len(ids)), index=genes)
    frame.columns = pd.Index(ids, dtype=object, name="experimentId")
    return frame
