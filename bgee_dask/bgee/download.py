"""Listing a species' droplet experiments in a Bgee release, fetching them, converting them on arrival.

The plan is made in the calling process from Bgee's small tables (the release table, the
species table, the species' annotation archive). The H5AD files are then fetched either on a
pool of threads here (``jobs`` at a time), each converted into the atlas as soon as it has
arrived while the others keep coming; or, given a Dask ``client``, by one task per experiment
that fetches and converts on a worker, so the data never passes through this process (the
workers must see ``out``, and the atlas).

A problem with one file (a 404, a transfer still cut short after its retries, content that is
not an H5AD, a failed conversion) or with one requested experiment is reported in one line and
the rest is still done. A problem with the release or the species stops everything, raised as
:class:`~bgee_dask.bgee.errors.BgeeDataError` or :class:`~bgee_dask.bgee.errors.TransferError`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import posixpath
import threading
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from bgee_dask.bgee.annotation import Annotation, check_archive, read_annotation
from bgee_dask.bgee.errors import BgeeDataError, TransferError
from bgee_dask.bgee.integrity import check_h5ad
from bgee_dask.bgee.manifest import Manifest
from bgee_dask.bgee.releases import (
    DEFAULT_BASE_URL,
    Release,
    Species,
    choose_release,
    load_releases,
    load_species,
    resolve_species,
)
from bgee_dask.bgee.transfer import TransferPolicy, fetch_bytes, fetch_file, sha256_file
from bgee_dask.schema import check_identifier

if TYPE_CHECKING:
    from bgee_dask.api.convert import ConversionReport
    from bgee_dask.format.location import AtlasLocation

#: Transfers at once when fetching on this machine.
DEFAULT_JOBS = 2


class IncompleteDownload(RuntimeError):
    """Raised by :func:`download` after doing all it could, when something failed.

    ``failures`` holds one line per problem; ``paths`` the H5AD files that are complete.
    """

    def __init__(self, failures: Sequence[str], paths: Sequence[Path]):
        self.failures = list(failures)
        self.paths = list(paths)
        more = f" (and {len(self.failures) - 1} more problems)" if len(self.failures) > 1 else ""
        super().__init__(f"{self.failures[0]}{more}")


@dataclass(frozen=True)
class FileJob:
    """One file to have at ``dest``; ``known`` is its manifest entry from an earlier run."""

    url: str
    dest: str
    kind: str  # "h5ad" or "annotation"
    experiment_id: str | None = None
    known: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return os.path.basename(self.dest)


@dataclass
class FileOutcome:
    """What became of one :class:`FileJob` (and of its conversion, when there was one)."""

    job: FileJob
    status: str  # "downloaded", "skipped" or "failed"
    entry: dict[str, Any] | None = None
    message: str = ""
    attempts: int = 0
    resumed: bool = False
    worker: str | None = None
    conversion: ConversionReport | None = None

    @property
    def ok(self) -> bool:
        return self.status != "failed"


@dataclass
class DownloadResult:
    """Everything one run did; ``failures`` has one line per problem, in the order met."""

    release: Release
    species: Species
    folder: Path
    annotation: Annotation | None = None
    outcomes: list[FileOutcome] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    atlas: str | None = None

    @property
    def paths(self) -> list[Path]:
        """The experiments' H5AD files that are complete at their final names."""
        return [Path(o.job.dest) for o in self.outcomes if o.ok and o.job.kind == "h5ad"]

    @property
    def conversions(self) -> list[ConversionReport]:
        return [o.conversion for o in self.outcomes if o.conversion is not None]


# -- one file -------------------------------------------------------------------------------------
def _checker(kind: str) -> Callable[[str], None]:
    return check_h5ad if kind == "h5ad" else check_archive


