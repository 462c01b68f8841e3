"""``bgee-dask check``: is every committed experiment whole, and what lies beside the catalog?

Verified for each experiment the catalog lists: its record is there, its store and gene-major
copy open as complete stores of a readable format version, and their shape and number of
stored values are the ones the catalog recorded. Reported beside them: records the header
does not reflect yet (a writer died between the two), records left out of the last commit
(with the reason), version folders nothing names (orphans), temporary files and table folders
of killed writes (debris), and a stale lock. ``repair`` commits what can be committed and
removes the debris; what it cannot fix (a damaged store, a record left out) stays reported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import zarr

from bgee_dask.catalog.commit import atlas_state, orphan_versions, sweep
from bgee_dask.catalog.locks import commit_lock_state
from bgee_dask.catalog.reader import CatalogError, read_header
from bgee_dask.format.layout import ATTRS_KEY, FORMAT_NAME, FORMAT_VERSION
from bgee_dask.format.location import AtlasLocation


@dataclass
class Finding:
    kind: str  # damaged, uncommitted, left-out, orphan, debris, stale-lock
    path: str
    detail: str

    def line(self) -> str:
        return f"{self.kind}: {self.path}: {self.detail}"


@dataclass
class CheckReport:
    atlas: str
    experiments: int = 0
    findings: list[Finding] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict:
        return {**asdict(self), "clean": self.clean}


def _store_problem(loc: AtlasLocation, rel: str, shape: tuple[int, int], nnz: int, gene_major: bool) -> str | None:
    """Why the store at ``rel`` is not the complete store the catalog recorded, or None."""
    try:
        # every node's own metadata, not the consolidated copy: that one would hide a missing node
        group = zarr.open_group(loc.zarr_store(rel, read_only=True), mode="r", use_consolidated=False)
        attrs = dict(group.attrs).get(ATTRS_KEY) or {}
    except Exception as exc:
        if loc.storage_error(exc) is not None:
            raise
        return f"cannot be opened ({type(exc).__name__}: {exc})"
    if not attrs.get("complete"):
        return "incomplete store (no 'complete' mark)"
    if not gene_major:
        if attrs.get("format") != FORMAT_NAME:
            return f"format {attrs.get('format')!r}, not {FORMAT_NAME}"
        if str(attrs.get("format_version", "")).split(".")[0] != FORMAT_VERSION.split(".")[0]:
            return f"format version {attrs.get('format_version')}, this bgee-dask reads {FORMAT_VERSION}"
    prefix = "" if gene_major else "X/"
    try:
        x = group if gene_major else group["X"]
        found_shape = tuple(int(s) for s in (x.attrs["shape"] if "shape" in x.attrs else attrs["shape"]))
        arrays = {name: x[name] for name in ("data", "indices", "indptr")}
        stored = int(arrays["data"].shape[0])
        offsets = int(arrays["indptr"].shape[0])
    except Exception as exc:
        return f"arrays missing or unreadable ({type(exc).__name__}: {exc})"
    for name, array in arrays.items():
        per_object = (array.shards or array.chunks)[0]
        expected = -(-int(array.shape[0]) // per_object)
        found = len(loc.find(f"{rel}/{prefix}{name}/c"))
        if found != expected:
            return f"{prefix}{name}: {found} of its {expected} chunk objects are there"
    if found_shape != shape:
        return f"shape {found_shape}, the catalog says {shape}"
    if stored != nnz:
        return f"{stored} stored values, the catalog says {nnz}"
    if offsets != (shape[1] if gene_major else shape[0]) + 1:
        return f"{offsets} offsets for shape {shape}"
    return None


def check_atlas(loc: AtlasLocation, *, repair: bool = False) -> CheckReport:
    """Verify the atlas at ``loc`` (see the module doc); with ``repair``, fix what can be fixed first."""
    report = CheckReport(loc.url)
    if repair and (read_header(loc) is not None or loc.list("catalog")):
        done = sweep(loc)
        report.repaired = [f"committed {k}" for k in done["committed"]] + [f"removed {r}" for r in done["removed"]]
    state = atlas_state(loc)
    if state.header is None and not state.records:
        raise FileNotFoundError(f"{loc.url}: not a bgee-dask atlas (no catalog)")
    findings = report.findings
    committed = (state.header or {}).get("experiments") or {}
    report.experiments = len(committed)
    for key in state.uncommitted:
        findings.append(Finding("uncommitted", key, "record not reflected in the catalog header; --repair commits it"))
    for item in (state.header or {}).get("left_out") or []:
        findings.append(Finding("left-out", item["experiment"], f"left out of the catalog: {item['reason']}"))
    for key, version in sorted(committed.items()):
        record = state.records.get(key)
        if record is None or record.get("version") != version:
            continue  # reported as uncommitted above
        shape = (int(record["n_cells"]), int(record["n_genes"]))
        problem = _store_problem(loc, record["store"], shape, int(record["nnz"]), gene_major=False)
        if problem is None and record.get("gene_index"):
            problem = _store_problem(loc, record["gene_index"], shape, int(record["nnz"]), gene_major=True)
        if problem is not None:
            findings.append(Finding("damaged", key, problem))
    for rel in orphan_versions(loc, state):
        findings.append(Finding("orphan", rel, "version folder no record names (a replaced or killed conversion)"))
    for rel in [*state.temp_files, *state.stale_tables]:
        findings.append(Finding("debris", rel, "left by a killed or failed write"))
    if commit_lock_state(loc) == "stale":
        findings.append(Finding("stale-lock", "catalog/lock.json", "lease its holder stopped refreshing"))
    return report


def check(atlas: str, *, repair: bool = False, storage_options: dict | None = None) -> CheckReport:
    """Check the atlas at a folder or URL (``bgee-dask check``); ``report.clean`` says whether all is well."""
    return check_atlas(AtlasLocation(atlas, storage_options), repair=repair)


__all__ = ["CatalogError", "CheckReport", "Finding", "check", "check_atlas"]
