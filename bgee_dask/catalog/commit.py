"""Committing experiment versions to the catalog: the only code that changes what readers see.

The protocol (written down in docs/store-format.md):
1. A conversion writes a new, immutable version folder (stores and its share of the catalog)
   under a fresh name, holding a writer lease on it. Nothing refers to it yet.
2. Under the commit lock it writes the experiment's record (which version is current), rebuilds
   the consolidated tables from every record into a new ``catalog/tables/<id>/`` folder, and
   writes the header naming that folder. Writing the header, one atomic write, is the commit.
3. Still under the lock, it removes the experiment's versions no record names and no live
   writer holds; then the lock is released.

A reader reads the header, then the tables it names; tables are never modified, and the tables
the previous header named are kept, so a reader sees the old atlas or the new one. A process
killed at any point leaves the previous commit intact; what it wrote is either committed at the
next consolidation (a record newer than the header) or debris that ``sweep`` removes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import os
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bgee_dask._version import __version__
from bgee_dask.catalog.gene_alignment import align_gene_codes
from bgee_dask.catalog.gene_lookup import GeneLookup, dictionary_column
from bgee_dask.catalog.locks import commit_lock, lease_alive
from bgee_dask.catalog.reader import (
    CATALOG_FORMAT,
    CATALOG_VERSION,
    EXPERIMENT_COLUMNS,
    EXPERIMENTS_FILE,
    GENE_LOOKUP_FILE,
    GENES_TABLE_FILE,
    RUNS_TABLE_FILE,
    read_header,
)
from bgee_dask.catalog.types import GENES_SCHEMA, RUNS_SCHEMA, CatalogTypeError, declared
from bgee_dask.failpoints import failpoint
from bgee_dask.format.location import TMP_MARK, AtlasLocation
from bgee_dask.format.paths import (
    EXPERIMENTS_ROOT,
    FRAGMENTS,
    HEADER,
    TABLES,
    WRITER_LEASE,
    experiment_dir,
    experiment_key,
    fragment_path,
    tables_dir,
)

#: Records and version tables read at once: small objects, so an object store's latency, not its
#: bandwidth, is what reading a few hundred of them costs.
READERS = 16


def read_record(loc: AtlasLocation, species: str, experiment_id: str) -> dict | None:
    """The experiment's committed record (which version is current), or None."""
    try:
        return loc.read_json(fragment_path(species, experiment_id))
    except FileNotFoundError:
        return None


def share_bytes(table: pa.Table) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, write_statistics=False)
    return buf.getvalue().to_pybytes()


def declared_runs(runs: pd.DataFrame | pa.Table) -> pa.Table:
    table = runs if isinstance(runs, pa.Table) else pa.Table.from_pandas(runs, preserve_index=False)
    return declared(table, RUNS_SCHEMA, "runs")


def declared_genes(genes: pd.DataFrame | pa.Table) -> pa.Table:
    table = genes if isinstance(genes, pa.Table) else pa.Table.from_pandas(genes, preserve_index=False)
    return declared(table, GENES_SCHEMA, "genes")


# -- consolidation ------------------------------------------------------------------------------
@dataclass
class _Share:
    key: str
    record: dict
    runs: pa.Table | None = None
    genes: pa.Table | None = None
    problem: str | None = None


def _record_keys(loc: AtlasLocation) -> list[str]:
    """``<species>/<experiment>`` of every record (temporary files of killed writes excluded)."""
    return [
        name.removesuffix(".json")
        for name in loc.find(FRAGMENTS)
        if name.endswith(".json") and TMP_MARK not in name and name.count("/") == 1
    ]


def _read_share(loc: AtlasLocation, key: str) -> _Share:
    share = _Share(key, {})
    try:
        share.record = loc.read_json(f"{FRAGMENTS}/{key}.json")
        share.runs = declared_runs(loc.read_arrow(share.record["runs"]))
        share.genes = declared_genes(loc.read_arrow(share.record["genes"]))
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
        if loc.storage_error(exc) is not None:
            raise
        share.problem = f"{type(exc).__name__}: {exc}"
    return share


