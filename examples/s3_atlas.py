"""An atlas in an S3-compatible object store: convert into it, open it, query it on Dask workers.

    export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... AWS_ENDPOINT_URL=http://127.0.0.1:8333
    python examples/s3_atlas.py s3://bgee/atlas ../shared/data/bgee/Homo_sapiens [--scheduler tcp://host:8786]

The credentials and the endpoint are passed explicitly as ``storage_options`` (the command line reads the
same variables by itself). The conversion tasks write the stores, the query tasks read them: on the workers,
never through this process, which reads only the catalog. Without ``--scheduler`` a local cluster is used.
Writes the result to ``--out`` (default pseudobulk-s3.csv) and prints a summary.
"""

from __future__ import annotations

import argparse
import os
import sys


def storage_options_from_env() -> dict:
    """What s3fs needs, from the usual AWS variables (AWS_ENDPOINT_URL for S3-compatible servers)."""
    missing = [v for v in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not os.environ.get(v)]
    if missing:
        raise SystemExit(f"set {' and '.join(missing)} (and AWS_ENDPOINT_URL for a server other than AWS)")
    options = {"key": os.environ["AWS_ACCESS_KEY_ID"], "secret": os.environ["AWS_SECRET_ACCESS_KEY"]}
    if os.environ.get("AWS_ENDPOINT_URL"):
        options["client_kwargs"] = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    return options


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("atlas", help="s3://bucket/prefix (the bucket must exist)")
    p.add_argument("sources", nargs="*", help="H5AD files or folders to convert first (default: none)")
    p.add_argument("--scheduler", help="address of a running Dask scheduler (default: a local cluster)")
    p.add_argument("--filter", default="cellTypeId != 'GO:0005575'")
    p.add_argument("--by", default="cellTypeId")
    p.add_argument("--genes", default=None, help="comma-separated gene ids or symbols (default: all)")
    p.add_argument("--out", default="pseudobulk-s3.csv")
    args = p.parse_args(argv)

    from distributed import Client, LocalCluster

    import bgee_dask as bd
    from bgee_dask.query.export import write_result

    options = storage_options_from_env()
    if args.scheduler:
        client, cluster = Client(args.scheduler, timeout="30s"), None
    else:
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0")
        client = Client(cluster)
    try:
        if args.sources:
            reports = bd.convert(args.sources, args.atlas, storage_options=options, client=client, progress=False)
            for r in reports:
                print(r.line())
            if not all(r.ok for r in reports):
                return 1
        atlas = bd.open_atlas(args.atlas, storage_options=options)
        print(atlas)
        genes = [g.strip() for g in args.genes.split(",")] if args.genes else None
        ds = atlas.query(args.filter, genes=genes, client=client).aggregate(
            by=args.by.split(","), stats=["sum", "mean", "var", "n_expressed", "frac_expressed"]
        )
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    write_result(ds, args.out)
    print(f"{ds.sizes['group']} groups x {ds.sizes['gene']} genes, {int(ds['n_cells'].sum())} cells -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
