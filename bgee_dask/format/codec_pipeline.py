"""Which zarr codec pipeline encodes and decodes chunks: zarr's own, or zarrs (Rust).

zarr picks an array's codec pipeline from its configuration (``codec_pipeline.path``) when the
array is opened. The stores are the same either way; only the speed differs: the ``zarrs``
pipeline (``pip install 'bgee-dask[zarrs]'``) decodes the X arrays of a query on several
threads in Rust (figures in ``benchmarks/README.md``). zarrs hands to zarr's own pipeline what
it does not handle: text columns, and stores it cannot open itself, such as S3 through fsspec.

zarr's configuration is process-global, so the choice is made once per process, before any
array opens, never switched around a single open: another thread opening an array meanwhile
(a conversion's writer, a query task) would read whichever value was set at that moment.
``use_codec_pipeline`` sets zarr's configuration and zarr's environment variable
``ZARR_CODEC_PIPELINE__PATH``, so the Dask workers this process starts afterwards (a local
cluster's processes, batch jobs) choose the same. Workers started elsewhere (``dask worker``
on another host) choose by their own environment: set the variable there.
"""

from __future__ import annotations

import importlib.util
import os

import zarr

#: The pipelines by name, and the ``codec_pipeline.path`` zarr's configuration takes for each
#: (zarr's own is the default value of that setting).
PIPELINES = {
    "zarr": "zarr.core.codec_pipeline.BatchedCodecPipeline",
    "zarrs": "zarrs.ZarrsCodecPipeline",
}
ENVIRONMENT_VARIABLE = "ZARR_CODEC_PIPELINE__PATH"


def use_codec_pipeline(name: str) -> None:
    """Make the arrays this process opens from now on, and the workers it starts, use pipeline ``name``.

    ``name`` is a key of ``PIPELINES``. Call it at the start of a program, before it opens an
    atlas or converts. ``ValueError`` (one line) for an unknown name, or for ``zarrs`` when the
    ``zarrs`` package is not installed.
    """
    if name not in PIPELINES:
        raise ValueError(f"unknown codec pipeline {name!r}: choose one of {', '.join(PIPELINES)}")
    if importlib.util.find_spec(PIPELINES[name].split(".")[0]) is None:
        raise ValueError(f"the {name} codec pipeline is not installed: pip install 'bgee-dask[{name}]'")
    zarr.config.set({"codec_pipeline.path": PIPELINES[name]})
    os.environ[ENVIRONMENT_VARIABLE] = PIPELINES[name]


def codec_pipeline_in_use() -> str:
    """The name of the pipeline arrays opened now get: a key of ``PIPELINES``, else zarr's setting as it is."""
    path = zarr.config.get("codec_pipeline.path")
    for name, configured in PIPELINES.items():
        if path == configured:
            return name
    return str(path)
