"""Bgee's own data: list a species' droplet experiments in a release, fetch them, convert them.

``list_experiments`` reads Bgee's release table, the release's species table and the species'
annotation archive; ``download`` fetches the H5AD files (resumable, checked, recorded in a
manifest) and, given an atlas, converts each as it arrives. ``bgee-dask download`` is the
command line of both.
"""

from __future__ import annotations

from bgee_dask.bgee.download import IncompleteDownload, download, list_experiments
from bgee_dask.bgee.errors import BgeeDataError, TransferError
from bgee_dask.bgee.releases import DEFAULT_BASE_URL
from bgee_dask.bgee.transfer import DEFAULT_POLICY, TransferPolicy

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_POLICY",
    "BgeeDataError",
    "IncompleteDownload",
    "TransferError",
    "TransferPolicy",
    "download",
    "list_experiments",
]
