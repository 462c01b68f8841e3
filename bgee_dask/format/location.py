"""Where an atlas lives: a local folder or an fsspec URL (s3://, gs://, memory://...).

All file traffic of the catalog goes through here, so that local and object-store atlases
behave the same, and so that local writes can be made atomic with a rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

S3_PROTOCOLS = ("s3", "s3a")

#: s3fs options used unless the caller's ``storage_options`` say otherwise (key by key, also inside
#: ``config_kwargs``). They bound the time a failure takes: wrong credentials, a missing bucket or a
#: refused connection fail without waiting on a time-out; an endpoint that accepts connections but never
#: answers fails after 8 attempts x ``read_timeout`` (about 50 s): botocore tries twice (its
#: ``max_attempts`` counts retries), inside s3fs's 2 attempts, which it nests for whole-object reads.
#: ``max_concurrency=1`` makes a whole-object read one GET (s3fs otherwise asks for the size first,
#: a HEAD per read); bgee-dask writes no object above s3fs's 50 MB block, so uploads lose nothing.
S3_DEFAULTS: dict[str, Any] = {
    "max_concurrency": 1,
    "config_kwargs": {
        "connect_timeout": 5,
        "read_timeout": 6,
        "retries": {"max_attempts": 1, "mode": "standard"},
    },
}

#: s3fs's attempts per request (a class attribute, so not settable through ``storage_options``; its
#: default, 5, nested, let a silent endpoint hang a reader for minutes).
S3_RETRIES = 2


class StorageAccessError(OSError):
    """The object store could not be used: wrong credentials, a missing bucket, an unreachable endpoint."""


def _s3_env_options(protocol: str) -> dict[str, Any]:
    """The usual AWS variables, including AWS_ENDPOINT_URL(_S3) for S3-compatible servers.

    They are copied into the options (rather than left to botocore) so that they travel with the
    tasks to workers whose environment does not have them.
    """
    if protocol not in S3_PROTOCOLS:
        return {}
    opts: dict[str, Any] = {}
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        opts["key"] = os.environ["AWS_ACCESS_KEY_ID"]
        opts["secret"] = os.environ.get("AWS_SECRET_ACCESS_KEY")
        if os.environ.get("AWS_SESSION_TOKEN"):
            opts["token"] = os.environ["AWS_SESSION_TOKEN"]
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    return opts


def _with_defaults(protocol: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` over :data:`S3_DEFAULTS` for S3 (the caller wins key by key); others unchanged."""
    if protocol not in S3_PROTOCOLS:
        return dict(options)
    merged = {**S3_DEFAULTS, **options}
    merged["config_kwargs"] = {**S3_DEFAULTS["config_kwargs"], **(options.get("config_kwargs") or {})}
    return merged


def _bounded(fs: fsspec.AbstractFileSystem) -> fsspec.AbstractFileSystem:
    """Cap s3fs's retries (a class attribute, so not settable through ``storage_options``)."""
    if type(fs).__name__ == "S3FileSystem" and getattr(fs, "retries", 0) > S3_RETRIES:
        fs.retries = S3_RETRIES
    return fs


def _error_code(exc: BaseException) -> str | None:
    """The S3 error code (``NoSuchBucket``, ``AccessDenied`` ...) behind an exception, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            return (response.get("Error") or {}).get("Code")
        exc = exc.__cause__ or exc.__context__
    return None


def _is_connection_error(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(
        names
        & {
            "EndpointConnectionError",
            "ConnectTimeoutError",
            "ReadTimeoutError",
            "ConnectionClosedError",
            "ClientConnectorError",
            "ServerDisconnectedError",
            "FSTimeoutError",
            "TimeoutError",
            "ConnectionError",
        }
    )


#: What marks a local file as still being written (see ``AtlasLocation.write_bytes``).
TMP_MARK = ".tmp-"


def _precondition_failed(exc: BaseException) -> bool:
    """Whether an object store refused a conditional request (HTTP 412 / 409)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if _error_code(exc) in {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}:
            return True
        if "PreconditionFailed" in str(exc) or "Precondition" in type(exc).__name__:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _etag_of(response: Any) -> str | None:
    return response.get("ETag") if isinstance(response, dict) else None


#: Serializes the conditional writes emulated on memory:// (a file system of this process only).
_MEMORY_LOCK = threading.Lock()
#: Where an atlas can be written: commits need conditional writes (see ``create_exclusive``).
WRITABLE_PROTOCOLS = ("file", "local", "memory", *S3_PROTOCOLS)


