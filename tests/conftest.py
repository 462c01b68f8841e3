"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["tests.fixtures_services"]

SHARED_BGEE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bgee"


@pytest.fixture(scope="session")
def bgee_data() -> Path:
    """The shared Bgee test files (../shared/data/bgee); missing data is a failure, not a skip."""
    if not (SHARED_BGEE / "Homo_sapiens").is_dir() or not (SHARED_BGEE / "variants").is_dir():
        pytest.fail(f"shared Bgee test data not found at {SHARED_BGEE}")
    return SHARED_BGEE


@pytest.fixture(scope="session")
def bgee_sources(bgee_data: Path) -> dict[str, Path]:
    """The 10 shared files by short name: SRPT00001..SRPT00007 (doc layout) and 00002.B, 00003.C, 00005.D."""
    files = sorted(bgee_data.glob("*/*.h5ad"))
    out = {}
    for f in files:
        exp = f.name.split("_")[2]
        variant = f.name.split(".")[-2] if f.parent.name == "variants" else None
        out[f"{exp}.{variant}" if variant else exp] = f
    if len(out) != 10:
        pytest.fail(f"expected 10 shared Bgee files under {bgee_data}, found {sorted(out)}")
    return out


#: Four of the shared experiments (human and mouse), small enough for the service tests to convert and query.
FOUR_EXPERIMENTS = ("SRPT00003", "SRPT00004", "SRPT00005", "SRPT00007")
#: Human marker genes measured by those experiments.
MARKER_GENES = ["CD19", "MS4A1", "CD3E", "LYZ"]


@pytest.fixture(scope="session")
def four_files(bgee_sources: dict[str, Path]) -> list[str]:
    return [str(bgee_sources[k]) for k in FOUR_EXPERIMENTS]


@pytest.fixture(scope="session")
def four_file_atlas(tmp_path_factory: pytest.TempPathFactory, four_files: list[str]) -> Path:
    """The four files converted locally once per session (read-only for the tests that share it)."""
    import bgee_dask as bd

    out = tmp_path_factory.mktemp("four-file-atlas") / "atlas"
    reports = bd.convert(four_files, out, workers=1, progress=False)
    assert all(r.status == "converted" for r in reports), [r.message for r in reports]
    return out
