"""HTTP transfers that survive a flaky link: ``.part`` files, Range resume, bounded retries, time-outs.

A file is written to ``<dest>.part`` and renamed to ``dest`` only once it is complete (every byte
the server announced) and has passed the caller's check, so ``dest`` never holds a partial file.
Beside the part a small ``<dest>.part.json`` records the URL, the server's validators (ETag,
Last-Modified) and the announced size: a later attempt, in this call or a later run, asks for the
rest with ``Range`` and ``If-Range``, so a file that changed on the server is fetched again from
its first byte instead of being stitched to an older beginning. A server that ignores ``Range``
answers 200 and the transfer restarts from zero.

Retries are bounded by attempts that bring nothing new: an attempt that ends early but grew the
part beyond its largest size so far does not count against ``retries``. Every wait is bounded by
``timeout`` (connecting, and each read), so a server that never answers fails after
``(retries + 1) * timeout`` plus the back-off pauses. A server that keeps sending a byte now and
then is making progress and is not cut off.

Only the standard library is used (``urllib.request``), so proxies set in the environment apply.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from bgee_dask._version import __version__
from bgee_dask.bgee.errors import TransferError

#: HTTP statuses worth another attempt: the server's trouble, not a wrong URL.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class TransferPolicy:
    """How patient a transfer is. The defaults give a silent server about a minute:
    3 attempts of 20 s, plus 1 s and 2 s pauses."""

    #: Seconds a connection may stay silent: while connecting, and between two reads.
    timeout: float = 20.0
    #: Further attempts after one that ended without a new byte (connection refused or reset,
    #: time-out, transfer cut short, 5xx status).
    retries: int = 2
    #: Pause before the k-th such retry: ``backoff * 2 ** (k - 1)`` seconds.
    backoff: float = 1.0
    #: Bytes per read (and per progress update).
    chunk: int = 1 << 20


#: The policy used when none is given (looked up at call time, so a test may replace it).
DEFAULT_POLICY = TransferPolicy()

USER_AGENT = f"bgee-dask/{__version__}"


@dataclass
class Fetched:
    """A completed transfer: what the manifest records about the file."""

    url: str
    path: str
    bytes: int
    sha256: str
    etag: str | None
    last_modified: str | None
    attempts: int
    resumed: bool

    def manifest_entry(self) -> dict[str, object]:
        return {
            "url": self.url,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "etag": self.etag,
            "last_modified": self.last_modified,
        }


class _Retry(Exception):
    """An attempt ended early for a reason another attempt may not meet."""


class _Permanent(Exception):
    """An attempt failed for a reason another attempt would meet again."""


def _policy(policy: TransferPolicy | None) -> TransferPolicy:
    return DEFAULT_POLICY if policy is None else policy


def _check_scheme(url: str) -> None:
    if not url.lower().startswith(("http://", "https://")):
        raise TransferError(url, "only http:// and https:// URLs can be fetched")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "no answer (time-out)"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _open(url: str, headers: dict[str, str], policy: TransferPolicy) -> http.client.HTTPResponse:
    """One request; HTTP error statuses become ``_Retry`` or ``_Permanent`` (416 is returned as is)."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **headers})
    try:
        return urllib.request.urlopen(request, timeout=policy.timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416:
            return exc  # type: ignore[return-value]  # the caller reads its Content-Range
        reason = f"HTTP {exc.code} {exc.reason}"
        exc.close()
        if exc.code in RETRY_STATUSES:
            raise _Retry(reason) from None
        raise _Permanent(reason) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise _Retry(_describe(exc)) from None


def _length(resp: http.client.HTTPResponse) -> int | None:
    value = resp.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$", re.IGNORECASE)


def _content_range(resp: http.client.HTTPResponse) -> tuple[int | None, int | None]:
    """(first byte, complete length) of a 206 or 416 answer; ``None`` where not stated."""
    m = _CONTENT_RANGE.match(resp.headers.get("Content-Range") or "")
    if not m:
        return None, None
    first = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(3)) if m.group(3) != "*" else None
    return first, total


