"""A local HTTP server laid out like Bgee's FTP site, for the download tests; it only listens on 127.0.0.1.

Layout under ``/ftp`` (``BgeeFtp.base_url``):

- ``release_v2.tsv``: releases 15.2 (absolute URLs), 15.1 (relative URLs, and a species table cut
  short) and 14.2 (no droplet data), with header names spelt three ways (spaces, hyphens, dots);
- ``bgee_v15_2/rPackageSpeciesInfo.tsv``: human and mouse with droplet data, zebrafish without,
  ending with Bgee's five blank lines;
- per species, the annotation ``.tar.gz`` built from the obs of the shared files (human inside a
  folder, mouse at the top) and the shared ``.h5ad`` files themselves.

Per path, behaviours make the server misbehave the way real links do: ``cut`` (the next n answers
stop half-way), ``always_cut``, ``reset`` (the next n connections are reset), ``slow`` (seconds of
silence before answering), ``no_range`` (Range ignored). Every request is logged with its Range
header and the status answered.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import socket
import struct
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anndata as ad
import pandas as pd

SPECIES_TABLE_HEADER = (
    "ID\tGENUS\tSPECIES_NAME\tCOMMON_NAME\tAFFYMETRIX\tEST\tIN_SITU\tRNA_SEQ\tSC_FULL_LENGTH\tSC_DROPLET_BASED"
)
SPECIES_ROWS = [
    "9606\tHomo\tsapiens\thuman\tT\tF\tF\tT\tT\tT",
    "10090\tMus\tmusculus\tmouse\tT\tT\tT\tT\tT\tT",
    "7955\tDanio\trerio\tzebrafish\tT\tT\tT\tT\tF\tF",
]
ANNOTATION_PATH = (
    "download/processed_expr_values/droplet_based/SPECIESNAMEPATTERN/"
    "SPECIESNAMEPATTERN_Droplet-Based_SC_RNA-Seq_experiments_libraries.tar.gz"
)
H5AD_PATH = "download/h5ad/droplet_based/SPECIESNAMEPATTERN/SPECIESNAMEPATTERN_EXPIDPATTERN_droplet_based.h5ad"
LAST_MODIFIED = formatdate(1_700_000_000, usegmt=True)

#: Experiment names and descriptions made up for the tests (Bgee's would come from the source studies).
EXPERIMENT_NAMES = {
    "SRPT00001": "Ten FACS-sorted PBMC populations (test)",
    "SRPT00002": "PBMC 4k, one library (test)",
    "SRPT00003": "Garnett PBMC FACS (test)",
    "SRPT00004": "Seurat pbmc_small (test)",
    "SRPT00005": "Mouse bone marrow stroma (test)",
    "SRPT00006": "Mouse E18 brain 10k (test)",
    "SRPT00007": "Mouse stomach and small intestine, Microwell-seq (test)",
}


def experiment_tables(species: str, files: dict[str, Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Bgee's experiments and libraries tables for ``files`` (experiment id -> H5AD), from their obs."""
    experiments, libraries = [], []
    for exp, path in sorted(files.items()):
        obs = ad.read_h5ad(path, backed="r").obs
        conditions = obs[["anatEntityId", "stageId", "cellTypeId", "sex", "strain"]].astype(str).drop_duplicates()
        experiments.append(
            {
                "Experiment ID": exp,
                "Experiment name": EXPERIMENT_NAMES[exp],
                "Library count": str(obs["libID"].nunique()),
                "Condition count": str(len(conditions)),
                "Cell count": str(len(obs)),
                "Data source": "SRA",
                "Data source URL": f"https://www.ncbi.nlm.nih.gov/sra/?term={exp}",
                "Experiment description": f'{species} test experiment {exp}: "real counts", made-up wrapping',
            }
        )
        cols = ["libID", "anatEntityId", "anatEntityName", "cellTypeId", "cellTypeName", "stageId", "stageName"]
        cols += ["sex", "strain"]
        groups = obs[cols].astype(str).value_counts(sort=False).reset_index(name="n").sort_values(cols)
        for row in groups.itertuples(index=False):
            libraries.append(
                {
                    "Experiment ID": exp,
                    "Library ID": row.libID,
                    "Anatomical entity ID": row.anatEntityId,
                    "Anatomical entity name": row.anatEntityName,
                    "Celltype ID": row.cellTypeId,
                    "Celltype name": row.cellTypeName,
                    "Stage ID": row.stageId,
                    "Stage name": row.stageName,
                    "Sex": row.sex,
                    "Strain": row.strain,
                    "Number of cells": str(row.n),
                }
            )
    return pd.DataFrame(experiments), pd.DataFrame(libraries)


def tsv(frame: pd.DataFrame) -> bytes:
    lines = ["\t".join(frame.columns)] + ["\t".join(map(str, row)) for row in frame.itertuples(index=False)]
    return ("\n".join(lines) + "\n").encode()


def tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def annotation_archive(species: str, files: dict[str, Path], folder: str | None) -> bytes:
    experiments, libraries = experiment_tables(species, files)
    prefix = f"{folder}/" if folder else ""
    return tar_gz(
        {
            f"{prefix}{species}_Droplet-Based_SC_RNA-Seq_experiments.tsv": tsv(experiments),
            f"{prefix}{species}_Droplet-Based_SC_RNA-Seq_libraries.tsv": tsv(libraries),
        }
    )


