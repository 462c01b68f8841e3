"""Smoke tests proving the real services of tests/services.py work (SeaweedFS S3, dask processes, SLURM)."""

from __future__ import annotations

import os
import sys
import time

import pytest

pytestmark = pytest.mark.services


# ------------------------------------------------------------------------------------------------ S3


@pytest.mark.timeout(180)
def test_s3_put_get_with_s3fs(s3_server):
    import s3fs

    assert s3_server.endpoint_url.startswith("http://127.0.0.1:")
    bucket = s3_server.make_bucket("smoke-put-get")
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options())
    fs.pipe(f"{bucket}/dir/hello.txt", b"hello seaweed")
    assert fs.cat(f"{bucket}/dir/hello.txt") == b"hello seaweed"
    assert fs.ls(f"{bucket}/dir") == [f"{bucket}/dir/hello.txt"]
    with fs.open(f"{bucket}/big.bin", "wb") as f:  # multipart-sized write
        f.write(os.urandom(6 * 2**20))
    assert fs.size(f"{bucket}/big.bin") == 6 * 2**20
    # s3fs can create buckets itself too
    fs.mkdir("smoke-s3fs-made")
    fs.pipe("smoke-s3fs-made/x", b"1")
    assert "smoke-s3fs-made" in {p.rstrip("/") for p in fs.ls("")}


@pytest.mark.timeout(120)
def test_s3_many_buckets_with_data(s3_server):
    # each bucket with data takes its own volumes: make sure a suite can use more than a couple
    fs = s3_server.filesystem()
    for i in range(6):
        b = s3_server.make_bucket(f"smoke-many-{i}")
        fs.pipe(f"{b}/k", str(i).encode())
    assert [fs.cat(f"smoke-many-{i}/k") for i in range(6)] == [str(i).encode() for i in range(6)]


def test_s3_bucket_fixture(s3_bucket, s3_server):
    fs = s3_server.filesystem()
    fs.pipe(f"{s3_bucket}/a", b"x")
    assert fs.exists(f"{s3_bucket}/a")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("creds", ["wrong-secret", "wrong-key", "anonymous"])
def test_s3_wrong_credentials_fail_fast(s3_server, creds):
    import s3fs

    bucket = s3_server.make_bucket("smoke-private")
    s3_server.filesystem().pipe(f"{bucket}/secret.txt", b"top secret")
    opts = s3_server.storage_options(
        config_kwargs={"connect_timeout": 5, "read_timeout": 10, "retries": {"max_attempts": 1}}
    )
    if creds == "wrong-secret":
        opts["secret"] = "not-the-secret"
    elif creds == "wrong-key":
        opts["key"] = "no-such-key"
    else:
        opts.pop("key")
        opts.pop("secret")
        opts["anon"] = True
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    t0 = time.monotonic()
    with pytest.raises(PermissionError):
        fs.cat(f"{bucket}/secret.txt")
    with pytest.raises(PermissionError):
        fs.pipe(f"{bucket}/intruder.txt", b"x")
    assert time.monotonic() - t0 < 30
    # and boto3 sees a real auth error, not a hang
    from botocore.exceptions import ClientError

    if creds != "anonymous":
        client = s3_server.boto3_client(key=opts["key"], secret=opts["secret"])
        with pytest.raises(ClientError) as ei:
            client.list_objects_v2(Bucket=bucket)
        assert ei.value.response["Error"]["Code"] in {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
    assert not s3_server.filesystem().exists(f"{bucket}/intruder.txt")


def test_s3_env(s3_server):
    env = s3_server.env()
    assert env["AWS_ENDPOINT_URL"] == s3_server.endpoint_url
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (s3_server.key, s3_server.secret)


# ---------------------------------------------------------------------------------------------- dask


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("PPid:")))


@pytest.mark.timeout(180)
def test_dask_processes_compute_on_two_workers(dask_cluster_procs):
    import dask.array as da

    cl = dask_cluster_procs
    assert cl.address.startswith("tcp://127.0.0.1:")
    pids = cl.worker_pids
    assert sorted(pids) == ["w0", "w1"]
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
    for name, pid in pids.items():  # with a nanny, the worker is the nanny's child
        assert _ppid(pid) == cl.process_pids[name]
    with cl.client() as client:
        x = da.arange(10_000, chunks=1_000)
        assert int((x**2).sum().compute()) == sum(i * i for i in range(10_000))
        addrs = {w["address"]: name for name, w in cl.scheduler_workers().items()}
        ran = {}
        for addr, name in addrs.items():
            ran[name] = client.submit(os.getpid, workers=[addr], pure=False).result(timeout=30)
        assert ran == pids


