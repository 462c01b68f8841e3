"""The canonical cell schema and Bgee's historical H5AD layouts.

Bgee has written its droplet H5AD files in several layouts over the years (the documented
one, the DB-derived "B", the bustools-derived "C" and the scFAIR "D"). Everything above this
module sees one schema only, so this is the single place that knows how each layout names its
columns. It imports nothing from the rest of the package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

#: Columns documented on bgee.org, in their documented order, plus ``experimentId``.
CANONICAL_COLUMNS: tuple[str, ...] = (
    "barcodes",
    "SampleId",
    "anatEntityId",
    "stageId",
    "cellTypeId",
    "strain",
    "sex",
    "speciesId",
    "anatEntityName",
    "stageName",
    "cellTypeName",
    "libID",
    "unique_cell_ids",
    "experimentId",
)

#: Columns the converter adds to every cell.
DERIVED_COLUMNS: tuple[str, ...] = ("source_row", "total_counts", "n_genes")

#: Cells are stored sorted by these columns, so that the usual filters read contiguous runs.
#: The order puts the most selective biological keys first.
SORT_COLUMNS: tuple[str, ...] = ("cellTypeId", "anatEntityId", "stageId", "sex", "strain", "libID")

#: Columns whose distinct combinations the catalog records as contiguous runs of cells.
RUN_COLUMNS: tuple[str, ...] = (
    "cellTypeId",
    "anatEntityId",
    "stageId",
    "sex",
    "strain",
    "libID",
    "cellTypeName",
    "anatEntityName",
    "stageName",
    "speciesId",
    "experimentId",
)

#: Integer-valued canonical columns; every other canonical column is a string category.
INTEGER_COLUMNS: frozenset[str] = frozenset({"SampleId", "speciesId"})

#: Bgee's placeholder cell type, used where no CL term applies. Layout D writes "unknown" instead.
PLACEHOLDER_CELL_TYPE = ("GO:0005575", "cellular_component")

#: NCBI taxon ids of the species Bgee names in its file names.
SPECIES_TAXON: dict[str, int] = {
    "Homo_sapiens": 9606,
    "Mus_musculus": 10090,
    "Danio_rerio": 7955,
    "Drosophila_melanogaster": 7227,
    "Caenorhabditis_elegans": 6239,
    "Rattus_norvegicus": 10116,
    "Sus_scrofa": 9823,
    "Bos_taurus": 9913,
    "Gallus_gallus": 9031,
    "Macaca_mulatta": 9544,
    "Pan_troglodytes": 9598,
    "Xenopus_tropicalis": 8364,
}
TAXON_SPECIES: dict[int, str] = {v: k for k, v in SPECIES_TAXON.items()}


class BgeeInputError(ValueError):
    """Something the user gave cannot be used: a file, a filter, a column, a gene, an argument.

    ``BgeeInputError(path, problem)`` for a file (the message names it), ``BgeeInputError(message)``
    otherwise. Subclasses are also the built-in type code would catch without bgee-dask
    (``InputKeyError`` is a ``KeyError``, ``InputTypeError`` a ``TypeError``).
    """

    def __init__(self, path: str | None, problem: str | None = None):
        if problem is None:
            path, problem = None, str(path)
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path else problem)

    def __str__(self) -> str:  # not KeyError's repr-quoted message
        return str(self.args[0]) if self.args else ""


class InputKeyError(BgeeInputError, KeyError):
    """An unknown name: a column, a gene, an experiment."""


class InputTypeError(BgeeInputError, TypeError):
    """An argument of the wrong type, e.g. a filter that is not a string."""


@dataclass(frozen=True)
class Layout:
    """One historical layout: how to recognise it and how its columns map to the canonical ones."""

    name: str
    description: str
    #: source column -> canonical column
    renames: dict[str, str] = field(default_factory=dict)
    #: source columns whose canonical counterpart is derived, renamed on import to keep them
    keep_as: dict[str, str] = field(default_factory=dict)


LAYOUTS: dict[str, Layout] = {
    "doc": Layout("doc", "documented schema (bgee.org tutorial)"),
    "B": Layout(
        "B",
        "DB-derived, 2023-2024 (experiment_id, library_id, CPM layer 'abundance')",
        renames={"experiment_id": "experimentId", "library_id": "libID"},
    ),
    "C": Layout(
        "C",
        "bustools-derived (barcode, anatId, rnaSeqLibraryId)",
        renames={"barcode": "barcodes", "anatId": "anatEntityId", "rnaSeqLibraryId": "libID"},
    ),
    "D": Layout(
        "D",
        "scFAIR 7.1.0 (CELLxGENE-style ontology columns)",
        renames={
            "barcode": "barcodes",
            "rnaSeqLibraryId": "libID",
            "experiment_id": "experimentId",
            "tissue_ontology_term_id": "anatEntityId",
            "tissue": "anatEntityName",
            "development_stage_ontology_term_id": "stageId",
            "development_stage": "stageName",
            "cell_type_ontology_term_id": "cellTypeId",
            "cell_type": "cellTypeName",
            "strain_or_genetic_background": "strain",
            "bgeeSex": "sex",
        },
        # D's own `sex` holds the PATO label; Bgee's vocabulary lives in `bgeeSex`.
        keep_as={"sex": "sex_ontology_label"},
    ),
}


def detect_layout(obs_columns: list[str], uns_keys: set[str], layer_keys: set[str]) -> str:
    """Name the layout from the signs listed in Bgee's writer history.

    Raises ``ValueError`` (without a path; the caller adds it) when no known layout fits, rather
    than guessing a mapping that would silently mislabel cells.
    """
    cols = set(obs_columns)
    if "schema_version" in uns_keys or "tissue_ontology_term_id" in cols:
        return "D"
    if "abundance" in layer_keys or "matrix_descriptions" in uns_keys:
        return "B"
    if "anatId" in cols:
        return "C"
    # B's own columns include "barcodes", so its library_id must be looked at before the doc rule
    if {"anatEntityId", "cellTypeId", "library_id"} <= cols and "libID" not in cols:
        return "B"
    if {"barcodes", "anatEntityId", "cellTypeId"} <= cols:
        return "doc"
    if {"anatEntityId", "cellTypeId"} <= cols and "barcode" in cols:
        return "B"
    raise ValueError(
        "unknown layout: obs has none of the column sets of Bgee's layouts "
        f"(doc/B/C/D); columns are {sorted(cols)[:12]}"
    )


def canonical_column_map(layout: str, obs_columns: list[str]) -> dict[str, str]:
    """Source column -> stored column name, for every column of ``obs``.

    Canonical columns come first under their canonical names; other columns keep their names
    unless that would clash with a canonical one.
    """
    spec = LAYOUTS[layout]
    mapping: dict[str, str] = {}
    for col in obs_columns:
        if col in spec.keep_as:
            mapping[col] = spec.keep_as[col]
        elif col in spec.renames:
            mapping[col] = spec.renames[col]
        else:
            mapping[col] = col
    targets = list(mapping.values())
    dup = {t for t in targets if targets.count(t) > 1}
    if dup:
        raise ValueError(f"columns {sorted(dup)} appear twice after mapping layout {layout}")
    return mapping


_DROPLET_NAME = re.compile(r"^(?P<species>[A-Z][a-z]+_[a-z]+)_(?P<exp>.+?)_droplet_based(?:\..*)?\.h5ad$")
_CPM_NAME = re.compile(r"^(?P<species>[A-Z][a-z]+_[a-z]+)_SC_RNA-Seq_read_counts_CPM_(?P<exp>.+?)\.h5ad$")


def parse_bgee_filename(path: str) -> tuple[str, str] | None:
    """(species, experimentId) from one of Bgee's file-name patterns, or None."""
    name = PurePosixPath(str(path).replace("\\", "/")).name
    for pattern in (_DROPLET_NAME, _CPM_NAME):
        m = pattern.match(name)
        if m:
            return m.group("species"), m.group("exp")
    return None


