"""Converting Bgee H5AD files into an atlas: atomic, idempotent, resumable, parallel.

Each file becomes a new, immutable version of its experiment, written under a fresh name while
nothing refers to it, then committed to the catalog in one atomic step (``commit.py``); the
version it replaces is removed after. Readers see the old experiment or the new one, never a
mix. Re-running skips sources whose sha256 is already recorded. A killed run leaves the atlas as
it was before that file; what it wrote is swept by the next run (or ``bgee-dask check --repair``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import time
import traceback
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bgee_dask._runtime import arrow_on_system_heap, bound_heap_growth, cpu_count, current_client, local_client
from bgee_dask._version import __version__
from bgee_dask.cancellation import Cancelled, check_cancelled
from bgee_dask.catalog.commit import commit_version, declared_genes, declared_runs, read_record, share_bytes, sweep
from bgee_dask.catalog.locks import writer_lease
from bgee_dask.catalog.types import CatalogTypeError
from bgee_dask.failpoints import failpoint
from bgee_dask.format.location import AtlasLocation
from bgee_dask.format.paths import (
    CELLS_STORE,
    GENES_FILE,
    GENES_STORE,
    HEADER,
    RUNS_FILE,
    WRITER_LEASE,
    new_version,
    version_dir,
)
from bgee_dask.schema import BgeeInputError, check_identifier, parse_bgee_filename
from bgee_dask.workdirs import sweep_stale

if TYPE_CHECKING:  # imported where files are read (see _convert_file)
    from bgee_dask.sources.h5ad import H5adSource


@dataclass
class ConversionReport:
    """The outcome for one source file."""

    source: str
    status: str  # "converted", "skipped" or "failed"
    experiment_id: str | None = None
    species: str | None = None
    layout: str | None = None
    n_cells: int | None = None
    n_genes: int | None = None
    nnz: int | None = None
    bytes: int | None = None
    seconds: float = 0.0
    cpm_in_x: bool | None = None
    store: str | None = None
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """The one-line summary printed by the CLI."""
        if self.status == "failed":
            return f"FAILED {self.message}"
        if self.status == "skipped":
            return f"skipped {self.species}/{self.experiment_id}: {self.message}"
        extra = " (CPM found in X; raw counts taken from layers['abundance'])" if self.cpm_in_x else ""
        return (
            f"converted {self.source} -> {self.store}: {self.n_cells} cells x {self.n_genes} genes, "
            f"layout {self.layout}, {self.seconds:.1f}s{extra}"
        )


def find_sources(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Files as given, folders searched recursively for ``.h5ad``; sorted, without repeats."""
    found: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            for dirpath, _dirs, files in os.walk(p):
                found.extend(os.path.join(dirpath, f) for f in files if f.endswith(".h5ad"))
        else:
            found.append(p)
    return sorted(dict.fromkeys(os.path.abspath(f) for f in found))


def sha256_file(path: str, bufsize: int = 1 << 22) -> str:
    # One buffer, refilled: a new bytes object per read page-faulted 25k times per file. Reads of
    # 4 MB, not 256 kB: each read and each update gives the GIL back and waits to take it again,
    # while the file's obs are being read (Python, holding it).
    h = hashlib.sha256()
    buf = bytearray(bufsize)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _identify(path: str, experiment_id: str | None, species: str | None) -> tuple[str, str] | None:
    """(species, experiment) from the file name when possible, else by opening the file."""
    named = parse_bgee_filename(path)
    if named and experiment_id is None and species is None:
        return named
    from bgee_dask.sources.h5ad import H5adSource  # (see _convert_file)

    try:
        with H5adSource(path, experiment_id=experiment_id, species=species) as src:
            return src.species, src.experiment_id
    except BgeeInputError:
        return None  # the conversion itself will report the problem


