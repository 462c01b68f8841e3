"""``atlas.expression`` over a generated atlas: a fresh process per run, first and second call timed.

    python benchmarks/bench_expression.py --out bench-out/expression              # 1M cells in 10 experiments
    python benchmarks/bench_expression.py --out bench-out/expression --cells 20000  # quick

The atlas is generated (``bgee_dask.synthetic``) and converted once under ``--out`` and reused by later runs.
Prints one line per run and the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import bgee_dask as bd
atlas = bd.open_atlas(sys.argv[1])
genes = [str(g) for g in atlas.catalog.gene_lookup.ids[: int(sys.argv[2])]]
t1 = time.perf_counter()
first = atlas.expression(genes)
t2 = time.perf_counter()
atlas.expression(genes)
t3 = time.perf_counter()
print(json.dumps({"open": t1 - t0, "first": t2 - t1, "second": t3 - t2, "rows": len(first),
                  "cells": int(atlas.experiments["n_cells"].sum())}))
"""


def build(out: Path, experiments: int, cells: int, seed: int) -> Path:
    import bgee_dask as bd
    from bgee_dask.synthetic import generate_sources

    atlas = out / f"atlas-{experiments}x{cells}"
    if (atlas / "catalog" / "atlas.json").exists():
        return atlas
    t = time.perf_counter()
    sources = generate_sources(
        out / f"h5ad-{experiments}x{cells}",
        n_experiments=experiments,
        cells_per_experiment=cells,
        n_genes_universe=20_000,
        mean_detected_genes=200,
        seed=seed,
    )
    reports = bd.convert(sources, atlas, progress=False)
    if not all(r.ok for r in reports):
        raise SystemExit("\n".join(r.line() for r in reports if not r.ok))
    print(f"atlas built in {time.perf_counter() - t:.1f} s: {atlas}", file=sys.stderr)
    return atlas


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-out/expression", help="folder for the generated files and atlas")
    p.add_argument("--experiments", type=int, default=10, help="experiments in the atlas")
    p.add_argument("--cells", type=int, default=100_000, help="cells per experiment")
    p.add_argument("--genes", type=int, default=3, help="genes asked for")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes")
    p.add_argument("--seed", type=int, default=3)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atlas = build(out, args.experiments, args.cells, args.seed)
    runs = []
    for _ in range(args.repeats):
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(atlas), str(args.genes)], capture_output=True, text=True, check=True
        )
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]))
    med = {k: statistics.median(r[k] for r in runs) for k in ("open", "first", "second")}
    print(
        f"{runs[0]['cells']:,} cells, {args.genes} genes: import+open {med['open']:.2f} s, "
        f"first call {med['first']:.2f} s, second {med['second']:.2f} s (medians of {len(runs)} processes)"
    )


if __name__ == "__main__":
    main()
