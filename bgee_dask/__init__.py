"""bgee-dask: Bgee droplet scRNA-seq H5AD files as one Zarr atlas, queried with Dask.

The public names are imported lazily so that ``import bgee_dask`` stays cheap (the CLI's
``--help`` should not pay for numba and dask).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bgee_dask._version import __version__

__all__ = [
    "Atlas",
    "BgeeInputError",
    "StorageAccessError",
    "__version__",
    "check",
    "convert",
    "open_atlas",
    "use_codec_pipeline",
]

_LAZY = {
    "convert": ("bgee_dask.api.convert", "convert"),
    "open_atlas": ("bgee_dask.api.atlas", "open_atlas"),
    "Atlas": ("bgee_dask.api.atlas", "Atlas"),
    "BgeeInputError": ("bgee_dask.schema", "BgeeInputError"),
    "StorageAccessError": ("bgee_dask.format.location", "StorageAccessError"),
    "check": ("bgee_dask.catalog.check", "check"),
    "use_codec_pipeline": ("bgee_dask.format.codec_pipeline", "use_codec_pipeline"),
}

if TYPE_CHECKING:  # pragma: no cover
    from bgee_dask.api.atlas import Atlas, open_atlas
    from bgee_dask.api.convert import convert
    from bgee_dask.catalog.check import check
    from bgee_dask.format.codec_pipeline import use_codec_pipeline
    from bgee_dask.format.location import StorageAccessError
    from bgee_dask.schema import BgeeInputError


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'bgee_dask' has no attribute {name!r}")
