"""The query command and the demo, as a user runs them."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import bgee_dask as bd
from bgee_dask.cli import main


@pytest.fixture(scope="module")
def small_atlas(tmp_path_factory, bgee_sources):
    out = tmp_path_factory.mktemp("cli-atlas")
    files = [str(bgee_sources[k]) for k in ("SRPT00003", "SRPT00004", "SRPT00005", "SRPT00007")]
    reports = bd.convert(files, out, workers=1, progress=False)
    assert all(r.status == "converted" for r in reports)
    return out


def _api_result(atlas_dir, flt, genes, by):
    return bd.open_atlas(atlas_dir).query(flt, genes=genes).aggregate(by=by)


@pytest.mark.parametrize("ext", [".csv", ".parquet", ".nc"])
def test_query_writes_each_format(small_atlas, tmp_path, ext, capsys):
    genes = ["CD3E", "MS4A1", "LYZ"]
    out = tmp_path / f"result{ext}"
    rc = main(
        [
            "query",
            str(small_atlas),
            "--filter",
            "speciesId == 9606",
            "--genes",
            ",".join(genes),
            "--by",
            "cellTypeId,libID",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    assert "groups" in capsys.readouterr().out
    ds = _api_result(small_atlas, "speciesId == 9606", genes, ["cellTypeId", "libID"])
    if ext == ".nc":
        got = xr.open_dataset(out)
        np.testing.assert_allclose(got["mean"].values, ds["mean"].values, equal_nan=True)
        assert list(got["cellTypeId"].values) == [str(v) for v in ds["cellTypeId"].values]
        return
    frame = pd.read_csv(out) if ext == ".csv" else pd.read_parquet(out)
    assert len(frame) == ds.sizes["group"] * ds.sizes["gene"]
    for i in range(ds.sizes["group"]):
        for j, gene in enumerate(ds["gene"].values):
            row = frame[
                (frame["cellTypeId"] == ds["cellTypeId"].values[i])
                & (frame["libID"] == ds["libID"].values[i])
                & (frame["gene"] == gene)
            ]
            assert len(row) == 1
            assert row["sum"].iloc[0] == pytest.approx(ds["sum"].values[i, j], nan_ok=True)
            assert row["n_cells"].iloc[0] == ds["n_cells"].values[i]


def test_query_plot_is_a_png(small_atlas, tmp_path):
    png = tmp_path / "dots.png"
    rc = main(
        [
            "query",
            str(small_atlas),
            "--by",
            "cellTypeId",
            "--genes",
            "CD3E,LYZ,MS4A1",
            "--out",
            str(tmp_path / "r.csv"),
            "--plot",
            str(png),
            "--normalize",
            "log1p_cp10k",
        ]
    )
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 5000


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--filter", "cellTypeId == "], "position"),
        (["--filter", "celltypeid == 'x'"], "celltypeid"),
        (["--genes", "NOT_A_GENE"], "NOT_A_GENE"),
        (["--stats", "median"], "median"),
        (["--scheduler", "tcp://127.0.0.1:9", "--memory-limit", "1GB"], "--memory-limit"),  # not silently ignored
        (["--scheduler", "tcp://127.0.0.1:9", "--cluster", "slurm"], "choose one of"),
        (["--queue", "short"], "only apply with --cluster"),
    ],
)
def test_query_errors_are_one_line(small_atlas, tmp_path, capsys, args, needle):
    rc = main(["query", str(small_atlas), "--by", "cellTypeId", "--out", str(tmp_path / "r.csv"), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err
    assert err.startswith("bgee-dask: error:")
    assert "Traceback" not in err


def test_query_unknown_output_format(small_atlas, tmp_path, capsys):
    rc = main(["query", str(small_atlas), "--by", "cellTypeId", "--out", str(tmp_path / "r.xlsx")])
    assert rc == 2
    assert "r.xlsx" in capsys.readouterr().err


def test_demo_command_runs_on_generated_data(tmp_path):
    """The README's first command, as a subprocess: generated data, local cluster, table and plot."""
    proc = subprocess.run(
        [sys.executable, "-m", "bgee_dask.cli", "demo", "--dir", str(tmp_path / "demo"), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = pd.read_csv(tmp_path / "demo" / "pseudobulk_human.csv")
    assert {"cellTypeId", "anatEntityId", "gene", "mean", "var", "frac_expressed"} <= set(table.columns)
    assert (tmp_path / "demo" / "dotplot_human.png").stat().st_size > 5000
    # the demo's table agrees with a direct query of the atlas it built
    ds = (
        bd.open_atlas(tmp_path / "demo" / "atlas")
        .query("speciesId == 9606 and cellTypeId != 'GO:0005575'")
        .aggregate(by=["cellTypeId", "anatEntityId"], normalize="log1p_cp10k")
    )
    assert len(table) == ds.sizes["group"] * ds.sizes["gene"]
    assert table["n_cells"].groupby([table["cellTypeId"], table["anatEntityId"]]).first().sum() == int(
        ds["n_cells"].sum()
    )
