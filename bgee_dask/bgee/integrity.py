"""The check a fetched H5AD must pass before it takes its final name.

Bgee publishes no checksums, so a complete transfer (every byte the server announced, see
:mod:`~bgee_dask.bgee.transfer`) is checked for what it should be: an HDF5 file (its signature)
that opens and holds ``X`` and ``obs``. The check raises ``ValueError`` with the problem, which
the transfer reports and answers by deleting the part (fetching it again could not mend it).
(The annotation archive's check is :func:`bgee_dask.bgee.annotation.check_archive`.)
"""

from __future__ import annotations

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def hdf5_signature_at(path: str) -> int | None:
    """Where the HDF5 superblock signature is: at byte 0, 512, 1024, 2048 ... (HDF5's rule), or None."""
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        size = fh.tell()
        offset = 0
        while offset + len(HDF5_SIGNATURE) <= size:
            fh.seek(offset)
            if fh.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
                return offset
            offset = 512 if offset == 0 else offset * 2
    return None


def check_h5ad(path: str) -> None:
    """Raise ``ValueError`` unless ``path`` is an HDF5 file that opens and has ``X`` and ``obs``."""
    if hdf5_signature_at(path) is None:
        with open(path, "rb") as fh:
            head = fh.read(64)
        hint = " (looks like an HTML page)" if b"<html" in head.lower() or b"<!doctype" in head.lower() else ""
        raise ValueError(f"not an HDF5 file: no HDF5 signature{hint}")
    import h5py

    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("X", "obs") if k not in f]
    except OSError as exc:
        raise ValueError(f"HDF5 file does not open ({exc})") from None
    if missing:
        raise ValueError(f"not an H5AD file: no {' or '.join(missing)}")
