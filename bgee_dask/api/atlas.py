"""The user-facing atlas: the catalog plus the ability to ask it questions."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pandas as pd

from bgee_dask.api.expression import expression
from bgee_dask.api.query import Query
from bgee_dask.catalog.annotations import read_experiment_annotations, read_library_annotations
from bgee_dask.catalog.reader import AtlasCatalog
from bgee_dask.format.location import AtlasLocation
from bgee_dask.query.names import column_values, queryable_columns
from bgee_dask.query.plan import check_columns


class Atlas:
    """Many experiment stores behind one catalog; ``query`` selects cells across all of them."""

    def __init__(self, catalog: AtlasCatalog):
        self.catalog = catalog
        self.location = catalog.location

    @property
    def url(self) -> str:
        return self.location.url

    @property
    def experiments(self) -> pd.DataFrame:
        """One row per experiment: id, species, cells, genes, nnz, bytes, layout, provenance."""
        return self.catalog.experiments

    def query(
        self,
        filter: str | None = None,
        genes: Sequence[str] | str | None = None,
        *,
        client: Any | None = None,
        progress: bool = False,
    ) -> Query:
        """Select cells across every experiment; nothing is read until a result is asked for."""
        return Query(self.catalog, filter=filter, genes=genes, client=client, progress=progress)

    def expression(
        self,
        genes: Sequence[str] | str,
        by: Sequence[str] | str | None = None,
        filter: str | None = None,
        *,
        client: Any | None = None,
    ) -> pd.DataFrame:
        """Where genes are expressed: per gene and group (default species, tissue, cell type, with names)
        ``n_cells``, ``n_measured``, ``mean_cp10k`` and ``frac_expressed``; see ``expression.expression``.

        Reads only the genes' values, from each experiment's gene-major copy.
        """
        return expression(self.catalog, genes, by=by, filter=filter, client=client)

    def values(self, column: str, filter: str | None = None, *, client: Any | None = None) -> pd.DataFrame:
        """The values of a cell metadata column, with their names (for ids), cell and experiment counts."""
        check_columns(self.catalog, [column], "values")
        return column_values(Query(self.catalog, filter=filter, genes=[], client=client), column)

    def annotations(self, of: str = "experiments") -> pd.DataFrame:
        """Bgee's own annotation, stored by ``bgee-dask download``; an empty frame for other atlases.

        ``of="experiments"``: one row per experiment (name, description, library count, source,
        release). ``of="libraries"``: one row per library and annotated sample (protocol,
        sequencing, cell counts). ``ValueError`` for anything else.
        """
        if of == "experiments":
            return read_experiment_annotations(self.location)
        if of == "libraries":
            return read_library_annotations(self.location)
        raise ValueError(f"annotations of {of!r}: choose 'experiments' or 'libraries'")

    @property
    def columns(self) -> list[str]:
        """The cell metadata columns one can filter and group on."""
        return queryable_columns(self.catalog)

    def __repr__(self) -> str:
        e = self.experiments
        return f"<Atlas {self.url}: {len(e)} experiments, {int(e['n_cells'].sum()) if len(e) else 0} cells>"


def open_atlas(url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> Atlas:
    """Open an atlas folder or object-store prefix (reads the catalog header and experiments table only)."""
    return Atlas(AtlasCatalog(AtlasLocation(url, storage_options)))
