"""Atlases in an object store, against the real SeaweedFS S3 server of the ``s3_server`` fixture.

Converted with the command line (credentials from the AWS_* variables only) and with the API
(``storage_options``); read back on real Dask worker processes; compared with the same files
converted to a local folder and with numpy on the source H5ADs. Requests are counted in the client
and in the workers by wrapping aiobotocore's API call, the one place every s3fs request goes through.
"""

from __future__ import annotations

import collections
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import bgee_dask as bd
from bgee_dask.catalog.reader import forget_cached_tables
from bgee_dask.format.location import S3_DEFAULTS, AtlasLocation, StorageAccessError
from bgee_dask.query.export import to_long_frame

pytestmark = pytest.mark.services

SMALL = ("SRPT00003", "SRPT00004", "SRPT00007")  # the 3-experiment atlas
ALL = ("SRPT00001", "SRPT00002", "SRPT00003", "SRPT00004", "SRPT00005", "SRPT00006", "SRPT00007")
HUMAN_GENES = ["CD19", "MS4A1", "CD3E", "LYZ", "NKG7"]
# touches one store (SRPT00007) in the 3- and the 7-experiment atlas alike
ONE_STORE_FILTER = "experimentId == 'SRPT00007' and cellTypeId == 'CL:0000236'"
B_CELLS = "cellTypeId == 'CL:0000236'"


# ------------------------------------------------------------------------------------ request counting

_COUNTS: collections.Counter = collections.Counter()
_BYTES: collections.Counter = collections.Counter()
_LOCK = threading.Lock()


def install_request_counter() -> bool:
    """Count every S3 API call of this process (and the bytes of GET/PUT bodies); idempotent."""
    import aiobotocore.client as aioclient

    if getattr(aioclient.AioBaseClient._make_api_call, "_bgee_counted", False):
        return True
    original = aioclient.AioBaseClient._make_api_call

    async def counted(self, operation_name, api_params):
        try:
            response = await original(self, operation_name, api_params)
        except Exception:
            with _LOCK:
                _COUNTS[operation_name] += 1
            raise
        body = api_params.get("Body")
        size = int(response.get("ContentLength") or 0) if operation_name == "GetObject" else 0
        if operation_name in ("PutObject", "UploadPart") and isinstance(body, (bytes, bytearray, memoryview)):
            size = len(body)
        with _LOCK:
            _COUNTS[operation_name] += 1
            _BYTES[operation_name] += size
        return response

    counted._bgee_counted = True
    aioclient.AioBaseClient._make_api_call = counted
    return True


def take_request_counts() -> tuple[dict[str, int], int]:
    """(requests by operation, bytes) since the last call; resets."""
    with _LOCK:
        counts, size = dict(_COUNTS), sum(_BYTES.values())
        _COUNTS.clear()
        _BYTES.clear()
    return counts, size


def _clear_open_stores() -> bool:
    from bgee_dask.format.experiment import OPEN_STORES

    OPEN_STORES.clear()
    return True


def _sum_counts(per_worker: dict) -> tuple[dict[str, int], int]:
    total: collections.Counter = collections.Counter()
    size = 0
    for counts, nbytes in per_worker.values():
        total.update(counts)
        size += nbytes
    return dict(total), size


# ------------------------------------------------------------------------------------ helpers


def _cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "bgee_dask.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _long(ds) -> pd.DataFrame:
    frame = to_long_frame(ds)
    for c in frame.columns:
        if frame[c].dtype == object or isinstance(frame[c].dtype, pd.CategoricalDtype):
            frame[c] = frame[c].astype(str)
    return frame.reset_index(drop=True)


def assert_same_result(got, expected) -> None:
    """Bit-for-bit the same groups, genes and statistics."""
    pd.testing.assert_frame_equal(_long(got), _long(expected), check_exact=True)


