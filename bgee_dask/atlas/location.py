"""Where an atlas lives: a local folder or an fsspec URL (s3://, gs://, memory://...).

All file traffic of the catalog goes through here, so that local and object-store atlases
behave the same, and so that local writes can be made atomic with a rename.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from typing import Any

import fsspec
import pandas as pd
import zarr


def _s3_env_options(protocol: str) -> dict[str, Any]:
    """The usual AWS variables, including AWS_ENDPOINT_URL for S3-compatible servers."""
    if protocol not in ("s3", "s3a"):
        return {}
    opts: dict[str, Any] = {}
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        opts["key"] = os.environ["AWS_ACCESS_KEY_ID"]
        opts["secret"] = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if os.environ.get("AWS_ENDPOINT_URL"):
        opts["client_kwargs"] = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    return opts


class AtlasLocation:
    """A root URL plus the options needed to reach it; picklable, so tasks can carry it."""

    def __init__(self, url: str | os.PathLike, storage_options: dict[str, Any] | None = None):
        url = os.fspath(url)
        protocol = fsspec.utils.get_protocol(url)
        self.is_local = protocol in ("file", "local")
        if self.is_local:
            url = os.path.abspath(url.removeprefix("file://"))
        self.url = url.rstrip("/")
        self.protocol = protocol
        if storage_options is None:
            storage_options = _s3_env_options(protocol)
        self.storage_options = dict(storage_options)

    def __repr__(self) -> str:
        return f"AtlasLocation({self.url!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"])  # type: ignore[misc]

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        # fsspec caches instances, so this is cheap after the first call in a process.
        return fsspec.filesystem("file" if self.is_local else self.protocol, **self.storage_options)

    def path(self, rel: str = "") -> str:
        root = self.url if self.is_local else self.url.split("://", 1)[1]
        return f"{root}/{rel}".rstrip("/") if rel else root

    def full_url(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    def zarr_store(self, rel: str, *, read_only: bool = False) -> zarr.abc.store.Store:
        if self.is_local:
            return zarr.storage.LocalStore(self.path(rel), read_only=read_only)
        return zarr.storage.FsspecStore.from_url(
            self.full_url(rel), storage_options=self.storage_options, read_only=read_only
        )

    # -- small files -----------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def write_bytes(self, rel: str, payload: bytes) -> None:
        """Write a whole object; on local disk through a temporary name and an atomic rename."""
        target = self.path(rel)
        if self.is_local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as fh:
                fh.write(payload)
            os.replace(tmp, target)
        else:
            with self.fs.open(target, "wb") as fh:
                fh.write(payload)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self.path(rel), "rb") as fh:
            return fh.read()

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_parquet(self, rel: str, frame: pd.DataFrame) -> None:
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        self.write_bytes(rel, buf.getvalue())

    def read_parquet(self, rel: str) -> pd.DataFrame:
        return pd.read_parquet(io.BytesIO(self.read_bytes(rel)))

    def list(self, rel: str) -> list[str]:
        """Names (not paths) directly under ``rel``; empty if it does not exist."""
        try:
            entries = self.fs.ls(self.path(rel), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(os.path.basename(str(e).rstrip("/")) for e in entries)

    def remove(self, rel: str) -> None:
        target = self.path(rel)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)

    def size(self, rel: str) -> int:
        return int(self.fs.du(self.path(rel)))
