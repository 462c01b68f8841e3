"""The ``bgee-dask convert`` and ``info`` commands, in-process and as a real subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import h5py
import pandas as pd
import pytest

from bgee_dask.cli import main

from . import make_inputs as mi
from .fresh_python import python_json

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SMALL = ["SRPT00004", "SRPT00005", "SRPT00007"]


def _totals(paths) -> tuple[int, int]:
    cells = nnz = 0
    for p in paths:
        with h5py.File(p, "r") as f:
            cells += int(f["X"].attrs["shape"][0])
            nnz += int(f["X/data"].shape[0])
    return cells, nnz


def _convert(capsys, *args) -> tuple[int, str, str]:
    code = main(["convert", *map(str, args), "--workers", "1", "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def _experiments(atlas: Path) -> list[str]:
    return sorted(pd.read_parquet(mi.catalog_table(atlas, "experiments.parquet"))["experimentId"])


def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "convert" in out and "info" in out
    for cmd in ("convert", "info"):
        with pytest.raises(SystemExit) as info:
            main([cmd, "--help"])
        assert info.value.code == 0
        assert "--json" in capsys.readouterr().out


def test_convert_all_good_then_info(tmp_path, capsys, bgee_sources):
    files = [bgee_sources[k] for k in SMALL]
    atlas = tmp_path / "atlas"
    code, out, err = _convert(capsys, *files, "--out", atlas)
    assert code == 0, err
    assert sum(line.startswith("converted ") for line in out.splitlines()) == 3
    assert "FAILED" not in err
    assert _experiments(atlas) == SMALL
    stored = mi.check_store(
        mi.store_path(atlas, "Mus_musculus", "SRPT00007"),
        bgee_sources["SRPT00007"],
        layout="doc",
        experiment_id="SRPT00007",
    )
    mi.check_catalog(atlas, stored, species="Mus_musculus", experiment_id="SRPT00007", layout="doc")

    assert main(["info", str(atlas), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    cells, nnz = _totals(files)
    assert summary["n_experiments"] == 3
    assert summary["n_cells"] == cells and summary["nnz"] == nnz
    assert summary["species"] == ["Homo_sapiens", "Mus_musculus"]
    rows = {r["experimentId"]: r for r in summary["experiments"]}
    assert sorted(rows) == SMALL
    for exp, path in zip(SMALL, files, strict=True):
        c, z = _totals([path])
        assert (rows[exp]["n_cells"], rows[exp]["nnz"], rows[exp]["layout"]) == (c, z, "doc")
        assert rows[exp]["bytes"] > 0

    assert main(["info", str(atlas)]) == 0
    text = capsys.readouterr().out
    assert "3 experiments" in text and f"{cells:,} cells" in text
    for exp in SMALL:
        assert exp in text


def test_adding_an_id_named_experiment_keys_symbol_named_genes_by_id(tmp_path, capsys, bgee_sources):
    # SRPT00004 names its 230 genes by symbol; SRPT00001 names genes by Ensembl id, symbols in feature_name
    atlas = tmp_path / "atlas"
    assert _convert(capsys, bgee_sources["SRPT00004"], "--out", atlas)[0] == 0
    assert main(["info", str(atlas), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["experiments"][0]["n_genes_by_symbol"] == 0

    assert _convert(capsys, bgee_sources["SRPT00001"], "--out", atlas)[0] == 0  # only the catalog changes for 00004
    ids_var = ad.read_h5ad(bgee_sources["SRPT00001"], backed="r").var
    ids_of = ids_var.groupby(ids_var["feature_name"].astype(str), observed=True).apply(lambda g: set(g.index))
    symbol_var = ad.read_h5ad(bgee_sources["SRPT00004"], backed="r").var_names
    expected = sum(1 for g in symbol_var if g in ids_of.index and len(ids_of[g]) == 1 and g not in ids_var.index)
    assert expected > 200
    assert main(["info", str(atlas), "--json"]) == 0
    rows = {r["experimentId"]: r for r in json.loads(capsys.readouterr().out)["experiments"]}
    assert rows["SRPT00004"]["n_genes_by_symbol"] == expected and rows["SRPT00001"]["n_genes_by_symbol"] == 0
    assert main(["info", str(atlas)]) == 0
    text = capsys.readouterr().out
    assert "by symbol" in text.splitlines()[2]
    assert any(line.startswith("SRPT00004") and f" {expected:,} " in line for line in text.splitlines())


def test_convert_partial_failure_folders_recursive_and_overwrite(tmp_path, capsys, bgee_sources):
    src = tmp_path / "src"
    nested = src / "Homo_sapiens" / "deeper"
    nested.mkdir(parents=True)
    good = [shutil.copy(bgee_sources["SRPT00004"], nested), shutil.copy(bgee_sources["SRPT00007"], src)]
    bad = [
        mi.truncated(bgee_sources["SRPT00005"], src / "Mus_musculus" / mi.bgee_name("SRPT82001", "Mus_musculus")),
        mi.not_hdf5(nested / mi.bgee_name("SRPT82002")),
        mi.bad_value(src / "x" / "y" / mi.bgee_name("SRPT82003"), float("nan")),
    ]
    (src / "notes.txt").write_text("not an h5ad, ignored")
    atlas = tmp_path / "atlas"
    code, out, err = _convert(capsys, src, "--out", atlas)
    assert code != 0
    failed = [line for line in err.splitlines() if line.startswith("FAILED")]
    assert len(failed) == len(bad), err
    for path in bad:
        assert sum(str(path) in line for line in failed) == 1, (path, failed)
    assert "notes.txt" not in out + err
    assert "2 converted, 0 skipped, 3 failed" in err
    assert _experiments(atlas) == ["SRPT00004", "SRPT00007"]
    assert not [p for p in atlas.rglob("*SRPT8200*")]
    mi.assert_no_debris(atlas)
    mi.check_store(mi.store_path(atlas, "Homo_sapiens", "SRPT00004"), good[0], layout="doc", experiment_id="SRPT00004")

    # a second run skips the converted files; the bad ones fail again
    code, out, err = _convert(capsys, *good, "--out", atlas)
    assert code == 0, err
    assert sum(line.startswith("skipped") for line in out.splitlines()) == 2
    shard = mi.store_path(atlas, "Homo_sapiens", "SRPT00004") / "X" / "data" / "c" / "0"
    before = shard.stat().st_mtime_ns
    code, out, err = _convert(capsys, good[0], "--out", atlas, "--overwrite")
    assert code == 0, err
    assert out.startswith("converted ")
    new_shard = mi.store_path(atlas, "Homo_sapiens", "SRPT00004") / "X" / "data" / "c" / "0"
    assert new_shard != shard and not shard.exists()  # a new version; the replaced one removed
    assert new_shard.stat().st_mtime_ns != before
    mi.assert_no_debris(atlas)
    mi.check_store(mi.store_path(atlas, "Homo_sapiens", "SRPT00004"), good[0], layout="doc", experiment_id="SRPT00004")


def test_convert_same_experiment_twice_needs_overwrite(tmp_path, capsys, bgee_sources):
    atlas = tmp_path / "atlas"
    assert _convert(capsys, bgee_sources["SRPT00005"], "--out", atlas)[0] == 0
    code, _, err = _convert(capsys, bgee_sources["SRPT00005.D"], "--out", atlas)
    assert code != 0
    line = next(x for x in err.splitlines() if x.startswith("FAILED"))
    assert bgee_sources["SRPT00005"].name in line and str(bgee_sources["SRPT00005.D"]) in line
    code, _, err = _convert(capsys, bgee_sources["SRPT00005.D"], "--out", atlas, "--overwrite")
    assert code == 0, err
    e = pd.read_parquet(mi.catalog_table(atlas, "experiments.parquet"))
    assert e["layout"].tolist() == ["D"]


def test_convert_experiment_id_option(tmp_path, capsys):
    path, _ = mi.b_layout(tmp_path / "in" / "download.h5ad", exp=None)
    atlas = tmp_path / "atlas"
    code, _, err = _convert(capsys, path, "--out", atlas)
    assert code != 0 and "experiment id" in err
    code, _, err = _convert(capsys, path, "--out", atlas, "--experiment-id", "SRPT82004", "--json")
    assert code == 0, err
    assert _experiments(atlas) == ["SRPT82004"]


def test_json_reports(tmp_path, capsys, bgee_sources):
    bad = mi.not_hdf5(tmp_path / mi.bgee_name("SRPT82005"))
    code, out, _ = _convert(capsys, bgee_sources["SRPT00004"], bad, "--out", tmp_path / "atlas", "--json")
    assert code != 0
    reports = {Path(r["source"]).name: r for r in json.loads(out)}
    assert reports[bgee_sources["SRPT00004"].name]["status"] == "converted"
    assert reports[bad.name]["status"] == "failed" and "not an HDF5" in reports[bad.name]["message"]


def test_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "no-such-atlas")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("bgee-dask: error:") and "no-such-atlas" in err
    (tmp_path / "empty").mkdir()
    assert main(["info", str(tmp_path / "empty")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    code, _, err = _convert(capsys, tmp_path / "empty", "--out", tmp_path / "atlas")
    assert code == 2 and "no .h5ad files" in err
    assert not (tmp_path / "atlas").exists()  # nothing converted: no atlas folder created
    with pytest.raises(SystemExit) as info:
        main(["convert", str(tmp_path)])  # --out missing
    assert info.value.code == 2


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("bgee-dask")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("bgee-dask")
    return [found] if found else [sys.executable, "-m", "bgee_dask.cli"]


def test_real_subprocess_default_local_cluster(tmp_path, bgee_sources):
    """The installed command, with the default local cluster of worker processes."""
    src = tmp_path / "src"
    src.mkdir()
    files = [Path(shutil.copy(bgee_sources[k], src)) for k in ("SRPT00004", "SRPT00007")]
    bad = mi.not_hdf5(src / mi.bgee_name("SRPT82006"))
    atlas = tmp_path / "atlas"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = subprocess.run(
        [*_cli(), "convert", str(src), "--out", str(atlas), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 1, run.stderr
    failed = [line for line in run.stderr.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and str(bad) in failed[0]
    assert _experiments(atlas) == ["SRPT00004", "SRPT00007"]
    info = subprocess.run([*_cli(), "info", str(atlas), "--json"], capture_output=True, text=True, timeout=120, env=env)
    assert info.returncode == 0, info.stderr
    summary = json.loads(info.stdout)
    assert (summary["n_cells"], summary["nnz"]) == _totals(files)
    helped = subprocess.run([*_cli(), "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert helped.returncode == 0 and "convert" in helped.stdout
    missing = subprocess.run(
        [*_cli(), "info", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120, env=env
    )
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1


def _two_sources(tmp_path, seeds: tuple[int, int]) -> dict[str, object]:
    """Two small Bgee files, by experiment id."""
    return {
        f"SRPT0000{s}": mi.write(mi.make_adata(300, 80, seed=s), tmp_path / mi.bgee_name(f"SRPT0000{s}")) for s in seeds
    }


def _check_stores(out, sources: dict[str, object]) -> None:
    for exp, src in sources.items():
        mi.check_store(mi.store_path(out, "Homo_sapiens", exp), src, layout="doc", experiment_id=exp)


def test_kernels_are_loaded_before_the_first_file(tmp_path):
    """Files converted in this process start with numba's kernels loaded, and no warm-up thread beside them."""
    sources = _two_sources(tmp_path, (1, 2))
    srcs = list(sources.values())
    out = tmp_path / "atlas"
    got = python_json(
        "import json, threading\n"
        "import bgee_dask.api.convert as conv\n"
        "seen, real = [], conv.convert_file\n"
        "def spy(*a, **k):\n"
        "    from bgee_dask.converter import csr_kernels\n"
        "    warm_up = any(t.name == 'bgee-dask-warm-up' for t in threading.enumerate())\n"
        "    seen.append([len(csr_kernels.gather_value_range.signatures), warm_up])\n"
        "    return real(*a, **k)\n"
        "conv.convert_file = spy\n"
        f"reports = conv.convert({[str(s) for s in srcs]!r}, {str(out)!r}, progress=False)\n"
        "print(json.dumps({'status': [r.status for r in reports], 'seen': seen}))\n"
    )
    assert got == {"status": ["converted"] * 2, "seen": [[1, False]] * 2}
    _check_stores(out, sources)


def test_threaded_conversion_does_not_import_distributed(tmp_path):
    """Files run as Dask tasks in this process without importing distributed (its import delayed the first file)."""
    sources = _two_sources(tmp_path, (3, 4))
    out = tmp_path / "atlas"
    got = python_json(
        "import json, sys\n"
        "import bgee_dask\n"
        f"reports = bgee_dask.convert({[str(s) for s in sources.values()]!r}, {str(out)!r}, progress=True)\n"
        "print(json.dumps({'status': [r.status for r in reports], 'distributed': 'distributed' in sys.modules}))\n"
    )
    assert got == {"status": ["converted"] * 2, "distributed": False}
    _check_stores(out, sources)
