"""Conversion benchmark: bgee-dask vs. anndata vs. the codec floor, and peak memory vs. input size.

One command runs everything side by side on the same gzip-compressed, Bgee-like H5AD files made
by ``bgee_dask.synthetic`` (cached under ``--out``, so re-runs do not regenerate them)::

    python benchmarks/bench_convert.py --out bench-out/convert [--quick]

Part 1, throughput over several files. Every contender runs in a fresh subprocess (the whole
process is timed: interpreter start, imports, cluster start, work), once untimed on one file as a warm-up,
then ``--repeats`` times, interleaved round-robin so machine noise hits all alike:

* ``bgee-dask``: ``bgee_dask.convert(files, out, progress=False)`` (default: Dask worker threads in
  the calling process, one file per task using every core, gene-major copy included); also with
  ``gene_index=False`` (one copy of the values, like anndata) and ``workers=<cores>`` (a local
  cluster of worker processes, one file per process);
* ``anndata``: ``anndata.read_h5ad(f)`` then ``adata.write_zarr(...)`` for each file, with
  ``anndata.settings.zarr_write_format = 3``, over ``multiprocessing.Pool(<cores>)`` and in one
  process; plus anndata's default zarr format (v2) over the pool;
* ``floor``: only decoding the source arrays (X/data, X/indices, X/indptr: raw HDF5 chunks via
  ``read_direct_chunk`` + libdeflate, as bgee-dask decodes, and once more with Python's zlib) and
  encoding them with the store's codecs (``DEFAULT_CODEC``, ``INDEX_CODEC`` for X/indices,
  2**17-element pieces), nothing else; over a process pool (one file per process) and over a
  thread pool (inflate and blosc release the GIL); the fastest is the floor. Three more floors add
  the kernels of work the issue requires beyond it, each alone and nothing else: the gene-major
  copy's (the transposition, by the converter's kernel, and encoding the copy); the source's
  sha256, the value checks and the cells put in another order (the converter's kernels); and
  both. They bound what any converter doing that work can reach, measured beside it.

Part 2, peak memory of converting one file: ``bgee_dask.convert([f], out, workers=1)`` in a fresh
subprocess for files of growing size; peak RSS is sampled over the process tree every 0.1 s
with psutil and also taken from the kernel (``ru_maxrss`` of that child, from ``os.wait4``). The
anndata read+write of the smallest file is measured the same way for contrast. A 1M-cell file is
tried only when the 300k timings say it fits in ``--budget-min`` and the disk has room.

Children import a copy of ``bgee_dask`` taken at start (``<out>/pkg-snapshot/<fingerprint>``, first on
``PYTHONPATH``), because the package is edited while benchmarks run; ``--no-snapshot`` measures the live one.

``--baseline PATH`` runs every bgee-dask contender a second time with another checkout of bgee-dask
(``PYTHONPATH=PATH``, e.g. a ``git worktree`` of an earlier commit; rows labelled ``baseline:``), each
right after this tree's run of the same contender, and reports this tree / baseline.

Results go to ``<out>/results.json`` and ``<out>/results.md``; the table is printed at the end
(``--report-only`` re-renders it from the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

RESULT_TAG = "BENCH_RESULT "
PIECE = 1 << 17  # elements per encoded piece, as the store's inner chunks (layout.VALUES_CHUNK)
GENE_WINDOW = 1 << 23  # gene-major values transposed at a time, as the converter does (a shard: layout.VALUES_SHARD)
ROW_ORDER_SEED = 0  # the floors' random order of cells

FULL = {
    "n_files": 8,
    "cells_per_file": 25_000,
    "memory_sizes": [100_000, 300_000],
    "big_size": 1_000_000,
}
QUICK = {
    "n_files": 4,
    "cells_per_file": 3_000,
    "memory_sizes": [10_000, 30_000],
    "big_size": None,
}
GEN = {"mean_detected_genes": 1500, "n_genes_universe": 30_000, "compression": "gzip", "compression_level": 4}


# ---------------------------------------------------------------------------------------------
# Children: each contender runs in its own process and prints one JSON line.
# ---------------------------------------------------------------------------------------------


def _anndata_one(job: tuple[str, str, int | None]) -> float:
    import anndata

    src, dst, fmt = job
    t0 = time.perf_counter()
    if fmt is not None:
        anndata.settings.zarr_write_format = fmt
    adata = anndata.read_h5ad(src)
    adata.write_zarr(dst)
    return time.perf_counter() - t0


def _decode_dataset(ds, executor, inflate: str = "libdeflate") -> Any:
    """The whole 1-D dataset from its raw deflate chunks, decoded on ``executor`` (or inline).

    ``inflate``: "libdeflate" (what bgee-dask uses, about twice as fast) or "zlib" (Python's own).
    """
    import zlib

    import deflate
    import numpy as np

    n, chunk, isz = int(ds.shape[0]), int(ds.chunks[0]), ds.dtype.itemsize
    out = np.empty(n, dtype=ds.dtype)
    raw_view = out.view(np.uint8)
    raws = [ds.id.read_direct_chunk((off,)) for off in range(0, n, chunk)]  # h5py's lock: main thread

    def decode(i: int) -> int:
        mask, raw = raws[i]
        if mask & 1:  # bit 0: deflate skipped for this chunk
            buf = raw
        elif inflate == "zlib":
            buf = zlib.decompress(raw)
        else:
            buf = deflate.zlib_decompress(raw, chunk * isz)
        lo = i * chunk * isz
        k = min(len(buf), n * isz - lo)
        raw_view[lo : lo + k] = np.frombuffer(buf, dtype=np.uint8, count=k)
        return k

    done = sum(executor.map(decode, range(len(raws)))) if executor else sum(map(decode, range(len(raws))))
    assert done == n * isz, (ds.name, done, n * isz)
    return out


def _numcodecs(settings) -> Any:
    """A ``layout.BloscSettings`` as the numcodecs Blosc codec the floors encode with (zarr's BloscCodec wraps it)."""
    import numcodecs

    shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[settings.shuffle]
    return numcodecs.Blosc(cname=settings.cname, clevel=settings.clevel, shuffle=shuffle, blocksize=0)


def _encode_all(values, codec, executor) -> int:
    """Bytes of ``values`` encoded piece by piece, as the store's inner chunks."""
    pieces = [values[i : i + PIECE] for i in range(0, values.size, PIECE)]
    encoded = list(executor.map(codec.encode, pieces)) if executor else [codec.encode(p) for p in pieces]
    return sum(len(b) for b in encoded)


def _floor_file(
    path: str, executor=None, inflate: str = "libdeflate", gene_major: bool = False, required: bool = False
) -> dict[str, int]:
    import h5py
    import numcodecs

    numcodecs.blosc.use_threads = False  # parallelism comes from our pool, as in the converter
    from bgee_dask.format.layout import DEFAULT_CODEC, INDEX_CODEC  # the store's own codecs

    codecs = {"X/data": DEFAULT_CODEC, "X/indices": INDEX_CODEC, "X/indptr": DEFAULT_CODEC}
    stats = {"decoded_bytes": 0, "encoded_bytes": 0}
    arrays = {}
    with h5py.File(path, "r") as f:
        n_genes = int(f["X"].attrs["shape"][1])
        for name in ("X/data", "X/indices", "X/indptr"):
            ds = f[name]
            filters = ds.id.get_create_plist()
            assert filters.get_nfilters() == 1 and filters.get_filter(0)[0] == h5py.h5z.FILTER_DEFLATE, name
            values = arrays[name] = _decode_dataset(ds, executor, inflate)
            stats["decoded_bytes"] += values.nbytes
            if not (required and name != "X/indptr"):  # (encoded once sorted, below)
                stats["encoded_bytes"] += _encode_all(values, _numcodecs(codecs[name]), executor)
    if required:
        stats["encoded_bytes"] += _floor_required(path, arrays, n_genes, executor)
    if gene_major:
        stats["encoded_bytes"] += _floor_gene_major(arrays, n_genes, executor)
    return stats


def _floor_required(path: str, arrays: dict[str, Any], n_genes: int, executor) -> int:
    """The kernels of the work the issue asks for beyond decoding and encoding, and nothing else.

    The source's sha256 (provenance), the value checks with the per-cell totals and detected
    genes (one pass, the converter's kernel), and the cells in another order: each encoded
    chunk gathered from the decoded rows as the converter does, here in a random row order
    (the converter's comes from sorting the metadata, which this floor does not read). No
    metadata, no writing.
    """
    import hashlib

    import numpy as np

    from bgee_dask.converter.csr_kernels import gather_value_range
    from bgee_dask.format.layout import DEFAULT_CODEC, INDEX_CODEC
    from bgee_dask.sources.value_check import scan_csr

    with open(path, "rb") as fh:
        hashlib.file_digest(fh, "sha256")
    data, indices = arrays["X/data"], arrays["X/indices"]
    indptr = arrays["X/indptr"].astype(np.int64)
    scan = scan_csr(indptr, indices, data, n_genes, executor)
    assert scan.position == -1, path
    perm = np.random.default_rng(ROW_ORDER_SEED).permutation(indptr.size - 1)
    dest_indptr = np.zeros(indptr.size, dtype=np.int64)
    np.cumsum(np.diff(indptr)[perm], out=dest_indptr[1:])
    value_codec, index_codec = _numcodecs(DEFAULT_CODEC), _numcodecs(INDEX_CODEC)

    def gather_and_encode(v0: int) -> int:
        n = min(PIECE, data.size - v0)
        out_indices, out_data = np.empty(n, dtype=np.int32), np.empty(n, dtype=data.dtype)
        gather_value_range(perm, indptr, indices, data, dest_indptr, v0, out_indices, out_data)
        return len(index_codec.encode(out_indices)) + len(value_codec.encode(out_data))

    starts = range(0, data.size, PIECE)
    return sum(executor.map(gather_and_encode, starts) if executor else map(gather_and_encode, starts))


def _floor_gene_major(arrays: dict[str, Any], n_genes: int, executor) -> int:
    """The gene-major copy's own work, and nothing else: transpose, then encode both arrays once more.

    The transposition is the converter's kernel (the fastest measured: scipy's ``tocsc`` takes ~3x
    as long), given the rows in source order, which reads them sequentially (the converter reads
    them in its sorted order): a lower bound on the copy's cost. One window of a shard's values at
    a time, its genes in two halves on the executor, as the converter does; no per-cell sums, no
    checks, no writing.
    """
    import numpy as np

    from bgee_dask.converter.csr_kernels import count_values_per_gene, gene_window_of_rows
    from bgee_dask.format.layout import DEFAULT_CODEC, INDEX_CODEC

    data, indices = arrays["X/data"], arrays["X/indices"]
    indptr = arrays["X/indptr"].astype(np.int64)
    gene_indptr = np.zeros(n_genes + 1, dtype=np.int64)
    # (the converter counts in its value scan; np.bincount first copies the indices to int64)
    np.cumsum(count_values_per_gene(indices, n_genes), out=gene_indptr[1:])
    rows = np.arange(indptr.size - 1, dtype=np.int64)
    window = GENE_WINDOW
    cells_out, values_out = np.empty(window, dtype=np.int32), np.empty(window, dtype=data.dtype)
    value_codec, cell_codec = _numcodecs(DEFAULT_CODEC), _numcodecs(INDEX_CODEC)
    encoded = 0
    for v0 in range(0, data.size, window):
        v1 = min(data.size, v0 + window)
        g0 = int(np.searchsorted(gene_indptr, v0, side="right")) - 1
        g1 = int(np.searchsorted(gene_indptr, v1, side="left"))
        cut = max(g0, min(int(np.searchsorted(gene_indptr, (v0 + v1) // 2, side="left")), g1))

        def transpose(genes: tuple[int, int], v0: int = v0, v1: int = v1) -> None:
            a, b = genes
            pos = gene_indptr[a:b].copy()
            gene_window_of_rows(rows, indptr, indices, data, a, b, pos, v0, v1, cells_out, values_out)

        halves = [(a, b) for a, b in ((g0, cut), (cut, g1)) if b > a]
        list(executor.map(transpose, halves)) if executor else [transpose(h) for h in halves]
        encoded += _encode_all(cells_out[: v1 - v0], cell_codec, executor)
        encoded += _encode_all(values_out[: v1 - v0], value_codec, executor)
    return encoded


def _child(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    import resource
    import warnings

    warnings.simplefilter("ignore")  # zarr's autosharding and consolidated-metadata notes, in every writer
    out: dict[str, Any] = {}
    # Imports of the libraries each tool needs happen before t_work, so that "work" excludes them;
    # "startup" is everything from process creation to t_work.
    if kind == "bgee":
        import bgee_dask
        import bgee_dask.api.convert  # h5py, anndata, zarr, pandas, numba kernels

        t_work = time.perf_counter()
        kw = {k: args[k] for k in ("workers", "gene_index") if args.get(k) is not None}
        reports = bgee_dask.convert(args["files"], args["out"], progress=False, **kw)
        bad = [r.line() for r in reports if r.status != "converted"]
        if bad:
            raise RuntimeError(f"bgee-dask did not convert everything: {bad}")
        out["file_seconds"] = [round(r.seconds, 3) for r in reports]
        out["bgee_dask_file"] = bgee_dask.__file__
        out["store_bytes"] = sum(r.bytes or 0 for r in reports)
    elif kind == "bgee_cli":
        # The command as users run it: the console script's entry point, with its defaults
        # (``run`` in checkouts whose entry point was not ``main``).
        import bgee_dask.cli as cli

        entry_point = getattr(cli, "run", cli.main)
        t_work = time.perf_counter()
        argv = ["convert", *args["files"], "--out", args["out"], *args.get("options", [])]
        code = entry_point(argv)
        if code != 0:
            raise RuntimeError(f"bgee-dask {' '.join(argv[:1])} exited {code}")
        import bgee_dask

        out["bgee_dask_file"] = bgee_dask.__file__
    elif kind == "anndata":
        import anndata  # noqa: F401  (inherited by the forked pool workers)

        t_work = time.perf_counter()
        os.makedirs(args["out"], exist_ok=True)
        jobs = [(f, os.path.join(args["out"], Path(f).stem + ".zarr"), args["zarr_format"]) for f in args["files"]]
        if args["processes"] > 1:
            with get_context("fork").Pool(args["processes"]) as pool:
                secs = list(pool.imap_unordered(_anndata_one, jobs, chunksize=1))
        else:
            secs = [_anndata_one(j) for j in jobs]
        out["file_seconds"] = [round(s, 3) for s in secs]
    elif kind == "floor":
        import h5py  # noqa: F401
        import numcodecs  # noqa: F401

        t_work = time.perf_counter()
        extra = {k: args.get(k, False) for k in ("gene_major", "required")}
        if args["mode"] == "processes":
            from functools import partial

            one = partial(_floor_file, inflate=args["inflate"], **extra)
            with get_context("fork").Pool(args["workers"]) as pool:
                stats = list(pool.imap_unordered(one, args["files"], chunksize=1))
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(args["workers"]) as ex:
                stats = [_floor_file(f, ex, args["inflate"], **extra) for f in args["files"]]
        out["decoded_bytes"] = sum(s["decoded_bytes"] for s in stats)
        out["encoded_bytes"] = sum(s["encoded_bytes"] for s in stats)
    else:
        raise ValueError(kind)
    t_end = time.perf_counter()
    out["work_s"] = t_end - t_work
    out["startup_s"] = (time.time() - (t_end - t_work)) - args["launched_at"]
    out["self_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["children_maxrss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return out


# ---------------------------------------------------------------------------------------------
# Parent: running children, sampling memory
# ---------------------------------------------------------------------------------------------


def _tree_rss(proc) -> int:
    import psutil

    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def run_child(kind: str, args: dict[str, Any], log_path: Path, timeout: float = 3600) -> dict[str, Any]:
    """Run one contender in a fresh interpreter; wall time, sampled tree RSS and kernel ru_maxrss."""
    import psutil

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as err, open(log_path.with_suffix(".out"), "w+") as outf:
        args = {**args, "launched_at": time.time()}
        cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--args", json.dumps(args)]
        t0 = time.perf_counter()
        env = dict(os.environ)
        first = args.get("pythonpath") or (str(_SNAPSHOT) if _SNAPSHOT is not None else None)
        if first is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [first, env.get("PYTHONPATH")]))
        popen = subprocess.Popen(cmd, stdout=outf, stderr=err, env=env)
        ps = psutil.Process(popen.pid)
        peak = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, _tree_rss(ps))
                stop.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        timer = threading.Timer(timeout, popen.kill)
        timer.start()
        try:
            # wait4 instead of Popen.wait: it returns this child's own rusage (RUSAGE_CHILDREN is a
            # running maximum over every child this process ever reaped).
            _, status, usage = os.wait4(popen.pid, 0)
        finally:
            timer.cancel()
            stop.set()
            sampler.join()
        wall = time.perf_counter() - t0
        popen.returncode = os.waitstatus_to_exitcode(status)
        outf.seek(0)
        lines = [ln for ln in outf.read().splitlines() if ln.startswith(RESULT_TAG)]
    if popen.returncode != 0 or not lines:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{kind} failed (exit {popen.returncode}); log {log_path}:\n{tail}")
    res = json.loads(lines[-1][len(RESULT_TAG) :])
    expected = args.get("pythonpath") or (str(_SNAPSHOT) if _SNAPSHOT is not None else None)
    if expected is not None and "bgee_dask_file" in res and not res["bgee_dask_file"].startswith(expected):
        raise RuntimeError(f"child imported {res['bgee_dask_file']}, not the package in {expected}")
    res.update(
        wall_s=wall,
        peak_tree_rss_mb=peak / 2**20,
        wait4_maxrss_mb=usage.ru_maxrss / 1024,
        user_s=usage.ru_utime,
        sys_s=usage.ru_stime,
    )
    return res


def _du(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(dirpath, f))
    return total


def _rm(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


#: PYTHONPATH entry that makes children import a frozen copy of the package (see _snapshot_package).
_SNAPSHOT: Path | None = None


def _live_package() -> Path:
    import bgee_dask

    return Path(bgee_dask.__file__).parent


def _package_fingerprint(root: Path | None = None) -> str:
    """sha256 over the package's .py files: other people edit the package while benchmarks run."""
    import hashlib

    root = root or _live_package()
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _snapshot_package(out: Path) -> tuple[Path, str]:
    """Copy the package's source under ``out`` so that every child runs the same code.

    The repository is edited while the benchmark runs; without a frozen copy, contenders started
    minutes apart would measure different versions of the converter.
    """
    tmp = out / "pkg-snapshot" / f"tmp-{os.getpid()}"
    _rm(tmp)
    shutil.copytree(_live_package(), tmp / "bgee_dask", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    fp = _package_fingerprint(tmp / "bgee_dask")
    final = out / "pkg-snapshot" / fp
    if final.exists():
        _rm(tmp)
    else:
        os.replace(tmp, final)
    return final, fp


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# Inputs (cached)
# ---------------------------------------------------------------------------------------------


def _gen_one(kwargs: dict[str, Any]) -> tuple[str, float]:
    from bgee_dask.synthetic import generate_experiment

    t0 = time.perf_counter()
    path = generate_experiment(**kwargs)
    return str(path), time.perf_counter() - t0


def ensure_sources(root: Path, name: str, jobs: list[dict[str, Any]], processes: int) -> dict[str, Any]:
    """Generate the files described by ``jobs`` under ``root/name`` unless a matching manifest exists."""
    folder = root / name
    manifest_path = folder / "manifest.json"
    spec = [{k: v for k, v in j.items() if k != "path"} for j in jobs]
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest["jobs"] == spec and all(os.path.exists(p) for p in manifest["files"]):
            manifest["cached"] = True
            return manifest
    _rm(folder)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    full = [{**j, "path": str(folder)} for j in jobs]
    if processes > 1 and len(full) > 1:
        with ProcessPoolExecutor(min(processes, len(full)), mp_context=get_context("spawn")) as ex:
            done = list(ex.map(_gen_one, full))
    else:
        done = [_gen_one(j) for j in full]
    manifest = {
        "jobs": spec,
        "files": [p for p, _ in done],
        "gen_seconds": [s for _, s in done],
        "gen_wall_s": time.perf_counter() - t0,
        "n_cells": [j["n_cells"] for j in jobs],
        "bytes": [os.path.getsize(p) for p, _ in done],
    }
    manifest_path.write_text(json.dumps(manifest, indent=1))
    manifest["cached"] = False
    return manifest


def _nnz(path: str) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["X/data"].shape[0])


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


BASELINE = "baseline: "


def _with_baseline(
    contenders: list[tuple[str, str, dict[str, Any]]], baseline: str | None
) -> list[tuple[str, str, dict[str, Any]]]:
    """Each bgee-dask contender followed by the same run of the baseline checkout (when there is one)."""
    if baseline is None:
        return contenders
    out = []
    for label, kind, args in contenders:
        out.append((label, kind, args))
        if kind in ("bgee", "bgee_cli"):
            base_args = {**args, "out": args["out"] + "-baseline", "pythonpath": baseline}
            out.append((BASELINE + label, kind, base_args))
    return out


def _throughput_contenders(files: list[str], work: Path, cores: int) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        ("bgee-dask convert (default: Dask worker threads)", "bgee", {"files": files, "out": str(work / "bgee")}),
        (
            "bgee-dask convert gene_index=False (Dask worker threads)",
            "bgee",
            {"files": files, "out": str(work / "bgee-nogi"), "gene_index": False},
        ),
        ("bgee-dask convert (the command, default)", "bgee_cli", {"files": files, "out": str(work / "bgee-cli")}),
        (
            "bgee-dask convert --no-gene-index (the command)",
            "bgee_cli",
            {"files": files, "out": str(work / "bgee-cli-nogi"), "options": ["--no-gene-index"]},
        ),
        (
            f"bgee-dask convert workers={cores} (worker processes)",
            "bgee",
            {"files": files, "out": str(work / "bgee-procs"), "workers": cores},
        ),
        (
            f"anndata read_h5ad+write_zarr v3, Pool({cores})",
            "anndata",
            {"files": files, "out": str(work / "ad3p"), "processes": cores, "zarr_format": 3},
        ),
        (
            "anndata read_h5ad+write_zarr v3, 1 process",
            "anndata",
            {"files": files, "out": str(work / "ad3s"), "processes": 1, "zarr_format": 3},
        ),
        (
            f"anndata read_h5ad+write_zarr default (v2), Pool({cores})",
            "anndata",
            {"files": files, "out": str(work / "ad2p"), "processes": cores, "zarr_format": None},
        ),
        (
            f"floor: gzip decode (libdeflate) + blosc encode, process Pool({cores})",
            "floor",
            {"files": files, "mode": "processes", "workers": cores, "inflate": "libdeflate"},
        ),
        (
            f"floor: gzip decode (libdeflate) + blosc encode, {cores} threads",
            "floor",
            {"files": files, "mode": "threads", "workers": cores, "inflate": "libdeflate"},
        ),
        (
            f"floor: gzip decode (zlib) + blosc encode, {cores} threads",
            "floor",
            {"files": files, "mode": "threads", "workers": cores, "inflate": "zlib"},
        ),
        (
            f"floor with the gene-major copy (+ transposition, 2nd encode), process Pool({cores})",
            "floor",
            {"files": files, "mode": "processes", "workers": cores, "inflate": "libdeflate", "gene_major": True},
        ),
        (
            f"floor with the required kernels (+ sha256, value checks, cells reordered), process Pool({cores})",
            "floor",
            {"files": files, "mode": "processes", "workers": cores, "inflate": "libdeflate", "required": True},
        ),
        (
            f"floor with the required kernels and the gene-major copy, process Pool({cores})",
            "floor",
            {
                "files": files,
                "mode": "processes",
                "workers": cores,
                "inflate": "libdeflate",
                "required": True,
                "gene_major": True,
            },
        ),
    ]


def _summarise(runs: list[dict[str, Any]], n_cells: int) -> dict[str, Any]:
    wall = [r["wall_s"] for r in runs]
    work = [r["work_s"] for r in runs]
    med = statistics.median(wall)
    return {
        "runs": len(runs),
        "wall_s_median": med,
        "wall_s_min": min(wall),
        "wall_s_max": max(wall),
        "work_s_median": statistics.median(work),
        "startup_s_median": statistics.median(r["startup_s"] for r in runs),
        "cells_per_s": n_cells / med,
        "cpu_s_median": statistics.median(r["user_s"] + r["sys_s"] for r in runs),
        "peak_tree_rss_mb_median": statistics.median(r["peak_tree_rss_mb"] for r in runs),
        "output_bytes": runs[-1].get("output_bytes"),
    }


def part_throughput(
    cfg: dict[str, Any],
    out: Path,
    repeats: int,
    cores: int,
    log,
    keep_outputs: bool = True,
    baseline: str | None = None,
) -> dict[str, Any]:
    jobs = [
        dict(
            n_cells=cfg["cells_per_file"],
            species=("Homo_sapiens", "Mus_musculus")[i % 2],
            experiment_id=f"SRPS{i + 1:05d}",
            seed=1000 + i,
            threads=1,
            **GEN,
        )
        for i in range(cfg["n_files"])
    ]
    log(f"[part 1] sources: {cfg['n_files']} files x {cfg['cells_per_file']} cells")
    manifest = ensure_sources(out / "sources", f"throughput-{cfg['n_files']}x{cfg['cells_per_file']}", jobs, cores)
    files = manifest["files"]
    n_cells = sum(manifest["n_cells"])
    nnz = sum(_nnz(f) for f in files)
    state = "cached" if manifest["cached"] else f"generated in {manifest['gen_wall_s']:.0f}s"
    log(f"[part 1] {state}: {n_cells} cells, {nnz / 1e6:.1f}M values, {sum(manifest['bytes']) / 1e6:.0f} MB gzip")
    work = out / "work"
    _rm(work)
    contenders = _with_baseline(_throughput_contenders(files, work, cores), baseline)
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in contenders}
    # Outputs stay until every run is done, each run writing into a directory of its own, when
    # the disk has room: on this machine's ext4 (no journal), creating a file scans past the
    # inodes deleted in the last 60-360 s, so deleting one run's output made the next writer pay
    # for it (perf: 5% of a conversion's CPU) and the floor, which writes nothing, not. Two full
    # runs, with and without the deletions, differed by less than their noise.
    writers = sum(1 for _, _, args in contenders if "out" in args)
    need = 1.6 * sum(manifest["bytes"]) * writers * repeats  # bgee-dask's stores with the gene index: 1.5x
    keep = keep_outputs and shutil.disk_usage(out).free > need + 5e9
    log(f"[part 1] outputs {'kept until the end' if keep else 'deleted after each run'} (need ~{need / 1e9:.0f} GB)")
    for rep in range(repeats + 1):
        for i, (label, kind, all_args) in enumerate(contenders):
            # rep 0 is an untimed warm-up on one file: numba's on-disk cache, page cache, .pyc files
            args = {**all_args, "files": files[:1]} if rep == 0 else dict(all_args)
            if keep and "out" in args:
                args["out"] = str(work / f"rep{rep}" / Path(args["out"]).name)
            if not keep:
                _rm(work)
            res = run_child(kind, args, out / "logs" / f"p1-{i}-rep{rep}.log")
            res["output_bytes"] = _du(Path(args["out"])) if "out" in args else res.get("encoded_bytes")
            if not keep:
                _rm(work)
            tag = "warm-up" if rep == 0 else f"rep {rep}/{repeats}"
            log(f"  {tag:>9}  {label:<58} {res['wall_s']:7.2f} s  (work {res['work_s']:6.2f} s)")
            if rep:
                runs[label].append(res)
    _rm(work)
    summary = {label: _summarise(r, n_cells) for label, r in runs.items()}
    labels = [c[0] for c in contenders if not c[0].startswith(BASELINE)]
    bgee, nogi, cli, cli_nogi, bgee_procs, ad3p, ad3s, ad2p, *floors, floor_gm, floor_req, floor_req_gm = labels
    # The floor is the fastest way measured to only decode and encode: normally libdeflate on threads.
    floor_label = min(floors, key=lambda f: summary[f]["wall_s_median"])

    def ratio(a: str, b: str, key: str = "wall_s_median") -> float:
        return summary[a][key] / summary[b][key]

    ratios = {
        "floor_contender": floor_label,
        "anndata_v3_pool_over_bgee": ratio(ad3p, bgee),
        "anndata_v3_single_over_bgee": ratio(ad3s, bgee),
        "anndata_v2_pool_over_bgee": ratio(ad2p, bgee),
        "bgee_over_floor": ratio(bgee, floor_label),
        "zlib_floor_contender": floors[-1],
        "bgee_over_zlib_floor": ratio(bgee, floors[-1]),
        "bgee_processes_over_floor": ratio(bgee_procs, floor_label),
        "anndata_v3_pool_over_bgee_no_gene_index": ratio(ad3p, nogi),
        "bgee_no_gene_index_over_floor": ratio(nogi, floor_label),
        "anndata_v3_pool_over_cli": ratio(ad3p, cli),
        "cli_over_floor": ratio(cli, floor_label),
        "anndata_v3_pool_over_cli_no_gene_index": ratio(ad3p, cli_nogi),
        "cli_no_gene_index_over_floor": ratio(cli_nogi, floor_label),
        # What the gene-major copy alone adds to the floor, and how close the converter is to that floor.
        "floor_gene_major_contender": floor_gm,
        "floor_gene_major_over_floor": ratio(floor_gm, floor_label),
        "bgee_over_floor_gene_major": ratio(bgee, floor_gm),
        "cli_over_floor_gene_major": ratio(cli, floor_gm),
        # The same for the kernels of the other work the issue requires (checksum, checks, sorted cells).
        "floor_required_contender": floor_req,
        "floor_required_over_floor": ratio(floor_req, floor_label),
        "cli_no_gene_index_over_floor_required": ratio(cli_nogi, floor_req),
        "floor_required_gene_major_contender": floor_req_gm,
        "floor_required_gene_major_over_floor": ratio(floor_req_gm, floor_label),
        "cli_over_floor_required_gene_major": ratio(cli, floor_req_gm),
        "labels": {"api": bgee, "api_no_gene_index": nogi, "cli": cli, "anndata_v3_pool": ad3p},
        # this tree / the baseline checkout, per bgee-dask contender (wall and CPU)
        "over_baseline": {
            label: {"wall": ratio(label, BASELINE + label), "cpu": ratio(label, BASELINE + label, "cpu_s_median")}
            for label in labels
            if BASELINE + label in summary
        },
        "work_only": {
            "anndata_v3_pool_over_bgee": ratio(ad3p, bgee, "work_s_median"),
            "anndata_v3_single_over_bgee": ratio(ad3s, bgee, "work_s_median"),
            "bgee_over_floor": ratio(bgee, floor_label, "work_s_median"),
        },
    }
    return {
        "files": files,
        "n_files": len(files),
        "n_cells": n_cells,
        "nnz": nnz,
        "source_bytes": sum(manifest["bytes"]),
        "generation": {"cached": manifest["cached"], "gen_wall_s": manifest["gen_wall_s"]},
        "contenders": [c[0] for c in contenders],
        "outputs_kept": keep,
        "summary": summary,
        "ratios": ratios,
        "runs": runs,
    }


def _memory_job(n: int) -> dict[str, Any]:
    # (threads change the generator's speed, not its values; the larger files get two)
    threads = 1 if n <= 1_000_000 else 2
    return dict(n_cells=n, species="Homo_sapiens", experiment_id="SRPS90001", seed=77, threads=threads, **GEN)


def part_memory(
    cfg: dict[str, Any],
    out: Path,
    cores: int,
    budget_s: float,
    t_begin: float,
    big: str,
    log,
    baseline: str | None = None,
):
    sizes = list(cfg["memory_sizes"])
    log(f"[part 2] sources: one file each of {sizes} cells")
    # Each size is its own cached folder; the first ones are generated in parallel.
    manifests: dict[int, dict[str, Any]] = {}
    todo = [n for n in sizes if not _cached(out, n)]
    if len(todo) > 1:
        with ProcessPoolExecutor(min(cores, len(todo)), mp_context=get_context("spawn")) as ex:
            for n, m in zip(todo, ex.map(_ensure_memory_source, [(str(out), n) for n in todo]), strict=True):
                manifests[n] = m
    for n in sizes:
        if n not in manifests:
            manifests[n] = _ensure_memory_source((str(out), n))
        m = manifests[n]
        state = "cached" if m["cached"] else f"generated in {m['gen_seconds'][0]:.0f}s"
        log(f"  {n:>9} cells: {m['bytes'][0] / 1e6:.0f} MB gzip ({state})")

    rows: list[dict[str, Any]] = []

    def measure(n: int, m: dict[str, Any]) -> None:
        f = m["files"][0]
        nnz = _nnz(f)
        variants = [(None, "bgee-dask convert workers=1", None)]
        if baseline is not None:
            variants.append((None, BASELINE + "bgee-dask convert workers=1", baseline))
        variants.append((False, "bgee-dask workers=1 gene_index=False", None))
        for gene_index, tool, pythonpath in variants:
            args = {"files": [f], "out": str(out / "work" / "mem"), "workers": 1, "gene_index": gene_index}
            if pythonpath is not None:
                args["pythonpath"] = pythonpath
            tag = "-baseline" if pythonpath else ""
            res = run_child("bgee", args, out / "logs" / f"p2-bgee-{n}-{gene_index}{tag}.log")
            res["output_bytes"] = _du(out / "work" / "mem")
            _rm(out / "work")
            rows.append(_memory_row(tool, n, nnz, m, res))
            log(
                f"  {tool:<38} {n:>9} cells: peak {res['peak_tree_rss_mb']:.0f} MB "
                f"(ru_maxrss {res['wait4_maxrss_mb']:.0f}), {res['wall_s']:.1f} s"
            )

    for n in sizes:
        measure(n, manifests[n])
    first = sizes[0]
    f = manifests[first]["files"][0]
    res = run_child(
        "anndata",
        {"files": [f], "out": str(out / "work" / "ad"), "processes": 1, "zarr_format": 3},
        out / "logs" / f"p2-anndata-{first}.log",
    )
    _rm(out / "work")
    rows.append(_memory_row("anndata read_h5ad+write_zarr v3", first, _nnz(f), manifests[first], res))
    log(f"  {'anndata':<38} {first:>9} cells: peak {res['peak_tree_rss_mb']:.0f} MB, {res['wall_s']:.1f} s")

    big_note = None
    n_big = cfg.get("big_size")
    if n_big and big != "no":
        last = sizes[-1]
        m_last = manifests[last]
        conv_last = sum(r["wall_s"] for r in rows if r["n_cells"] == last and not r["tool"].startswith("anndata"))
        scale = n_big / last
        gen_est = 0.0 if _cached(out, n_big) else m_last["gen_seconds"][0] * scale
        est = gen_est + conv_last * scale
        elapsed = time.perf_counter() - t_begin
        # source + store + spill (8 bytes per value, uncompressed) + margin
        disk_need = m_last["bytes"][0] * scale * 1.8 + _nnz(m_last["files"][0]) * scale * 8 * 1.2
        disk_free = shutil.disk_usage(out).free
        fits_time = elapsed + est * 1.15 < budget_s
        fits_disk = disk_free > disk_need
        big_note = (
            f"1M-cell file: estimated {est / 60:.1f} min (generation {gen_est / 60:.1f} + conversion "
            f"{conv_last * scale / 60:.1f}) after {elapsed / 60:.1f} min elapsed, budget {budget_s / 60:.0f} min; "
            f"disk needs ~{disk_need / 1e9:.1f} GB, {disk_free / 1e9:.1f} GB free"
        )
        if big == "yes" or (fits_time and fits_disk):
            log(f"[part 2] trying {big_note}")
            m = _ensure_memory_source((str(out), n_big))
            log(f"  {n_big:>9} cells: {m['bytes'][0] / 1e6:.0f} MB gzip (generated in {m['gen_wall_s']:.0f}s)")
            measure(n_big, m)
            big_note = "ran: " + big_note
        else:
            big_note = "skipped: " + big_note
            log(f"[part 2] {big_note}")
    return {"rows": rows, "big_size_note": big_note}


def _cached(out: Path, n: int) -> bool:
    manifest_path = out / "sources" / f"memory-{n}" / "manifest.json"
    if not manifest_path.exists():
        return False
    m = json.loads(manifest_path.read_text())
    return all(os.path.exists(p) for p in m["files"])


def _ensure_memory_source(arg: tuple[str, int]) -> dict[str, Any]:
    out, n = arg
    return ensure_sources(Path(out) / "sources", f"memory-{n}", [_memory_job(n)], 1)


def _memory_row(tool: str, n: int, nnz: int, m: dict[str, Any], res: dict[str, Any]) -> dict[str, Any]:
    return {
        "tool": tool,
        "n_cells": n,
        "nnz": nnz,
        "source_mb": m["bytes"][0] / 1e6,
        "uncompressed_x_mb": nnz * 8 / 1e6,
        "wall_s": res["wall_s"],
        "work_s": res["work_s"],
        "peak_tree_rss_mb": res["peak_tree_rss_mb"],
        "wait4_maxrss_mb": res["wait4_maxrss_mb"],
        "child_self_maxrss_mb": res["self_maxrss_mb"],
        "output_bytes": res.get("output_bytes"),
    }


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"# Conversion benchmark ({meta['date']}, {'quick' if meta['quick'] else 'full'} configuration)",
        "",
        f"Machine: {meta['cores']} cores, {meta['ram_gb']:.0f} GB RAM, {meta['platform']}, Python {meta['python']}; "
        f"shared with other engineers' test runs, so timings are noisy. Load average at start: {meta['loadavg_start']}"
        f", at end: {meta.get('loadavg_end')}. Figures are medians of {meta['repeats']} runs, each in a fresh "
        "process (whole-process wall time: interpreter start, imports, cluster start, work), after one untimed "
        "warm-up on one file; sources in the page cache.",
        "",
        f"anndata {meta['anndata']} (default `zarr_write_format` = {meta['anndata_default_zarr_write_format']}), "
        f"zarr {meta['zarr']}; `bgee_dask.convert` defaults {meta['bgee_dask_convert_defaults']}. "
        + (
            f"bgee-dask measured from a copy of its source taken at start (fingerprint "
            f"{meta['bgee_dask_measured_fingerprint']}), so every run measured the same code"
            if meta.get("bgee_dask_snapshot")
            else f"bgee-dask measured live (fingerprint {meta['bgee_dask_measured_fingerprint']})"
        )
        + (
            f"; the repository's package changed during the run (-> {meta['bgee_dask_source_sha256_end']})"
            + ("" if meta.get("bgee_dask_snapshot") else ": **runs may have measured different code**")
            if meta.get("package_changed_during_run")
            else "; the repository's package did not change during the run"
        )
        + ".",
        "",
    ]
    tp = results.get("throughput")
    if tp:
        lines += [
            f"## Throughput: {tp['n_files']} files, {tp['n_cells']:,} cells, {tp['nnz'] / 1e6:.0f}M values, "
            f"{tp['source_bytes'] / 1e6:.0f} MB gzip H5AD",
            "",
            {
                True: "Every run wrote into a directory of its own, deleted only after the last run (no file "
                "deletions between timed runs).",
                False: "Each run's output was deleted before the next run started.",
                None: "Each run's output was deleted before the next run started.",
            }[tp.get("outputs_kept")],
            "",
            "| contender | median wall s (min-max) | cells/s | work s | startup s | CPU s | peak RSS (tree) MB |"
            " output MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for label in tp["contenders"]:
            s = tp["summary"][label]
            out_mb = f"{s['output_bytes'] / 1e6:.0f}" if s.get("output_bytes") else "-"
            lines.append(
                f"| {label} | {s['wall_s_median']:.2f} ({s['wall_s_min']:.2f}-{s['wall_s_max']:.2f}) | "
                f"{s['cells_per_s']:,.0f} | {s['work_s_median']:.2f} | {s['startup_s_median']:.2f} | "
                f"{s['cpu_s_median']:.1f} | {s['peak_tree_rss_mb_median']:.0f} | {out_mb} |"
            )
        r = tp["ratios"]
        w = r["work_only"]
        if "labels" in r:
            roles = r["labels"]
            bgee_l, nogi_l, ad3p_l = roles["api"], roles["api_no_gene_index"], roles["anndata_v3_pool"]
        else:  # results.json of runs before the command was a contender
            bgee_l, nogi_l, _, ad3p_l = tp["contenders"][:4]

        def s_cpu(label: str) -> float:
            return tp["summary"][label]["cpu_s_median"]

        ok3 = "met" if r["anndata_v3_pool_over_bgee"] >= 3 else "NOT met"
        ok13 = "met" if r["bgee_over_floor"] <= 1.3 else "NOT met"
        lines += [
            "",
            f"* anndata v3 Pool / bgee-dask: **{r['anndata_v3_pool_over_bgee']:.2f}x** (target >= 3: {ok3}); "
            f"anndata v3 single process / bgee-dask: {r['anndata_v3_single_over_bgee']:.2f}x; "
            f"anndata default (v2) Pool / bgee-dask: {r['anndata_v2_pool_over_bgee']:.2f}x.",
            f"* bgee-dask / floor: **{r['bgee_over_floor']:.2f}** (target <= 1.3: {ok13}); "
            f"floor = {r['floor_contender']}; bgee-dask on worker processes / floor: "
            f"{r.get('bgee_processes_over_floor', float('nan')):.2f}.",
            *(
                [
                    f"* The command (`bgee-dask convert`, whose exit skips the interpreter's last garbage collection): "
                    f"anndata v3 Pool / bgee-dask **{r['anndata_v3_pool_over_cli']:.2f}x**, bgee-dask / floor "
                    f"**{r['cli_over_floor']:.2f}**; with `--no-gene-index` "
                    f"{r['anndata_v3_pool_over_cli_no_gene_index']:.2f}x and {r['cli_no_gene_index_over_floor']:.2f}."
                ]
                if "cli_over_floor" in r
                else []
            ),
            f"* Without the gene-major copy (gene_index=False): anndata v3 Pool / bgee-dask "
            f"{r['anndata_v3_pool_over_bgee_no_gene_index']:.2f}x, bgee-dask / floor "
            f"{r['bgee_no_gene_index_over_floor']:.2f}.",
            *(
                [
                    f"* The floor with the gene-major copy's own work (transposing, encoding the copy) / the floor: "
                    f"**{r['floor_gene_major_over_floor']:.2f}** (CPU {s_cpu(r['floor_gene_major_contender']):.1f} s "
                    f"against {s_cpu(r['floor_contender']):.1f}); bgee-dask (default, with the copy) / that floor: "
                    f"{r['bgee_over_floor_gene_major']:.2f} (the command {r['cli_over_floor_gene_major']:.2f})."
                ]
                if "floor_gene_major_over_floor" in r
                else []
            ),
            *(
                [
                    f"* The floor with the kernels of the other required work (sha256, value checks, cells "
                    f"reordered) / the floor: **{r['floor_required_over_floor']:.2f}** (the command "
                    f"`--no-gene-index` / that floor: {r['cli_no_gene_index_over_floor_required']:.2f}); with "
                    f"the gene-major copy too: **{r['floor_required_gene_major_over_floor']:.2f}** (the command "
                    f"/ that floor: {r['cli_over_floor_required_gene_major']:.2f})."
                ]
                if "floor_required_over_floor" in r
                else []
            ),
            f"* CPU seconds (user+sys of the whole process tree; less sensitive to other users' load): bgee-dask "
            f"{s_cpu(bgee_l):.1f}, gene_index=False {s_cpu(nogi_l):.1f}, anndata v3 Pool {s_cpu(ad3p_l):.1f}, floor "
            f"{s_cpu(r['floor_contender']):.1f}; bgee-dask / floor {s_cpu(bgee_l) / s_cpu(r['floor_contender']):.2f}, "
            f"anndata v3 Pool / bgee-dask {s_cpu(ad3p_l) / s_cpu(bgee_l):.2f}x.",
            *(
                [
                    "* This tree / baseline checkout (wall, CPU): "
                    + "; ".join(
                        f"{label}: **{v['wall']:.2f}**, {v['cpu']:.2f}" for label, v in r["over_baseline"].items()
                    )
                    + "."
                ]
                if r.get("over_baseline")
                else []
            ),
            f"* Work only (excluding interpreter start and imports): anndata v3 Pool / bgee-dask "
            f"{w['anndata_v3_pool_over_bgee']:.2f}x, single / bgee-dask {w['anndata_v3_single_over_bgee']:.2f}x, "
            f"bgee-dask / floor {w['bgee_over_floor']:.2f}.",
            "",
        ]
    mem = results.get("memory")
    if mem:
        lines += [
            "## Peak memory of converting one file",
            "",
            "| tool | cells | values | gzip H5AD MB | X uncompressed MB | wall s | peak RSS (psutil, tree) MB |"
            " ru_maxrss MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in mem["rows"]:
            lines.append(
                f"| {row['tool']} | {row['n_cells']:,} | {row['nnz'] / 1e6:.0f}M | {row['source_mb']:.0f} | "
                f"{row['uncompressed_x_mb']:.0f} | {row['wall_s']:.1f} | {row['peak_tree_rss_mb']:.0f} | "
                f"{row['wait4_maxrss_mb']:.0f} |"
            )
        bgee = [r for r in mem["rows"] if not r["tool"].startswith(("anndata", BASELINE))]
        peak = max((r["peak_tree_rss_mb"] for r in bgee if "gene_index=False" not in r["tool"]), default=0)
        peak_nogi = max((r["peak_tree_rss_mb"] for r in bgee if "gene_index=False" in r["tool"]), default=0)
        verdict = "met" if peak <= 1024 else "NOT met"
        lines += [
            "",
            f"* bgee-dask (default) peak RSS at most {peak:.0f} MB (target <= 1024 MB: {verdict}); "
            f"with gene_index=False at most {peak_nogi:.0f} MB.",
        ]
        base = {r["n_cells"]: r for r in mem["rows"] if r["tool"].startswith(BASELINE)}
        if base:
            mine = {r["n_cells"]: r for r in bgee if "gene_index=False" not in r["tool"]}
            lines.append(
                "* Peak RSS, this tree / baseline: "
                + "; ".join(
                    f"{n:,} cells {mine[n]['peak_tree_rss_mb']:.0f} / {base[n]['peak_tree_rss_mb']:.0f} MB, "
                    f"wall {mine[n]['wall_s']:.1f} / {base[n]['wall_s']:.1f} s"
                    for n in sorted(base)
                    if n in mine
                )
                + "."
            )
        if mem.get("big_size_note"):
            lines.append(f"* {mem['big_size_note']}.")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench-out/convert"))
    p.add_argument("--quick", action="store_true", help="tiny inputs, to check that the benchmark works")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--budget-min", type=float, default=35.0, help="time budget deciding whether to try 1M cells")
    p.add_argument("--one-million", choices=("auto", "yes", "no"), default="auto")
    p.add_argument(
        "--memory-sizes",
        metavar="N,N",
        help="cells of the files whose conversion's peak memory is measured, instead of 100k and 300k (and 1M); "
        "anndata is measured on the first",
    )
    p.add_argument(
        "--no-snapshot",
        action="store_true",
        help="run the live package instead of a copy taken at start (edits during the run then leak in)",
    )
    p.add_argument(
        "--delete-outputs",
        action="store_true",
        help="delete each run's output before the next run (default: keep every run's output until the end)",
    )
    p.add_argument("--report-only", action="store_true", help="re-render <out>/results.md from results.json")
    p.add_argument(
        "--baseline",
        metavar="PATH",
        help="also run every bgee-dask contender with the bgee-dask of this checkout (PYTHONPATH=PATH), interleaved",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--args", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.child:
        res = _child(a.child, json.loads(a.args))
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0

    if a.report_only:
        md = _markdown(json.loads((a.out / "results.json").read_text()))
        (a.out / "results.md").write_text(md)
        print(md)
        return 0

    import psutil

    t_begin = time.perf_counter()
    cfg = QUICK if a.quick else FULL
    if a.memory_sizes:
        cfg = {**cfg, "memory_sizes": [int(n) for n in a.memory_sizes.split(",")], "big_size": None}
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cores = _cpu_count()

    def log(msg: str) -> None:
        stamp = time.perf_counter() - t_begin
        print(f"[{stamp / 60:5.1f} min] {msg}", flush=True)

    import inspect
    from importlib.metadata import version

    import anndata

    import bgee_dask

    global _SNAPSHOT
    baseline = None
    if a.baseline:
        baseline = os.path.abspath(a.baseline)
        if not os.path.isfile(os.path.join(baseline, "bgee_dask", "__init__.py")):
            p.error(f"--baseline {a.baseline}: no bgee_dask package there")
    live_fp = _package_fingerprint()
    if a.no_snapshot:
        measured_fp = live_fp
    else:
        _SNAPSHOT, measured_fp = _snapshot_package(out)

    results: dict[str, Any] = {
        "meta": {
            "date": dt.datetime.now().astimezone().isoformat(timespec="minutes"),
            "quick": a.quick,
            "cores": cores,
            "ram_gb": psutil.virtual_memory().total / 2**30,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "repeats": a.repeats,
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "anndata": version("anndata"),
            "zarr": version("zarr"),
            "bgee_dask_convert_defaults": {
                k: v.default
                for k, v in inspect.signature(bgee_dask.convert).parameters.items()
                if v.default is not inspect.Parameter.empty and k in ("workers", "gene_index", "progress")
            },
            "bgee_dask_measured_fingerprint": measured_fp,
            "bgee_dask_snapshot": str(_SNAPSHOT) if _SNAPSHOT else None,
            "bgee_dask_source_sha256_start": live_fp,
            "baseline": baseline,
            "baseline_fingerprint": _package_fingerprint(Path(baseline) / "bgee_dask") if baseline else None,
            "anndata_default_zarr_write_format": anndata.settings.zarr_write_format,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "config": cfg,
            "generator": GEN,
        }
    }
    log(
        f"{cores} cores; anndata {version('anndata')} (default zarr_write_format = "
        f"{anndata.settings.zarr_write_format}); out {out}"
    )
    if not a.skip_throughput:
        results["throughput"] = part_throughput(
            cfg, out, a.repeats, cores, log, keep_outputs=not a.delete_outputs, baseline=baseline
        )
    if not a.skip_memory:
        results["memory"] = part_memory(
            cfg, out, cores, a.budget_min * 60, t_begin, a.one_million, log, baseline=baseline
        )
    results["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["meta"]["bgee_dask_source_sha256_end"] = _package_fingerprint()
    results["meta"]["package_changed_during_run"] = (
        results["meta"]["bgee_dask_source_sha256_end"] != results["meta"]["bgee_dask_source_sha256_start"]
    )
    results["meta"]["total_minutes"] = (time.perf_counter() - t_begin) / 60
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    md = _markdown(results)
    (out / "results.md").write_text(md)
    print()
    print(md)
    log(f"done; results in {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
