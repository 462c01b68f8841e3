"""Where Bgee keeps a release's droplet data: ``release_v2.tsv`` and the release's species table.

Read from Bgee's R package (BgeeDB) and pipeline, not from a published specification, so the
parsing is liberal where those tools are: header names are matched after turning every character
other than a letter or digit into ``.`` (R's ``make.names``), ignoring case and repeated dots;
values may be quoted. It is strict where a mistake would go unnoticed: a row with a field too
many or too few, and a species table without the blank lines Bgee ends it with, are refused as
cut short.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

from bgee_dask.bgee.errors import BgeeDataError
from bgee_dask.bgee.transfer import TransferPolicy, fetch_bytes

DEFAULT_BASE_URL = "https://www.bgee.org/ftp"
RELEASES_FILE = "release_v2.tsv"
SPECIES_FILE = "rPackageSpeciesInfo.tsv"
SPECIES_PLACEHOLDER = "SPECIESNAMEPATTERN"
EXPERIMENT_PLACEHOLDER = "EXPIDPATTERN"

#: The columns of ``release_v2.tsv`` used here, as :func:`column_key` spells them.
RELEASE_COLUMN = "release"
FTP_COLUMN = "ftp.url"
MIN_BGEEDB_COLUMN = "minimumversionbgeedb"
ANNOTATION_COLUMN = "droplet.based.single.cell.rna.seq.annotation.url.pattern"
H5AD_COLUMN = "droplet.based.single.cell.rna.seq.h5ad.experiment.url.pattern"

#: The species table's columns used here.
SPECIES_COLUMNS = ("id", "genus", "species.name", "common.name", "sc.droplet.based")

#: ``ftp://ftp.bgee.org/<path>`` is served over HTTPS as ``<base URL>/<path>``.
_BGEE_FTP = re.compile(r"^ftp://ftp\.bgee\.org/", re.IGNORECASE)


def column_key(name: str) -> str:
    """A header name as compared here: non-alphanumerics as one ``.``, lower case, no dots at the ends."""
    return re.sub(r"\.+", ".", re.sub(r"[^A-Za-z0-9]", ".", name.strip().strip('"'))).strip(".").lower()


def read_tsv(text: str, source: str) -> tuple[list[str], list[list[str]]]:
    """The header names and rows (lists of fields) of a tab-separated table; blank lines are skipped,
    values lose the double quotes around them.

    Raises :class:`BgeeDataError` for a row whose field count differs from the header's: a table
    cut short in the middle of a row, or not a table at all.
    """
    lines = [line.rstrip("\r") for line in text.lstrip("\ufeff").split("\n")]
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise BgeeDataError(f"{source}: empty table")
    header = [h.strip().strip('"') for h in lines[0].split("\t")]
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        fields = [f.strip().strip('"') for f in line.split("\t")]
        if len(fields) != len(header):
            raise BgeeDataError(
                f"{source}: line {number} has {len(fields)} fields where the header has {len(header)} "
                "(table cut short, or not a Bgee table)"
            )
        rows.append(fields)
    return header, rows


def parse_tsv(text: str, source: str) -> tuple[list[str], list[dict[str, str]]]:
    """The header (as column keys) and rows (``{column_key: value}``) of a tab-separated table."""
    names, rows = read_tsv(text, source)
    header = [column_key(h) for h in names]
    return header, [dict(zip(header, row, strict=True)) for row in rows]


def _require(columns: Sequence[str], source: str, header: Sequence[str]) -> None:
    missing = [c for c in columns if c not in header]
    if missing:
        raise BgeeDataError(f"{source}: no column {', '.join(missing)} (columns: {', '.join(header)})")


def absolute_url(url: str, base_url: str) -> str:
    """A URL from Bgee's tables as one to fetch: relative ones are taken against ``base_url``,
    ``ftp://ftp.bgee.org/...`` as the same path under ``base_url``."""
    url = url.strip()
    if _BGEE_FTP.match(url):
        return f"{base_url.rstrip('/')}/{_BGEE_FTP.sub('', url)}"
    return urllib.parse.urljoin(base_url.rstrip("/") + "/", url)


@dataclass(frozen=True)
class Release:
    """One row of ``release_v2.tsv``, its URLs made absolute."""

    name: str
    ftp_url: str
    minimum_bgeedb: str
    annotation_pattern: str
    h5ad_pattern: str

    @property
    def species_table_url(self) -> str:
        return f"{self.ftp_url.rstrip('/')}/{SPECIES_FILE}"

    def has_droplet_data(self) -> bool:
        return bool(self.annotation_pattern and self.h5ad_pattern)

    def annotation_url(self, species: str) -> str:
        return self.annotation_pattern.replace(SPECIES_PLACEHOLDER, species)

    def h5ad_url(self, species: str, experiment_id: str) -> str:
        return self.h5ad_pattern.replace(SPECIES_PLACEHOLDER, species).replace(EXPERIMENT_PLACEHOLDER, experiment_id)


