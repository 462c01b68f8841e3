"""Converting Bgee H5AD files into an atlas: atomic, idempotent, resumable, parallel.

A store only becomes part of the atlas when its catalog fragment is written, and that happens
after the store is complete; on local disk the store is also written under a temporary name
and renamed into place. Re-running skips sources whose sha256 is already recorded. A killed
run leaves at most a partial store without a fragment, which the next run replaces.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
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

from .._runtime import bound_heap_growth, cpu_count, current_client, gc_paused, local_client
from .._version import __version__
from ..schema import BgeeInputError, check_identifier, parse_bgee_filename
from ..store.layout import gene_index_relpath, store_relpath
from ..store.scratch import release_scratch
from .catalog import Fragment, consolidate, read_fragment_record, remove_fragment, write_fragment
from .location import AtlasLocation

if TYPE_CHECKING:  # imported where files are read (see _convert_file)
    from ..h5ad.source import H5adSource


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
    from ..h5ad.source import H5adSource  # (see _convert_file)

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
    with gc_paused():
        return _convert_file(
            path, loc, overwrite, threads, experiment_id, species, tmp_dir, in_memory_nnz, gene_index, progress
        )


def _convert_file(
    path, loc, overwrite, threads, experiment_id, species, tmp_dir, in_memory_nnz, gene_index, progress
) -> ConversionReport:
    # Imported where files are read, in the workers: the process that only plans and schedules a
    # conversion then starts its cluster ~0.7 s sooner (anndata alone brings in dask.array, sparse
    # and numba), and the workers' imports run in parallel instead of after it.
    from ..h5ad.source import H5adSource
    from ..store.writer import decode_matrix

    start = time.perf_counter()
    report = ConversionReport(source=path, status="failed")
    threads = threads or cpu_count()
    size: dict[str, Any] = {} if in_memory_nnz is None else {"in_memory_nnz": in_memory_nnz}
    kwargs: dict[str, Any] = dict(size)
    bar = None
    try:
        # Decoding starts as soon as the matrix is open, while obs and var are still being read, unless
        # this run may skip the file (its experiment is in the atlas already: the checksum decides).
        known = _ids_before_opening(path, experiment_id, species)
        record_before = read_fragment_record(loc, *known) if known is not None else None
        early = known is not None and (overwrite or record_before is None)
        with (
            ThreadPoolExecutor(max(1, threads)) as pool,
            ThreadPoolExecutor(1, thread_name_prefix="bgee-dask-sha256") as hasher,
            contextlib.ExitStack() as decoding,
        ):
            # The checksum on a thread of its own: on the pool it held one of the threads decoding
            # the matrix for 0.2 s of every 25k-cell file.
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
                    report.experiment_id, report.species, report.layout = src.experiment_id, src.species, src.layout
                    ids = (src.species, src.experiment_id)
                    existing = record_before if ids == known else read_fragment_record(loc, *ids)
                    if existing and not overwrite:
                        same_name = existing["source_name"] == src.name
                        if existing["source_sha256"] == sha():
                            report.status, report.message = "skipped", "unchanged (same sha256)"
                            report.store = existing["store"]
                            return report
                        if not same_name:
                            raise BgeeInputError(
                                path,
                                f"experiment {src.species}/{src.experiment_id} is already in the atlas from "
                                f"{existing['source_name']}; pass --overwrite to replace it",
                            )
                    rel = store_relpath(src.species, src.experiment_id)
                    provenance = {
                        "source_name": src.name,
                        "source_size": os.path.getsize(path),
                        "source_sha256": "",
                        "layout": src.layout,
                        "counts_source": src.counts_key,
                        "cpm_in_x": src.cpm_in_x,
                        "converter": f"bgee-dask {__version__}",
                        "converted_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    }

                    def final_provenance() -> dict[str, Any]:
                        # taken when the store's attributes are written: hashing runs alongside the writing
                        return {**provenance, "source_sha256": sha()}

                    written = _write_atomically(loc, rel, src, final_provenance, pool, tmp_dir, kwargs, gene_index)
                finally:
                    decoding.close()  # the decode has ended before the file closes
                    if bar is not None:
                        bar.close()
        report.status = "converted"
        report.cpm_in_x = written.attrs["cpm_in_x"]
        report.n_cells, report.n_genes, report.nnz = written.n_cells, written.n_genes, written.nnz
        report.store = rel
        report.bytes = loc.size(rel) + (loc.size(gene_index_relpath(rel)) if gene_index else 0)
        genes = written.var
        symbol_col = next((c for c in ("feature_name", "gene_symbol", "symbol") if c in genes), None)
        gene_table = {
            "gene_id": genes.index.astype(str),
            # missing symbols stay missing (astype(str) would name them "nan")
            "gene_symbol": np.where(genes[symbol_col].notna(), genes[symbol_col].astype(str), None)
            if symbol_col
            else None,
            "gene_index": range(len(genes)),
            "gene_nnz": written.gene_nnz,
        }
        record = {
            "experimentId": report.experiment_id,
            "species": report.species,
            "n_cells": written.n_cells,
            "n_genes": written.n_genes,
            "nnz": written.nnz,
            "bytes": report.bytes,
            "store": rel,
            "layout": report.layout,
            "cpm_in_x": bool(report.cpm_in_x),
            "row_blocks": written.row_blocks,
            "obs_columns": written.obs_columns,
            "gene_index": gene_index_relpath(rel) if gene_index else None,
            **written.attrs["provenance"],  # as the store records it, checksum included
        }
        write_fragment(loc, Fragment(record, written.runs, pd.DataFrame(gene_table)))
        if report.cpm_in_x:
            report.message = "X held CPM; raw counts were taken from layers['abundance']"
    except BgeeInputError as exc:
        report.message = str(exc)
    except Exception as exc:  # a bug or an environment failure: still one line, with the cause
        report.message = f"{path}: {type(exc).__name__}: {exc}"
        report.details["traceback"] = traceback.format_exc()
    report.seconds = time.perf_counter() - start
    return report


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


def _write_atomically(loc, rel, src, provenance, pool, tmp_dir, kwargs, gene_index: bool):
    """Stores first, then the old fragment goes (so a killed overwrite is redone), then the stores are published.

    On local disk both stores are written under temporary names and renamed into place; on an
    object store, where there is no rename, the fragment written afterwards is what publishes them.
    """
    from ..store.writer import write_experiment  # (see _convert_file)

    targets = [rel, gene_index_relpath(rel)]
    if loc.is_local:
        parent = os.path.dirname(loc.path(rel))
        os.makedirs(parent, exist_ok=True)
        for name in os.listdir(parent):  # leftovers of killed runs for this experiment
            if any(name.startswith(os.path.basename(t) + suffix) for t in targets for suffix in (".partial-", ".old-")):
                loc.remove(f"{os.path.dirname(rel)}/{name}")
        token = uuid.uuid4().hex[:8]
        partial = {t: f"{t}.partial-{token}" for t in targets}
        try:
            written = write_experiment(
                src,
                loc.zarr_store(partial[rel]),
                provenance=provenance,
                executor=pool,
                spill_dir=tmp_dir,
                gene_index_store=loc.zarr_store(partial[targets[1]]) if gene_index else None,
                **kwargs,
            )
            # Only now: a source that fails validation while streaming must not unlist the experiment.
            remove_fragment(loc, src.species, src.experiment_id)
            for t in targets:
                if loc.exists(t):
                    os.replace(loc.path(t), loc.path(f"{t}.old-{token}"))
                if loc.exists(partial[t]):
                    os.replace(loc.path(partial[t]), loc.path(t))
                loc.remove(f"{t}.old-{token}")
        except BaseException:
            for t in targets:
                loc.remove(partial[t])
            raise
        return written
    remove_fragment(loc, src.species, src.experiment_id)
    for t in targets:
        loc.remove(t)
    try:
        return write_experiment(
            src,
            loc.zarr_store(rel),
            provenance=provenance,
            executor=pool,
            spill_dir=tmp_dir,
            gene_index_store=loc.zarr_store(targets[1]) if gene_index else None,
            **kwargs,
        )
    except BaseException:
        for t in targets:
            loc.remove(t)
        raise


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
    if paths and not loc.is_local:
        # wrong credentials or a missing bucket: one StorageAccessError before any file is read
        loc.check_access(write=True)
    todo, reports = _plan(paths, overwrite, experiment_id, species)
    kwargs = {
        "overwrite": overwrite,
        "experiment_id": experiment_id,
        "species": species,
        "tmp_dir": tmp_dir,
        "gene_index": gene_index,
    }
    client = client or current_client()
    if client is None and (len(todo) <= 1 or workers == 1):
        try:
            reports += _run_serial(todo, loc, kwargs, progress)
        finally:
            release_scratch()
        consolidate(loc)
    elif client is None and workers is None:
        # Tasks of dask's threaded scheduler, in this process: a file already keeps every core
        # busy (decoding and encoding run on its own thread pool), so worker processes only added
        # their start-up and a second copy of the imports (bench_convert, 2 cores, 8 files: 12.45 s
        # on two processes, 10.88 s here), and an in-process distributed cluster only its event
        # loop. Many cores: a few files at once, each with its share of the cores.
        cores = cpu_count()
        n = max(1, min(len(todo), cores // 4))
        try:
            reports += _run_threads(todo, loc, kwargs, progress, n, threads=max(1, cores // n))
        finally:
            release_scratch()
        consolidate(loc)
    elif client is None:
        n = min(len(todo), workers)
        with ThreadPoolExecutor(1) as background:
            with local_client(n) as local:
                reports += _run_on(local, todo, loc, kwargs, progress, threads=max(1, cpu_count() // n))
                # the catalog is consolidated while the cluster shuts down (0.7 s)
                consolidated = background.submit(consolidate, loc)
            consolidated.result()
    else:
        try:
            reports += _run_on(client, todo, loc, kwargs, progress, threads=None)
        finally:
            # the workers kept the last file's working arrays for the next one; nothing more is coming
            client.run(release_scratch)
        consolidate(loc)
    order = {p: i for i, p in enumerate(paths)}
    return sorted(reports, key=lambda r: order.get(r.source, len(order)))


def _load_kernels() -> None:
    """numba's kernels, loaded before the first file converted in this process (``value_check.load_kernels``)."""
    from ..store.writer import load_conversion_kernels  # (see _convert_file)

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
    distributed client is running, which imports ``distributed`` (0.13-0.19 s holding the GIL,
    before the first file could start) even when the scheduler is named.
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