def fetch_one(
    job: FileJob,
    policy: TransferPolicy | None = None,
    on_size: Callable[[int], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> FileOutcome:
    """Have ``job.dest`` complete; never raises for a file that cannot be fetched, reports it.

    A file at its final name whose size matches its manifest entry is complete and is left as
    it is, without asking the server. One without a (matching) entry is checked and hashed; if it
    fails the check it is fetched again.
    """
    check = _checker(job.kind)
    try:
        if os.path.isfile(job.dest):
            size = os.path.getsize(job.dest)
            if job.known and job.known.get("bytes") == size and job.known.get("url") == job.url:
                return FileOutcome(job, "skipped", dict(job.known), "complete (as in the manifest)")
            try:
                check(job.dest)
            except ValueError:
                os.remove(job.dest)  # not a complete file of this kind: fetched again below
            else:
                entry = {"url": job.url, "bytes": size, "sha256": sha256_file(job.dest)}
                entry.update(etag=None, last_modified=None, recorded_at=_now())
                return FileOutcome(job, "skipped", entry, "complete (checked and hashed; was not in the manifest)")
        fetched = fetch_file(job.url, job.dest, policy=policy, check=check, on_size=on_size, on_bytes=on_bytes)
    except TransferError as exc:
        return FileOutcome(job, "failed", message=str(exc))
    except OSError as exc:  # the local disk: full, not writable
        return FileOutcome(job, "failed", message=f"{job.dest}: {type(exc).__name__}: {exc}")
    entry = {**fetched.manifest_entry(), "recorded_at": _now()}
    return FileOutcome(
        job, "downloaded", entry, f"{fetched.bytes:,} bytes", attempts=fetched.attempts, resumed=fetched.resumed
    )


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _worker_address() -> str | None:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return None


def fetch_and_convert(
    job: FileJob, policy: TransferPolicy | None, loc: AtlasLocation | None, gene_index: bool = True
) -> FileOutcome:
    """A worker's task: fetch one experiment, then convert it into the atlas at ``loc`` if given.

    ``convert_file`` commits the experiment to the catalog itself: nothing is left for the client.
    """
    outcome = fetch_one(job, policy)
    outcome.worker = _worker_address()
    if loc is not None and outcome.ok:
        from bgee_dask.api.convert import convert_file

        outcome.conversion = convert_file(job.dest, loc, gene_index=gene_index)
    return outcome


# -- the plan -------------------------------------------------------------------------------------
def _file_name(url: str) -> str:
    name = posixpath.basename(urllib.parse.urlparse(url).path)
    if not name or name in {".", ".."} or "/" in name or "\\" in name:
        raise BgeeDataError(f"{url}: no file name in the URL")
    return urllib.parse.unquote(name)


def _resolve(
    species: str | int, release: str | None, base_url: str, policy: TransferPolicy | None
) -> tuple[Release, Species]:
    source = f"{base_url.rstrip('/')}/release_v2.tsv"
    chosen = choose_release(load_releases(base_url, policy=policy), release, source)
    if not chosen.has_droplet_data():
        raise BgeeDataError(
            f"Bgee {chosen.name} publishes no droplet-based single-cell data (no droplet URL patterns in {source})"
        )
    return chosen, resolve_species(load_species(chosen, policy=policy), species, chosen.name)


def _with_context(annotation: Annotation, release: Release) -> pd.DataFrame:
    return annotation.experiments.assign(species=annotation.species, release=release.name)


def list_experiments(
    species: str | int,
    release: str | None = None,
    base_url: str = DEFAULT_BASE_URL,
    *,
    policy: TransferPolicy | None = None,
) -> pd.DataFrame:
    """The droplet-based experiments Bgee publishes for ``species`` in ``release`` (default: the newest).

    ``species``: ``Genus_species``, ``"Genus species"``, a common name, or an NCBI taxon id. One
    row per experiment: ``experimentId``, ``name``, ``library_count``, ``condition_count``,
    ``data_source``, ``data_source_url``, ``description``, the annotation's other columns, then
    ``species`` and ``release``. Raises ``BgeeDataError`` or ``TransferError`` with one line.
    """
    rel, sp = _resolve(species, release, base_url, policy)
    url = rel.annotation_url(sp.name)
    return _with_context(read_annotation(fetch_bytes(url, policy=policy), sp.name, url), rel)


def _wanted(
    requested: Sequence[str] | None, annotation: Annotation | None, sp: Species, rel: Release, failures: list[str]
) -> list[str]:
    if requested is None:
        return annotation.experiment_ids if annotation is not None else []
    out = []
    known = set(annotation.experiment_ids) if annotation is not None else None
    for exp in dict.fromkeys(str(e).strip() for e in requested):
        try:
            check_identifier("experiment id", exp)
        except ValueError as exc:
            failures.append(str(exc))
            continue
        if known is not None and exp not in known:
            listed = annotation.experiment_ids  # type: ignore[union-attr]
            shown = ", ".join(listed[:10]) + (f" ... ({len(listed)} in all)" if len(listed) > 10 else "")
            failures.append(
                f"experiment {exp} is not in the {sp.name} annotation of Bgee {rel.name} (it lists {shown})"
            )
            continue
        out.append(exp)
    return out


def run_download(
    species: str | int,
    experiments: Sequence[str] | None = None,
    release: str | None = None,
    out: str | os.PathLike = "bgee",
    base_url: str = DEFAULT_BASE_URL,
    atlas: str | os.PathLike | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    jobs: int = DEFAULT_JOBS,
    client: Any | None = None,
    progress: bool = True,
    policy: TransferPolicy | None = None,
    gene_index: bool = True,
    on_outcome: Callable[[FileOutcome], None] | None = None,
) -> DownloadResult:
    """Do all :func:`download` does and report on each part instead of raising for one file.

    ``on_outcome`` is called in this process for each file as it is done (for printing).
    """
    rel, sp = _resolve(species, release, base_url, policy)
    check_identifier("release", rel.name)
    folder = Path(out) / rel.name / sp.name
    manifest = Manifest(folder)
    result = DownloadResult(release=rel, species=sp, folder=folder, atlas=None if atlas is None else str(atlas))

    def done(outcome: FileOutcome) -> None:
        if outcome.entry is not None:
            manifest.record(outcome.job.name, outcome.entry)
        if not outcome.ok:
            result.failures.append(outcome.message)
        conversion = outcome.conversion
        if conversion is not None and conversion.status == "failed":
            result.failures.append(f"conversion failed: {conversion.message}")
        result.outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)

    loc = None
    if atlas is not None:
        from bgee_dask.format.location import AtlasLocation

        loc = AtlasLocation(atlas, storage_options)
        loc.check_access(write=True)  # before any transfer: wrong credentials fail now

    # the annotation: the list of experiments, and what the atlas keeps about them
    url = rel.annotation_url(sp.name)
    name = _file_name(url)
    outcome = fetch_one(FileJob(url, str(folder / name), "annotation", known=manifest.get(name)), policy)
    done(outcome)
    if outcome.ok:
        try:
            result.annotation = read_annotation(Path(outcome.job.dest).read_bytes(), sp.name, url)
        except BgeeDataError as exc:
            result.failures.append(str(exc))
    if loc is not None and result.annotation is not None:
        from bgee_dask.catalog.annotations import write_annotations

        write_annotations(loc, sp.name, _with_context(result.annotation, rel), result.annotation.libraries)

    todo = []
    for exp in _wanted(experiments, result.annotation, sp, rel, result.failures):
        url = rel.h5ad_url(sp.name, exp)
        try:
            name = _file_name(url)
        except BgeeDataError as exc:
            result.failures.append(str(exc))
            continue
        todo.append(FileJob(url, str(folder / name), "h5ad", exp, manifest.get(name)))

    if client is not None:
        _on_cluster(client, todo, policy, loc, gene_index, progress, done)
    else:
        _here(todo, policy, loc, gene_index, progress, max(1, jobs), done)
    return result


def _convert_here(path: str, loc: AtlasLocation, gene_index: bool) -> ConversionReport:
    """One file through the converter's public entry point, in this process; the atlas lists it on return."""
    from bgee_dask.api.convert import convert

    (report,) = convert(
        path, loc.url, storage_options=loc.storage_options, workers=1, progress=False, gene_index=gene_index
    )
    return report


def _here(todo, policy, loc, gene_index, progress, jobs, done) -> None:
    """Fetch on ``jobs`` threads; convert each file in this thread as it arrives, while the others keep coming.

    If this thread is interrupted (Ctrl-C), the transfers under way stop at their next chunk and
    keep their parts for the next run, instead of running to their end.
    """
    if not todo:
        return
    stop = threading.Event()
    with _byte_bar(progress, stop) as (on_size, on_bytes), ThreadPoolExecutor(jobs, thread_name_prefix="bgee") as pool:
        futures = [pool.submit(fetch_one, job, policy, on_size, on_bytes) for job in todo]
        try:
            for fut in as_completed(futures):
                outcome = fut.result()
                if loc is not None and outcome.ok:
                    outcome.conversion = _convert_here(outcome.job.dest, loc, gene_index)
                done(outcome)
        except BaseException:
            stop.set()
            for fut in futures:
                fut.cancel()
            raise


def _on_cluster(client, todo, policy, loc, gene_index, progress, done) -> None:
    """One task per experiment, fetching and converting on a worker."""
    if not todo:
        return
    from distributed import as_completed as completed
    from tqdm.auto import tqdm

    futures = [
        client.submit(
            fetch_and_convert,
            job,
            policy,
            loc,
            gene_index,
            pure=False,
            key=f"bgee-fetch-{job.experiment_id}-{uuid.uuid4().hex[:8]}",
        )
        for job in todo
    ]
    with tqdm(total=len(futures), desc="fetching on workers", unit="file", disable=not progress) as bar:
        for fut in completed(futures):
            done(fut.result())
            bar.update(1)


class _Stopped(Exception):
    """Raised in a transfer's thread to end it early (the caller was interrupted)."""


@contextlib.contextmanager
def _byte_bar(progress: bool, stop: threading.Event) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """A bar of bytes received and their rate over all transfers; its total grows as sizes become known.

    Its byte counter is called for every chunk, so it is also where a transfer learns to ``stop``.
    """
    from tqdm.auto import tqdm

    lock = threading.Lock()
    with tqdm(total=0, desc="downloading", unit="B", unit_scale=True, unit_divisor=1024, disable=not progress) as bar:

        def on_size(n: int) -> None:
            with lock:
                bar.total += n
                bar.refresh()

        def on_bytes(n: int) -> None:
            if stop.is_set():
                raise _Stopped
            with lock:
                bar.update(n)

        yield on_size, on_bytes


def download(
    species: str | int,
    experiments: Sequence[str] | None = None,
    release: str | None = None,
    out: str | os.PathLike = "bgee",
    base_url: str = DEFAULT_BASE_URL,
    atlas: str | os.PathLike | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    jobs: int = DEFAULT_JOBS,
    client: Any | None = None,
    progress: bool = True,
    policy: TransferPolicy | None = None,
    gene_index: bool = True,
) -> list[Path]:
    """Fetch a species' droplet H5AD files from Bgee into ``out/<release>/<Genus_species>/``.

    ``experiments``: ids from the species' annotation (default: all it lists). ``release``:
    default the newest. Files arrive through ``.part`` files, resume with HTTP Range and are
    retried as ``policy`` says (default :data:`~bgee_dask.bgee.transfer.DEFAULT_POLICY`: about a
    minute for a server that never answers); each is checked (size, HDF5 signature, opening) and
    recorded in ``manifest.json`` (url, bytes, sha256, ETag, Last-Modified). Files already
    complete are not fetched again and not rewritten.

    ``atlas``: convert each file into this atlas (a folder or fsspec URL, with ``storage_options``)
    as it arrives, and keep the species' experiment and library annotations in its catalog.
    ``client``: fetch and convert on its workers instead of ``jobs`` threads here.

    Returns the H5AD paths. Raises :class:`IncompleteDownload` after doing the rest when a file or
    an experiment failed; ``BgeeDataError`` / ``TransferError`` when the release, the species or
    Bgee's tables are unusable.
    """
    result = run_download(
        species,
        experiments,
        release,
        out,
        base_url,
        atlas,
        storage_options=storage_options,
        jobs=jobs,
        client=client,
        progress=progress,
        policy=policy,
        gene_index=gene_index,
    )
    if result.failures:
        raise IncompleteDownload(result.failures, result.paths)
    return result.paths
