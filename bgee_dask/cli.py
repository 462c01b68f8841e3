"""The ``bgee-dask`` command.

Errors a user can fix (a bad file, an unknown column, a missing atlas) end in one line on
stderr and exit status 2; a conversion that leaves some files failed exits 1 after converting
the others.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from bgee_dask._version import __version__
from bgee_dask.cancellation import Cancelled, check_cancelled, stop_on_signals
from bgee_dask.query.preload import PRELOAD_MODULE

EXIT_PARTIAL = 1
EXIT_USAGE = 2


def _add_cluster_options(
    p: argparse.ArgumentParser,
    *,
    workers: bool = True,
    default: str = "a local cluster of worker processes",
    jobs: bool = True,
) -> None:
    g = p.add_argument_group(f"where to compute (default: {default})")
    g.add_argument("--scheduler", metavar="ADDR", help="address of a running Dask scheduler, e.g. tcp://host:8786")
    if workers:
        g.add_argument("--workers", type=int, metavar="N", help="worker processes of the local cluster")
    g.add_argument(
        "--cluster", choices=["slurm", "pbs", "sge", "lsf"], help="start workers as batch jobs (dask-jobqueue)"
    )
    if jobs:  # (download has its own --jobs: transfers at once, or batch jobs with --cluster)
        g.add_argument(
            "--jobs", type=int, default=None, metavar="N", help="batch jobs to start with --cluster (default 1)"
        )
    g.add_argument(
        "--codec-pipeline",
        choices=["zarr", "zarrs"],
        help="decode and encode chunks with zarr's own pipeline or with zarrs (Rust, faster reads; "
        "pip install 'bgee-dask[zarrs]'); default: zarr's configuration (ZARR_CODEC_PIPELINE__PATH)",
    )
    g.add_argument(
        "--memory-limit",
        metavar="SIZE",
        help="memory per worker, e.g. 2GB: each local worker's limit, or each batch job's memory with --cluster",
    )
    j = p.add_argument_group(
        "batch jobs (--cluster; defaults from the jobqueue.<kind> section of Dask's config, else 1 core, 4GB, 1 hour)"
    )
    j.add_argument("--jobqueue-config", metavar="YAML", help="a dask-jobqueue configuration file (jobqueue.yaml)")
    j.add_argument(
        "--interface",
        metavar="IFACE",
        help="network interface the scheduler and workers talk over, e.g. ib0 (lo on a single machine)",
    )
    j.add_argument("--queue", metavar="NAME", help="queue / partition to submit to")
    j.add_argument("--cores", type=int, metavar="N", help="cores per job (one worker process per job)")
    j.add_argument("--walltime", metavar="HH:MM:SS", help="time limit of each job")
    j.add_argument(
        "--worker-timeout",
        type=float,
        metavar="SECONDS",
        help="give up if no job has started a worker after this long (default 600)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bgee-dask",
        description="Convert Bgee droplet scRNA-seq H5AD files into a Zarr atlas and query many experiments at once.",
    )
    parser.add_argument("--version", action="version", version=f"bgee-dask {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("convert", help="convert H5AD files (or folders of them) into an atlas")
    p.add_argument("sources", nargs="+", metavar="SRC", help=".h5ad files or folders (searched recursively)")
    p.add_argument("--out", required=True, metavar="ATLAS", help="atlas folder or URL (s3://bucket/prefix)")
    p.add_argument("--overwrite", action="store_true", help="replace experiments already in the atlas")
    p.add_argument("--experiment-id", help="experiment id when file names and obs do not say")
    p.add_argument("--species", help="species (Genus_species) when file names and obs do not say")
    p.add_argument("--tmp-dir", help="folder for the spill files of large conversions (default: system temp)")
    p.add_argument("--json", action="store_true", help="print the per-file reports as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--no-gene-index",
        action="store_true",
        help="skip the gene-major copy (smaller atlas, slower gene-slice queries)",
    )
    _add_cluster_options(p, default="Dask worker threads in this process, each file using every core")

    p = sub.add_parser(
        "check",
        help="verify an atlas: every experiment's stores whole and as recorded; list debris, orphans, stale locks",
    )
    p.add_argument("atlas", metavar="ATLAS", help="atlas folder or URL (s3://bucket/prefix)")
    p.add_argument(
        "--repair",
        action="store_true",
        help="commit what killed runs left uncommitted and remove debris and orphan versions, then check",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("info", help="list the experiments of an atlas")
    p.add_argument("atlas", metavar="ATLAS", help="atlas folder or URL (s3://bucket/prefix)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("query", help="filter cells and aggregate genes across every experiment of an atlas")
    p.add_argument("atlas", metavar="ATLAS", help="atlas folder or URL")
    p.add_argument("--filter", metavar="EXPR", help="e.g. \"cellTypeId == 'CL:0000236' and sex in ['female', 'male']\"")
    p.add_argument("--genes", metavar="IDS", help="comma-separated Ensembl ids or symbols (default: all genes)")
    p.add_argument("--by", required=True, metavar="COLS", help="comma-separated metadata columns to group by")
    p.add_argument(
        "--stats",
        default="sum,mean,var,n_expressed,frac_expressed",
        metavar="LIST",
        help="comma-separated: sum, mean, var, n_expressed, frac_expressed (default: all)",
    )
    p.add_argument(
        "--normalize",
        choices=["none", "cp10k", "log1p_cp10k"],
        default=None,
        help="per-cell normalization before the statistics (default: none; the --plot shows log1p_cp10k unless "
        "this is given)",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="result file: .csv, .parquet or .nc (statistics per group and gene), or .h5ad: the pseudobulk "
        "AnnData of summed raw counts for PyDESeq2 / decoupler",
    )
    p.add_argument(
        "--min-cells",
        type=int,
        default=None,
        metavar="N",
        help="with --out .h5ad: leave out groups of fewer than N cells (default 10)",
    )
    p.add_argument("--plot", metavar="PNG", help="also draw a dot plot (colour = mean, size = fraction expressing)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_cluster_options(p)

    p = sub.add_parser(
        "expression",
        help="where genes are expressed: per species, tissue and cell type across every experiment",
        description="Cells, cells that measured the gene, mean counts per 10k and fraction expressing, per gene "
        "and group; read from each experiment's gene-major copy.",
    )
    p.add_argument("atlas", metavar="ATLAS", help="atlas folder or URL")
    p.add_argument("genes", nargs="+", metavar="GENE", help="Ensembl ids or symbols (also comma-separated)")
    p.add_argument("--filter", metavar="EXPR", help='only cells matching this filter, e.g. "speciesId == 9606"')
    p.add_argument(
        "--by",
        metavar="COLS",
        help="comma-separated columns to group by (default: speciesId,anatEntityId,cellTypeId, shown with names)",
    )
    p.add_argument("--out", metavar="FILE", help="write the whole table to .csv, .tsv or .parquet instead of printing")
    p.add_argument("--plot", metavar="PNG", help="also draw a dot plot (colour = mean cp10k, size = fraction)")
    p.add_argument(
        "--max-rows", type=int, default=30, metavar="N", help="groups printed per gene without --out (default 30)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_cluster_options(p)

    p = sub.add_parser(
        "values",
        help="list the values of a cell metadata column, with names and cell counts",
        description="The values a column holds among the (filtered) cells, most cells first: what to write in "
        "--filter and what --by will group. 'bgee-dask info ATLAS' lists the columns.",
    )
    p.add_argument("atlas", metavar="ATLAS", help="atlas folder or URL")
    p.add_argument("column", metavar="COLUMN", help="a cell metadata column, e.g. cellTypeId, anatEntityId, sex")
    p.add_argument("--filter", metavar="EXPR", help="count only cells matching this filter")
    p.add_argument("--limit", type=int, default=100, metavar="N", help="values printed, most cells first (0: all)")
    p.add_argument("--json", action="store_true", help="machine-readable output (every value)")

    p = sub.add_parser(
        "download",
        help="list, fetch and convert a species' droplet experiments straight from Bgee",
        description="Fetch a species' droplet H5AD files from Bgee into DIR/<release>/<Genus_species>/ (resumable, "
        "checked, recorded in manifest.json; complete files are not fetched again) and, with --atlas, convert "
        "each into an atlas as it arrives, with the experiments' annotations.",
    )
    p.add_argument(
        "species",
        metavar="SPECIES",
        help='Genus_species, "Genus species", a common name from Bgee\'s species table (human) or an NCBI taxon '
        "id (9606)",
    )
    p.add_argument(
        "--experiment",
        action="append",
        metavar="ID",
        help="an experiment id from the species' annotation; repeat for more (default: every experiment)",
    )
    p.add_argument("--release", metavar="R", help="Bgee release, e.g. 15.2 (default: the newest in release_v2.tsv)")
    p.add_argument(
        "--base-url", metavar="URL", help="where Bgee's release_v2.tsv is (default: https://www.bgee.org/ftp)"
    )
    p.add_argument(
        "--list",
        action="store_true",
        help="only list the experiments, one per line (id, name, library count); nothing is written",
    )
    p.add_argument("--json", action="store_true", help="with --list: the experiments' annotations as JSON")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="where files land, as DIR/<release>/<Genus_species>/<file> (required unless --list)",
    )
    p.add_argument(
        "--atlas",
        metavar="ATLAS",
        help="convert each file as it arrives into this atlas (folder or URL, e.g. s3://bucket/atlas), and keep "
        "the experiment and library annotations in its catalog",
    )
    p.add_argument(
        "--jobs",
        type=int,
        metavar="N",
        help="transfers at once (default 2); with --cluster, batch jobs to start, each a worker that fetches and "
        "converts",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_cluster_options(
        p,
        workers=False,
        jobs=False,
        default="--jobs transfers on threads of this process, each file converted here as it arrives; with "
        "--scheduler or --cluster the workers fetch and convert, and must see DIR and the atlas",
    )

    p = sub.add_parser("generate", help="write synthetic Bgee-like H5AD files (for demos and benchmarks)")
    p.add_argument("out", metavar="DIR", help="folder to write the .h5ad files into (created if missing)")
    p.add_argument("--experiments", type=int, default=4, help="files to write, one experiment each (default 4)")
    p.add_argument("--cells", type=int, default=2000, help="cells per experiment")
    p.add_argument("--genes", type=int, default=30000, help="genes in each species' universe")
    p.add_argument("--detected-genes", type=float, default=1500, help="mean detected genes per cell")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same files")
    p.add_argument("--processes", type=int, default=1, help="files written at once (default 1)")

    p = sub.add_parser("demo", help="generate a small atlas, convert it and run a query (no download)")
    p.add_argument("--dir", default="bgee-demo", help="working folder (default: ./bgee-demo)")
    _add_cluster_options(p)
    return parser


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _cluster_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "scheduler": args.scheduler,
        "workers": getattr(args, "workers", None),
        "cluster": args.cluster,
        "jobs": args.jobs,
        "memory_limit": args.memory_limit,
        "jobqueue_config": args.jobqueue_config,
        "jobqueue_options": {
            "interface": args.interface,
            "queue": args.queue,
            "cores": args.cores,
            "walltime": args.walltime,
        },
        "worker_timeout": args.worker_timeout,
    }


def _check_cluster_args(args: argparse.Namespace) -> None:
    if args.scheduler and args.cluster:
        raise ValueError("choose one of --scheduler and --cluster")
    if args.scheduler and args.memory_limit:
        raise ValueError(
            "--memory-limit sets the memory of workers bgee-dask starts (locally or with --cluster); "
            "the workers of a running scheduler keep the limit they were started with"
        )
    names = ("jobs", "jobqueue_config", "interface", "queue", "cores", "walltime", "worker_timeout")
    batch = [f"--{k.replace('_', '-')}" for k in names]
    used = [flag for flag in batch if getattr(args, flag[2:].replace("-", "_")) is not None]
    if used and not args.cluster:
        raise ValueError(f"{', '.join(used)} only apply with --cluster")


def _remote_client(args: argparse.Namespace) -> bool:
    """Whether to build a client from the options (else the API starts its own local cluster)."""
    _check_cluster_args(args)
    return bool(args.scheduler or args.cluster or args.memory_limit)


@contextlib.contextmanager
def _client(args: argparse.Namespace, preload: tuple[str, ...] = ()):
    from bgee_dask.cluster import client_for

    with client_for(**_cluster_kwargs(args), preload=preload) as client:
        if args.cluster:
            print(f"{args.cluster} cluster: dashboard {client.dashboard_link}", file=sys.stderr)
        yield client


def _cmd_convert(args: argparse.Namespace) -> int:
    from bgee_dask.api.convert import convert

    kwargs = dict(
        overwrite=args.overwrite,
        progress=not args.no_progress,
        experiment_id=args.experiment_id,
        species=args.species,
        tmp_dir=args.tmp_dir,
        gene_index=not args.no_gene_index,
    )
    if _remote_client(args):
        with _client(args) as client:
            reports = convert(args.sources, args.out, client=client, **kwargs)
    else:
        reports = convert(args.sources, args.out, workers=args.workers, **kwargs)
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=1, default=str))
    else:
        for r in reports:
            print(r.line(), file=sys.stderr if r.status == "failed" else sys.stdout)
    if not reports:
        print("bgee-dask: error: no .h5ad files found in the given sources", file=sys.stderr)
        return EXIT_USAGE
    failed = sum(not r.ok for r in reports)
    done = sum(r.status == "converted" for r in reports)
    skipped = sum(r.status == "skipped" for r in reports)
    print(f"{done} converted, {skipped} skipped, {failed} failed -> {args.out}", file=sys.stderr)
    return EXIT_PARTIAL if failed else 0


def _cmd_info(args: argparse.Namespace) -> int:
    from bgee_dask.catalog.reader import AtlasCatalog
    from bgee_dask.format.location import AtlasLocation
    from bgee_dask.query.names import queryable_columns

    catalog = AtlasCatalog(AtlasLocation(args.atlas))
    summary = catalog.summary()
    summary["columns"] = queryable_columns(catalog) if summary["n_experiments"] else []
    if args.json:
        print(json.dumps(_with_experiment_names(args.atlas, summary), indent=1, default=str))
        return 0
    print(
        f"atlas {summary['atlas']} ({summary['format']} {summary['format_version']}, updated {summary['updated_at']})"
    )
    print(
        f"{summary['n_experiments']} experiments, species {', '.join(summary['species']) or '-'}, "
        f"{summary['n_cells']:,} cells, {summary['nnz']:,} non-zero values, {_human_bytes(summary['bytes'])}"
    )
    rows = _with_experiment_names(args.atlas, summary)["experiments"]
    if rows:
        header = (
            f"{'experiment':<14} {'species':<24} {'cells':>10} {'genes':>8} {'by symbol':>10} {'nnz':>14} "
            f"{'size':>10} {'layout':<6} name"
        )
        print(header)
        for r in rows:
            by_symbol = r.get("n_genes_by_symbol")
            print(
                f"{r['experimentId']:<14} {r['species']:<24} {r['n_cells']:>10,} {r['n_genes']:>8,} "
                f"{'-' if by_symbol is None else format(by_symbol, ','):>10} "
                f"{r['nnz']:>14,} {_human_bytes(r['bytes']):>10} {r.get('layout', ''):<6} {r.get('name', '')}".rstrip()
            )
        if any(r.get("n_genes_by_symbol") for r in rows):
            print(
                "by symbol: genes the file names by symbol, keyed in queries by the Ensembl id other experiments "
                "of the species give that symbol"
            )
    if summary["columns"]:
        print(f"columns to filter and group on: {', '.join(summary['columns'])}")
        print("  (bgee-dask values ATLAS COLUMN lists a column's values with their cell counts)")
    return 0


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _cmd_query(args: argparse.Namespace) -> int:
    if _is_h5ad(args.out):  # the pseudobulk for count tools, not statistics per group and gene
        return _cmd_query_pseudobulk(args)
    if args.min_cells is not None:
        raise ValueError("--min-cells applies to the pseudobulk, written with --out FILE.h5ad")
    # where the results go is checked before anything is computed
    _check_local_output(args.out, suffixes=(".csv", ".parquet", ".pq", ".nc"))
    if args.plot:
        _check_local_output(args.plot, suffixes=(".png", ".pdf", ".svg"))
    from bgee_dask.api.atlas import open_atlas
    from bgee_dask.query.export import write_result

    atlas = open_atlas(args.atlas)
    normalize = None if args.normalize == "none" else args.normalize
    stats = _split(args.stats) or []
    if args.plot:
        stats = list(dict.fromkeys([*stats, "mean", "frac_expressed"]))

    def run(client: Any) -> Any:
        q = atlas.query(args.filter, genes=_split(args.genes), client=client, progress=not args.no_progress)
        ds = q.aggregate(by=_split(args.by) or [], stats=stats, normalize=normalize)
        return ds, _plot_dataset(args, q, ds)

    if _remote_client(args) or args.workers:
        with _client(args, preload=(PRELOAD_MODULE,)) as client:
            ds, plot_ds = run(client)
    else:
        ds, plot_ds = run(None)
    write_result(ds, args.out)
    print(f"{ds.sizes['group']} groups x {ds.sizes['gene']} genes, {int(ds['n_cells'].sum()):,} cells -> {args.out}")
    if args.plot:
        _draw_dot_plot(plot_ds, args.plot)
    return 0


#: What the query's --plot shows without --normalize: means of normalized counts, comparable across cells.
PLOT_NORMALIZE = "log1p_cp10k"


def _plot_dataset(args: argparse.Namespace, query: Any, ds: Any) -> Any:
    """The result the --plot draws: ``ds`` itself, or normalized means when --normalize was not given."""
    if not args.plot or args.normalize is not None or ds.sizes["group"] == 0:
        return ds
    return query.aggregate(by=_split(args.by) or [], stats=["mean", "frac_expressed"], normalize=PLOT_NORMALIZE)


def _is_h5ad(path: str) -> bool:
    return os.path.splitext(str(path))[1].lower() == ".h5ad"


def _check_local_output(path: str, *, suffixes: tuple[str, ...]) -> None:
    """Fail before computing when ``path`` cannot be written: wrong format, a URL, or a missing folder."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in suffixes:
        raise ValueError(f"{path}: unknown output format {ext!r}; use {', '.join(suffixes)}")
    if "://" in path:
        raise ValueError(f"{path}: this output is written to a local file; give a path on this machine")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{path}: folder {folder} does not exist")


