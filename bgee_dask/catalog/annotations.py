"""Bgee's experiment and library annotations, kept in the atlas beside the catalog.

Per species, two parquet files under ``catalog/annotations/``: ``<Genus_species>.experiments.parquet``
(one row per experiment: ``experimentId``, ``name``, ``description``, ``data_source``,
``data_source_url``, ``library_count`` ...) and ``<Genus_species>.libraries.parquet`` (one row per
library and annotated sample). They describe what Bgee published for the species, so they may
list experiments the atlas does not hold; readers join them to the catalog on ``experimentId``.

They are separate from the consolidated catalog tables on purpose: conversions never rewrite
them, and writing them never touches what queries read. Each file is written whole and
atomically (see :meth:`AtlasLocation.write_bytes`) under the commit lock, the libraries first, and only when its
content changed, so fetching the same release again leaves them as they were.
"""

from __future__ import annotations

import io

import pandas as pd

from bgee_dask.catalog.locks import commit_lock
from bgee_dask.format.location import AtlasLocation
from bgee_dask.schema import check_identifier

ANNOTATIONS = "catalog/annotations"
EXPERIMENTS_SUFFIX = ".experiments.parquet"
LIBRARIES_SUFFIX = ".libraries.parquet"


def experiments_relpath(species: str) -> str:
    return f"{ANNOTATIONS}/{check_identifier('species', species)}{EXPERIMENTS_SUFFIX}"


def libraries_relpath(species: str) -> str:
    return f"{ANNOTATIONS}/{check_identifier('species', species)}{LIBRARIES_SUFFIX}"


def _as_stored(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` as it reads back from parquet, to compare with what is stored."""
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    buf.seek(0)
    return pd.read_parquet(buf)


def _write_if_changed(loc: AtlasLocation, rel: str, frame: pd.DataFrame) -> bool:
    if loc.exists(rel):
        try:
            same = loc.read_parquet(rel).equals(_as_stored(frame))
        except (OSError, ValueError):  # unreadable: replace it
            same = False
        if same:
            return False
    loc.write_parquet(rel, frame)
    return True


def write_annotations(loc: AtlasLocation, species: str, experiments: pd.DataFrame, libraries: pd.DataFrame) -> bool:
    """Store one species' annotations; returns whether anything was written.

    ``experiments`` needs an ``experimentId`` column, ``libraries`` an ``experimentId`` and a
    ``libraryId``; a ``species`` column is set to ``species`` in both.
    """
    for what, frame, needed in (
        ("experiments", experiments, ("experimentId",)),
        ("libraries", libraries, ("experimentId", "libraryId")),
    ):
        missing = [c for c in needed if c not in frame]
        if missing:
            raise ValueError(f"{what} annotation of {species} has no {', '.join(missing)} column")
    experiments = experiments.reset_index(drop=True).assign(species=species)
    libraries = libraries.reset_index(drop=True).assign(species=species)
    # under the commit lock, like every write under catalog/: a sweep may then take any
    # temporary file it finds there for a killed writer's
    with commit_lock(loc):
        wrote_libraries = _write_if_changed(loc, libraries_relpath(species), libraries)
        wrote_experiments = _write_if_changed(loc, experiments_relpath(species), experiments)
    return wrote_libraries or wrote_experiments


def read_experiment_annotations(loc: AtlasLocation) -> pd.DataFrame:
    """Every species' experiment annotations, one row per (``species``, ``experimentId``);
    an empty frame with those two columns when the atlas has none."""
    names = [n for n in loc.list(ANNOTATIONS) if n.endswith(EXPERIMENTS_SUFFIX)]
    frames = []
    for name in names:
        frame = loc.read_parquet(f"{ANNOTATIONS}/{name}")
        frame["species"] = name[: -len(EXPERIMENTS_SUFFIX)]
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=["species", "experimentId"])
    out = pd.concat(frames, ignore_index=True)
    first = ["species", "experimentId"]
    out = out[first + [c for c in out.columns if c not in first]]
    return out.drop_duplicates(first).reset_index(drop=True)


def read_library_annotations(loc: AtlasLocation) -> pd.DataFrame:
    """Every species' library annotations (one row per library and annotated sample), or an empty frame."""
    names = [n for n in loc.list(ANNOTATIONS) if n.endswith(LIBRARIES_SUFFIX)]
    frames = [loc.read_parquet(f"{ANNOTATIONS}/{n}").assign(species=n[: -len(LIBRARIES_SUFFIX)]) for n in names]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["species", "experimentId"])