def _digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def _deepest_first(folders: set[str]) -> list[str]:
    """Folder keys (``<folder>/``), children before their parents."""
    return [f"{f}/" for f in sorted(folders, key=lambda f: f.count("/"), reverse=True)]


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
        self.storage_options = _with_defaults(protocol, dict(storage_options))

    def __repr__(self) -> str:
        return f"AtlasLocation({self.url!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"])  # type: ignore[misc]

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        # fsspec caches instances, so this is cheap after the first call in a process.
        return _bounded(fsspec.filesystem("file" if self.is_local else self.protocol, **self.storage_options))

    def path(self, rel: str = "") -> str:
        root = self.url if self.is_local else self.url.split("://", 1)[1]
        return f"{root}/{rel}".rstrip("/") if rel else root

    def full_url(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    # -- errors ------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str | None:
        """The object store's endpoint URL when one is set (S3-compatible servers)."""
        kwargs = self.storage_options.get("client_kwargs") or {}
        return kwargs.get("endpoint_url") or self.storage_options.get("endpoint_url")

    def _bucket(self) -> str:
        return self.path().split("/", 1)[0]

    def storage_error(self, exc: BaseException) -> StorageAccessError | None:
        """A one-line :class:`StorageAccessError` for a failure the user must fix, else ``None``."""
        if self.is_local or isinstance(exc, StorageAccessError):
            return None
        where = f" at {self.endpoint}" if self.endpoint else ""
        code = _error_code(exc)
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if code == "NoSuchBucket":
            return StorageAccessError(f"{self.url}: bucket {self._bucket()!r} does not exist{where}")
        if isinstance(exc, PermissionError) or code in {
            "AccessDenied",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "InvalidToken",
            "ExpiredToken",
            "Forbidden",
            "403",
        }:
            return StorageAccessError(
                f"{self.url}: access denied by the object store{where} ({detail}); check the credentials "
                "(storage_options key/secret, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
            )
        if type(exc).__name__ in {"NoCredentialsError", "PartialCredentialsError"}:
            return StorageAccessError(
                f"{self.url}: no credentials for the object store ({detail}); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or pass storage_options"
            )
        if _is_connection_error(exc):
            return StorageAccessError(f"{self.url}: cannot reach the object store{where} ({detail})")
        return None

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            clear = self.storage_error(exc)
            if clear is None:
                raise
            raise clear from exc

    def check_access(self, *, write: bool = False) -> None:
        """Fail early, with a :class:`StorageAccessError`, when the atlas cannot be read (or written).

        One listing request, plus with ``write`` a probe object written and removed.
        """
        if write and self.protocol not in WRITABLE_PROTOCOLS:
            raise StorageAccessError(
                f"{self.url}: bgee-dask writes atlases on local disks and S3-compatible object stores only "
                f"(its commits need conditional writes); {self.protocol}:// atlases can be read"
            )
        if self.is_local:
            if write:  # the atlas folder is made by the first commit, not here: a failed run leaves none
                existing = self.url
                while not os.path.exists(existing):
                    existing = os.path.dirname(existing)
                if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
                    raise PermissionError(f"{self.url}: cannot write there ({existing} is not a writable folder)")
            return
        with self._translated():
            try:
                self.fs.ls(self.path(), detail=False, refresh=True)
            except FileNotFoundError as exc:  # no atlas there yet is fine; no bucket is not
                if _error_code(exc) == "NoSuchBucket":
                    raise
            if write:  # some servers (SeaweedFS) create a missing bucket on a PUT: list first
                probe = self.path(f"catalog/.write-probe-{uuid.uuid4().hex[:8]}")
                self.fs.pipe_file(probe, b"")
                self.fs.rm_file(probe)

    def zarr_store(self, rel: str, *, read_only: bool = False) -> zarr.abc.store.Store:
        if self.is_local:
            return zarr.storage.LocalStore(self.path(rel), read_only=read_only)
        store = zarr.storage.FsspecStore.from_url(
            self.full_url(rel), storage_options=self.storage_options, read_only=read_only
        )
        _bounded(store.fs)
        return store

    # -- small files -----------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        with self._translated():
            return self.fs.exists(self.path(rel))

    def write_bytes(self, rel: str, payload: bytes) -> None:
        """Write a whole object atomically: readers see the old content or the new, never a part.

        On local disk through a temporary name (``<name>.tmp-<random>``, removed if the write
        fails; one left by a killed process is debris that ``check`` finds) and a rename; on an
        object store one PUT, which is atomic there.
        """
        target = self.path(rel)
        if self.is_local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}{TMP_MARK}{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as fh:
                    fh.write(payload)
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
        else:
            with self._translated():
                self.fs.pipe_file(target, payload)  # one PUT

    # -- conditional writes (object stores): what leases are built on ---------------------------
    # S3 (and S3-compatible servers) through If-None-Match / If-Match; memory:// (one process's
    # own file system, used in tests and notebooks) under a process lock, its ETag a digest of
    # the content. Other object stores are refused for writing by ``check_access``.
    def create_exclusive(self, rel: str, payload: bytes) -> str | None:
        """Write an object only if none exists (``If-None-Match: *``); its ETag, or None if one existed."""
        if self.protocol == "memory":
            with _MEMORY_LOCK:
                if self.fs.exists(self.path(rel)):
                    return None
                self.fs.pipe_file(self.path(rel), payload)
                return _digest(payload)
        with self._translated():
            try:
                out = self.fs.pipe_file(self.path(rel), payload, mode="create")
            except Exception as exc:
                if _precondition_failed(exc):
                    return None
                raise
        return _etag_of(out) or self.stat(rel)[0]  # type: ignore[index]

    def replace_if(self, rel: str, payload: bytes, etag: str) -> str | None:
        """Overwrite an object only if it still has ``etag`` (``If-Match``); the new ETag, or None."""
        if self.protocol == "memory":
            with _MEMORY_LOCK:
                found = self.stat(rel)
                if found is None or found[0] != etag:
                    return None
                self.fs.pipe_file(self.path(rel), payload)
                return _digest(payload)
        with self._translated():
            try:
                out = self.fs.pipe_file(self.path(rel), payload, IfMatch=etag)
            except Exception as exc:
                if _precondition_failed(exc) or isinstance(exc, FileNotFoundError):
                    return None
                raise
        return _etag_of(out) or self.stat(rel)[0]  # type: ignore[index]

    def remove_if(self, rel: str, etag: str) -> bool:
        """Delete an object only if it still has ``etag``; whether it was deleted."""
        if self.protocol == "memory":
            with _MEMORY_LOCK:
                found = self.stat(rel)
                if found is None or found[0] != etag:
                    return False
                self.fs.rm_file(self.path(rel))
                return True
        bucket, _, key = self.path(rel).partition("/")
        with self._translated():
            try:
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=etag)
            except Exception as exc:
                if _precondition_failed(exc) or isinstance(exc, FileNotFoundError):
                    return False
                raise
            self.fs.invalidate_cache(self.path(rel))
        return True

    def stat(self, rel: str) -> tuple[str, float] | None:
        """(ETag, modification time as a POSIX timestamp) of an object, None if there is none."""
        with self._translated():
            try:
                info = self.fs.info(self.path(rel), refresh=True)
                if self.protocol == "memory":
                    created = info.get("created")
                    stamp = created.timestamp() if hasattr(created, "timestamp") else float(created or 0)
                    return _digest(self.fs.cat_file(self.path(rel))), stamp
            except FileNotFoundError:
                return None
        modified = info.get("LastModified") or info.get("mtime")
        stamp = modified.timestamp() if hasattr(modified, "timestamp") else float(modified or 0)
        return str(info.get("ETag", "")), stamp

    def read_bytes(self, rel: str) -> bytes:
        if self.is_local:
            with open(self.path(rel), "rb") as fh:
                return fh.read()
        with self._translated():
            return self.fs.cat_file(self.path(rel))  # one GET

    def read_buffer(self, rel: str) -> pa.Buffer:
        """A whole object as an Arrow buffer: a local file is memory-mapped, not read."""
        if self.is_local:
            with pa.memory_map(self.path(rel)) as mapped:
                return mapped.read_buffer()
        return pa.py_buffer(self.read_bytes(rel))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_parquet(self, rel: str, frame: pd.DataFrame) -> None:
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        self.write_bytes(rel, buf.getvalue())

    def read_parquet(self, rel: str) -> pd.DataFrame:
        # pq.ParquetFile, not pd.read_parquet: the latter goes through pyarrow.dataset, whose import would
        # delay a query's first planning in a process
        return self.read_arrow(rel).to_pandas()

    def read_arrow(self, rel: str, columns: Sequence[str] | None = None) -> pa.Table:
        """A parquet file as an Arrow table (those of ``columns`` it has), in one request."""
        parquet = pq.ParquetFile(pa.BufferReader(self.read_bytes(rel)))
        if columns is not None:
            columns = [c for c in columns if c in parquet.schema_arrow.names]
        return parquet.read(columns=columns)

    def list(self, rel: str) -> list[str]:
        """Names (not paths) directly under ``rel``; empty if it does not exist."""
        with self._translated():
            try:
                entries = self.fs.ls(self.path(rel), detail=False, refresh=True)
            except FileNotFoundError as exc:
                if _error_code(exc) == "NoSuchBucket":
                    raise
                return []
        return sorted(os.path.basename(str(e).rstrip("/")) for e in entries)

    def find(self, rel: str) -> list[str]:
        """Paths (relative to ``rel``) of every file below ``rel``; empty if there is none."""
        base = self.path(rel).rstrip("/")
        with self._translated():
            try:
                if not self.is_local:
                    self.fs.invalidate_cache(base)  # a listing must see what other writers wrote
                found = self.fs.find(base)
            except FileNotFoundError as exc:
                if _error_code(exc) == "NoSuchBucket":
                    raise
                return []
        # file systems differ on a leading "/" (memory:// adds one): compare without it
        prefix = base.lstrip("/") + "/"
        paths = (str(p).lstrip("/") for p in found)
        return sorted(p[len(prefix) :] for p in paths if p.startswith(prefix))

    def remove(self, rel: str) -> None:
        """Remove a file or a folder with everything in it; nothing if there is none."""
        target = self.path(rel)
        with self._translated():
            if self.is_local:
                if os.path.isdir(target):
                    shutil.rmtree(target)
                elif os.path.lexists(target):
                    os.remove(target)
            elif self.protocol in ("s3", "s3a"):
                self._remove_s3_tree(target)
            elif self.fs.exists(target):
                self.fs.rm(target, recursive=True)

    def _remove_s3_tree(self, target: str) -> None:
        """Delete every object under ``target`` and the folder entries a server may keep for them.

        S3 has no folders, but servers built on a file tree (SeaweedFS) keep a folder emptied of
        its objects, and list it: a removed version would then still be listed. Deleting the key
        ``<folder>/``, deepest first, removes such an entry once it is empty; where none exists
        (S3) that delete is a no-op.
        """
        bucket, _, key = target.partition("/")
        self.fs.invalidate_cache(target)
        names = (p.partition("/")[2] for p in self.fs.find(target))
        objects = [name for name in names if name == key or name.startswith(f"{key}/")]
        folders = {key}
        for name in objects:
            parent = os.path.dirname(name)
            while len(parent) > len(key):
                folders.add(parent)
                parent = os.path.dirname(parent)
        if key in objects:  # ``target`` is an object itself
            folders.discard(key)
        self._delete_keys(bucket, objects + _deepest_first(folders))
        left = self._listed_folders(bucket, key)  # empty folders an earlier, interrupted removal left
        if left:
            self._delete_keys(bucket, _deepest_first(left | {key}))
        self.fs.invalidate_cache(target)

    def _delete_keys(self, bucket: str, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes 1000 keys, deleted in order
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            self.fs.call_s3("delete_objects", Bucket=bucket, Delete={"Objects": batch, "Quiet": True})

    def _listed_folders(self, bucket: str, key: str) -> set[str]:
        """The folders a delimited listing shows below ``key``, recursively (none on S3 once it is empty)."""
        found: set[str] = set()
        pending = [key]
        while pending:
            prefix, token = pending.pop(), {}
            while True:
                page = self.fs.call_s3(
                    "list_objects_v2", Bucket=bucket, Prefix=f"{prefix}/", Delimiter="/", **token
                )
                for sub in page.get("CommonPrefixes") or []:
                    folder = sub["Prefix"].rstrip("/")
                    found.add(folder)
                    pending.append(folder)
                if not page.get("IsTruncated"):
                    break
                token = {"ContinuationToken": page["NextContinuationToken"]}
        return found

    def size(self, rel: str) -> int:
        with self._translated():
            return int(self.fs.du(self.path(rel)))