def _cmd_query_pseudobulk(args: argparse.Namespace) -> int:
    """``query --out X.h5ad``: the pseudobulk AnnData (summed raw counts per group) for PyDESeq2 and decoupler."""
    from bgee_dask.api.atlas import open_atlas

    _check_local_output(args.out, suffixes=(".h5ad",))
    if args.plot:
        _check_local_output(args.plot, suffixes=(".png", ".pdf", ".svg"))
    by = _split(args.by) or []
    min_cells = 10 if args.min_cells is None else args.min_cells
    atlas = open_atlas(args.atlas)

    def run(client: Any) -> Any:
        q = atlas.query(args.filter, genes=_split(args.genes), client=client, progress=not args.no_progress)
        pb = q.pseudobulk(by, min_cells=min_cells)
        plot_ds = None
        if args.plot:
            norm = PLOT_NORMALIZE if args.normalize is None else (None if args.normalize == "none" else args.normalize)
            plot_ds = q.aggregate(by=by, stats=["mean", "frac_expressed"], normalize=norm)
        return pb, plot_ds

    if _remote_client(args) or args.workers:
        with _client(args, preload=(PRELOAD_MODULE,)) as client:
            pb, plot_ds = run(client)
    else:
        pb, plot_ds = run(None)
    pb.write_h5ad(args.out)
    below = len(pb.uns["groups_below_min_cells"])
    print(
        f"pseudobulk: {pb.n_obs} groups x {pb.n_vars} genes, {int(pb.obs['n_cells'].sum()):,} cells -> {args.out}"
        f"\n{below} groups under {min_cells} cells left out; {pb.uns['n_genes_dropped']:,} genes left out "
        f"(not measured in every group's experiments){'; sums rounded to integers' if pb.uns['counts_rounded'] else ''}"
    )
    if plot_ds is not None:
        _draw_dot_plot(plot_ds, args.plot)
    return 0


