"""Crash consistency: a conversion killed with SIGKILL at every step boundary leaves a consistent atlas.

For each failpoint (``bgee_dask.failpoints.FAILPOINTS``) a child process re-converts an
experiment from a new release of its source and kills itself there. Afterwards, full-scan and
gene-slice queries equal the old source or the new one exactly (never a mix, never an error),
the other experiment is untouched, ``check`` reports the state, and a re-run converges: the new
source, exactly, and a clean ``check``.
"""

from __future__ import annotations

import shutil
import signal

import pytest

import bgee_dask as bd
from bgee_dask.failpoints import FAILPOINTS

from . import make_inputs as mi
from .trust_support import atlas_sums, convert_in_child, gene_sums, new_release, which_version

#: Which version readers must see after a kill at each point: the header write is the commit.
VISIBLE_AFTER = {
    "store-written": "old",
    "lock-taken": "old",
    "fragment-written": "old",
    "tables-written": "old",
    "header-written": "new",
    "old-version-removing": "new",
    "committed": "new",
}
#: What check reports after a kill at each point (a kill before anything is written under the lock
#: leaves a version folder nothing names; one after the record, a record the header does not reflect).
FINDINGS_AFTER = {
    "store-written": {"orphan"},
    "lock-taken": {"orphan"},
    "fragment-written": {"uncommitted"},
    "tables-written": {"uncommitted", "debris"},
    "header-written": {"orphan", "debris"},
    "old-version-removing": {"orphan"},
    "committed": set(),
}
EXPERIMENT = "SRPT00004"
OTHER = "SRPT00007"
SLICE_GENES = 5


def test_every_failpoint_is_covered():
    assert set(FAILPOINTS) == set(VISIBLE_AFTER) == set(FINDINGS_AFTER)


@pytest.fixture(scope="module")
def base(tmp_path_factory, bgee_sources):
    """An atlas with the old SRPT00004 and SRPT00007, the new release of SRPT00004, and the references."""
    root = tmp_path_factory.mktemp("crash")
    old_src, other_src = bgee_sources[EXPERIMENT], bgee_sources[OTHER]
    new_src = new_release(old_src, root / "release2")
    atlas = root / "atlas"
    reports = bd.convert([old_src, other_src], atlas, workers=1, progress=False)
    assert all(r.status == "converted" for r in reports), [r.line() for r in reports]
    old, new, other = gene_sums(old_src), gene_sums(new_src), gene_sums(other_src)
    assert sum(old[g] != new[g] for g in old) > 0.9 * len(old)  # the release differs on (almost) every gene
    genes = sorted(g for g in old if old[g] != new[g])[:SLICE_GENES]
    return {"atlas": atlas, "new_src": new_src, "old": old, "new": new, "other": other, "genes": genes}


def _state(atlas, base) -> tuple[str, str]:
    """The version the full scan and the gene slice answer with (each "old", "new" or a mix)."""
    full = which_version(atlas_sums(atlas, EXPERIMENT), base["old"], base["new"])
    genes = base["genes"]
    sliced = which_version(atlas_sums(atlas, EXPERIMENT, genes=genes), base["old"], base["new"])
    return full, sliced


@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "new-release"])
@pytest.mark.parametrize("point", FAILPOINTS)
def test_kill_at_failpoint_leaves_old_or_new_and_rerun_converges(base, tmp_path, point, overwrite):
    atlas = tmp_path / "atlas"
    shutil.copytree(base["atlas"], atlas)
    done = convert_in_child(atlas, [base["new_src"]], overwrite=overwrite, failpoint=point)
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stdout, done.stderr)

    full, sliced = _state(atlas, base)
    assert full == sliced == VISIBLE_AFTER[point], (point, full, sliced)
    assert atlas_sums(atlas, OTHER) == pytest.approx(base["other"], rel=0, abs=0)

    report = bd.check(atlas)
    assert {f.kind for f in report.findings} == FINDINGS_AFTER[point], [f.line() for f in report.findings]
    assert report.clean == (not FINDINGS_AFTER[point])

    rerun = convert_in_child(atlas, [base["new_src"]], overwrite=overwrite)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert _state(atlas, base) == ("new", "new")
    assert atlas_sums(atlas, OTHER) == base["other"]
    report = bd.check(atlas)
    assert report.clean, [f.line() for f in report.findings]
    mi.assert_no_debris(atlas)


def test_check_repair_alone_converges_after_a_kill_between_record_and_header(base, tmp_path):
    """The record points to the new version but the header does not: repair commits it, nothing else needed."""
    atlas = tmp_path / "atlas"
    shutil.copytree(base["atlas"], atlas)
    done = convert_in_child(atlas, [base["new_src"]], overwrite=True, failpoint="fragment-written")
    assert done.returncode == -signal.SIGKILL
    assert _state(atlas, base) == ("old", "old")
    report = bd.check(atlas, repair=True)
    assert report.clean, [f.line() for f in report.findings]
    assert any(line.startswith("committed") for line in report.repaired)
    assert _state(atlas, base) == ("new", "new")
    mi.assert_no_debris(atlas)
