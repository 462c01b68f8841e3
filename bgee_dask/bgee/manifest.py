"""The record of what was fetched into one folder: ``manifest.json``, one entry per file.

An entry holds the URL, the size, the sha256 of the bytes received, and the server's ETag and
Last-Modified, so a file can be checked later against what was fetched and against the server.
A file whose entry matches its size is complete and is not fetched again. The manifest is
rewritten (atomically, through a temporary name) only when an entry changed.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "bgee-dask/download-manifest"
MANIFEST_VERSION = "1"


class Manifest:
    """The manifest of ``folder`` (empty if it has none yet, or one that does not parse)."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / MANIFEST_NAME
        self.files: dict[str, dict[str, Any]] = {}
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(self.path.read_text())
            if isinstance(data, dict) and isinstance(data.get("files"), dict):
                self.files = data["files"]

    def get(self, name: str) -> dict[str, Any] | None:
        return self.files.get(name)

    def record(self, name: str, entry: dict[str, Any]) -> bool:
        """Set ``name``'s entry and save the manifest if that changed it; returns whether it did."""
        if self.files.get(name) == entry:
            return False
        self.files[name] = dict(entry)
        self.save()
        return True

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "files": dict(sorted(self.files.items()))}
        tmp = self.path.with_name(f"{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
