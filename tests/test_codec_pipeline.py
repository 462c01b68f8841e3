"""The codec pipeline chosen per process: it reaches the workers the process starts, and answers as zarr's own does.

The whole suite also runs with the zarrs pipeline in CI (``ZARR_CODEC_PIPELINE__PATH``, see
``.ci/run``), against the same references; this module checks how the choice is made.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from bgee_dask.cli import main
from bgee_dask.format import codec_pipeline
from bgee_dask.format.codec_pipeline import PIPELINES, use_codec_pipeline
from tests.conftest import MARKER_GENES
from tests.fresh_python import python_json


def test_unknown_or_missing_pipelines_are_one_line_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown codec pipeline 'blosc': choose one of zarr, zarrs"):
        use_codec_pipeline("blosc")
    monkeypatch.setattr(codec_pipeline.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install 'bgee-dask\[zarrs\]'"):
        use_codec_pipeline("zarrs")


def _answer_in_fresh_process(pipeline: str, atlas: str) -> dict:
    """Pipeline names in the client and in a local cluster's two workers, and a query's values, in a fresh process.

    A fresh process because zarr's configuration is process-global; ``use_codec_pipeline`` there
    overrides whatever the environment chose.
    """
    return python_json(f"""
import json
import numpy as np
import bgee_dask as bd
from bgee_dask._runtime import local_client
from bgee_dask.format.codec_pipeline import codec_pipeline_in_use

bd.use_codec_pipeline({pipeline!r})
with local_client(2) as client:
    workers = sorted(set(client.run(codec_pipeline_in_use).values()))
    ds = bd.open_atlas({atlas!r}).query(genes={MARKER_GENES!r}).aggregate(
        by=["experimentId", "cellTypeId"], stats=["sum", "var", "n_expressed"]
    )
print(json.dumps({{"client": codec_pipeline_in_use(), "workers": workers,
                  **{{s: np.nan_to_num(ds[s].values, nan=-1).tolist() for s in ("sum", "var", "n_expressed")}}}}))
""")


def test_the_choice_reaches_a_local_clusters_workers_and_answers_alike(four_file_atlas):
    answers = {name: _answer_in_fresh_process(name, str(four_file_atlas)) for name in PIPELINES}
    for name, got in answers.items():
        assert got["client"] == name and got["workers"] == [name]
    import bgee_dask as bd

    ds = (
        bd.open_atlas(four_file_atlas)
        .query(genes=MARKER_GENES)
        .aggregate(by=["experimentId", "cellTypeId"], stats=["sum", "var", "n_expressed"])
    )
    for got in answers.values():
        for stat in ("sum", "var", "n_expressed"):
            np.testing.assert_array_equal(np.array(got[stat]), np.nan_to_num(ds[stat].values, nan=-1), err_msg=stat)


def test_cli_option_gives_the_same_table(four_file_atlas, tmp_path):
    """``--codec-pipeline zarrs`` on a query: the same CSV as zarr's own pipeline writes (run as a command)."""
    tables = {}
    for name in PIPELINES:
        out = tmp_path / f"{name}.csv"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "bgee_dask.cli",
                "query",
                str(four_file_atlas),
                "--by",
                "cellTypeId",
                "--genes",
                ",".join(MARKER_GENES),
                "--workers",
                "1",
                "--codec-pipeline",
                name,
                "--out",
                str(out),
                "--no-progress",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        tables[name] = out.read_text()
    assert tables["zarr"] == tables["zarrs"]
    assert len(tables["zarr"].splitlines()) > 1


def test_cli_refuses_an_unknown_pipeline(four_file_atlas, capsys):
    with pytest.raises(SystemExit):
        main(["query", str(four_file_atlas), "--by", "cellTypeId", "--codec-pipeline", "blosc"])
    assert "invalid choice: 'blosc'" in capsys.readouterr().err


def test_zarrs_converts_what_zarr_reads_back(four_files, tmp_path):
    """An atlas written under zarrs holds the same X as one written under zarr's own pipeline."""
    out = tmp_path / "atlas"
    got = python_json(f"""
import json
import bgee_dask as bd
bd.use_codec_pipeline("zarrs")
reports = bd.convert({four_files[:2]!r}, {str(out)!r}, workers=1, progress=False)
print(json.dumps([r.status for r in reports]))
""")
    assert got == ["converted", "converted"]
    import anndata as ad

    import bgee_dask as bd

    adata = bd.open_atlas(out).query().to_anndata()
    for path in four_files[:2]:
        source = ad.read_h5ad(path)
        sub = adata[adata.obs["experimentId"] == path.split("/")[-1].split("_")[2]]
        assert sorted(sub.obs_names) == sorted(source.obs_names)
        cols = sub.var_names.get_indexer(source.var_names)
        assert (cols >= 0).all()
        assert abs(sub.X[:, cols] - source[sub.obs_names].X).max() == 0
