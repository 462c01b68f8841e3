"""Layer 1, sources: reading Bgee H5AD files (every historical layout) into what the converter needs.

Depends only on ``bgee_dask.schema`` and the support modules; nothing here knows about Zarr.
"""