def species_from_taxon(taxon: int) -> str | None:
    """Bgee's ``Genus_species`` for an NCBI taxon id, if known."""
    return TAXON_SPECIES.get(int(taxon))


SAFE_ID = re.compile(r"^[A-Za-z0-9._-]+$")


def check_identifier(kind: str, value: str) -> str:
    """Experiment ids and species names become path components, so keep them to a safe alphabet."""
    if not SAFE_ID.match(value) or value in {".", ".."}:
        raise ValueError(f"{kind} {value!r} is not usable as a store name (letters, digits, . _ - only)")
    return value


_OBJECT_KINDS = {
    "string": "string",
    "empty": "empty",
    "integer": "number",
    "floating": "number",
    "mixed-integer-float": "number",
    "decimal": "number",
    "boolean": "bool",
}


def value_kind(values) -> tuple[str, str]:
    """(kind, description) of a pandas column or index: which filter literals its values can meet.

    kind is "string", "number", "bool", "empty" (only missing values: says nothing), "mixed" or
    "unsupported". A categorical has the kind of its categories.
    """
    import numpy as np
    import pandas as pd
    from pandas.api.types import infer_dtype, is_bool_dtype, is_numeric_dtype, is_string_dtype

    dtype = values.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        categories = values.cat.categories if isinstance(values, pd.Series) else values.categories
        if not len(categories):
            return "empty", "categorical, no categories"
        kind, desc = value_kind(categories)
        return kind, f"categorical, categories: {desc}"
    if isinstance(dtype, np.dtype) and dtype.kind == "O":
        inferred = infer_dtype(values, skipna=True)
        return _OBJECT_KINDS.get(inferred, "mixed"), f"object dtype holding {inferred} values"
    if is_bool_dtype(dtype):
        return "bool", str(dtype)
    if is_numeric_dtype(dtype) and not (isinstance(dtype, np.dtype) and dtype.kind == "c"):
        if len(values) and bool(pd.isna(values).all()):
            return "empty", str(dtype)
        return "number", str(dtype)
    if is_string_dtype(dtype):
        return "string", str(dtype)
    return "unsupported", str(dtype)

