"""One pass over a block of counts to find the first thing wrong with it.

numpy would need four passes and two temporary boolean arrays (``isfinite``, ``< 0``, ``min``,
``max``) per block; on a 25k-cell file those temporaries alone are ~75 MB of fresh memory.
"""

from __future__ import annotations

import numba
import numpy as np

OK, NAN, INFINITE, NEGATIVE, TOO_LARGE, INDEX_OUT_OF_RANGE = range(6)
#: Integer counts at or above this lose precision as float32.
FLOAT32_EXACT = 1 << 24


@numba.njit(nogil=True, cache=True)
def _first_problem(data, indices, bound, check_int_range):  # pragma: no cover - jit
    for k in range(data.shape[0]):
        v = data[k]
        if v != v:
            return NAN, k
        if v < 0:
            return NEGATIVE, k
        if check_int_range and v >= FLOAT32_EXACT:
            return TOO_LARGE, k
        if v - v != 0:  # +inf (-inf was negative)
            return INFINITE, k
        i = indices[k]
        if i < 0 or i >= bound:
            return INDEX_OUT_OF_RANGE, k
    return OK, -1


def first_problem(data: np.ndarray, indices: np.ndarray, bound: int) -> tuple[int, int]:
    """(code, position) of the first bad value or index, ``(OK, -1)`` when the block is sound."""
    if data.size == 0:
        return OK, -1
    is_int = bool(np.issubdtype(data.dtype, np.integer))
    code, pos = _first_problem(data, indices, bound, is_int)
    return int(code), int(pos)