def numpy_reference(files, genes: list[str], flt=None) -> dict[str, dict]:
    """Per cellTypeId: cells, and per gene the sum, expressing cells and measuring cells.

    A gene is found in each file as a researcher would look it up: by its name in ``var_names``, else by
    its symbol in ``var['feature_name']`` (files keyed by Ensembl id).
    """
    out: dict[str, dict] = {}
    for f in files:
        a = ad.read_h5ad(f)
        obs = a.obs
        mask = np.ones(a.n_obs, bool) if flt is None else np.asarray(flt(obs), bool)
        cols = [gene_column(a, g) for g in genes]
        x = a.X.tocsr()
        cell_types = obs["cellTypeId"].astype(str).to_numpy()
        for ct in np.unique(cell_types[mask]):
            rows = np.flatnonzero(mask & (cell_types == ct))
            slot = out.setdefault(
                ct,
                {
                    "n_cells": 0,
                    "sum": np.zeros(len(genes)),
                    "nexpr": np.zeros(len(genes), int),
                    "nmeas": np.zeros(len(genes), int),
                },
            )
            slot["n_cells"] += rows.size
            for j, c in enumerate(cols):
                if c < 0:
                    continue
                v = np.asarray(x[rows][:, c].todense(), dtype=np.float64).ravel()
                slot["sum"][j] += v.sum()
                slot["nexpr"][j] += int((v > 0).sum())
                slot["nmeas"][j] += rows.size
    return out


def gene_column(a: ad.AnnData, gene: str) -> int:
    """The column of ``gene`` in ``a`` by var_names, else by a symbol that names one column only; -1 if none."""
    if gene in a.var_names:
        return int(a.var_names.get_loc(gene))
    if "feature_name" in a.var:
        hits = np.flatnonzero(a.var["feature_name"].astype(str).to_numpy() == gene)
        assert hits.size <= 1, f"{gene} names {hits.size} genes"
        return int(hits[0]) if hits.size else -1
    return -1


def check_against_numpy(ds, ref: dict[str, dict]) -> None:
    keys = [str(k) for k in ds["cellTypeId"].values]
    assert sorted(keys) == sorted(ref)
    for i, ct in enumerate(keys):
        r = ref[ct]
        assert int(ds["n_cells"].values[i]) == r["n_cells"]
        np.testing.assert_array_equal(ds["n_measured"].values[i], r["nmeas"])
        np.testing.assert_array_equal(ds["n_expressed"].values[i], r["nexpr"])
        np.testing.assert_allclose(ds["sum"].values[i], np.where(r["nmeas"] > 0, r["sum"], np.nan), rtol=1e-12)


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def files(bgee_sources) -> dict[str, str]:
    return {k: str(bgee_sources[k]) for k in ALL}


@pytest.fixture(scope="module")
def local_atlas(tmp_path_factory, files, dask_cluster_procs):
    out = tmp_path_factory.mktemp("local-atlas")
    with dask_cluster_procs.client() as client:
        reports = bd.convert([files[k] for k in ALL], out, client=client, progress=False)
    assert all(r.status == "converted" for r in reports), [r.message for r in reports]
    return bd.open_atlas(out)


@pytest.fixture(scope="module")
def local_atlas3(tmp_path_factory, files):
    """The 3 experiments of ``atlas3`` alone: genes are keyed by what the atlas holds, so compare like with like."""
    out = tmp_path_factory.mktemp("local-atlas3")
    reports = bd.convert([files[k] for k in SMALL], out, workers=1, progress=False)
    assert all(r.status == "converted" for r in reports), [r.message for r in reports]
    return bd.open_atlas(out)


@pytest.fixture(scope="module")
def s3_atlases(s3_server, files, dask_cluster_procs):
    """s3://<bucket>/atlas3 (3 experiments) and s3://<bucket>/atlas (7), made with the command line.

    Converted on the real scheduler's workers (which have no AWS_* variables: the credentials travel
    with the tasks): the first 3, then the prefix is copied to atlas3, then all 7 files into ``atlas``
    (3 skipped: already there).
    """
    bucket = s3_server.make_bucket(f"atlas-{uuid.uuid4().hex[:8]}")
    url = f"s3://{bucket}/atlas"

    def convert_on_cluster(names):
        r = _cli(
            "convert",
            *[files[k] for k in names],
            "--out",
            url,
            "--scheduler",
            dask_cluster_procs.address,
            "--no-progress",
            env=s3_server.env(),
        )
        assert r.returncode == 0, r.stderr
        return r

    r = convert_on_cluster(SMALL)
    assert r.stderr.count("\n") >= 1 and "3 converted, 0 skipped, 0 failed" in r.stderr
    fs = s3_server.filesystem()
    fs.copy(f"{bucket}/atlas", f"{bucket}/atlas3", recursive=True)
    r = convert_on_cluster(ALL)
    assert "4 converted, 3 skipped, 0 failed" in r.stderr, r.stderr
    return {"bucket": bucket, "atlas": url, "atlas3": f"s3://{bucket}/atlas3"}