def _retrying(url: str, policy: TransferPolicy, attempt: Callable[[], object], progress: Callable[[], int]):
    """Run ``attempt`` until it returns; ``progress()`` is the high-water mark of bytes kept."""
    best = progress()
    failures = attempts = 0
    while True:
        attempts += 1
        try:
            return attempt(), attempts
        except _Permanent as exc:
            raise TransferError(url, str(exc)) from None
        except (_Retry, urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            reason = str(exc) if isinstance(exc, _Retry) else _describe(exc)
            now = progress()
            if now > best:
                best, failures = now, 0
            else:
                failures += 1
            if failures > policy.retries:
                raise TransferError(
                    url, f"gave up after {attempts} attempts, the last {failures} without a new byte ({reason})"
                ) from None
            time.sleep(policy.backoff * 2 ** max(0, failures - 1) if failures else min(policy.backoff, 0.1))


def fetch_bytes(url: str, *, policy: TransferPolicy | None = None) -> bytes:
    """A small file in memory (a table), with the same retries and time-outs as :func:`fetch_file`.

    The whole body is asked for again on each attempt; it must be as long as the server announced.
    """
    policy = _policy(policy)
    _check_scheme(url)
    best = [0]

    def attempt() -> bytes:
        with _open(url, {}, policy) as resp:
            if resp.status != 200:
                raise _Permanent(f"HTTP {resp.status} {resp.reason}")
            expected = _length(resp)
            chunks, n = [], 0
            try:
                while buf := resp.read(policy.chunk):
                    chunks.append(buf)
                    n += len(buf)
                    best[0] = max(best[0], n)
            except (http.client.HTTPException, OSError) as exc:
                raise _Retry(f"transfer cut short after {n} bytes ({_describe(exc)})") from None
            if expected is not None and n < expected:
                raise _Retry(f"transfer cut short: {n} of {expected} bytes")
            return b"".join(chunks)

    body, _ = _retrying(url, policy, attempt, lambda: best[0])
    return body  # type: ignore[return-value]


def _sidecar(part: str) -> str:
    return f"{part}.json"


def _read_sidecar(part: str, url: str) -> dict | None:
    """What the part's first attempt learnt about the file, if it was fetched from this URL."""
    try:
        with open(_sidecar(part)) as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("url") == url else None


def _write_sidecar(part: str, meta: dict) -> None:
    tmp = f"{_sidecar(part)}.tmp"
    with open(tmp, "w") as fh:
        json.dump(meta, fh)
    os.replace(tmp, _sidecar(part))


def _remove(*paths: str) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(p)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def _sha256_of(path: str, bufsize: int = 1 << 22) -> hashlib._Hash:
    h = hashlib.sha256()
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as fh:
        while buf := fh.read(bufsize):
            h.update(buf)
    return h


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes."""
    return _sha256_of(os.fspath(path)).hexdigest()


def fetch_file(
    url: str,
    dest: str | os.PathLike,
    *,
    policy: TransferPolicy | None = None,
    check: Callable[[str], None] | None = None,
    on_size: Callable[[int], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> Fetched:
    """Fetch ``url`` to ``dest`` through ``dest.part``, resuming a part left by an earlier attempt or run.

    ``check(part_path)`` raises ``ValueError`` when the complete content is not what was expected
    (an HTML error page served with status 200, say); the part is then deleted, since resuming it
    could not mend it. ``on_size(n)`` is told the file's size once known, ``on_bytes(k)`` each
    chunk written (negative when a restart drops bytes already counted). Raises
    :class:`TransferError` with one line; after a cut-short failure the part stays for the next run.
    """
    policy = _policy(policy)
    _check_scheme(url)
    dest = os.fspath(dest)
    part = f"{dest}.part"
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    meta = _read_sidecar(part, url)
    if meta is None:  # a part of unknown origin cannot be trusted to be this file's beginning
        _remove(part)
    state = {"meta": meta, "hasher": None, "hashed": -1, "resumed": False, "sized": False}
    if on_bytes and _size(part):
        on_bytes(_size(part))

    def restart() -> None:
        had = _size(part)
        _remove(part, _sidecar(part))
        state.update(meta=None, hasher=None, hashed=-1)
        if on_bytes and had:
            on_bytes(-had)

    def announce(total: int | None) -> None:
        if total is not None and on_size and not state["sized"]:
            state["sized"] = True
            on_size(total)

    def attempt() -> Fetched:
        have = _size(part)
        headers = {}
        m = state["meta"]
        if have and m:
            headers["Range"] = f"bytes={have}-"
            validator = m.get("etag") if m.get("etag") and not str(m["etag"]).startswith("W/") else None
            validator = validator or m.get("last_modified")
            if validator:
                headers["If-Range"] = validator
        with _open(url, headers, policy) as resp:
            status = resp.status
            if status == 416:  # nothing left to send: complete if the part is the whole file
                _, total = _content_range(resp)
                if total is not None and have == total and m and m.get("total") in (None, total):
                    return finish(total)
                restart()
                raise _Retry("the server refused the range asked for; starting again from the first byte")
            if status == 206 and m and "Range" in headers:
                first, total = _content_range(resp)
                if first != have or (m.get("total") is not None and total != m["total"]):
                    restart()
                    raise _Retry("the server answered a different range; starting again from the first byte")
                state["resumed"] = True
                mode = "ab"
            elif status == 200:
                if have:
                    restart()  # no Range support, or the file changed (If-Range): from the first byte
                total = _length(resp)
                state["meta"] = {
                    "url": url,
                    "etag": resp.headers.get("ETag"),
                    "last_modified": resp.headers.get("Last-Modified"),
                    "total": total,
                }
                _write_sidecar(part, state["meta"])
                mode = "wb"
            else:
                raise _Permanent(f"unexpected HTTP {status} {resp.reason}")
            total = state["meta"].get("total")
            announce(total)
            start = _size(part) if mode == "ab" else 0
            if state["hashed"] != start:
                state["hasher"], state["hashed"] = (_sha256_of(part) if start else hashlib.sha256()), start
            hasher = state["hasher"]
            with open(part, mode) as fh:
                try:
                    while buf := resp.read(policy.chunk):
                        fh.write(buf)
                        hasher.update(buf)
                        state["hashed"] += len(buf)
                        if on_bytes:
                            on_bytes(len(buf))
                except (http.client.HTTPException, OSError) as exc:
                    fh.flush()
                    raise _Retry(f"transfer cut short at byte {_size(part)} ({_describe(exc)})") from None
        got = _size(part)
        if total is not None and got < total:
            raise _Retry(f"transfer cut short: {got} of {total} bytes")
        if total is not None and got > total:
            restart()
            raise _Permanent(f"received {got} bytes where the server announced {total}")
        return finish(got)

    def finish(n: int) -> Fetched:
        if check is not None:
            try:
                check(part)
            except ValueError as exc:
                _remove(part, _sidecar(part))
                raise _Permanent(str(exc)) from None
        if state["hashed"] != n:
            state["hasher"], state["hashed"] = _sha256_of(part), n
        m = state["meta"] or {}
        os.replace(part, dest)
        _remove(_sidecar(part))
        return Fetched(
            url=url,
            path=dest,
            bytes=n,
            sha256=state["hasher"].hexdigest(),
            etag=m.get("etag"),
            last_modified=m.get("last_modified"),
            attempts=0,
            resumed=state["resumed"],
        )

    fetched, attempts = _retrying(url, policy, attempt, lambda: _size(part))
    fetched.attempts = attempts
    return fetched
