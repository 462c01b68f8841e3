"""Contiguous runs of cells that share their main metadata.

Because stores are sorted by metadata, each distinct combination of the run columns covers a
few contiguous row ranges. A catalog of those ranges answers most filters (cell type, tissue,
stage, sex, library...) exactly, without opening the store, and tells a query which row
ranges to read.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bgee_dask.schema import RUN_COLUMNS


def runs_table(obs: pd.DataFrame, columns: tuple[str, ...] = RUN_COLUMNS) -> pd.DataFrame:
    """One row per maximal run of equal values in ``columns``: the values, ``row_start``, ``row_stop``."""
    n = len(obs)
    cols = [c for c in columns if c in obs]
    if n == 0:
        return pd.DataFrame({**{c: pd.Series([], dtype=object) for c in cols}, "row_start": [], "row_stop": []})
    change = np.zeros(n, dtype=bool)
    change[0] = True
    for c in cols:
        values = obs[c]
        if isinstance(values.dtype, pd.CategoricalDtype):
            codes = values.cat.codes.to_numpy()  # one code per category, -1 for missing: no strings hashed
        else:
            codes = pd.factorize(values.astype(object), use_na_sentinel=True)[0]
        change[1:] |= codes[1:] != codes[:-1]
    starts = np.flatnonzero(change)
    stops = np.append(starts[1:], n)
    table = obs.iloc[starts][cols].reset_index(drop=True)
    for c in cols:
        if isinstance(table[c].dtype, pd.CategoricalDtype):
            table[c] = table[c].astype(object)
    table["row_start"] = starts.astype(np.int64)
    table["row_stop"] = stops.astype(np.int64)
    return table
