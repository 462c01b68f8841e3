"""The commands that answer biologists' questions (query --out .h5ad, expression, values, info) read back and
compared, and dot plots rendered and their labels read from the matplotlib figure."""

from __future__ import annotations

import argparse
import io
import os

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import bgee_dask as bd
import bgee_dask.query.plot as plot_module
from bgee_dask.cli import _parser, main
from bgee_dask.query.dotplot import dot_plot_figure


@pytest.fixture(scope="module")
def atlas_dir(four_file_atlas):
    return str(four_file_atlas)


@pytest.fixture(scope="module")
def source_obs(four_files) -> pd.DataFrame:
    frames = []
    for f in four_files:
        a = ad.read_h5ad(f, backed="r")
        obs = a.obs.copy()
        obs["experimentId"] = os.path.basename(f).split("_")[2]
        frames.append(obs)
        a.file.close()
    return pd.concat(frames)


def test_query_out_h5ad_writes_the_pseudobulk(atlas_dir, source_obs, tmp_path, capsys):
    out = tmp_path / "pb.h5ad"
    flt = "speciesId == 10090 and experimentId == 'SRPT00007'"
    args = ["query", atlas_dir, "--filter", flt, "--by", "cellTypeId,anatEntityId", "--out", str(out)]
    assert main([*args, "--min-cells", "8", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    got = ad.read_h5ad(out)
    want = bd.open_atlas(atlas_dir).query(flt).pseudobulk(["cellTypeId", "anatEntityId"], min_cells=8)
    np.testing.assert_array_equal(got.X, want.X)
    assert list(got.var_names) == list(want.var_names) and list(got.obs_names) == list(want.obs_names)
    pd.testing.assert_frame_equal(got.obs, want.obs, check_dtype=False, check_categorical=False)
    np.testing.assert_array_equal(got.layers["psbulk_props"], want.layers["psbulk_props"])
    # group sizes from the source cells; groups under 8 cells listed, not kept
    cells = source_obs[source_obs["experimentId"] == "SRPT00007"].groupby(["cellTypeId", "anatEntityId"], observed=True)
    sizes = {k: len(v) for k, v in cells.indices.items()}
    kept = {k: n for k, n in sizes.items() if n >= 8}
    assert (
        dict(zip(zip(got.obs["cellTypeId"], got.obs["anatEntityId"], strict=True), got.obs["n_cells"], strict=True))
        == kept
    )
    assert len(got.uns["groups_below_min_cells"]) == len(sizes) - len(kept) > 0
    assert f"pseudobulk: {len(kept)} groups x {got.n_vars} genes" in printed


def test_query_min_cells_and_bad_outputs_fail_before_computing(atlas_dir, tmp_path, capsys, monkeypatch):
    import bgee_dask.api.query as query_module

    def no_compute(*args, **kwargs):
        raise AssertionError("computed before checking the output")

    monkeypatch.setattr(query_module.Query, "aggregate", no_compute)
    assert main(["query", atlas_dir, "--by", "cellTypeId", "--out", str(tmp_path / "r.csv"), "--min-cells", "5"]) == 2
    assert "--min-cells applies to the pseudobulk" in capsys.readouterr().err
    missing = tmp_path / "no" / "such" / "pb.h5ad"
    assert main(["query", atlas_dir, "--by", "cellTypeId", "--out", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["expression", atlas_dir, "LYZ", "--out", str(tmp_path / "t.xlsx")]) == 2
    assert "unknown output format" in capsys.readouterr().err


def test_expression_command_prints_and_writes_the_table(atlas_dir, tmp_path, capsys):
    assert main(["expression", atlas_dir, "LYZ,CD3E", "Lyz2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    table = bd.open_atlas(atlas_dir).expression(["LYZ", "CD3E", "Lyz2"])
    # one block per gene, the groups by name with their numbers
    assert printed.index("LYZ") < printed.index("CD3E") < printed.index("Lyz2")
    top = table[table["gene"] == "Lyz2"].iloc[0]
    line = next(x for x in printed.splitlines() if x.strip().startswith(f"Mus musculus | {top['anatEntityName']} | "))
    assert top["cellTypeName"] in line and f"{top['frac_expressed']:.1%}" in line
    unmeasured = table[(table["gene"] == "LYZ") & (table["n_measured"] == 0)]
    assert f"not measured in {len(unmeasured)} groups ({int(unmeasured['n_cells'].sum()):,} cells)" in printed

    out = tmp_path / "where.csv"
    png = tmp_path / "where.png"
    assert main(["expression", atlas_dir, "LYZ,CD3E", "Lyz2", "--out", str(out), "--plot", str(png)]) == 0
    got = pd.read_csv(out)
    assert list(got.columns) == list(table.columns) and len(got) == len(table)
    np.testing.assert_array_equal(got["n_measured"], table["n_measured"])
    np.testing.assert_allclose(got["mean_cp10k"], table["mean_cp10k"].astype(float), rtol=1e-12, equal_nan=True)
    assert list(got["cellTypeName"]) == list(table["cellTypeName"])
    assert png.stat().st_size > 10_000


def test_values_and_info_commands(atlas_dir, source_obs, capsys):
    assert main(["values", atlas_dir, "cellTypeId", "--filter", "speciesId == 9606"]) == 0
    printed = capsys.readouterr().out.splitlines()
    human = source_obs[source_obs["speciesId"] == 9606]
    counts = human.groupby(["cellTypeId", "cellTypeName"], observed=True).size().sort_values(ascending=False)
    body = printed[1 : 1 + len(counts)]
    for line, ((ct, name), n) in zip(body, counts.items(), strict=True):
        assert line.split()[0] == ct and name in line and f"{n:,}" in line.split()
    assert printed[-1] == f"{len(counts)} values, {len(human):,} cells"

    assert main(["values", atlas_dir, "libID", "--limit", "2", "--json"]) == 0
    records = pd.read_json(io.StringIO(capsys.readouterr().out))
    assert dict(zip(records["libID"], records["n_cells"], strict=True)) == source_obs["libID"].value_counts().to_dict()

    assert main(["info", atlas_dir]) == 0
    info = capsys.readouterr().out
    line = next(x for x in info.splitlines() if x.startswith("columns to filter and group on:"))
    for c in ("cellTypeId", "anatEntityId", "stageId", "libID", "experimentId", "cellTypeAuthorAnnotation"):
        assert c in line


def test_every_argument_has_help():
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        for action in command._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"{name} {action.dest}"


def test_query_plot_shows_normalized_means_by_default(atlas_dir, tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(plot_module, "dot_plot", lambda ds, path, **kw: drawn.append(ds))
    out = tmp_path / "r.csv"
    args = ["query", atlas_dir, "--genes", "LYZ,CD3E", "--by", "cellTypeId", "--out", str(out), "--plot", "p.png"]
    assert main(args) == 0
    assert drawn[-1].attrs["normalize"] == "log1p_cp10k"
    raw = bd.open_atlas(atlas_dir).query(genes=["LYZ", "CD3E"]).aggregate(by="cellTypeId", stats=["mean"])
    table = pd.read_csv(out)
    np.testing.assert_allclose(table["mean"], raw["mean"].values.reshape(-1), rtol=1e-12, equal_nan=True)
    assert main([*args, "--normalize", "cp10k"]) == 0
    assert drawn[-1].attrs["normalize"] == "cp10k"


def _texts(items) -> list[str]:
    return [t.get_text() for t in items]


def test_dot_plot_labels_rows_by_names_with_cell_counts(atlas_dir, source_obs):
    import matplotlib.pyplot as plt

    genes = ["LYZ", "CD3E", "Lyz2"]
    ds = bd.open_atlas(atlas_dir).query(genes=genes).aggregate(by=["cellTypeId", "anatEntityId"], normalize="cp10k")
    fig = dot_plot_figure(ds)
    try:
        ax = fig.axes[0]
        sizes = source_obs.groupby(["cellTypeName", "anatEntityName"], observed=True).size()
        want = {f"{ct} | {t}  ({n:,} cells)" for (ct, t), n in sizes.items()}
        assert set(_texts(ax.get_yticklabels())) == want
        assert _texts(ax.get_xticklabels()) == genes
        legend = _texts(fig.legends[0].get_texts())
        assert legend[0] == "not measured" and legend[1:] == ["25%", "50%", "100%"]
        crosses = next(c for c in ax.collections if c.get_label() == "not measured")
        assert len(crosses.get_offsets()) == int(np.isnan(ds["mean"].values).sum())
        assert ax.get_title() == "cell type x tissue"
        assert fig.axes[1].get_ylabel() == "mean counts per 10k"
    finally:
        plt.close(fig)


def test_dot_plot_says_how_genes_were_chosen_and_which_groups_were_left_out(atlas_dir, tmp_path):
    import matplotlib.pyplot as plt

    q = bd.open_atlas(atlas_dir).query("experimentId == 'SRPT00007'")
    ds = q.aggregate(by=["cellTypeId", "libID"], stats=["mean", "frac_expressed"], normalize="log1p_cp10k")
    fig = dot_plot_figure(ds, max_genes=12, max_groups=10)
    try:
        ax = fig.axes[0]
        n_genes, n_groups = ds.sizes["gene"], ds.sizes["group"]
        assert f"12 of {n_genes:,} genes, chosen automatically: largest spread of the mean" in ax.get_title()
        assert len(ax.get_xticklabels()) == 12 and len(ax.get_yticklabels()) == 10
        note = fig.get_supxlabel()
        assert f"{n_groups - 10} of {n_groups} groups left out" in note and "the 10 with the most cells" in note
        # the 10 drawn groups are the largest ones
        cells = np.sort(ds["n_cells"].values)[::-1]
        drawn = [int(t.rsplit("(", 1)[1].split()[0].replace(",", "")) for t in _texts(ax.get_yticklabels())]
        assert sorted(drawn, reverse=True) == cells[:10].tolist()
        assert fig.axes[1].get_ylabel() == "mean log1p(counts per 10k)"
    finally:
        plt.close(fig)
    path = plot_module.dot_plot(ds, tmp_path / "dots.png", max_genes=12, max_groups=10)
    assert os.path.getsize(path) > 10_000