def _experiments_frame(shares: list[_Share]) -> pd.DataFrame:
    if not shares:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in EXPERIMENT_COLUMNS})
    frame = pd.DataFrame.from_records([s.record for s in shares])
    frame.insert(0, "experiment", [s.key for s in shares])
    return frame


def _stack_runs(shares: list[_Share]) -> pd.DataFrame:
    """The runs of every experiment in one frame (a few rows each), text as categoricals."""
    tables = [s.runs for s in shares]
    if not tables:
        frame = RUNS_SCHEMA.empty_table().to_pandas()
        frame.insert(0, "experiment", pd.Series(dtype=object))
        return frame
    frame = pa.concat_tables(tables).to_pandas()
    keys = np.asarray([s.key for s in shares], dtype=object)
    frame.insert(0, "experiment", np.repeat(keys, [len(t) for t in tables]))
    for col in frame.columns:  # repeated text: categoricals, read back as codes
        if frame[col].dtype == object:
            frame[col] = frame[col].astype("category")
    return frame


def _stack_genes(shares: list[_Share]) -> pa.Table:
    """The genes of every experiment in one table, led by an ``experiment`` dictionary column."""
    tables = [s.genes for s in shares] or [GENES_SCHEMA.empty_table()]
    stacked = pa.concat_tables(tables).combine_chunks()
    lengths = np.asarray([t.num_rows for t in tables])
    keys = [s.key for s in shares]
    experiment = pa.DictionaryArray.from_arrays(
        pa.array(np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)), pa.array(keys or [""], pa.string())
    )
    return stacked.add_column(0, "experiment", experiment)


def _with_gene_keys(genes: pa.Table, experiments: pd.DataFrame) -> pa.Table:
    """The genes table with its ``gene_key`` column (see ``gene_alignment``), text dictionary-encoded.

    Also adds ``n_genes_by_symbol`` to ``experiments``.
    """
    n = genes.num_rows
    names = genes.column("gene_id").combine_chunks()
    symbols = genes.column("gene_symbol").combine_chunks()
    # names and symbols numbered together, so that the rule compares them as integers
    shared = pa.concat_arrays([names, symbols]).dictionary_encode()
    codes = shared.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    experiment = genes.column("experiment").combine_chunks().indices.to_numpy().astype(np.int64)
    _, species_of_experiment = np.unique(experiments["species"].to_numpy(dtype=object), return_inverse=True)
    key, symbol, by_symbol = align_gene_codes(experiment, species_of_experiment[experiment], codes[:n], codes[n:])
    experiments["n_genes_by_symbol"] = np.bincount(experiment[by_symbol], minlength=len(experiments))
    columns = {name: genes.column(name) for name in genes.column_names}
    columns["gene_id"] = dictionary_column(codes[:n], shared.dictionary)
    columns["gene_key"] = dictionary_column(key, shared.dictionary)
    columns["gene_symbol"] = dictionary_column(symbol, shared.dictionary)
    order = ["experiment", "gene_id", "gene_key", "gene_symbol"]
    order += [c for c in genes.column_names if c not in order]
    return pa.table({name: columns[name] for name in order})


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