def parse_releases(text: str, source: str, base_url: str) -> list[Release]:
    """The releases of ``release_v2.tsv``, in the file's order (newest first)."""
    header, rows = parse_tsv(text, source)
    _require((RELEASE_COLUMN, FTP_COLUMN), source, header)
    if not rows:
        raise BgeeDataError(f"{source}: no release listed")
    out = []
    for row in rows:
        ftp = absolute_url(row[FTP_COLUMN], base_url)
        out.append(
            Release(
                name=row[RELEASE_COLUMN],
                ftp_url=ftp,
                minimum_bgeedb=row.get(MIN_BGEEDB_COLUMN, ""),
                # patterns relative to the release's folder are taken as such
                annotation_pattern=absolute_url(row[ANNOTATION_COLUMN], ftp) if row.get(ANNOTATION_COLUMN) else "",
                h5ad_pattern=absolute_url(row[H5AD_COLUMN], ftp) if row.get(H5AD_COLUMN) else "",
            )
        )
    return out


def _release_key(name: str) -> str:
    """``15.2``, ``15_2``, ``v15.2`` and ``bgee_v15_2`` all name release 15.2."""
    key = name.strip().lower().replace("_", ".").replace("-", ".")
    return re.sub(r"^(bgee\.?)?v", "", key)


def choose_release(releases: Sequence[Release], name: str | None, source: str) -> Release:
    """The release called ``name``, or the newest (the first row) when ``name`` is None."""
    if name is None:
        return releases[0]
    for r in releases:
        if _release_key(r.name) == _release_key(name):
            return r
    raise BgeeDataError(f"unknown release {name!r}; {source} lists {', '.join(r.name for r in releases)}")


def load_releases(base_url: str = DEFAULT_BASE_URL, *, policy: TransferPolicy | None = None) -> list[Release]:
    """Fetch and parse ``{base_url}/release_v2.tsv``."""
    url = f"{base_url.rstrip('/')}/{RELEASES_FILE}"
    return parse_releases(decode_text(fetch_bytes(url, policy=policy), url), url, base_url)


def decode_text(payload: bytes, source: str) -> str:
    """A table's text: UTF-8 as Bgee writes it (a non-UTF-8 byte is refused as not a table)."""
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BgeeDataError(f"{source}: not a text table ({exc})") from None


@dataclass(frozen=True)
class Species:
    """One row of a release's species table."""

    taxon_id: int
    genus: str
    species_name: str
    common_name: str
    droplet: bool

    @property
    def name(self) -> str:
        """Bgee's ``Genus_species``, as its file names and URL patterns spell it."""
        return f"{self.genus}_{self.species_name}"

    def describe(self) -> str:
        return f"{self.name} ({self.common_name}, {self.taxon_id})" if self.common_name else self.name


_TRUE = frozenset({"t", "true", "1", "yes", "y"})


def parse_species_table(text: str, source: str) -> list[Species]:
    """The species of ``rPackageSpeciesInfo.tsv``.

    Bgee ends this table with blank lines; a table that stops right after a row was cut short
    (the rows that followed are lost), so it is refused rather than read as complete.
    """
    lines = text.split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    # "row\n" splits into [row, ""]: the row's own line end; a blank line adds one more element
    if last < 0 or len(lines) - last < 3:
        raise BgeeDataError(
            f"{source}: the table does not end with Bgee's blank lines: it was cut short, rows may be missing"
        )
    header, rows = parse_tsv(text, source)
    _require(SPECIES_COLUMNS, source, header)
    if not rows:
        raise BgeeDataError(f"{source}: no species listed")
    out = []
    for row in rows:
        try:
            taxon = int(row["id"])
        except ValueError:
            raise BgeeDataError(f"{source}: species id {row['id']!r} is not an NCBI taxon id") from None
        out.append(
            Species(
                taxon_id=taxon,
                genus=row["genus"].strip(),
                species_name=row["species.name"].strip(),
                common_name=row["common.name"].strip(),
                droplet=row["sc.droplet.based"].strip().lower() in _TRUE,
            )
        )
    return out


def load_species(release: Release, *, policy: TransferPolicy | None = None) -> list[Species]:
    url = release.species_table_url
    return parse_species_table(decode_text(fetch_bytes(url, policy=policy), url), url)


def resolve_species(table: Sequence[Species], query: str | int, release: str) -> Species:
    """The species named ``Genus_species``, ``"Genus species"``, by common name or by NCBI taxon id.

    Raises :class:`BgeeDataError` for a name the table does not have, and for a species without
    droplet-based single-cell data in this release; both list the species that have such data.
    """
    text = str(query).strip()
    key = re.sub(r"[\s_]+", "_", text).lower()
    found = next(
        (
            s
            for s in table
            if (text.isdigit() and s.taxon_id == int(text))
            or s.name.lower() == key
            or (s.common_name and s.common_name.lower() == text.lower())
        ),
        None,
    )
    with_data = ", ".join(s.describe() for s in table if s.droplet) or "none"
    if found is None:
        raise BgeeDataError(f"unknown species {text!r} in Bgee {release}; species with droplet data: {with_data}")
    if not found.droplet:
        raise BgeeDataError(
            f"{found.describe()} has no droplet-based single-cell data in Bgee {release}; "
            f"species with droplet data: {with_data}"
        )
    return found
