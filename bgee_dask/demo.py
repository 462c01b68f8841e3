"""The README's first command: a whole tour on data generated here, so that no download is needed."""

from __future__ import annotations

import os
import time

from bgee_dask.api.atlas import open_atlas
from bgee_dask.api.convert import convert
from bgee_dask.query.export import write_result
from bgee_dask.query.plot import dot_plot
from bgee_dask.synthetic import generate_sources

#: Marker genes of the generator are not named; the demo shows the genes that vary most instead.
DEMO_EXPERIMENTS = 6
DEMO_CELLS = (1500, 4000)
DEMO_GENES = 8000


def run_demo(workdir: str | os.PathLike = "bgee-demo", *, workers: int | None = None) -> int:
    """Generate Bgee-like files, convert and query them with Dask on this machine, write a table and a plot."""
    workdir = os.fspath(workdir)
    sources = os.path.join(workdir, "h5ad")
    atlas_dir = os.path.join(workdir, "atlas")
    t0 = time.perf_counter()
    if not os.path.isdir(sources) or not any(f.endswith(".h5ad") for _, _, fs in os.walk(sources) for f in fs):
        print(f"1/4 generating {DEMO_EXPERIMENTS} Bgee-like experiments in {sources}")
        generate_sources(
            sources,
            n_experiments=DEMO_EXPERIMENTS,
            cells_per_experiment=DEMO_CELLS,
            n_genes_universe=DEMO_GENES,
            mean_detected_genes=800,
            seed=7,
        )
    else:
        print(f"1/4 reusing the Bgee-like experiments in {sources}")
    print(f"2/4 converting into the atlas {atlas_dir} (Dask tasks on the threads of this process)")
    reports = convert(sources, atlas_dir, workers=workers)
    failed = [r for r in reports if not r.ok]
    for r in reports:
        print("   ", r.line())
    if failed:
        return 1
    atlas = open_atlas(atlas_dir)
    e = atlas.experiments
    print(
        f"3/4 atlas: {len(e)} experiments, {int(e['n_cells'].sum()):,} cells, species {sorted(e['species'].unique())}"
    )
    query = atlas.query("speciesId == 9606 and cellTypeId != 'GO:0005575'")
    ds = query.aggregate(by=["cellTypeId", "anatEntityId"], normalize="log1p_cp10k")
    table = os.path.join(workdir, "pseudobulk_human.csv")
    plot = os.path.join(workdir, "dotplot_human.png")
    write_result(ds, table)
    dot_plot(ds, plot, max_genes=25)
    print(f"4/4 pseudobulk of human cells by cell type x tissue: {ds.sizes['group']} groups x {ds.sizes['gene']} genes")
    print(f"    table -> {table}\n    dot plot -> {plot}")
    print(f"done in {time.perf_counter() - t0:.0f}s")
    return 0