# ------------------------------------------------------------------------------------ end to end


def test_s3_atlas_equals_local_atlas_and_numpy(s3_server, s3_atlases, local_atlas, files):
    atlas = bd.open_atlas(s3_atlases["atlas"], storage_options=s3_server.storage_options())
    assert len(atlas.experiments) == 7
    cols = ["experimentId", "species", "n_cells", "n_genes", "nnz", "source_sha256"]
    pd.testing.assert_frame_equal(atlas.experiments[cols], local_atlas.experiments[cols])
    for flt, genes, by in [
        ("speciesId == 9606", HUMAN_GENES, ["cellTypeId"]),
        ("cellTypeId != 'GO:0005575' and libID != 'SRXT010003'", None, ["cellTypeId", "experimentId"]),
    ]:
        got = atlas.query(flt, genes=genes).aggregate(by=by, stats=["sum", "mean", "var", "n_expressed"])
        expected = local_atlas.query(flt, genes=genes).aggregate(by=by, stats=["sum", "mean", "var", "n_expressed"])
        assert got.sizes["group"] > 3
        assert_same_result(got, expected)
    got = atlas.query("speciesId == 9606", genes=HUMAN_GENES).aggregate(by="cellTypeId", stats=["sum", "n_expressed"])
    check_against_numpy(got, numpy_reference([files[k] for k in ALL[:4]], HUMAN_GENES))
    # the cells themselves
    obs_s3 = atlas.query(B_CELLS).obs()
    obs_local = local_atlas.query(B_CELLS).obs()
    pd.testing.assert_frame_equal(obs_s3.astype(str), obs_local.astype(str))


def test_cli_query_with_env_credentials(s3_server, s3_atlases, local_atlas, tmp_path):
    out = tmp_path / "r.parquet"
    r = _cli(
        "query",
        s3_atlases["atlas"],
        "--filter",
        "speciesId == 10090",
        "--by",
        "cellTypeId,anatEntityId",
        "--out",
        str(out),
        "--workers",
        "1",
        "--no-progress",
        env=s3_server.env(),
    )
    assert r.returncode == 0, r.stderr
    expected = local_atlas.query("speciesId == 10090").aggregate(by=["cellTypeId", "anatEntityId"])
    got = pd.read_parquet(out)
    pd.testing.assert_frame_equal(
        got.astype({c: str for c in ("cellTypeId", "anatEntityId", "gene")}).reset_index(drop=True),
        _long(expected)[got.columns].astype({c: str for c in ("cellTypeId", "anatEntityId", "gene")}),
        check_exact=True,
        check_dtype=False,
    )
    r = _cli("info", s3_atlases["atlas"], env=s3_server.env())
    assert r.returncode == 0 and "7 experiments" in r.stdout


def test_generic_fsspec_url_memory(files, local_atlas3):
    # any fsspec URL works; memory:// lives in this process, so convert and query run here too
    url = f"memory://bgee-{uuid.uuid4().hex[:8]}/atlas"
    reports = bd.convert([files["SRPT00004"], files["SRPT00007"]], url, workers=1, progress=False)
    assert [r.status for r in reports] == ["converted", "converted"]
    atlas = bd.open_atlas(url)
    flt = "experimentId in ['SRPT00004', 'SRPT00007']"
    assert_same_result(atlas.query(flt).aggregate(by="cellTypeId"), local_atlas3.query(flt).aggregate(by="cellTypeId"))


# ------------------------------------------------------------------------------------ requests