def consolidate_locked(loc: AtlasLocation) -> dict:
    """Rebuild the tables from every record and commit them; the caller holds the commit lock.

    A record whose share cannot be read or cast to the declared types is left out of the
    tables and listed in the header's ``left_out``, with the reason: it never blocks the others.
    """
    keys = _record_keys(loc)
    with ThreadPoolExecutor(max(1, min(READERS, len(keys))), thread_name_prefix="bgee-dask-catalog") as pool:
        shares = list(pool.map(lambda k: _read_share(loc, k), keys))
    left_out = [{"experiment": s.key, "reason": s.problem} for s in shares if s.problem]
    shares = [s for s in shares if not s.problem]
    experiments = _experiments_frame(shares)
    runs = _stack_runs(shares)
    genes = _with_gene_keys(_stack_genes(shares), experiments) if shares else None
    catalog_id = uuid.uuid4().hex
    folder = tables_dir(catalog_id)
    try:
        loc.write_bytes(f"{folder}/{RUNS_TABLE_FILE}", _parquet_bytes(runs))
        if genes is not None:
            loc.write_bytes(f"{folder}/{GENES_TABLE_FILE}", share_bytes(genes))
            # uncompressed on local disk: mapped and used in place; an object store pays per byte instead
            compression = None if loc.is_local else "zstd"
            lookup = GeneLookup.from_arrow(genes).to_arrow_bytes(catalog_id, compression)
            loc.write_bytes(f"{folder}/{GENE_LOOKUP_FILE}", lookup)
        loc.write_bytes(f"{folder}/{EXPERIMENTS_FILE}", _parquet_bytes(experiments))
    except BaseException:
        with contextlib.suppress(Exception):  # (a disk full, a lost connection): no partial tables left
            loc.remove(folder)
        raise
    failpoint("tables-written")
    previous = read_header(loc)
    header = {
        "format": CATALOG_FORMAT,
        "format_version": CATALOG_VERSION,
        "writer": f"bgee-dask {__version__}",
        "updated_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "catalog_id": catalog_id,  # readers cache the tables of one id: they never change under it
        "tables": folder,
        "previous_tables": previous.get("tables") if previous else None,
        "n_experiments": len(shares),
        "experiments": {s.key: s.record.get("version") for s in shares},
        "left_out": left_out,
    }
    try:
        loc.write_json(HEADER, header)
    except BaseException:
        with contextlib.suppress(Exception):
            loc.remove(folder)  # the header still names the previous tables
        raise
    failpoint("header-written")
    keep = {folder, header["previous_tables"]}
    for name in loc.list(TABLES):
        if f"{TABLES}/{name}" not in keep:
            loc.remove(f"{TABLES}/{name}")
    return header


def consolidate(loc: AtlasLocation) -> dict:
    """Take the lock, rebuild and commit the tables from every record."""
    with commit_lock(loc):
        return consolidate_locked(loc)


# -- committing one experiment ------------------------------------------------------------------
def commit_version(loc: AtlasLocation, record: dict, on_committed: Callable[[], None] | None = None) -> dict:
    """Make ``record``'s version the experiment's current one, then remove the versions it replaces.

    ``on_committed`` runs under the lock as soon as the version is visible: the writer releases
    its lease there, so that a writer committing a newer version after it already sees this one
    as replaceable (released any later, it would be left behind as an orphan).

    Returns the new header. Raises :class:`CatalogTypeError` if the share could not be consolidated
    (the record is then taken back, so the experiment stays as it was).
    """
    species, experiment_id = record["species"], record["experimentId"]
    key = experiment_key(species, experiment_id)
    with commit_lock(loc):
        failpoint("lock-taken")
        before = read_record(loc, species, experiment_id)
        loc.write_json(fragment_path(species, experiment_id), record)
        failpoint("fragment-written")
        try:
            header = consolidate_locked(loc)
        except BaseException:
            _restore_record(loc, species, experiment_id, before)  # the caller removes the version
            raise
        problem = next((x["reason"] for x in header["left_out"] if x["experiment"] == key), None)
        if problem is None and header["experiments"].get(key) != record["version"]:
            # the listing did not show the record just written: never report a commit that did not happen
            problem = f"{fragment_path(species, experiment_id)} was written but not found when the catalog was rebuilt"
        if problem is not None:
            _restore_record(loc, species, experiment_id, before)
            header = consolidate_locked(loc)
            loc.remove(experiment_dir(species, experiment_id) + "/" + record["version"])
            raise CatalogTypeError(f"{key}: its catalog share could not be consolidated: {problem}")
        if on_committed is not None:
            on_committed()
        remove_replaced_versions(loc, species, experiment_id, keep={record["version"]})
        failpoint("committed")
    return header


def _restore_record(loc: AtlasLocation, species: str, experiment_id: str, before: dict | None) -> None:
    """Put the experiment's record back as it was before a commit that did not happen."""
    with contextlib.suppress(Exception):
        if before is not None:
            loc.write_json(fragment_path(species, experiment_id), before)
        else:
            loc.remove(fragment_path(species, experiment_id))


