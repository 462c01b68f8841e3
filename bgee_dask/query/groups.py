"""Group keys of cells: one normalization shared by the blocks that read obs and the planner.

Partials from different blocks are merged by key, so a group must get the same key whether a
block read its cells' metadata from the store or the planner took it from the catalog's runs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def group_codes(frame: pd.DataFrame, by: list[str]) -> tuple[np.ndarray, list[tuple]]:
    """A group number per row of ``frame`` and each group's key (a tuple of ``by`` values, None for missing)."""
    if not by:
        return np.zeros(len(frame), dtype=np.int32), [()]
    codes, uniques = [], []
    for c in by:
        # missing is None whatever marks it (None, NaN, pd.NA: pandas 3's text columns use NaN)
        code, uniq = pd.factorize(frame[c].astype(object), use_na_sentinel=True)
        if (code < 0).any():
            code = np.where(code < 0, len(uniq), code)
            uniq = [*uniq, None]
        codes.append(code)
        uniques.append(list(uniq))
    stacked = np.stack(codes, axis=1)
    combos, inverse = np.unique(stacked, axis=0, return_inverse=True)
    keys = [tuple(_plain(uniques[i][k]) for i, k in enumerate(combo)) for combo in combos]
    return inverse.reshape(-1).astype(np.int32), keys


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value
