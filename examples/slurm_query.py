"""Query an atlas with Dask workers that run as SLURM batch jobs (dask-jobqueue).

    python examples/slurm_query.py ATLAS --jobs 4 --queue normal --interface ib0 \
        [--jobqueue-config deploy/slurm/jobqueue.yaml] [--sources H5AD ...]

Run it where ``sbatch`` works (a login node, or inside a batch job). The scheduler runs in this process;
each job runs one worker, which must reach it over ``--interface`` (``lo`` only when everything runs on
one machine). With ``--sources`` the files are converted into ATLAS first, on the same workers: they
must see the files, and ATLAS, at the same paths (a shared file system, or an s3:// atlas).
Other job settings come from the jobqueue.yaml (see deploy/slurm/jobqueue.yaml) or bgee-dask's defaults.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("atlas", help="atlas folder (on a shared file system) or s3:// URL")
    p.add_argument("--sources", nargs="+", help="H5AD files or folders to convert first")
    p.add_argument("--jobs", type=int, default=2, help="batch jobs (= workers) to start")
    p.add_argument("--queue", help="partition")
    p.add_argument("--interface", help="network interface, e.g. ib0 (lo on a single machine)")
    p.add_argument("--memory", default=None, help="memory per job, e.g. 4GB")
    p.add_argument("--jobqueue-config", help="a jobqueue.yaml")
    p.add_argument("--log-directory", help="folder for the jobs' output")
    p.add_argument("--filter", default="cellTypeId != 'GO:0005575'")
    p.add_argument("--by", default="cellTypeId")
    p.add_argument("--genes", default=None, help="comma-separated gene ids or symbols (default: all)")
    p.add_argument("--out", default="pseudobulk-slurm.csv")
    args = p.parse_args(argv)

    import bgee_dask as bd
    from bgee_dask.cluster import client_for
    from bgee_dask.query.export import write_result

    t0 = time.perf_counter()
    options = {"queue": args.queue, "interface": args.interface, "log_directory": args.log_directory}
    with client_for(
        cluster="slurm",
        jobs=args.jobs,
        memory_limit=args.memory,
        jobqueue_config=args.jobqueue_config,
        jobqueue_options=options,
    ) as client:
        client.wait_for_workers(args.jobs, timeout=300)
        job_ids = sorted(set(client.run(lambda: __import__("os").environ.get("SLURM_JOB_ID")).values()))
        print(f"{len(job_ids)} workers in SLURM jobs {', '.join(job_ids)} after {time.perf_counter() - t0:.1f}s")
        if args.sources:
            reports = bd.convert(args.sources, args.atlas, client=client, progress=False)
            for r in reports:
                print(r.line())
            if not all(r.ok for r in reports):
                return 1
        atlas = bd.open_atlas(args.atlas)
        genes = [g.strip() for g in args.genes.split(",")] if args.genes else None
        ds = atlas.query(args.filter, genes=genes, client=client).aggregate(
            by=args.by.split(","), stats=["sum", "mean", "var", "n_expressed", "frac_expressed"]
        )
    write_result(ds, args.out)
    print(
        f"{ds.sizes['group']} groups x {ds.sizes['gene']} genes, {int(ds['n_cells'].sum())} cells -> {args.out} "
        f"({time.perf_counter() - t0:.1f}s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
