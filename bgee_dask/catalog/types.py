"""The declared types of the catalog's tables, whatever the first file looked like.

A column's type in the catalog is fixed here, not inferred from the experiments that happen
to be in it: Bgee writes NULL metadata as NaN, so a file whose ``strain`` is all missing reads
back as float, beside text in the next file. Each experiment's share is cast to these types
when it is converted (a value that cannot be cast is an error for that file, before anything
is committed), and again when the catalog is consolidated (a share that still cannot be cast
is left out and reported, never blocking the others).
"""

from __future__ import annotations

import pyarrow as pa

from bgee_dask.schema import INTEGER_COLUMNS, RUN_COLUMNS

RUNS_SCHEMA = pa.schema(
    [pa.field(c, pa.int64() if c in INTEGER_COLUMNS else pa.string()) for c in RUN_COLUMNS]
    + [pa.field("row_start", pa.int64()), pa.field("row_stop", pa.int64())]
)
GENES_SCHEMA = pa.schema(
    [
        pa.field("gene_id", pa.string()),
        pa.field("gene_symbol", pa.string()),
        pa.field("gene_index", pa.int64()),
        pa.field("gene_nnz", pa.int64()),
    ]
)


class CatalogTypeError(ValueError):
    """A catalog column holds values its declared type cannot represent."""


def _castable(column: pa.ChunkedArray, target: pa.DataType) -> bool:
    kind = column.type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if pa.types.is_string(target):
        return pa.types.is_null(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)
    if pa.types.is_integer(target):
        return pa.types.is_null(kind) or pa.types.is_integer(kind)
    return kind == target


def declared(table: pa.Table, schema: pa.Schema, what: str) -> pa.Table:
    """``table`` with exactly ``schema``'s columns and types (absent columns all missing).

    Only lossless casts are made: text stays text, integers stay integers, an all-missing
    column of any type becomes missing values. Anything else raises :class:`CatalogTypeError`
    naming the column, its type and the declared one.
    """
    columns = []
    for field in schema:
        if field.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table.column(field.name)
        if column.null_count == len(column):
            columns.append(pa.nulls(table.num_rows, field.type))
        elif _castable(column, field.type):
            columns.append(column.cast(field.type))
        else:
            raise CatalogTypeError(
                f"{what} column {field.name!r} holds {column.type}, not the declared {field.type}"
            )
    return pa.Table.from_arrays(columns, schema=schema)