def remove_replaced_versions(loc: AtlasLocation, species: str, experiment_id: str, keep: set[str]) -> list[str]:
    """Remove the experiment's versions not in ``keep`` whose writer is gone; their paths."""
    removed = []
    base = experiment_dir(species, experiment_id)
    for version in loc.list(base):
        if version in keep or lease_alive(loc, f"{base}/{version}/{WRITER_LEASE}"):
            continue
        folder = f"{base}/{version}"
        parts = loc.list(folder)
        for i, part in enumerate(parts):  # one part at a time: a kill in between leaves debris, never a mix
            loc.remove(f"{folder}/{part}")
            if i == 0:
                failpoint("old-version-removing")
        loc.remove(folder)
        removed.append(folder)
    return removed


# -- state of the whole atlas: what check reports and sweep cleans --------------------------------
@dataclass
class AtlasState:
    """What is on disk beside the committed catalog."""

    header: dict | None
    records: dict[str, dict] = field(default_factory=dict)  # key -> record
    versions: dict[str, list[str]] = field(default_factory=dict)  # key -> version folders on disk
    temp_files: list[str] = field(default_factory=list)
    stale_tables: list[str] = field(default_factory=list)

    @property
    def uncommitted(self) -> list[str]:
        """Records that the header does not reflect (a writer died between record and header)."""
        committed = (self.header or {}).get("experiments") or {}
        left = {x["experiment"] for x in (self.header or {}).get("left_out") or []}
        return sorted(
            k for k, r in self.records.items() if committed.get(k) != r.get("version") and k not in left
        ) + sorted(k for k in committed if k not in self.records)


def atlas_state(loc: AtlasLocation) -> AtlasState:
    """One listing of the catalog and the experiments folders, with every record read."""
    state = AtlasState(read_header(loc))
    for name in loc.find("catalog"):
        if TMP_MARK in name:
            state.temp_files.append(f"catalog/{name}")
    keys = _record_keys(loc)
    with ThreadPoolExecutor(max(1, min(READERS, len(keys)))) as pool:
        records = list(pool.map(lambda k: _read_json_or_none(loc, f"{FRAGMENTS}/{k}.json"), keys))
    state.records = {k: r for k, r in zip(keys, records, strict=True) if r is not None}
    for species in loc.list(EXPERIMENTS_ROOT):
        for experiment in loc.list(f"{EXPERIMENTS_ROOT}/{species}"):
            state.versions[f"{species}/{experiment}"] = loc.list(f"{EXPERIMENTS_ROOT}/{species}/{experiment}")
    if state.header is not None:
        keep = {state.header.get("tables"), state.header.get("previous_tables")}
        state.stale_tables = [f"{TABLES}/{n}" for n in loc.list(TABLES) if f"{TABLES}/{n}" not in keep]
    return state


def _read_json_or_none(loc: AtlasLocation, rel: str) -> dict | None:
    try:
        return loc.read_json(rel)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def orphan_versions(loc: AtlasLocation, state: AtlasState) -> list[str]:
    """Version folders no record or header names and no live writer holds."""
    committed = (state.header or {}).get("experiments") or {}
    out = []
    for key, versions in state.versions.items():
        named = {state.records.get(key, {}).get("version"), committed.get(key)}
        for version in versions:
            folder = f"{EXPERIMENTS_ROOT}/{key}/{version}"
            if version not in named and not lease_alive(loc, f"{folder}/{WRITER_LEASE}"):
                out.append(folder)
    return out


def sweep(loc: AtlasLocation) -> dict[str, list[str]]:
    """Under the lock: commit records the header missed, then remove debris. What was done, by kind.

    Debris: temporary files of killed writes (no writer is active while the lock is held), version
    folders nothing names and no live writer holds, table folders older than the previous commit,
    and empty experiment folders.
    """
    done: dict[str, list[str]] = {"committed": [], "removed": []}
    with commit_lock(loc):
        state = atlas_state(loc)
        if state.uncommitted or (state.header is None and state.records):
            done["committed"] = state.uncommitted or sorted(state.records)
            consolidate_locked(loc)
            state = atlas_state(loc)
        for rel in [*state.temp_files, *state.stale_tables, *orphan_versions(loc, state)]:
            loc.remove(rel)
            done["removed"].append(rel)
        if loc.is_local:  # object stores have no folders to leave behind
            for key in state.versions:
                with contextlib.suppress(OSError):  # only if empty: a writer may be starting a version there
                    os.rmdir(loc.path(f"{EXPERIMENTS_ROOT}/{key}"))
    return done
