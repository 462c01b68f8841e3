"""Where everything lives inside an atlas: the one place that builds its relative paths.

```
catalog/atlas.json                               header: the commit point (names the current tables)
catalog/tables/<catalog_id>/...                  the consolidated tables of one commit (never modified)
catalog/fragments/<species>/<experiment>.json    each experiment's record: which version is current
catalog/lock, catalog/lock.json                  the commit lock (a file lock locally, a lease object elsewhere)
experiments/<species>/<experiment>/<version>/    one immutable version of an experiment:
    cells.zarr  genes.zarr  runs.parquet  genes.parquet  writing.lock (while its conversion runs)
```

Species and experiment ids are checked to be single path components (``schema.check_identifier``),
and every experiment's files sit in a folder of its own, so no id can address another's files.
"""

from __future__ import annotations

import datetime as _dt
import uuid

HEADER = "catalog/atlas.json"
TABLES = "catalog/tables"
FRAGMENTS = "catalog/fragments"
LOCK_FILE = "catalog/lock"  # local: held with flock
LOCK_OBJECT = "catalog/lock.json"  # object store: a lease object
EXPERIMENTS_ROOT = "experiments"

CELLS_STORE = "cells.zarr"
GENES_STORE = "genes.zarr"
RUNS_FILE = "runs.parquet"
GENES_FILE = "genes.parquet"
WRITER_LEASE = "writing.lock"


def experiment_key(species: str, experiment_id: str) -> str:
    """The experiment's key in the catalog tables: unique, since neither id may hold a '/'."""
    return f"{species}/{experiment_id}"


def fragment_path(species: str, experiment_id: str) -> str:
    return f"{FRAGMENTS}/{species}/{experiment_id}.json"


def experiment_dir(species: str, experiment_id: str) -> str:
    return f"{EXPERIMENTS_ROOT}/{species}/{experiment_id}"


def version_dir(species: str, experiment_id: str, version: str) -> str:
    return f"{experiment_dir(species, experiment_id)}/{version}"


def tables_dir(catalog_id: str) -> str:
    return f"{TABLES}/{catalog_id}"


def new_version() -> str:
    """A version name that sorts by time and never repeats: ``20261207T051722Z-1a2b3c4d``."""
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{uuid.uuid4().hex[:8]}"