def _draw_dot_plot(ds: Any, path: str) -> None:
    if ds.sizes["group"] == 0:
        print("no cell matched: no plot drawn", file=sys.stderr)
        return
    from bgee_dask.query.plot import dot_plot

    dot_plot(ds, path)
    print(f"dot plot -> {path}")


def _cmd_expression(args: argparse.Namespace) -> int:
    from bgee_dask.api.atlas import open_atlas
    from bgee_dask.api.expression import expression_dataset, expression_frame, format_expression_table

    if args.out:
        _check_local_output(args.out, suffixes=(".csv", ".tsv", ".parquet"))
    if args.plot:
        _check_local_output(args.plot, suffixes=(".png", ".pdf", ".svg"))
    atlas = open_atlas(args.atlas)

    def run(client: Any) -> Any:
        kwargs = dict(by=_split(args.by), filter=args.filter, client=client, progress=not args.no_progress)
        ds = expression_dataset(atlas.catalog, args.genes, **kwargs)
        # the plot's colours on a log scale: one highly expressed gene would wash out the others
        if not args.plot:
            return ds, None
        return ds, expression_dataset(atlas.catalog, args.genes, normalize=PLOT_NORMALIZE, **kwargs)

    if _remote_client(args) or args.workers:
        with _client(args, preload=(PRELOAD_MODULE,)) as client:
            ds, plot_ds = run(client)
    else:
        ds, plot_ds = run(None)
    table = expression_frame(ds)
    if args.out:
        ext = os.path.splitext(args.out)[1].lower()
        if ext == ".parquet":
            table.astype({c: str for c in table.columns if table[c].dtype == object}).to_parquet(args.out, index=False)
        else:
            table.to_csv(args.out, index=False, sep="\t" if ext == ".tsv" else ",")
        print(f"{len(table):,} rows ({ds.sizes['gene']} genes x {ds.sizes['group']} groups) -> {args.out}")
    else:
        print(format_expression_table(table, max_rows_per_gene=args.max_rows or None), end="")
    if args.plot:
        if ds.sizes["group"] == 0:
            print("no cell matched: no plot drawn", file=sys.stderr)
        else:
            from bgee_dask.query.plot import dot_plot

            symbols = ds["gene_symbol"].values if "gene_symbol" in ds.coords else ds["gene"].values
            shown = ", ".join(str(s) if s else str(g) for s, g in zip(symbols, ds["gene"].values, strict=True))
            verb = "is" if ds.sizes["gene"] == 1 else "are"
            dot_plot(plot_ds, args.plot, title=f"where {shown} {verb} expressed")
            print(f"dot plot -> {args.plot}")
    return 0


