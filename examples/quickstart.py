"""Local quickstart: convert Bgee H5AD files into an atlas on a local Dask cluster, then query it.

    python examples/quickstart.py --workdir bgee-quickstart                    # generated Bgee-like files
    python examples/quickstart.py ../shared/data/bgee/Homo_sapiens --workdir bgee-quickstart

Without sources, small Bgee-like files are generated first (``bgee_dask.synthetic``: nothing is downloaded).
Writes ``<workdir>/atlas`` and ``<workdir>/pseudobulk.csv`` (one row per group and gene) and prints a summary.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sources", nargs="*", help="H5AD files or folders (default: generate 4 small experiments)")
    p.add_argument("--workdir", default="bgee-quickstart", help="folder for the atlas and the result")
    p.add_argument("--workers", type=int, default=2, help="worker processes of the local Dask cluster")
    p.add_argument("--filter", default="cellTypeId != 'GO:0005575'", help="cell filter")
    p.add_argument("--by", default="cellTypeId,anatEntityId", help="comma-separated group-by columns")
    p.add_argument("--genes", default=None, help="comma-separated gene ids or symbols (default: all)")
    args = p.parse_args(argv)

    from distributed import Client, LocalCluster

    import bgee_dask as bd
    from bgee_dask.query.export import write_result

    os.makedirs(args.workdir, exist_ok=True)
    sources = args.sources
    if not sources:
        from bgee_dask.synthetic import generate_sources

        sources = [os.path.join(args.workdir, "h5ad")]
        generate_sources(
            sources[0],
            n_experiments=4,
            cells_per_experiment=(300, 1200),
            n_genes_universe=3000,
            mean_detected_genes=300,
            seed=1,
        )
        print(f"generated 4 Bgee-like experiments in {sources[0]}")
    atlas_dir = os.path.join(args.workdir, "atlas")
    genes = [g.strip() for g in args.genes.split(",")] if args.genes else None
    t0 = time.perf_counter()
    # Processes on 127.0.0.1 only; the same code runs on any cluster given its Client.
    with (
        LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        ) as cluster,
        Client(cluster) as client,
    ):
        reports = bd.convert(sources, atlas_dir, client=client, progress=False)
        for r in reports:
            print(r.line())
        if not all(r.ok for r in reports):
            return 1
        atlas = bd.open_atlas(atlas_dir)
        print(atlas)
        query = atlas.query(args.filter, genes=genes, client=client)
        print(query)
        ds = query.aggregate(by=args.by.split(","), stats=["sum", "mean", "n_expressed", "frac_expressed"])
    out = os.path.join(args.workdir, "pseudobulk.csv")
    write_result(ds, out)
    print(
        f"{ds.sizes['group']} groups x {ds.sizes['gene']} genes, {int(ds['n_cells'].sum())} cells -> {out} "
        f"({time.perf_counter() - t0:.1f}s)"
    )
    return 0


if __name__ == "__main__":  # the guard LocalCluster(processes=True) needs
    sys.exit(main())
