"""A fresh process's open + selective query, against importing the libraries it is built on.

    python benchmarks/bench_open.py --out bench-out/open                  # 200k cells in 24 experiments
    python benchmarks/bench_open.py --out bench-out/open --cells 2000     # quick

Two contenders, each in fresh processes, interleaved round-robin, medians and their ratio:
- ``imports``: ``import numpy, pandas, dask.array, xarray, zarr`` and nothing else;
- ``bgee-dask``: ``import bgee_dask``, open the atlas, one selective query (one cell type in one
  tissue, grouped by cellTypeId x anatEntityId, every statistic) on the default scheduler, as a
  script or a notebook's first cell would.

The atlas is generated (``bgee_dask.synthetic``) and converted once under ``--out`` and reused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMPORTS = """
import time
t0 = time.perf_counter()
import numpy, pandas, dask.array, xarray, zarr
print(time.perf_counter() - t0)
"""

QUERY = """
import sys, time
t0 = time.perf_counter()
import bgee_dask as bd
ds = bd.open_atlas(sys.argv[1]).query(sys.argv[2]).aggregate(
    by=["cellTypeId", "anatEntityId"], stats=["sum", "mean", "var", "n_expressed", "frac_expressed"]
)
assert int(ds["n_cells"].sum()) > 0
print(time.perf_counter() - t0)
"""


def build(out: Path, experiments: int, cells: int, seed: int) -> Path:
    import bgee_dask as bd
    from bgee_dask.synthetic import generate_sources

    atlas = out / f"atlas-{experiments}x{cells}"
    if (atlas / "catalog" / "atlas.json").exists():
        return atlas
    sources = generate_sources(
        out / f"h5ad-{experiments}x{cells}", n_experiments=experiments, cells_per_experiment=cells, seed=seed
    )
    reports = bd.convert(sources, atlas, progress=False)
    if not all(r.ok for r in reports):
        raise SystemExit("\n".join(r.line() for r in reports if not r.ok))
    return atlas


def selective_filter(atlas: Path) -> str:
    """The (cell type, tissue) pair whose cells are closest to 1% of the atlas."""
    import bgee_dask as bd

    runs = bd.open_atlas(atlas).catalog.runs.assign(n_cells=lambda r: r["row_stop"] - r["row_start"])
    cells = runs.groupby(["cellTypeId", "anatEntityId"], observed=True)["n_cells"].sum()
    share = (cells / cells.sum() - 0.01).abs()
    cell_type, tissue = share.idxmin()
    return f"cellTypeId == '{cell_type}' and anatEntityId == '{tissue}'"


def timed(code: str, *args: str) -> float:
    """Wall time of a fresh interpreter running ``code``, start to exit."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-out/open", help="folder for the generated files and atlas")
    p.add_argument("--experiments", type=int, default=24, help="experiments in the atlas")
    p.add_argument("--cells", type=int, default=200_000 // 24, help="cells per experiment")
    p.add_argument("--repeats", type=int, default=7, help="fresh processes per contender")
    p.add_argument("--seed", type=int, default=5)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atlas = build(out, args.experiments, args.cells, args.seed)
    where = selective_filter(atlas)
    timed(IMPORTS)  # file system caches warm for both
    timed(QUERY, str(atlas), where)
    runs: dict[str, list[float]] = {"imports": [], "bgee-dask": []}
    for _ in range(args.repeats):
        runs["imports"].append(timed(IMPORTS))
        runs["bgee-dask"].append(timed(QUERY, str(atlas), where))
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(json.dumps({"filter": where, "runs": runs, "medians": med}))
    print(
        f"{args.experiments} experiments x {args.cells} cells, `{where}`: imports {med['imports']:.2f} s, "
        f"open + selective query {med['bgee-dask']:.2f} s, ratio {med['bgee-dask'] / med['imports']:.2f} "
        f"(medians of {args.repeats} fresh processes each)"
    )


if __name__ == "__main__":
    main()