def _cmd_values(args: argparse.Namespace) -> int:
    from bgee_dask.api.atlas import open_atlas

    table = open_atlas(args.atlas).values(args.column, filter=args.filter)
    if args.json:
        print(table.to_json(orient="records", indent=1))
        return 0
    if table.empty:
        print("no cell matched")
        return 0
    shown = table if not args.limit else table.head(args.limit)
    text = shown.astype(object).where(shown.notna(), "NA")
    text["n_cells"] = [f"{n:,}" for n in shown["n_cells"]]
    print(text.rename(columns={"n_cells": "cells", "n_experiments": "experiments"}).to_string(index=False))
    if len(shown) < len(table):
        print(f"... {len(table) - len(shown)} more values (--limit 0 lists all)")
    print(f"{len(table)} values, {int(table['n_cells'].sum()):,} cells")
    return 0


def _with_experiment_names(atlas: str, summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` with each experiment's ``name`` from Bgee's annotations, where the atlas has them."""
    from bgee_dask.catalog.annotations import read_experiment_annotations
    from bgee_dask.format.location import AtlasLocation

    notes = read_experiment_annotations(AtlasLocation(atlas))
    if "name" in notes:
        rows = zip(notes["species"], notes["experimentId"], notes["name"], strict=True)
        names = {(s, e): n for s, e, n in rows if isinstance(n, str) and n}
        for r in summary["experiments"]:
            if (r["species"], r["experimentId"]) in names:
                r["name"] = names[(r["species"], r["experimentId"])]
    return summary


def _cmd_download(args: argparse.Namespace) -> int:
    from bgee_dask.bgee.download import DEFAULT_JOBS, list_experiments, run_download
    from bgee_dask.bgee.releases import DEFAULT_BASE_URL

    base_url = args.base_url or DEFAULT_BASE_URL
    if args.list:
        frame = list_experiments(args.species, args.release, base_url)
        if args.json:
            print(json.dumps(frame.astype(object).where(frame.notna(), None).to_dict(orient="records"), indent=1))
        else:
            for exp, name, n in zip(frame["experimentId"], frame["name"], frame["library_count"], strict=True):
                print(f"{exp}\t{name or ''}\t{'' if n is None or n != n else n}")
        return 0
    if args.json:
        raise ValueError("--json applies to --list")
    if not args.out:
        raise ValueError("--out DIR is required (unless --list)")
    if args.jobs is not None and args.jobs < 1:
        raise ValueError("--jobs must be at least 1")
    # --jobs counts batch jobs only with --cluster; here it is also the number of transfers
    cluster_args = argparse.Namespace(**{**vars(args), "jobs": args.jobs if args.cluster else None})
    _check_cluster_args(cluster_args)
    if args.memory_limit and not args.cluster:
        raise ValueError("--memory-limit applies to the batch jobs started with --cluster")

    def show(outcome: Any) -> None:
        where = f" on {outcome.worker}" if outcome.worker else ""
        if outcome.status == "downloaded":
            extra = ", resumed" if outcome.resumed else ""
            extra += f", {outcome.attempts} attempts" if outcome.attempts > 1 else ""
            print(f"downloaded {outcome.job.dest} ({outcome.entry['bytes']:,} bytes{extra}){where}")
        elif outcome.status == "skipped":
            print(f"skipped {outcome.job.dest}: {outcome.message}{where}")
        if outcome.conversion is not None and outcome.conversion.status != "failed":
            print(outcome.conversion.line())

    kwargs = dict(
        experiments=args.experiment,
        release=args.release,
        out=args.out,
        base_url=base_url,
        atlas=args.atlas,
        jobs=args.jobs or DEFAULT_JOBS,
        progress=not args.no_progress,
        on_outcome=show,
    )
    if args.scheduler or args.cluster:
        with _client(cluster_args) as client:
            result = run_download(args.species, client=client, **kwargs)
    else:
        result = run_download(args.species, **kwargs)
    for failure in result.failures:
        print(f"bgee-dask: error: {failure}", file=sys.stderr)
    counts = {s: sum(o.status == s for o in result.outcomes) for s in ("downloaded", "skipped")}
    converted = sum(r.status == "converted" for r in result.conversions)
    print(
        f"Bgee {result.release.name} {result.species.name}: {counts['downloaded']} files downloaded, "
        f"{counts['skipped']} already complete, {len(result.failures)} problems -> {result.folder}"
        + (f"; {converted} converted -> {args.atlas}" if args.atlas else ""),
        file=sys.stderr,
    )
    return EXIT_PARTIAL if result.failures else 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from bgee_dask.synthetic import generate_sources

    paths = generate_sources(
        args.out,
        n_experiments=args.experiments,
        cells_per_experiment=args.cells,
        n_genes_universe=args.genes,
        mean_detected_genes=args.detected_genes,
        seed=args.seed,
        processes=args.processes,
    )
    for path in paths:
        print(path)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from bgee_dask.demo import run_demo

    if _remote_client(args):
        # the demo's convert and query use the current client: this one
        with _client(args):
            return run_demo(args.dir, workers=args.workers)
    return run_demo(args.dir, workers=args.workers)


def _cmd_check(args: argparse.Namespace) -> int:
    from bgee_dask.catalog.check import check_atlas
    from bgee_dask.format.location import AtlasLocation

    report = check_atlas(AtlasLocation(args.atlas), repair=args.repair)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1, default=str))
    else:
        for line in report.repaired:
            print(f"repaired: {line}")
        for finding in report.findings:
            print(finding.line())
        state = "clean" if report.clean else f"{len(report.findings)} problem(s)"
        print(f"{report.atlas}: {report.experiments} experiments checked, {state}")
    return 0 if report.clean else EXIT_PARTIAL


_COMMANDS = {
    "check": _cmd_check,
    "convert": _cmd_convert,
    "info": _cmd_info,
    "query": _cmd_query,
    "expression": _cmd_expression,
    "values": _cmd_values,
    "download": _cmd_download,
    "generate": _cmd_generate,
    "demo": _cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    try:
        with stop_on_signals():
            if getattr(args, "codec_pipeline", None):
                from bgee_dask.format.codec_pipeline import use_codec_pipeline

                use_codec_pipeline(args.codec_pipeline)
            code = _COMMANDS[args.command](args)
            check_cancelled()
            return code
    except (KeyboardInterrupt, Cancelled) as exc:
        signum = getattr(exc, "signum", None) or signal.SIGINT
        print(f"bgee-dask: interrupted by {signal.Signals(signum).name}; nothing half-written is left visible",
              file=sys.stderr)
        return 128 + int(signum)
    except (ValueError, KeyError, FileNotFoundError, PermissionError, RuntimeError, TimeoutError, OSError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"bgee-dask: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        if not _is_storage_library_error(exc):
            raise
        print(f"bgee-dask: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _is_storage_library_error(exc: BaseException) -> bool:
    """Errors of the object-store stack (botocore, aiohttp, fsspec): the user's setup, not a bug."""
    modules = {cls.__module__.split(".")[0] for cls in type(exc).__mro__}
    return bool(modules & {"botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "gcsfs", "adlfs"})


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
