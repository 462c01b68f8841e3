"""What the crash, concurrency and fault tests share: changed sources, child conversions, exact references."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]


def new_release(src: str | os.PathLike, dst_dir: str | os.PathLike, *, seed: int = 1) -> Path:
    """The same experiment as ``src`` (same file name, genes and obs columns) with other counts and cells.

    What a new Bgee release of an experiment looks like to the converter: a different sha256
    under the same name. Counts are changed on every gene, so that old and new differ everywhere.
    """
    a = ad.read_h5ad(src)
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(a.n_obs, size=max(1, a.n_obs - 7), replace=False))
    a = a[keep].copy()
    x = sp.csr_matrix(a.X, dtype=np.float32)
    x.data = (x.data * 2 + 1).astype(np.float32)
    a.X = x
    out = Path(dst_dir) / Path(src).name
    out.parent.mkdir(parents=True, exist_ok=True)
    a.write_h5ad(out, compression="gzip")
    return out


def gene_sums(path: str | os.PathLike) -> dict[str, float]:
    """Column sums of a source's X by var name (float64): the independent reference."""
    a = ad.read_h5ad(path)
    sums = np.asarray(sp.csr_matrix(a.X).sum(axis=0), dtype=np.float64).ravel()
    return dict(zip(a.var_names.astype(str), sums, strict=True))


def atlas_sums(atlas, experiment_id: str, genes: list[str] | None = None, **open_kwargs) -> dict[str, float]:
    """Per gene, the sum over the experiment's cells as the atlas answers it (gene-major copy when ``genes``)."""
    import bgee_dask as bd
    from bgee_dask.catalog.reader import forget_cached_tables

    forget_cached_tables()
    q = bd.open_atlas(atlas, **open_kwargs).query(f"experimentId == '{experiment_id}'", genes=genes)
    ds = q.aggregate(by="experimentId", stats=["sum"])
    assert ds.sizes["group"] == 1, ds
    return dict(zip(ds["gene"].values.astype(str), ds["sum"].values[0].astype(np.float64), strict=True))


def which_version(found: dict[str, float], old: dict[str, float], new: dict[str, float]) -> str:
    """"old" or "new" when ``found`` equals one of them exactly on its genes, else a description of the mix."""
    if all(found[g] == old[g] for g in found) and set(found) <= set(old):
        return "old"
    if all(found[g] == new[g] for g in found) and set(found) <= set(new):
        return "new"
    n_old = sum(found[g] == old.get(g) for g in found)
    n_new = sum(found[g] == new.get(g) for g in found)
    return f"mix ({n_old} genes as old, {n_new} as new, of {len(found)})"


CONVERT_SNIPPET = """
import sys, bgee_dask as bd
reports = bd.convert(sys.argv[2:], sys.argv[1], overwrite={overwrite}, workers=1, progress=False)
for r in reports:
    print(r.status, r.source, r.message)
sys.exit(0 if all(r.ok for r in reports) else 1)
"""


def convert_in_child(
    atlas, sources, *, overwrite: bool = False, failpoint: str | None = None, env: dict | None = None, wait=True
):
    """``bgee_dask.convert`` in a fresh interpreter (optionally killed at ``failpoint``); the CompletedProcess."""
    child_env = {**os.environ, **(env or {})}
    child_env.pop("BGEE_DASK_FAILPOINT", None)
    if failpoint:
        child_env["BGEE_DASK_FAILPOINT"] = failpoint
    args = [sys.executable, "-c", CONVERT_SNIPPET.format(overwrite=overwrite), str(atlas), *map(str, sources)]
    if not wait:
        return subprocess.Popen(args, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(args, env=child_env, capture_output=True, text=True, timeout=600)
