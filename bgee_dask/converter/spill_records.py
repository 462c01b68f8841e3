"""Append-only spill files of typed records, shared by the row reorder and the gene-major copy.

A record is a header of int64 counts followed by arrays; each array's length is one of the
header's counts. Reading a file back concatenates each array over all its records.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np


def append_record(path: str, counts: Sequence[int], arrays: Sequence[np.ndarray]) -> None:
    """Append one record: ``counts`` as int64, then ``arrays`` as they are.

    A failed write is an ``OSError`` naming the file and the cause (``ndarray.tofile`` would
    say only how many items it wrote, even on a full disk).
    """
    try:
        with open(path, "ab") as fh:
            fh.write(np.asarray(counts, dtype=np.int64).data)
            for a in arrays:
                fh.write(np.ascontiguousarray(a).data)
    except OSError as exc:
        raise OSError(exc.errno, f"spill file {path}: {exc.strerror or exc}") from exc


def read_records(path: str, fields: Sequence[tuple[int, np.dtype]], n_counts: int) -> list[np.ndarray]:
    """Each field's values over all records, then delete the file (empty arrays if there is none).

    ``fields`` gives, per array, which header count is its length and its dtype.
    """
    dtypes = [np.dtype(d) for _, d in fields]
    if not os.path.exists(path):
        return [np.empty(0, d) for d in dtypes]
    raw = np.fromfile(path, dtype=np.uint8)
    os.unlink(path)
    parts: list[list[np.ndarray]] = [[] for _ in fields]
    pos = 0
    while pos < raw.size:
        counts = raw[pos : pos + 8 * n_counts].view(np.int64)
        pos += 8 * n_counts
        for i, ((which, _), dtype) in enumerate(zip(fields, dtypes, strict=True)):
            size = int(counts[which]) * dtype.itemsize
            parts[i].append(raw[pos : pos + size].view(dtype))
            pos += size
    return [np.concatenate(p) for p in parts]