def convert_file(
    path: str,
    loc: AtlasLocation,
    *,
    overwrite: bool = False,
    threads: int | None = None,
    experiment_id: str | None = None,
    species: str | None = None,
    tmp_dir: str | None = None,
    in_memory_nnz: int | None = None,
    gene_index: bool = True,
    progress: bool = False,
) -> ConversionReport:
    """Convert one file into the atlas; never raises for a bad file, reports it instead."""
    bound_heap_growth()
    arrow_on_system_heap()
    return _convert_file(
        path, loc, overwrite, threads, experiment_id, species, tmp_dir, in_memory_nnz, gene_index, progress
    )


def _convert_file(
    path, loc, overwrite, threads, experiment_id, species, tmp_dir, in_memory_nnz, gene_index, progress
) -> ConversionReport:
    # Imported where files are read, in the workers: the process that only plans and schedules a
    # conversion starts its cluster without waiting for them (anndata alone brings in dask.array,
    # sparse and numba), and the workers' imports run in parallel instead of after it.
    from bgee_dask.converter.writer import decode_matrix
    from bgee_dask.sources.h5ad import H5adSource

    start = time.perf_counter()
    report = ConversionReport(source=path, status="failed")
    threads = threads or cpu_count()
    size: dict[str, Any] = {} if in_memory_nnz is None else {"in_memory_nnz": in_memory_nnz}
    kwargs: dict[str, Any] = dict(size)
    bar = None
    version: _Version | None = None
    try:
        with contextlib.ExitStack() as leased:
            check_cancelled()
            # Decoding starts as soon as the matrix is open, while obs and var are still being read, unless
            # this run may skip the file (its experiment is in the atlas already: the checksum decides).
            known = _ids_before_opening(path, experiment_id, species)
            record_before = read_record(loc, *known) if known is not None else None
            early = known is not None and (overwrite or record_before is None)
            # The pools are shut down (every thread stopped writing) before a failed version is
            # removed: that happens after this block, in the ``finally`` below.
            with (
                ThreadPoolExecutor(max(1, threads)) as pool,
                ThreadPoolExecutor(1, thread_name_prefix="bgee-dask-sha256") as hasher,
                contextlib.ExitStack() as decoding,
            ):
                # The checksum on a thread of its own: on the pool it would hold one of the threads
                # decoding the matrix for as long as it runs.
                sha_future = hasher.submit(sha256_file, path) if os.path.isfile(path) else None

                def sha() -> str:
                    return sha_future.result() if sha_future else ""

                def on_matrix(src: H5adSource):
                    nonlocal bar
                    bar = _value_bar(src, progress)
                    if bar is not None:
                        src.on_read = kwargs["on_write"] = bar.update
                    if not early:
                        return None
                    kwargs["decoding"] = decoding.enter_context(decode_matrix(src, **size))
                    return decoding.close

                with H5adSource(
                    path, experiment_id=experiment_id, species=species, executor=pool, on_matrix=on_matrix
                ) as src:
                    try:
                        report.experiment_id, report.species, report.layout = (
                            src.experiment_id,
                            src.species,
                            src.layout,
                        )
                        ids = (src.species, src.experiment_id)
                        existing = record_before if ids == known else read_record(loc, *ids)
                        if existing and not overwrite:
                            if existing["source_sha256"] == sha():
                                report.status, report.message = "skipped", "unchanged (same sha256)"
                                report.store = existing["store"]
                                return report
                            if existing["source_name"] != src.name:
                                raise BgeeInputError(
                                    path,
                                    f"experiment {src.species}/{src.experiment_id} is already in the atlas from "
                                    f"{existing['source_name']}; pass --overwrite to replace it",
                                )
                        provenance = {
                            "source_name": src.name,
                            "source_size": os.path.getsize(path),
                            "source_sha256": "",
                            "layout": src.layout,
                            "counts_source": src.counts_key,
                            "cpm_in_x": src.cpm_in_x,
                            "converter": f"bgee-dask {__version__}",
                            "converted_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                        }

                        def final_provenance() -> dict[str, Any]:
                            # taken when the store's attributes are written: hashing runs alongside the writing
                            return {**provenance, "source_sha256": sha()}

                        version = _Version(loc, src.species, src.experiment_id, gene_index)
                        leased.enter_context(writer_lease(loc, version.folder, WRITER_LEASE))
                        written = _write_stores(version, src, final_provenance, pool, tmp_dir, kwargs)
                    finally:
                        decoding.close()  # the decode has ended before the file closes
                        if bar is not None:
                            bar.close()
            failpoint("store-written")
            record = _record(version, written, report, loc)

            def committed() -> None:
                version.committed = True
                leased.close()  # the version is referenced now: no lease needed (see commit_version)

            commit_version(loc, record, on_committed=committed)
        report.status = "converted"
        report.cpm_in_x = written.attrs["cpm_in_x"]
        report.n_cells, report.n_genes, report.nnz = written.n_cells, written.n_genes, written.nnz
        report.store, report.bytes = version.cells, record["bytes"]
        if report.cpm_in_x:
            report.message = "X held CPM; raw counts were taken from layers['abundance']"
    except BgeeInputError as exc:
        report.message = str(exc)
    except Cancelled as exc:
        report.message = f"{path}: {exc}; nothing of it was committed"
    except Exception as exc:  # a bug or an environment failure: still one line, with the cause
        report.message = f"{path}: {type(exc).__name__}: {exc}"
        report.details["traceback"] = traceback.format_exc()
    finally:
        if version is not None and not version.committed:
            _remove_quietly(loc, version.folder)
    report.seconds = time.perf_counter() - start
    return report


@dataclass
class _Version:
    """A new version of an experiment: its folder and what goes in it (see ``paths``)."""

    loc: AtlasLocation
    species: str
    experiment_id: str
    gene_index: bool
    name: str = field(default_factory=new_version)
    committed: bool = False

    @property
    def folder(self) -> str:
        return version_dir(self.species, self.experiment_id, self.name)

    @property
    def cells(self) -> str:
        return f"{self.folder}/{CELLS_STORE}"

    @property
    def genes(self) -> str | None:
        return f"{self.folder}/{GENES_STORE}" if self.gene_index else None


def _write_stores(version: _Version, src, provenance, pool, tmp_dir, kwargs):
    from bgee_dask.converter.writer import write_experiment  # (see _convert_file)

    loc = version.loc
    return write_experiment(
        src,
        loc.zarr_store(version.cells),
        provenance=provenance,
        executor=pool,
        spill_dir=tmp_dir,
        gene_index_store=loc.zarr_store(version.genes) if version.genes else None,
        **kwargs,
    )


def _record(version: _Version, written, report: ConversionReport, loc: AtlasLocation) -> dict[str, Any]:
    """The experiment's catalog record, after its share (runs and genes tables) is written beside the stores.

    The share is cast to the catalog's declared types here, so that a value the catalog cannot
    hold fails this file, before anything is committed.
    """
    genes = written.var
    symbol_col = next((c for c in ("feature_name", "gene_symbol", "symbol") if c in genes), None)
    gene_table = pd.DataFrame(
        {
            "gene_id": genes.index.astype(str),
            # missing symbols stay missing (astype(str) would name them "nan")
            "gene_symbol": np.where(genes[symbol_col].notna(), genes[symbol_col].astype(str), None)
            if symbol_col
            else None,
            "gene_index": np.arange(len(genes), dtype=np.int64),
            "gene_nnz": written.gene_nnz,
        }
    )
    try:
        runs, gene_share = declared_runs(written.runs), declared_genes(gene_table)
    except CatalogTypeError as exc:
        raise BgeeInputError(report.source, str(exc)) from None
    loc.write_bytes(f"{version.folder}/{RUNS_FILE}", share_bytes(runs))
    loc.write_bytes(f"{version.folder}/{GENES_FILE}", share_bytes(gene_share))
    size = loc.size(version.cells) + (loc.size(version.genes) if version.genes else 0)
    return {
        "experimentId": version.experiment_id,
        "species": version.species,
        "version": version.name,
        "n_cells": written.n_cells,
        "n_genes": written.n_genes,
        "nnz": written.nnz,
        "bytes": size,
        "store": version.cells,
        "gene_index": version.genes,
        "runs": f"{version.folder}/{RUNS_FILE}",
        "genes": f"{version.folder}/{GENES_FILE}",
        "format_version": written.attrs["format_version"],
        "layout": report.layout,
        "cpm_in_x": bool(written.attrs["cpm_in_x"]),
        "row_blocks": written.row_blocks,
        "obs_columns": written.obs_columns,
        "obs_kinds": json.dumps(written.obs_kinds, sort_keys=True),
        **written.attrs["provenance"],  # as the store records it, checksum included
    }


def _remove_quietly(loc: AtlasLocation, rel: str) -> None:
    """Remove a version that was not committed; a failure here leaves debris for ``check``, not an error.

    Locally, the folders that held only it go too, up to the atlas folder itself: a run that
    committed nothing into a new atlas leaves no folder behind.
    """
    with contextlib.suppress(Exception):
        loc.remove(rel)
    if loc.is_local:
        folder = os.path.dirname(loc.path(rel))
        while len(folder) >= len(loc.url):
            try:
                os.rmdir(folder)  # only if empty
            except OSError:
                break
            folder = os.path.dirname(folder)


def _ids_before_opening(path: str, experiment_id: str | None, species: str | None) -> tuple[str, str] | None:
    """(species, experiment) when known without opening the file: from the options or the file name.

    They name a catalog fragment, so ids that could not name a store give ``None`` (opening the
    file then reports them).
    """
    if experiment_id is not None and species is not None:
        ids = (species, experiment_id)
    elif experiment_id is None and species is None:
        ids = parse_bgee_filename(path)
    else:
        return None
    if ids is None:
        return None
    try:
        return check_identifier("species", ids[0]), check_identifier("experiment id", ids[1])
    except ValueError:
        return None


def _plan(paths: Sequence[str], overwrite: bool, experiment_id: str | None, species: str | None):
    """Reject sources that map to the same experiment as an earlier one in this run."""
    owners: dict[tuple[str, str], str] = {}
    todo, rejected = [], []
    for path in paths:
        key = _identify(path, experiment_id, species)
        if key is not None and key in owners:
            first = owners[key]
            if overwrite:
                rejected.append(
                    ConversionReport(
                        source=first,
                        status="skipped",
                        species=key[0],
                        experiment_id=key[1],
                        message=f"superseded by {path} (--overwrite: the last source wins)",
                    )
                )
                todo.remove(first)
            else:
                rejected.append(
                    ConversionReport(
                        source=path,
                        status="failed",
                        species=key[0],
                        experiment_id=key[1],
                        message=f"{path}: maps to experiment {key[0]}/{key[1]} like {first}; "
                        "convert one of them, or pass --overwrite",
                    )
                )
                continue
        if key is not None:
            owners[key] = path
        todo.append(path)
    return todo, rejected


def convert(
    sources: str | os.PathLike | Iterable[str | os.PathLike],
    out: str | os.PathLike,
    *,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    client: Any | None = None,
    workers: int | None = None,
    progress: bool = True,
    experiment_id: str | None = None,
    species: str | None = None,
    tmp_dir: str | None = None,
    gene_index: bool = True,
) -> list[ConversionReport]:
    """Convert Bgee H5AD files (or folders of them) into the atlas at ``out``.

    ``gene_index`` also writes each experiment's gene-major copy, which makes queries for a few
    genes read megabytes instead of whole matrices, at the cost of a second copy of the values.

    Files are converted as Dask tasks: on ``client`` when given, else on the current client,
    else by default on dask's threaded scheduler in this process (one file per four cores at a
    time, each decoding and encoding on its share of the cores); ``workers=N`` starts a local
    cluster of N worker processes, and ``workers=1`` converts in this process without Dask.
    Bad files are reported, not raised, and never stop the others; an object store that cannot
    be written raises ``StorageAccessError`` before any file is read.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    paths = find_sources(sources)
    loc = AtlasLocation(out, storage_options)
    if paths:
        # wrong credentials, a missing bucket, a read-only folder: one error before any file is read
        loc.check_access(write=True)
    todo, reports = _plan(paths, overwrite, experiment_id, species)
    if todo:
        sweep_stale(tmp_dir)  # spill folders of conversions killed before (this machine's)
    kwargs = {
        "overwrite": overwrite,
        "experiment_id": experiment_id,
        "species": species,
        "tmp_dir": tmp_dir,
        "gene_index": gene_index,
    }
    client = client or current_client()
    if client is None and (len(todo) <= 1 or workers == 1):
        reports += _run_serial(todo, loc, kwargs, progress)
    elif client is None and workers is None:
        # Tasks of dask's threaded scheduler, in this process: a file already keeps every core
        # busy (decoding and encoding run on its own thread pool), so worker processes only added
        # their start-up and a second copy of the imports. Many cores: a few files at once, each
        # with its share of the cores.
        cores = cpu_count()
        n = max(1, min(len(todo), cores // 4))
        reports += _run_threads(todo, loc, kwargs, progress, n, threads=max(1, cores // n))
    elif client is None:
        n = min(len(todo), workers)
        with local_client(n) as local:
            reports += _run_on(local, todo, loc, kwargs, progress, threads=max(1, cpu_count() // n))
    else:
        reports += _run_on(client, todo, loc, kwargs, progress, threads=None)
    if todo and (loc.exists(HEADER) or any(r.status == "converted" for r in reports)):
        # Each file committed itself; this commits what killed runs left uncommitted and removes their debris.
        sweep(loc)
    order = {p: i for i, p in enumerate(paths)}
    return sorted(reports, key=lambda r: order.get(r.source, len(order)))


def _load_kernels() -> None:
    """numba's kernels, loaded before the first file converted in this process (``value_check.load_kernels``)."""
    from bgee_dask.converter.writer import load_conversion_kernels  # (see _convert_file)

    load_conversion_kernels()


def _value_bar(src: H5adSource, progress: bool):
    """A bar over the values read and then written (twice the file's values), for one large file."""
    if not progress or not src.nnz:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=2 * src.nnz, desc=src.name, unit=" values", unit_scale=True, leave=False)


