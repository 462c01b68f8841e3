"""The two ways fetching from Bgee fails: what Bgee publishes is not usable, or a transfer failed.

Both carry a one-line message naming the URL or file and the problem, which the command line
prints as is (``bgee-dask: error: ...``).
"""

from __future__ import annotations


class BgeeDataError(ValueError):
    """Bgee's tables or archives do not say what is asked: an unknown release, species or
    experiment, a table cut short, an archive whose members leave their folder."""


class TransferError(OSError):
    """A file could not be fetched: an HTTP error status, a server that never answers, a transfer
    still cut short after the retries, or content that fails its checks."""

    def __init__(self, url: str, problem: str):
        self.url = url
        self.problem = problem
        super().__init__(f"{url}: {problem}")