@pytest.mark.timeout(180)
def test_dask_kill_worker_without_nanny(dask_cluster_factory):
    cl = dask_cluster_factory(n_workers=2, nanny=False)
    assert cl.worker_pids == cl.process_pids  # no nanny: the launched process is the worker
    with cl.client() as client:
        futs = client.map(lambda i: (time.sleep(0.3), i * 2)[1], range(20), pure=False)
        time.sleep(1.0)
        killed = cl.kill_worker("w0")
        assert sum(client.gather(futs)) == sum(i * 2 for i in range(20))
    deadline = time.monotonic() + 30
    while "w0" in cl.worker_pids and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sorted(cl.worker_pids) == ["w1"]
    assert not _alive(killed)


@pytest.mark.timeout(180)
def test_dask_kill_worker_with_nanny_restarts(dask_cluster_factory):
    cl = dask_cluster_factory(n_workers=2, nanny=True)
    before = cl.worker_pids
    killed = cl.kill_worker("w1")
    assert killed == before["w1"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = cl.worker_pids
        if "w1" in now and now["w1"] != killed:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"nanny did not restart w1: {cl.worker_pids}\n{cl.log_tails()}")
    assert now["w0"] == before["w0"]
    with cl.client() as client:
        assert client.submit(sum, [1, 2, 3]).result(timeout=30) == 6


# --------------------------------------------------------------------------------------------- SLURM


@pytest.mark.timeout(240)
def test_slurm_dask_jobqueue(slurm, tmp_path):
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    assert os.environ["SLURM_CONF"] == str(slurm.conf_path)
    assert slurm.node_state() == "idle"
    assert slurm.jobs() == []
    cluster = SLURMCluster(
        cores=1,
        processes=1,
        memory="2GB",
        queue="debug",
        interface="lo",
        python=sys.executable,
        walltime="00:15:00",
        log_directory=str(tmp_path / "logs"),
        local_directory=str(tmp_path / "scratch"),
        scheduler_options={"dashboard_address": "127.0.0.1:0"},
        worker_extra_args=["--no-dashboard", "--dashboard-address", "127.0.0.1:0"],
    )
    try:
        assert "#SBATCH -p debug" in cluster.job_script()
        cluster.scale(jobs=2)
        with Client(cluster, timeout=30) as client:
            client.wait_for_workers(2, timeout=120)
            job_ids = {str(job.job_id) for job in cluster.workers.values()}
            assert len(job_ids) == 2
            jobs = {j["id"]: j["state"] for j in slurm.jobs()}
            assert set(jobs) == job_ids, jobs
            assert set(jobs.values()) == {"RUNNING"}
            # the workers really are those SLURM jobs
            on_workers = client.run(lambda: os.environ.get("SLURM_JOB_ID"))
            assert set(on_workers.values()) == job_ids
            assert all(a.startswith("tcp://127.0.0.1:") for a in on_workers)
            import dask.array as da

            x = da.ones((2_000, 2_000), chunks=(500, 500))
            assert float(x.sum().compute()) == 4_000_000.0
    finally:
        cluster.close()
    deadline = time.monotonic() + 60
    left = slurm.jobs()
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = [j for j in slurm.jobs() if j["state"] not in {"COMPLETED", "CANCELLED"}]
    assert not left, f"jobs still there after close(): {left}\n{slurm.log_tail()}"


@pytest.mark.timeout(120)
def test_slurm_sbatch_plain(slurm, tmp_path):
    out = tmp_path / "out.txt"
    r = slurm.run("sbatch", "--parsable", "-o", str(out), "--wrap", "echo hello-from-slurm")
    job_id = r.stdout.strip().split(";")[0]
    assert job_id.isdigit()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if out.exists() and "hello-from-slurm" in out.read_text():
            break
        time.sleep(0.3)
    else:
        pytest.fail(f"sbatch job {job_id} produced no output\n{slurm.log_tail()}")