def _measure(url, options, client, flt, genes):
    """Requests (and bytes) of open_atlas, of planning a query, and of running it (client vs workers)."""
    client.run(install_request_counter)
    client.run(_clear_open_stores)
    client.run(take_request_counts)
    install_request_counter()
    forget_cached_tables()  # measure a first open in this process
    take_request_counts()
    t0 = time.perf_counter()
    atlas = bd.open_atlas(url, storage_options=options)
    opened = take_request_counts()
    q = atlas.query(flt, genes=genes, client=client)
    planned = take_request_counts()
    ds = q.aggregate(by="cellTypeId")
    seconds = time.perf_counter() - t0
    in_client = take_request_counts()
    on_workers = _sum_counts(client.run(take_request_counts))
    return {
        "open": opened,
        "plan": planned,
        "compute_client": in_client,
        "compute_workers": on_workers,
        "stores": len(q.plan.experiments),
        "blocks": len(q.plan.tasks),
        "seconds": round(seconds, 2),
        "result": ds,
    }


def test_open_and_query_cost_a_fixed_number_of_requests(
    s3_server, s3_atlases, dask_cluster_procs, local_atlas, local_atlas3
):
    options = s3_server.storage_options()
    measured = {}
    with dask_cluster_procs.client() as client:
        for name in ("atlas3", "atlas"):
            for label, flt, genes in [("one store", ONE_STORE_FILTER, None), ("B cells", B_CELLS, HUMAN_GENES)]:
                m = _measure(s3_atlases[name], options, client, flt, genes)
                measured[(name, label)] = m
                # the client reads the catalog, and only the catalog: 2 GETs to open, 2 more to plan
                assert m["open"][0] == {"GetObject": 2}, m["open"]
                assert m["plan"][0] == {"GetObject": 2}, m["plan"]
                assert m["compute_client"][0] == {}, m["compute_client"]
                # the stores are read by the workers
                assert m["compute_workers"][0].get("GetObject", 0) >= 2 * m["stores"]
                assert set(m["compute_workers"][0]) == {"GetObject"}, m["compute_workers"]
                local = local_atlas3 if name == "atlas3" else local_atlas
                expected = local.query(flt, genes=genes).aggregate(by="cellTypeId")
                assert_same_result(m["result"], expected)
                # opened again, the unchanged catalog (same catalog_id) costs its header only
                take_request_counts()
                again = bd.open_atlas(s3_atlases[name], storage_options=options)
                assert take_request_counts()[0] == {"GetObject": 1}
                again.query(flt, genes=genes, client=client)
                assert take_request_counts()[0] == {}
    for label in ("one store", "B cells"):
        small, big = measured[("atlas3", label)], measured[("atlas", label)]
        assert small["open"][0] == big["open"][0]
        assert big["open"][1] < 3 * small["open"][1]  # header + experiments table: a few KB either way
    # the same single store read in both atlases: the same requests, whatever else the atlas holds
    assert measured[("atlas3", "one store")]["compute_workers"] == measured[("atlas", "one store")]["compute_workers"]
    print("\nS3 requests (count by operation, bytes):")
    for (name, label), m in measured.items():
        print(
            f"  {name:7s} {label:9s} open={m['open']} plan={m['plan']} client-compute={m['compute_client']} "
            f"workers={m['compute_workers']} stores={m['stores']} blocks={m['blocks']} {m['seconds']}s"
        )


# ------------------------------------------------------------------------------------ errors


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("bgee-dask: error:")]
    assert len(errors) == 1, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def test_wrong_credentials_are_one_clear_error(s3_server, s3_atlases, files, tmp_path):
    t0 = time.monotonic()
    for wrong in ("secret", "key"):
        options = s3_server.storage_options(**{wrong: "not-the-right-one"})
        with pytest.raises(StorageAccessError, match="access denied") as ei:
            bd.open_atlas(s3_atlases["atlas"], storage_options=options)
        assert "credentials" in str(ei.value) and len(str(ei.value).splitlines()) == 1
    env = {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "not-the-right-one"}
    _one_line_error(_cli("info", s3_atlases["atlas"], env=env), "access denied")
    _one_line_error(
        _cli("query", s3_atlases["atlas"], "--by", "cellTypeId", "--out", str(tmp_path / "r.csv"), env=env),
        "access denied",
    )
    r = _cli("convert", files["SRPT00004"], "--out", f"s3://{s3_atlases['bucket']}/other", env=env)
    _one_line_error(r, "access denied")
    assert "converted" not in r.stdout  # the preflight stops it before any file is read
    # the API checks the same before starting anything
    options = s3_server.storage_options(secret="not-the-right-one")
    with pytest.raises(StorageAccessError, match="access denied"):
        bd.convert(files["SRPT00004"], f"s3://{s3_atlases['bucket']}/other", storage_options=options, workers=1)
    assert time.monotonic() - t0 < 60


