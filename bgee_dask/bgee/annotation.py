"""A species' droplet annotation archive: its experiments table and its libraries table.

Bgee publishes one ``.tar.gz`` per species and release holding
``<Sp>_Droplet-Based_SC_RNA-Seq_experiments.tsv`` (one row per experiment) and
``<Sp>_Droplet-Based_SC_RNA-Seq_libraries.tsv`` (one row per library and annotated sample),
possibly inside a folder. The archive is read in memory and nothing is extracted, yet an archive
with a member whose path leaves its folder (an absolute path, ``..``, a link pointing outside)
is refused whole: it is not what Bgee writes, and whoever extracted it by hand would be harmed.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
import zlib
from dataclasses import dataclass

import pandas as pd

from bgee_dask.bgee.errors import BgeeDataError
from bgee_dask.bgee.releases import column_key, decode_text, read_tsv

#: Experiments table columns (by :func:`~bgee_dask.bgee.releases.column_key`) and their names here;
#: the first ones are always present in the frames (missing values where a table lacks them).
EXPERIMENT_COLUMNS: dict[str, str] = {
    "experiment.id": "experimentId",
    "experiment.name": "name",
    "library.count": "library_count",
    "condition.count": "condition_count",
    "data.source": "data_source",
    "data.source.url": "data_source_url",
    "experiment.description": "description",
}

#: Libraries table columns named as in the atlas's cell metadata; other columns keep Bgee's names.
LIBRARY_COLUMNS: dict[str, str] = {
    "experiment.id": "experimentId",
    "library.id": "libraryId",
    "anatomical.entity.id": "anatEntityId",
    "anatomical.entity.name": "anatEntityName",
    "celltype.id": "cellTypeId",
    "cell.type.id": "cellTypeId",
    "celltype.name": "cellTypeName",
    "cell.type.name": "cellTypeName",
    "stage.id": "stageId",
    "stage.name": "stageName",
    "developmental.stage.id": "stageId",
    "developmental.stage.name": "stageName",
    "sex": "sex",
    "strain": "strain",
}

_COUNT_COLUMNS = ("library_count", "condition_count")


@dataclass
class Annotation:
    """One species' annotation: ``experiments`` (one row per experiment, ``experimentId`` unique)
    and ``libraries`` (one row per library and annotated sample), all values text but the counts."""

    species: str
    experiments: pd.DataFrame
    libraries: pd.DataFrame

    @property
    def experiment_ids(self) -> list[str]:
        return self.experiments["experimentId"].tolist()


def _leaves_folder(member: tarfile.TarInfo) -> bool:
    """Whether extracting ``member`` would write, or link to, a path outside the archive's folder."""

    def outside(path: str) -> bool:
        path = path.replace("\\", "/")
        norm = posixpath.normpath(path)
        return path.startswith("/") or norm == ".." or norm.startswith("../") or ":" in path.split("/")[0]

    if outside(member.name):
        return True
    if member.issym():
        return outside(posixpath.join(posixpath.dirname(member.name), member.linkname)) or member.linkname.startswith(
            "/"
        )
    if member.islnk():
        return outside(member.linkname)
    return False


def _refusal(bad: list[str]) -> str:
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    return f"archive refused: member {bad[0]!r} leaves the archive's folder{more}"


def check_archive(path: str) -> None:
    """Raise ``ValueError`` unless ``path`` is a tar archive (compressed or not) that reads to its
    end and has no member leaving its folder: the check a fetched archive passes before it is kept."""
    try:
        with tarfile.open(path, mode="r:*") as tar:
            members = tar.getmembers()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise ValueError(f"not a readable tar archive ({type(exc).__name__}: {exc})") from None
    bad = [m.name for m in members if _leaves_folder(m)]
    if bad:
        raise ValueError(_refusal(bad))


def _pick(members: list[tarfile.TarInfo], species: str, kind: str, source: str) -> tarfile.TarInfo:
    """The ``..._<kind>.tsv`` member, preferring one named after the species."""
    found = [
        m
        for m in members
        if m.isfile()
        and column_key(posixpath.basename(m.name)).endswith(f"{kind}.tsv")
        and "droplet" in column_key(posixpath.basename(m.name))
    ]
    if not found:
        names = ", ".join(m.name for m in members) or "none"
        raise BgeeDataError(f"{source}: no droplet-based {kind} table in the archive (members: {names})")
    prefix = column_key(species)
    found.sort(key=lambda m: not column_key(posixpath.basename(m.name)).startswith(prefix))
    return found[0]


def _frame(names: list[str], rows: list[list[str]], renames: dict[str, str], source: str) -> pd.DataFrame:
    columns = []
    for name in names:
        new = renames.get(column_key(name), name)
        if new in columns:
            raise BgeeDataError(f"{source}: two columns mean {new!r}")
        columns.append(new)
    return pd.DataFrame(rows, columns=columns, dtype=object)


def read_annotation(payload: bytes, species: str, source: str) -> Annotation:
    """Parse an annotation archive (``.tar.gz``, or any tar ``tarfile`` reads).

    Raises :class:`BgeeDataError` for an archive that is cut short or unreadable, holds a member
    leaving its folder, or lacks either table or its ``Experiment ID`` / ``Library ID`` column.
    """
    try:
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r:*") as tar:
            members = tar.getmembers()  # reads the whole archive: a cut-short one fails here
            bad = [m.name for m in members if _leaves_folder(m)]
            if bad:
                raise BgeeDataError(f"{source}: {_refusal(bad)}")
            tables = {}
            for kind in ("experiments", "libraries"):
                member = _pick(members, species, kind, source)
                fh = tar.extractfile(member)
                assert fh is not None  # a regular file (see _pick)
                where = f"{source}:{member.name}"
                tables[kind] = (read_tsv(decode_text(fh.read(), where), where), where)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise BgeeDataError(f"{source}: not a readable tar archive ({type(exc).__name__}: {exc}); cut short?") from None

    (names, rows), where = tables["experiments"]
    experiments = _frame(names, rows, EXPERIMENT_COLUMNS, where)
    if "experimentId" not in experiments:
        raise BgeeDataError(f"{where}: no 'Experiment ID' column (columns: {', '.join(names)})")
    for col in EXPERIMENT_COLUMNS.values():
        if col not in experiments:
            experiments[col] = None
    for col in _COUNT_COLUMNS:
        experiments[col] = pd.to_numeric(experiments[col], errors="coerce").astype("Int64")
    first = list(EXPERIMENT_COLUMNS.values())
    experiments = experiments[first + [c for c in experiments.columns if c not in first]]
    experiments = experiments.drop_duplicates("experimentId").reset_index(drop=True)

    (names, rows), where = tables["libraries"]
    libraries = _frame(names, rows, LIBRARY_COLUMNS, where)
    for col in ("experimentId", "libraryId"):
        if col not in libraries:
            raise BgeeDataError(f"{where}: no {col!r} column (columns: {', '.join(names)})")
    return Annotation(species=species, experiments=experiments, libraries=libraries.reset_index(drop=True))