def _run_serial(todo, loc, kwargs, progress) -> list[ConversionReport]:
    from tqdm.auto import tqdm

    if todo:
        _load_kernels()
    if len(todo) == 1:  # one file: show its values rather than a 0/1 file count
        return [convert_file(todo[0], loc, progress=progress, **kwargs)]
    out = []
    for path in tqdm(todo, desc="converting", unit="file", disable=not progress or not todo):
        out.append(convert_file(path, loc, **kwargs))
    return out


def _run_threads(todo, loc, kwargs, progress, n, threads) -> list[ConversionReport]:
    """One Dask task per file on dask's threaded scheduler (``n`` at a time), with a progress bar.

    The graph goes to ``dask.threaded.get`` itself: ``dask.compute`` first asks whether a
    distributed client is running, which imports ``distributed`` (holding the GIL, before the
    first file could start) even when the scheduler is named.
    """
    import dask
    from dask.callbacks import Callback
    from dask.threaded import get
    from tqdm.auto import tqdm

    _load_kernels()  # (convert sends two files or more here)
    tasks = [dask.delayed(convert_file, pure=False)(path, loc, threads=threads, **kwargs) for path in todo]
    graph: dict = {}
    for task in tasks:
        graph.update(task.__dask_graph__())
    with tqdm(total=len(tasks), desc="converting", unit="file", disable=not progress or not tasks) as bar:

        class FileDone(Callback):
            def _posttask(self, key, result, dsk, state, worker_id) -> None:
                if isinstance(result, ConversionReport):
                    bar.update(1)

        with FileDone():
            return list(get(graph, [task.key for task in tasks], num_workers=n))


def _run_on(client, todo, loc, kwargs, progress, threads) -> list[ConversionReport]:
    from distributed import as_completed
    from tqdm.auto import tqdm

    futures = [
        client.submit(
            convert_file, path, loc, threads=threads, pure=False, key=f"convert-{uuid.uuid4().hex[:8]}", **kwargs
        )
        for path in todo
    ]
    out = []
    with tqdm(total=len(futures), desc="converting", unit="file", disable=not progress or not futures) as bar:
        for fut in as_completed(futures):
            out.append(fut.result())
            bar.update(1)
    return out