def test_missing_bucket_is_one_clear_error(s3_server, files, tmp_path):
    url = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/atlas"
    with pytest.raises(StorageAccessError, match="does not exist"):
        bd.open_atlas(url, storage_options=s3_server.storage_options())
    _one_line_error(_cli("info", url, env=s3_server.env()), "bucket", "does not exist")
    t0 = time.monotonic()
    r = _cli("convert", files["SRPT00004"], "--out", url, env=s3_server.env())
    _one_line_error(r, "does not exist")
    assert time.monotonic() - t0 < 30  # the preflight fails before any conversion starts
    assert "converted" not in r.stdout
    # an existing bucket without an atlas is a different, equally clear message
    bucket = s3_server.make_bucket(f"empty-{uuid.uuid4().hex[:8]}")
    with pytest.raises(FileNotFoundError, match="not a bgee-dask atlas"):
        bd.open_atlas(f"s3://{bucket}/nothing", storage_options=s3_server.storage_options())


@pytest.fixture
def silent_endpoint():
    """A TCP port that accepts connections and never answers (a hung proxy or server)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for c in held:
        c.close()
    server.close()


def test_unreachable_or_silent_endpoint_fails_in_bounded_time(s3_server, silent_endpoint):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    t0 = time.monotonic()
    with pytest.raises(StorageAccessError, match="cannot reach the object store"):
        bd.open_atlas(
            "s3://any-bucket/atlas", storage_options=s3_server.storage_options(client_kwargs={"endpoint_url": refused})
        )
    assert time.monotonic() - t0 < 15
    # silent: the defaults give up after 8 x read_timeout; a 1 s read timeout keeps the test short
    t0 = time.monotonic()
    with pytest.raises(StorageAccessError, match="cannot reach the object store"):
        bd.open_atlas(
            "s3://any-bucket/atlas",
            storage_options=s3_server.storage_options(
                client_kwargs={"endpoint_url": silent_endpoint}, config_kwargs={"read_timeout": 1}
            ),
        )
    assert time.monotonic() - t0 < 8 * 1 + 10
    env = {**s3_server.env(), "AWS_ENDPOINT_URL": refused}
    _one_line_error(_cli("info", "s3://any-bucket/atlas", env=env), "cannot reach")


def test_default_storage_options(monkeypatch):
    loc = AtlasLocation("s3://b/p", {"key": "k", "secret": "s", "config_kwargs": {"read_timeout": 30}})
    assert loc.storage_options["max_concurrency"] == 1
    assert loc.storage_options["config_kwargs"]["read_timeout"] == 30  # the caller's value wins
    assert loc.storage_options["config_kwargs"]["connect_timeout"] == S3_DEFAULTS["config_kwargs"]["connect_timeout"]
    assert AtlasLocation("/tmp/x", None).storage_options == {}
    for k, v in {
        "AWS_ACCESS_KEY_ID": "id",
        "AWS_SECRET_ACCESS_KEY": "sec",
        "AWS_SESSION_TOKEN": "tok",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:1",
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    loc = AtlasLocation("s3://b/p")
    assert (loc.storage_options["key"], loc.storage_options["secret"], loc.storage_options["token"]) == (
        "id",
        "sec",
        "tok",
    )
    assert loc.endpoint == "http://127.0.0.1:1"
    # options travel with the tasks to the workers
    import pickle

    assert pickle.loads(pickle.dumps(loc)).storage_options == loc.storage_options