def release_table(base_url: str) -> bytes:
    header = [
        "release",
        "release date",
        "FTP.URL",
        "referenceURL",
        "minimumVersionBgeeDB",
        "Droplet-Based single cell RNA-Seq annotation URL pattern",
        "Droplet.Based.single.cell.RNA.Seq.H5AD.experiment.URL.pattern",
    ]
    v152 = f"{base_url}/bgee_v15_2/"
    rows = [
        ["15.2", "2024-05-10", v152, "https://www.bgee.org/", "2.30.0", v152 + ANNOTATION_PATH, v152 + H5AD_PATH],
        ["15.1", "2023-06-01", "bgee_v15_1/", "https://www.bgee.org/", "2.26.0", ANNOTATION_PATH, H5AD_PATH],
        ["14.2", "2021-02-01", "bgee_v14_2/", "https://www.bgee.org/", "2.18.0", "", ""],
    ]
    return ("\n".join("\t".join(r) for r in [header, *rows]) + "\n").encode()


def species_table(cut_short: bool = False) -> bytes:
    text = "\n".join([SPECIES_TABLE_HEADER, *SPECIES_ROWS]) + "\n"
    return (text if cut_short else text + "\n" * 5).encode()


def ftp_content(bgee_data: Path) -> dict[str, bytes | Path]:
    """URL path -> content (bytes, or a file served from disk); the release table, which names the
    server's address, is added by :func:`bgee_ftp`."""
    human = {p.name.split("_")[2]: p for p in sorted((bgee_data / "Homo_sapiens").glob("*.h5ad"))}
    mouse = {p.name.split("_")[2]: p for p in sorted((bgee_data / "Mus_musculus").glob("*.h5ad"))}
    v152 = "/ftp/bgee_v15_2/"
    content: dict[str, bytes | Path] = {
        v152 + "rPackageSpeciesInfo.tsv": species_table(),
        "/ftp/bgee_v15_1/rPackageSpeciesInfo.tsv": species_table(cut_short=True),
        "/ftp/bgee_v14_2/rPackageSpeciesInfo.tsv": species_table(),
    }
    for species, files, folder in (
        ("Homo_sapiens", human, "Homo_sapiens_Droplet-Based_SC_RNA-Seq_annotation"),
        ("Mus_musculus", mouse, None),
    ):
        content[v152 + ANNOTATION_PATH.replace("SPECIESNAMEPATTERN", species)] = annotation_archive(
            species, files, folder
        )
        for exp, path in files.items():
            url = H5AD_PATH.replace("SPECIESNAMEPATTERN", species).replace("EXPIDPATTERN", exp)
            content[v152 + url] = path
    return content


@dataclass
class Request:
    path: str
    range: str | None
    if_range: str | None
    status: int = 0


@dataclass
class BgeeFtp:
    """The running server: ``base_url``, ``content`` and ``behaviours`` (editable), ``log``."""

    server: ThreadingHTTPServer
    content: dict[str, bytes | Path]
    behaviours: dict[str, dict] = field(default_factory=dict)
    log: list[Request] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/ftp"

    def url_path(self, species: str, exp: str) -> str:
        url = H5AD_PATH.replace("SPECIESNAMEPATTERN", species).replace("EXPIDPATTERN", exp)
        return "/ftp/bgee_v15_2/" + url

    def annotation_path(self, species: str) -> str:
        return "/ftp/bgee_v15_2/" + ANNOTATION_PATH.replace("SPECIESNAMEPATTERN", species)

    def requests_for(self, path: str) -> list[Request]:
        with self.lock:
            return [r for r in self.log if r.path == path]

    def etag(self, path: str) -> str:
        return f'"{hashlib.sha1(self.body(path)).hexdigest()[:16]}"'

    def body(self, path: str) -> bytes:
        c = self.content[path]
        return c.read_bytes() if isinstance(c, Path) else c


def _handler(ftp: BgeeFtp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            req = Request(path, self.headers.get("Range"), self.headers.get("If-Range"))
            with ftp.lock:
                ftp.log.append(req)
                b = ftp.behaviours.setdefault(path, {})
                reset = b.get("reset", 0) > 0
                if reset:
                    b["reset"] -= 1
                cut = b.get("always_cut") or b.get("cut", 0) > 0
                if b.get("cut", 0) > 0:
                    b["cut"] -= 1
            if b.get("slow"):
                ftp.stop.wait(b["slow"])
            if reset:
                # RST, not FIN: the peer sees "connection reset by peer"
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True
                req.status = -1
                return
            if path not in ftp.content:
                req.status = 404
                self.send_error(404, "Not Found")
                return
            body = ftp.body(path)
            etag = f'"{hashlib.sha1(body).hexdigest()[:16]}"'
            start, status = 0, 200
            rng = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            if rng and not b.get("no_range") and (if_range is None or if_range in (etag, LAST_MODIFIED)):
                start = int(rng.removeprefix("bytes=").split("-")[0])
                if start >= len(body):
                    req.status = 416
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            req.status = status
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body) - start))
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", LAST_MODIFIED)
            if not b.get("no_range"):
                self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.end_headers()
            end = start + (len(body) - start) // 2 if cut else len(body)
            view = memoryview(body)
            with contextlib.suppress(OSError):
                for i in range(start, end, 1 << 16):
                    self.wfile.write(view[i : min(end, i + (1 << 16))])
                self.wfile.flush()
            if cut:
                self.close_connection = True

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # a reset or cut connection is the point
        pass


@contextlib.contextmanager
def bgee_ftp(content: dict[str, bytes | Path]) -> Iterator[BgeeFtp]:
    """Serve (a copy of) ``content`` and the release table on 127.0.0.1, on a free port."""
    server = _Server(("127.0.0.1", 0), BaseHTTPRequestHandler)
    ftp = BgeeFtp(server=server, content=dict(content))
    ftp.content["/ftp/release_v2.tsv"] = release_table(ftp.base_url)
    server.RequestHandlerClass = _handler(ftp)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield ftp
    finally:
        ftp.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        time.sleep(0)  # let handler threads see the stop event
