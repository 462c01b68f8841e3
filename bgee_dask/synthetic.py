"""Synthetic Bgee droplet H5AD files of any size, in Bgee's documented ("doc") layout.

The shared real files are small (17k cells in all), so benchmarks at 10^5-10^6 cells and the demo
need generated inputs. The files imitate what a reader meets in real Bgee downloads, not just the
shape of the matrix:

* ``X`` is a ``csr_matrix`` group (float32 data, int32 indices, gzip level 4, chunked) exactly like
  anndata writes it, rows stacked library by library;
* ``obs``/``var`` are written with anndata's own element writer, so encodings (categorical,
  string-array, int64 arrays) and column order match the shared files;
* counts are negative-binomial around cell-type-specific profiles, so cell types are separable and
  the number of detected genes per cell is realistic, which drives nnz, file size and query costs;
* every experiment measures a different subset of a species-wide gene universe, as real
  experiments do, so cross-experiment gene alignment is exercised.

Memory stays bounded: the matrix is generated and appended ``chunk_rows`` cells at a time; only
per-cell metadata (a few bytes per cell) and a few row blocks live in memory. The exception is
``x_format="csc"``, which needs the whole matrix before it can be transposed.

Everything is deterministic for a given seed: each cell draws from its own RNG stream (seeded from
the experiment seed and the cell's row), so the counts do not depend on ``chunk_rows`` or on the
output format.
"""

from __future__ import annotations

import functools
import math
import os
import re
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import pandas as pd
from anndata.io import write_elem

from bgee_dask._jit import numba
from bgee_dask.schema import PLACEHOLDER_CELL_TYPE, SPECIES_TAXON

__all__ = [
    "CELL_TYPES",
    "SPECIES",
    "TISSUES",
    "gene_universe",
    "generate_experiment",
    "generate_sources",
    "synthetic_filename",
]

#: Share of nonzero values split like multi-mapping reads when ``non_integer=True``.
NON_INTEGER_FRACTION = 0.1

#: Size of the pseudo 10x barcode whitelist (10x v2 has 737,280); drawing from it makes the same
#: barcode recur across libraries of one experiment, as in real data.
_WHITELIST_SIZE = 737_280

_ANNDATA_ENCODING = {"encoding-type": "anndata", "encoding-version": "0.1.0"}


# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------

#: Uberon tissues: id -> name.
TISSUES: dict[str, str] = {
    "UBERON:0000178": "blood",
    "UBERON:0002371": "bone marrow",
    "UBERON:0000955": "brain",
    "UBERON:0002048": "lung",
    "UBERON:0002107": "liver",
    "UBERON:0000945": "stomach",
    "UBERON:0002108": "small intestine",
    "UBERON:0002113": "kidney",
    "UBERON:0002106": "spleen",
}

_BLD, _BM, _BRN, _LNG, _LIV, _STO, _SI, _KID, _SPL = TISSUES


@dataclass(frozen=True)
class CellType:
    """One cell-type term, with the tissues it is drawn in and how complex its transcriptome is."""

    id: str
    name: str
    #: author label variants; one is picked per experiment, as different authors label differently
    author_labels: tuple[str, ...]
    tissues: tuple[str, ...]
    #: relative number of detected genes (neutrophils low, fibroblasts high)
    complexity: float = 1.0


#: Cell Ontology terms (plus Bgee's placeholder) the generator can use. The index in this tuple
#: seeds the type's expression profile, so append new types at the end only.
CELL_TYPES: tuple[CellType, ...] = (
    CellType("CL:0000236", "B cell", ("B", "B cells", "CD19+ B"), (_BLD, _BM, _LNG, _SPL, _SI, _LIV), 0.9),
    CellType("CL:0001054", "CD14-positive monocyte", ("CD14+ Mono", "CD14 monocytes"), (_BLD, _BM, _SPL), 1.1),
    CellType("CL:0000623", "natural killer cell", ("NK", "NK cells", "CD56+ NK"), (_BLD, _SPL, _LIV, _LNG), 0.9),
    CellType("CL:0000624", "CD4-positive, alpha-beta T cell", ("CD4 T", "T_CD4", "CD4+ T Helper"), (_BLD, _SPL), 0.85),
    CellType(
        "CL:0000625", "CD8-positive, alpha-beta T cell", ("CD8 T", "T_CD8", "CD8+ Cytotoxic T"), (_BLD, _SPL), 0.85
    ),
    CellType("CL:0000897", "CD4-positive, alpha-beta memory T cell", ("CD4 Memory", "Memory CD4 T"), (_BLD,), 0.85),
    CellType(
        "CL:0000895",
        "naive thymus-derived CD4-positive, alpha-beta T cell",
        ("Naive CD4 T", "CD4 Naive"),
        (_BLD,),
        0.8,
    ),
    CellType("CL:0000815", "regulatory T cell", ("Treg", "T Reg"), (_BLD, _SPL), 0.85),
    CellType("CL:0000113", "mononuclear phagocyte", ("MNP", "Mono/Mac"), (_BLD, _SPL), 1.1),
    CellType("CL:0000084", "T cell", ("T", "T cells", "T cell"), (_BM, _LNG, _LIV, _STO, _SI, _KID, _SPL), 0.85),
    CellType(
        "CL:0000235", "macrophage", ("Macrophage", "Mac", "Macrophages"), (_BM, _BRN, _LNG, _LIV, _STO, _SI, _KID, _SPL)
    ),
    CellType("CL:0000057", "fibroblast", ("Fibroblast", "Fib"), (_LNG, _STO, _SI, _KID), 1.35),
    CellType("CL:0000115", "endothelial cell", ("Endothelial", "EC"), (_BRN, _LNG, _LIV, _STO, _SI, _KID, _SPL), 1.2),
    CellType("CL:0000584", "enterocyte", ("Enterocyte", "Enterocyte_Fabp1 high"), (_SI,), 1.1),
    CellType("CL:0000160", "goblet cell", ("Goblet", "Goblet cell"), (_SI, _LNG), 1.0),
    CellType("CL:0000451", "dendritic cell", ("DC", "cDC"), (_BLD, _LNG, _SPL, _BM), 1.15),
    CellType("CL:0000784", "plasmacytoid dendritic cell", ("pDC",), (_BLD, _SPL), 1.0),
    CellType("CL:0000097", "mast cell", ("Mast", "Mast cell"), (_LNG, _STO), 0.9),
    CellType("CL:0000192", "smooth muscle cell", ("SMC", "Smooth muscle"), (_LNG, _STO, _SI), 1.2),
    CellType("CL:0000066", "epithelial cell", ("Epithelial", "Epi"), (_LNG, _LIV, _STO, _SI, _KID), 1.1),
    CellType("CL:0000764", "erythroid lineage cell", ("Erythroid", "Ery"), (_BM, _SPL), 0.6),
    CellType("CL:0000138", "chondrocyte", ("CH", "Chondrocyte"), (_BM,), 1.2),
    CellType("CL:0000062", "osteoblast", ("OS", "Osteoblast"), (_BM,), 1.2),
    CellType("CL:0000034", "stem cell", ("Stem", "Stem cell"), (_BM,), 1.3),
    CellType("CL:0000155", "peptic cell", ("Chief cell",), (_STO,), 1.0),
    CellType("CL:0000162", "parietal cell", ("Parietal cell",), (_STO,), 1.0),
    CellType("CL:0000510", "paneth cell", ("Paneth cell",), (_SI,), 0.9),
    CellType("CL:0002204", "tuft cell", ("Tuft cell",), (_SI, _STO), 1.0),
    CellType("CL:0000164", "enteroendocrine cell", ("Enteroendocrine", "EEC"), (_SI, _STO), 1.0),
    CellType("CL:0000775", "neutrophil", ("Neutrophil", "Neu"), (_BLD, _BM, _SPL, _LNG), 0.55),
    CellType("CL:0000540", "neuron", ("Neuron", "Excitatory neuron"), (_BRN,), 1.5),
    CellType("CL:0000127", "astrocyte", ("Astrocyte", "Astro"), (_BRN,), 1.2),
    CellType("CL:0000128", "oligodendrocyte", ("Oligodendrocyte", "Oligo"), (_BRN,), 1.1),
    CellType("CL:0000129", "microglial cell", ("Microglia",), (_BRN,), 1.0),
    CellType("CL:0000182", "hepatocyte", ("Hepatocyte", "Hep"), (_LIV,), 1.3),
    CellType("CL:0000632", "hepatic stellate cell", ("Stellate", "HSC_liver"), (_LIV,), 1.2),
    CellType("CL:0000786", "plasma cell", ("Plasma", "Plasma cell"), (_BM, _SPL, _SI), 0.8),
    CellType("CL:0000037", "hematopoietic stem cell", ("HSC", "CD34+"), (_BM,), 1.2),
    CellType("CL:0000653", "podocyte", ("Podocyte", "Podo"), (_KID,), 1.2),
    CellType("CL:0002306", "epithelial cell of proximal tubule", ("PT", "Proximal tubule"), (_KID,), 1.25),
    CellType("CL:0000064", "ciliated cell", ("Ciliated",), (_LNG,), 1.2),
    CellType("CL:0000158", "club cell", ("Club", "Club cell"), (_LNG,), 1.1),
)

#: Bgee's placeholder where no CL term fits; drawn as a small unlabelled population.
PLACEHOLDER = CellType(
    PLACEHOLDER_CELL_TYPE[0], PLACEHOLDER_CELL_TYPE[1], ("?", "Unknown", "unassigned", "NA"), tuple(TISSUES), 0.9
)
_ALL_TYPES: tuple[CellType, ...] = (*CELL_TYPES, PLACEHOLDER)


@dataclass(frozen=True)
class SpeciesSpec:
    """What differs between species: ID formats, vocabulary and how sparse Ensembl numbering is."""

    taxon: int
    gene_prefix: str
    #: mean gap between consecutive Ensembl gene numbers (human ids reach ~ENSG00000310000)
    id_gap: int
    upper_symbols: bool
    #: (id, name, weight)
    stages: tuple[tuple[str, str, float], ...]
    strains: tuple[tuple[str, float], ...]
    sexes: tuple[tuple[str, float], ...]


_SEXES = (("female", 0.28), ("male", 0.28), ("mixed", 0.14), ("NA", 0.1), ("not annotated", 0.2))

SPECIES: dict[str, SpeciesSpec] = {
    "Homo_sapiens": SpeciesSpec(
        taxon=SPECIES_TAXON["Homo_sapiens"],
        gene_prefix="ENSG",
        id_gap=5,
        upper_symbols=True,
        stages=(
            ("HsapDv:0000087", "human adult stage", 0.7),
            ("UBERON:0000113", "post-juvenile adult stage", 0.15),
            ("UBERON:0000104", "life cycle", 0.15),
        ),
        strains=(("NA", 1.0),),
        sexes=_SEXES,
    ),
    "Mus_musculus": SpeciesSpec(
        taxon=SPECIES_TAXON["Mus_musculus"],
        gene_prefix="ENSMUSG",
        id_gap=2,
        upper_symbols=False,
        stages=(
            ("UBERON:0000113", "post-juvenile adult stage", 0.6),
            ("MmusDv:0000035", "Theiler stage 26", 0.2),
            ("UBERON:0000104", "life cycle", 0.2),
        ),
        strains=(("C57BL/6J", 0.6), ("C57BL/6N", 0.1), ("BALB/c", 0.1), ("NA", 0.2)),
        sexes=_SEXES,
    ),
}

_SYMBOL_FAMILIES = (
    "ZNF", "SLC", "KRT", "RPL", "RPS", "CD", "IL", "CCL", "CXCL", "TMEM", "FAM", "KLF", "SOX", "HOX",
    "COL", "MYO", "ATP", "NDUF", "PCDH", "OR", "LINC", "KIF", "ABC", "ADAM", "ANK", "ARHGAP", "CDH",
    "DNAJ", "EIF", "FBXO", "GPR", "HLA", "IFI", "KCN", "LRRC", "MAP", "MT", "NUP", "PPP", "PRR", "RAB",
    "RBM", "SEC", "SERPIN", "TRIM", "TSPAN", "UBE", "USP", "WDR", "ZBTB",
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Species gene universe (independent of experiment and seed)
# --------------------------------------------------------------------------------------------

# Each species-level quantity has its own RNG stream, so the first n values of a universe of
# size N > n equal those of a universe of size n: gene i keeps its ID, symbol and profile.
_Q_ID_GAPS, _Q_FAMILY, _Q_DUPSYM, _Q_BASE, _Q_DISP, _Q_TYPE, _Q_MARKERS = range(7)


def _species_rng(spec: SpeciesSpec, *key: int) -> np.random.Generator:
    return np.random.default_rng([spec.taxon, 0x5EED, *key])


@dataclass(frozen=True)
class GeneUniverse:
    """All genes a species can have, in Ensembl ID order, with their baseline expression."""

    species: str
    gene_ids: np.ndarray  # str objects
    symbols: np.ndarray  # str objects; a few symbols occur twice, like Ensembl's
    base_log_mean: np.ndarray  # float64
    dispersion: np.ndarray  # NB size r, float64


def _check_species(species: str) -> SpeciesSpec:
    try:
        return SPECIES[species]
    except KeyError:
        raise ValueError(f"species {species!r} is not supported; use one of {sorted(SPECIES)}") from None


@functools.lru_cache(maxsize=8)
def gene_universe(species: str, n_genes: int = 30000) -> GeneUniverse:
    """The species' gene universe; identical in every experiment and process for the same size."""
    spec = _check_species(species)
    if not 100 <= n_genes <= 200_000:
        raise ValueError(f"n_genes_universe must be within [100, 200000], got {n_genes}")
    gaps = 1 + _species_rng(spec, _Q_ID_GAPS).integers(0, 2 * spec.id_gap - 1, size=n_genes)
    numbers = np.cumsum(gaps) + 2
    ids = np.array([f"{spec.gene_prefix}{n:011d}" for n in numbers], dtype=object)

    fam = _species_rng(spec, _Q_FAMILY).integers(0, len(_SYMBOL_FAMILIES), size=n_genes)
    counters = [0] * len(_SYMBOL_FAMILIES)
    symbols = np.empty(n_genes, dtype=object)
    for i, f in enumerate(fam.tolist()):
        counters[f] += 1
        name = f"{_SYMBOL_FAMILIES[f]}{counters[f]}"
        symbols[i] = name if spec.upper_symbols else name.capitalize()
    # Ensembl has a few symbols on two gene IDs (e.g. mouse Rp1); readers must cope.
    dup = np.flatnonzero(_species_rng(spec, _Q_DUPSYM).random(n_genes) < 0.002)
    dup = dup[dup > 0]
    symbols[dup] = symbols[dup - 1]

    base = _species_rng(spec, _Q_BASE).normal(0.0, 2.4, size=n_genes)
    disp = np.exp(_species_rng(spec, _Q_DISP).normal(np.log(1.5), 0.6, size=n_genes))
    return GeneUniverse(species, ids, symbols, base, disp)


def _type_log_profile(species: str, n_genes: int, type_index: int) -> np.ndarray:
    """Cell-type log-mean deviations, shared by all experiments so types match across files."""
    spec = SPECIES[species]
    dev = _species_rng(spec, _Q_TYPE, type_index).normal(0.0, 0.6, size=n_genes)
    rng = _species_rng(spec, _Q_MARKERS, type_index)
    n_markers = int(rng.integers(30, 80))
    markers = rng.choice(n_genes, size=min(n_markers, n_genes), replace=False)
    dev[markers] += rng.uniform(2.5, 5.0, size=markers.size)
    return dev


# --------------------------------------------------------------------------------------------
# Experiment design (metadata), compact per-cell arrays
# --------------------------------------------------------------------------------------------


@dataclass
class _Library:
    lib_id: str
    tissue: str
    stage: tuple[str, str]
    sex: str
    strain: str
    n_cells: int


@dataclass
class _Design:
    species: str
    experiment_id: str
    libraries: list[_Library]
    types: list[int]  # indices into _ALL_TYPES
    author_labels: list[str]  # per local type
    lib_of_cell: np.ndarray  # int32, library index per cell (non-decreasing)
    type_of_cell: np.ndarray  # int16, local type index per cell
    barcode_int: np.ndarray  # uint32, 2 bits per base
    sample_table: np.ndarray  # (n_libraries, n_types) int64 SampleId, 0 where absent
    measured: np.ndarray  # int64 universe positions, increasing
    cell_size: np.ndarray  # float64 expected UMIs per cell


def _experiment_number(experiment_id: str) -> int:
    digits = re.findall(r"\d+", experiment_id)
    if digits:
        return int(digits[-1]) % 10**6
    return zlib.crc32(experiment_id.encode()) % 10**6


def _pick(rng: np.random.Generator, options: Sequence[tuple[Any, ...]]) -> tuple[Any, ...]:
    w = np.array([o[-1] for o in options], dtype=float)
    return options[int(rng.choice(len(options), p=w / w.sum()))]


def _split(rng: np.random.Generator, total: int, weights: np.ndarray, minimum: int = 1) -> np.ndarray:
    """Multinomial split of ``total`` with at least ``minimum`` per part."""
    k = weights.size
    base = np.full(k, minimum, dtype=np.int64)
    rest = total - base.sum()
    if rest < 0:
        raise ValueError(f"cannot split {total} into {k} parts of at least {minimum}")
    return base + rng.multinomial(rest, weights / weights.sum())


def _design(
    rng: np.random.Generator,
    *,
    species: str,
    experiment_id: str,
    n_cells: int,
    n_genes_universe: int,
    measured_fraction: tuple[float, float],
    n_libraries: int | None,
    n_cell_types: int | None,
) -> _Design:
    spec = SPECIES[species]
    exp_num = _experiment_number(experiment_id)

    if n_libraries is None:
        n_libraries = round(n_cells / 6000) + int(rng.integers(1, 4))
    n_libraries = max(1, min(int(n_libraries), n_cells, 999))

    # Tissues: a few per experiment, one per library; every tissue gets at least one library.
    n_tissues = int(rng.integers(1, min(4, n_libraries) + 1))
    tissues = [str(t) for t in rng.choice(list(TISSUES), size=n_tissues, replace=False)]
    lib_tissue = [tissues[i % n_tissues] for i in range(n_libraries)]
    rng.shuffle(lib_tissue)

    # Cell types: mostly those at home in the chosen tissues.
    native = [i for i, ct in enumerate(CELL_TYPES) if set(ct.tissues) & set(tissues)]
    if n_cell_types is None:
        n_cell_types = int(rng.integers(5, 16))
    with_placeholder = bool(rng.random() < 0.5) and n_cell_types > 1
    n_real = max(1, min(int(n_cell_types) - with_placeholder, len(CELL_TYPES)))
    chosen = [int(i) for i in rng.choice(native, size=min(n_real, len(native)), replace=False)]
    if len(chosen) < n_real:
        others = [i for i in range(len(CELL_TYPES)) if i not in chosen]
        chosen += [int(i) for i in rng.choice(others, size=n_real - len(chosen), replace=False)]
    types = sorted(chosen) + ([len(CELL_TYPES)] if with_placeholder else [])
    author = [str(rng.choice(_ALL_TYPES[t].author_labels)) for t in types]

    # Skewed abundances: Zipf-like ranks in random order, the placeholder kept small.
    k = len(types)
    ranks = rng.permutation(k) + 1
    exp_w = (1.0 / ranks**1.1) * rng.lognormal(0.0, 0.3, size=k)
    if with_placeholder:
        exp_w[-1] = exp_w[:-1].sum() * rng.uniform(0.01, 0.03)

    stage = _pick(rng, spec.stages)
    strain = str(_pick(rng, spec.strains)[0])
    lib_cells = _split(rng, n_cells, rng.lognormal(0.0, 0.5, size=n_libraries))

    libraries: list[_Library] = []
    lib_parts, type_parts = [], []
    sample_table = np.zeros((n_libraries, k), dtype=np.int64)
    next_sample = 1
    for li in range(n_libraries):
        tissue = lib_tissue[li]
        sex = str(_pick(rng, spec.sexes)[0])
        libraries.append(
            _Library(f"SRX{exp_num:06d}{li + 1:03d}", tissue, (stage[0], stage[1]), sex, strain, int(lib_cells[li]))
        )
        at_home = np.array([tissue in _ALL_TYPES[t].tissues for t in types])
        if not at_home.any():
            at_home[:] = True
        w = np.where(at_home, exp_w * rng.lognormal(0.0, 0.3, size=k), 0.0)
        counts = rng.multinomial(int(lib_cells[li]), w / w.sum())
        # Source order within a library is not grouped by type.
        lib_types = rng.permutation(np.repeat(np.arange(k, dtype=np.int16), counts))
        type_parts.append(lib_types)
        lib_parts.append(np.full(int(lib_cells[li]), li, dtype=np.int32))
        for t in np.flatnonzero(counts):
            sample_table[li, t] = exp_num * 100_000 + next_sample
            next_sample += 1
    if next_sample > 100_000:
        raise ValueError("too many (library, cell type) samples for one experiment (max 99,999)")

    barcodes = []
    for lib in libraries:
        if lib.n_cells <= _WHITELIST_SIZE // 2:
            idx = rng.choice(_WHITELIST_SIZE, size=lib.n_cells, replace=False).astype(np.uint64)
            # Odd multiplier: a bijection on 32-bit ints, so whitelist entries stay distinct.
            bc = ((idx * np.uint64(0x9E3779B1) + np.uint64(0x7F4A7C15)) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        else:
            bc = rng.choice(2**32, size=lib.n_cells, replace=False).astype(np.uint32)
        barcodes.append(bc)

    lo, hi = measured_fraction
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"measured_fraction must satisfy 0 < min <= max <= 1, got {measured_fraction}")
    n_measured = max(1, round(rng.uniform(lo, hi) * n_genes_universe))
    measured = np.sort(rng.choice(n_genes_universe, size=n_measured, replace=False))

    return _Design(
        species=species,
        experiment_id=experiment_id,
        libraries=libraries,
        types=types,
        author_labels=author,
        lib_of_cell=np.concatenate(lib_parts),
        type_of_cell=np.concatenate(type_parts),
        barcode_int=np.concatenate(barcodes),
        sample_table=sample_table,
        measured=measured,
        cell_size=np.empty(0),
    )


# --------------------------------------------------------------------------------------------
# Counts model
# --------------------------------------------------------------------------------------------

_GH_NODES, _GH_WEIGHTS = np.polynomial.hermite_e.hermegauss(5)
_GH_WEIGHTS = _GH_WEIGHTS / _GH_WEIGHTS.sum()


@numba.njit(cache=True, nogil=True)
def _expected_detected(log_s, p, r, nodes, weights, sigma):  # pragma: no cover - jit
    """Mean over log-normal library sizes of the expected number of genes with a count > 0."""
    total = 0.0
    for j in range(nodes.shape[0]):
        s = math.exp(log_s + sigma * nodes[j])
        acc = 0.0
        for g in range(p.shape[0]):
            mu = s * p[g]
            acc += 1.0 - math.exp(-r[g] * math.log1p(mu / r[g]))
        total += weights[j] * acc
    return total


def _calibrate_size(p: np.ndarray, r: np.ndarray, target: float, sigma: float) -> float:
    """Median UMIs per cell giving ``target`` detected genes on average (bisection in log space)."""
    lo, hi = math.log(1.0), math.log(1e8)
    if _expected_detected(hi, p, r, _GH_NODES, _GH_WEIGHTS, sigma) < target:
        raise ValueError(f"mean_detected_genes={target:.0f} is not reachable with {p.size} measured genes; lower it")
    for _ in range(26):  # ~1e-6 relative precision on the size
        mid = 0.5 * (lo + hi)
        if _expected_detected(mid, p, r, _GH_NODES, _GH_WEIGHTS, sigma) < target:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


@numba.njit(cache=True, nogil=True)
def _nb_walk(u, mu, r):  # pragma: no cover - jit
    """Smallest k with NB-CDF(k) > u (inverse CDF); cheap for the small means that dominate."""
    ratio = mu / (r + mu)
    pk = math.exp(-r * math.log1p(mu / r))
    cum = pk
    k = 0
    while u > cum and k < 1_000_000:
        k += 1
        pk *= (k - 1 + r) / k * ratio
        if pk <= 0.0:
            break
        cum += pk
    return k


_U64 = np.uint64


@numba.njit(cache=True, nogil=True, inline="always")
def _u01(st):  # pragma: no cover - jit
    """Uniform [0, 1) from xoshiro256+ (state ``st``, 4 x uint64): a few inlined integer operations per
    draw, cheaper here than np.random."""
    s0, s1, s2, s3 = st[0], st[1], st[2], st[3]
    result = s0 + s3
    t = s1 << _U64(17)
    s2 ^= s0
    s3 ^= s1
    s1 ^= s2
    s0 ^= s3
    s2 ^= t
    s3 = (s3 << _U64(45)) | (s3 >> _U64(19))
    st[0], st[1], st[2], st[3] = s0, s1, s2, s3
    return (result >> _U64(11)) * (1.0 / 9007199254740992.0)


@numba.njit(cache=True, nogil=True)
def _seed_state(st, seed):  # pragma: no cover - jit
    """Fill the xoshiro state from one seed with splitmix64, as its authors recommend."""
    z = _U64(seed)
    for i in range(4):
        z += _U64(0x9E3779B97F4A7C15)
        x = z
        x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
        st[i] = x ^ (x >> _U64(31))


@numba.njit(cache=True, nogil=True)
def _fill_rows(
    first, stop, seeds, cell_type, cell_size, order, p_sorted, r_sorted, frac_nonint,
    indptr, indices, data, dense,
):  # pragma: no cover - jit  # fmt: skip
    """Draw NB counts for cells ``first..stop-1`` into CSR buffers; stop early when full.

    Genes are visited in decreasing mean (per type). Genes with mean >= 1 are drawn one by one;
    the long tail of rare genes is sampled as a thinned Poisson process, so the cost per cell
    follows the number of detected genes rather than the number of measured genes.
    Returns (cells done, values written).
    """
    n_genes = order.shape[1]
    cap = indices.shape[0]
    st = np.empty(4, dtype=np.uint64)
    pos = 0
    indptr[0] = 0
    for c in range(first, stop):
        if pos + n_genes > cap:
            return c, pos
        # Uniforms come from xoshiro; numba's generator only serves the few gamma/Poisson draws.
        np.random.seed(seeds[c - first])
        _seed_state(st, seeds[c - first])
        t = cell_type[c]
        s = cell_size[c]
        start = pos
        k = 0
        # Head: every gene with mean >= 1, drawn directly.
        while k < n_genes:
            mu = s * p_sorted[t, k]
            if mu < 1.0:
                break
            r = r_sorted[t, k]
            x = np.random.poisson(np.random.gamma(r, mu / r)) if mu > 8.0 else _nb_walk(_u01(st), mu, r)
            if x > 0:
                dense[order[t, k]] = x
            k += 1
        # Tail: NB(r, mu) is a Poisson(r*log1p(mu/r)) number of clusters with Logarithmic(mu/(r+mu))
        # sizes. Clusters are placed by thinning a Poisson process along the genes whose rate b is
        # the largest remaining mean (means decrease along k, and r*log1p(mu/r) <= mu).
        x_pos = float(k)
        while k < n_genes:
            b = s * p_sorted[t, k]
            if b <= 0.0:
                break
            x_pos += -math.log(1.0 - _u01(st)) / b
            if x_pos >= n_genes:
                break
            k = int(x_pos)
            mu = s * p_sorted[t, k]
            r = r_sorted[t, k]
            lg = math.log1p(mu / r)
            if _u01(st) * b < r * lg:
                pp = mu / (r + mu)
                u = _u01(st)
                size = 1
                prob = pp / lg
                cum = prob
                while u > cum and size < 1_000_000:
                    size += 1
                    prob *= pp * (size - 1) / size
                    if prob <= 0.0:
                        break
                    cum += prob
                dense[order[t, k]] += size
        # Emit the row in gene order; a scan of the dense row is cheaper than sorting the hits.
        for g in range(n_genes):
            if dense[g] != 0.0:
                indices[pos] = g
                data[pos] = dense[g]
                dense[g] = 0.0
                pos += 1
        if frac_nonint > 0.0:
            for j in range(start, pos):
                u = _u01(st)
                if u < frac_nonint:
                    # Multi-mapping reads split between two or three genes.
                    data[j] = data[j] * 0.5 if u < 0.5 * frac_nonint else data[j] / 3.0
        indptr[c - first + 1] = pos
    return stop, pos


def _splitmix32(x: np.ndarray) -> np.ndarray:
    """Well-mixed 32-bit seeds from consecutive integers (uint64 arithmetic wraps on purpose)."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z & np.uint64(0xFFFFFFFF)).astype(np.int64)


@dataclass
class _Model:
    order: np.ndarray  # (n_types, n_measured) int32 measured positions by decreasing mean
    p_sorted: np.ndarray  # (n_types, n_measured) float64
    r_sorted: np.ndarray  # (n_types, n_measured) float64
    seed_base: int


def _model(design: _Design, uni: GeneUniverse, rng: np.random.Generator, mean_detected: float) -> _Model:
    m = design.measured
    batch = rng.normal(0.0, 0.15, size=m.size)  # experiment-wide gene effect
    r = uni.dispersion[m]
    k = len(design.types)
    order = np.empty((k, m.size), dtype=np.int32)
    p_sorted = np.empty((k, m.size))
    r_sorted = np.empty((k, m.size))

    counts = np.bincount(design.type_of_cell, minlength=k).astype(float)
    complexity = np.array([_ALL_TYPES[t].complexity for t in design.types])
    # Scale complexities so that the cell-weighted mean of detected genes hits the target.
    complexity = complexity / (np.dot(counts, complexity) / counts.sum())
    sigma_lib, sigma_cell = 0.2, 0.4
    sigma = math.hypot(sigma_lib, sigma_cell)
    median = np.empty(k)
    for i, t in enumerate(design.types):
        logp = uni.base_log_mean[m] + _type_log_profile(design.species, uni.gene_ids.size, t)[m] + batch
        p = np.exp(logp - logp.max())
        p /= p.sum()
        o = np.argsort(-p, kind="stable")
        order[i] = o
        p_sorted[i] = p[o]
        r_sorted[i] = r[o]
        target = min(mean_detected * complexity[i], 0.9 * m.size)
        median[i] = _calibrate_size(p, r, target, sigma)

    # Median-centred, as the calibration assumes.
    lib_depth = rng.lognormal(0.0, sigma_lib, size=len(design.libraries))
    cell_noise = rng.lognormal(0.0, sigma_cell, size=design.type_of_cell.size)
    design.cell_size = median[design.type_of_cell] * lib_depth[design.lib_of_cell] * cell_noise
    return _Model(order, p_sorted, r_sorted, int(rng.integers(0, 2**62)))


def _gen_block(
    design: _Design, model: _Model, row: int, stop: int, frac_nonint: float, dtype: np.dtype, mean_nnz: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR pieces (indptr starting at 0) of rows ``[row, stop)``; safe to run in several threads."""
    n_genes = model.order.shape[1]
    dense = np.zeros(n_genes)
    seeds = _splitmix32(model.seed_base + np.arange(row, stop, dtype=np.int64))
    parts = []
    first = row
    while first < stop:
        # Room for the rows at ~1.3x the expected mean, and always for one worst-case cell.
        cap = int((stop - first) * mean_nnz * 1.3) + n_genes + 1024
        indptr = np.zeros(stop - first + 1, dtype=np.int64)
        indices = np.empty(cap, dtype=np.int32)
        data = np.empty(cap, dtype=dtype)
        done, pos = _fill_rows(
            first, stop, seeds[first - row :], design.type_of_cell, design.cell_size, model.order,
            model.p_sorted, model.r_sorted, frac_nonint, indptr, indices, data, dense,
        )  # fmt: skip
        parts.append((indptr[: done - first + 1], indices[:pos], data[:pos]))
        first = done
    if len(parts) == 1:
        return parts[0]
    offsets = np.cumsum([0] + [p[1].size for p in parts])
    indptr = np.concatenate(
        [np.zeros(1, np.int64)] + [p[0][1:] + off for p, off in zip(parts, offsets[:-1], strict=True)]
    )
    return indptr, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])


def _blocks(
    design: _Design,
    model: _Model,
    chunk_rows: int,
    frac_nonint: float,
    dtype: np.dtype,
    mean_hint: float,
    threads: int,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Row blocks in order, generated ahead in worker threads while the caller compresses.

    The kernel releases the GIL and every cell has its own RNG stream, so threads change speed,
    not values. About ``threads + 2`` blocks are in memory at once.
    """
    n = design.type_of_cell.size
    starts = list(range(0, n, chunk_rows))
    # The first block runs here: it compiles (or loads) the kernel once, before threads race to.
    first = _gen_block(design, model, 0, min(n, chunk_rows), frac_nonint, dtype, mean_hint)
    mean_nnz = max(1.0, first[1].size / max(1, first[0].size - 1))
    yield first
    del first
    if len(starts) == 1:
        return
    with ThreadPoolExecutor(max_workers=max(1, threads)) as ex:
        pending: deque[Future] = deque()
        todo = iter(starts[1:])
        for _ in range(max(1, threads)):
            start = next(todo, None)
            if start is None:
                break
            pending.append(
                ex.submit(_gen_block, design, model, start, min(n, start + chunk_rows), frac_nonint, dtype, mean_nnz)
            )
        while pending:
            block = pending.popleft().result()
            start = next(todo, None)
            if start is not None:
                pending.append(
                    ex.submit(
                        _gen_block, design, model, start, min(n, start + chunk_rows), frac_nonint, dtype, mean_nnz
                    )
                )
            yield block
            del block


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _dataset_kwargs(compression: str | None, level: int | None) -> dict[str, Any]:
    if compression is None:
        return {}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4 if level is None else int(level)}
    return {"compression": compression}


def _decode_barcodes(bc: np.ndarray) -> np.ndarray:
    """uint32 -> 16-letter ACGT bytes; integer order equals lexicographic order (A<C<G<T)."""
    shifts = np.arange(30, -1, -2, dtype=np.uint32)
    codes = (bc[:, None] >> shifts) & np.uint32(3)
    letters = np.frombuffer(b"ACGT", dtype=np.uint8)[codes]
    return np.ascontiguousarray(letters).view("S16").ravel()


def _categorical(cell_codes: np.ndarray, labels: Sequence[str]) -> pd.Categorical:
    """Per-cell categorical from a small label table, categories sorted like anndata's writer does."""
    used = np.unique(cell_codes)
    cats = sorted({str(labels[i]) for i in used})
    remap = np.array([cats.index(str(x)) if str(x) in cats else -1 for x in labels], dtype=np.int64)
    return pd.Categorical.from_codes(remap[cell_codes], categories=cats)


def _write_obs(f: h5py.File, design: _Design, dkw: dict[str, Any]) -> None:
    """Write obs column by column, so that only one string column is in memory at a time."""
    cols = [
        "barcodes", "SampleId", "anatEntityId", "stageId", "cellTypeId", "strain", "sex", "speciesId",
        "anatEntityName", "stageName", "cellTypeName", "libID", "unique_cell_ids", "cellTypeAuthorAnnotation",
    ]  # fmt: skip
    g = f.create_group("obs")
    g.attrs["encoding-type"] = "dataframe"
    g.attrs["encoding-version"] = "0.2.0"
    g.attrs["_index"] = "_index"
    g.attrs["column-order"] = cols

    libs = design.libraries
    lc = design.lib_of_cell
    tc = design.type_of_cell.astype(np.int64)
    types = [_ALL_TYPES[t] for t in design.types]
    bc_bytes = _decode_barcodes(design.barcode_int)
    lib_ids = np.array([lib.lib_id.encode() for lib in libs])

    def sep(a: np.ndarray) -> np.ndarray:
        return np.strings.add(a, b"_")

    write_elem(g, "_index", np.strings.add(sep(bc_bytes), lib_ids[lc]).astype(str), dataset_kwargs=dkw)

    uniq, inverse = np.unique(design.barcode_int, return_inverse=True)
    if uniq.size < design.barcode_int.size:  # repeated barcodes: anndata makes them categorical
        barcodes: Any = pd.Categorical.from_codes(inverse.ravel(), categories=_decode_barcodes(uniq).astype(str))
    else:
        barcodes = bc_bytes.astype(str)
    del uniq, inverse
    write_elem(g, "barcodes", barcodes, dataset_kwargs=dkw)
    del barcodes

    sample_id = design.sample_table[lc, tc]
    write_elem(g, "SampleId", sample_id, dataset_kwargs=dkw)
    per_lib = {
        "anatEntityId": [lib.tissue for lib in libs],
        "stageId": [lib.stage[0] for lib in libs],
        "strain": [lib.strain for lib in libs],
        "sex": [lib.sex for lib in libs],
        "anatEntityName": [TISSUES[lib.tissue] for lib in libs],
        "stageName": [lib.stage[1] for lib in libs],
        "libID": [lib.lib_id for lib in libs],
    }
    per_type = {
        "cellTypeId": [ct.id for ct in types],
        "cellTypeName": [ct.name for ct in types],
        "cellTypeAuthorAnnotation": design.author_labels,
    }
    for col in cols:
        if col in per_lib:
            write_elem(g, col, _categorical(lc, per_lib[col]), dataset_kwargs=dkw)
        elif col in per_type:
            write_elem(g, col, _categorical(tc, per_type[col]), dataset_kwargs=dkw)
        elif col == "speciesId":
            taxon = np.full(lc.size, SPECIES[design.species].taxon, dtype=np.int64)
            write_elem(g, col, taxon, dataset_kwargs=dkw)
    sample_bytes = np.array([str(s).encode() for s in design.sample_table.ravel()])
    suffix = sample_bytes.reshape(design.sample_table.shape)[lc, tc]
    write_elem(g, "unique_cell_ids", np.strings.add(sep(bc_bytes), suffix).astype(str), dataset_kwargs=dkw)


def _write_var(f: h5py.File, uni: GeneUniverse, measured: np.ndarray, dkw: dict[str, Any]) -> None:
    ids = uni.gene_ids[measured]
    symbols = uni.symbols[measured]
    sym = pd.Categorical(symbols)
    # object dtype, as Bgee's files have it: with pandas 3 plain text would be written as
    # anndata's nullable-string-array, a layout no Bgee release has
    var = pd.DataFrame(
        {
            "gene_id": pd.Series(ids, dtype=object),
            "feature_name": sym if len(sym.categories) < len(sym) else pd.Series(symbols, dtype=object),
        }
    )
    var.index = pd.Index(ids, dtype=object)
    write_elem(f, "var", var, dataset_kwargs=dkw)


def _write_x_csr(
    f: h5py.File, blocks, n_cells: int, n_genes: int, dtype: np.dtype, est_nnz: int, dkw: dict[str, Any]
) -> int:
    g = f.create_group("X")
    g.attrs["encoding-type"] = "csr_matrix"
    g.attrs["encoding-version"] = "0.1.0"
    g.attrs["shape"] = np.array([n_cells, n_genes], dtype=np.int64)
    # The chunk h5py would choose for the final size, i.e. what anndata's writer would produce.
    chunk = h5py.filters.guess_chunk((max(est_nnz, 1),), None, 4)
    kw = dict(chunks=chunk, maxshape=(None,), track_times=False, **dkw)
    data = g.create_dataset("data", shape=(0,), dtype=dtype, **kw)
    indices = g.create_dataset("indices", shape=(0,), dtype=np.int32, **kw)
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    nnz = 0
    row = 0
    for bptr, bidx, bdat in blocks:
        n = bidx.size
        data.resize((nnz + n,))
        indices.resize((nnz + n,))
        data[nnz:] = bdat
        indices[nnz:] = bidx
        indptr[row + 1 : row + bptr.size] = bptr[1:] + nnz
        row += bptr.size - 1
        nnz += n
        del bptr, bidx, bdat  # let the block go before the generator hands over the next one
    ptr_dtype = np.int32 if nnz < 2**31 else np.int64
    g.create_dataset("indptr", data=indptr.astype(ptr_dtype), track_times=False, **dkw)
    return nnz


def _write_x_csc(f: h5py.File, blocks, n_cells: int, n_genes: int, dtype: np.dtype, dkw: dict[str, Any]) -> int:
    import scipy.sparse as sp

    ptrs, idx, dat = [np.zeros(1, dtype=np.int64)], [], []
    nnz = 0
    for bptr, bidx, bdat in blocks:
        ptrs.append(bptr[1:] + nnz)
        idx.append(bidx)
        dat.append(bdat)
        nnz += bidx.size
    csr = sp.csr_matrix(
        (
            np.concatenate(dat) if dat else np.empty(0, dtype),
            np.concatenate(idx) if idx else np.empty(0, np.int32),
            np.concatenate(ptrs),
        ),
        shape=(n_cells, n_genes),
    )
    del ptrs, idx, dat
    write_elem(f, "X", csr.tocsc(), dataset_kwargs=dkw)
    return nnz


def synthetic_filename(species: str, experiment_id: str) -> str:
    """Bgee's droplet file name, so the converter's file-name parsing applies unchanged."""
    return f"{species}_{experiment_id}_droplet_based.h5ad"


def generate_experiment(
    path: str | os.PathLike[str],
    *,
    n_cells: int,
    species: str = "Homo_sapiens",
    experiment_id: str,
    n_genes_universe: int = 30000,
    measured_fraction: tuple[float, float] = (0.85, 0.98),
    mean_detected_genes: float = 1500,
    n_libraries: int | None = None,
    n_cell_types: int | None = None,
    seed: int = 0,
    compression: str | None = "gzip",
    compression_level: int | None = 4,
    x_format: Literal["csr", "csc"] = "csr",
    dtype: str | np.dtype = "float32",
    non_integer: bool = False,
    chunk_rows: int = 4096,
    threads: int | None = None,
) -> Path:
    """Write one synthetic Bgee droplet experiment and return its path.

    ``path`` is either the output file (ending in ``.h5ad``) or an output root, in which case the
    file goes to ``<root>/<species>/<species>_<experiment_id>_droplet_based.h5ad`` like Bgee's
    downloads. The file is written to a temporary name and renamed at the end, so an interrupted
    run never leaves a truncated file under the final name.

    The content depends only on the arguments that shape the data (seed, experiment_id, species,
    sizes, ``non_integer``): not on ``chunk_rows``, ``x_format``, ``dtype`` or compression.
    ``x_format="csc"`` holds the whole matrix in memory (CSC cannot be streamed by row), so use it
    for small files only. ``n_libraries`` is capped at 999 (three digits in the libID).
    ``threads`` generate row blocks while the main thread compresses (default: CPUs - 1, at most
    4); pass 1 when running several generators in parallel processes.
    """
    _check_species(species)
    if n_cells < 1:
        raise ValueError(f"n_cells must be >= 1, got {n_cells}")
    if x_format not in ("csr", "csc"):
        raise ValueError(f"x_format must be 'csr' or 'csc', got {x_format!r}")
    np_dtype = np.dtype(dtype)
    if np_dtype not in (np.dtype("float32"), np.dtype("float64"), np.dtype("int32")):
        raise ValueError(f"dtype must be float32, float64 or int32, got {np_dtype}")
    if non_integer and np_dtype.kind == "i":
        raise ValueError("non_integer=True needs a float dtype")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")

    out = Path(path)
    if out.suffix != ".h5ad":
        out = out / species / synthetic_filename(species, experiment_id)
    out.parent.mkdir(parents=True, exist_ok=True)

    uni = gene_universe(species, int(n_genes_universe))
    rng = np.random.default_rng([int(seed), zlib.crc32(experiment_id.encode()), SPECIES[species].taxon])
    design = _design(
        rng,
        species=species,
        experiment_id=experiment_id,
        n_cells=int(n_cells),
        n_genes_universe=uni.gene_ids.size,
        measured_fraction=measured_fraction,
        n_libraries=n_libraries,
        n_cell_types=n_cell_types,
    )
    model = _model(design, uni, rng, float(mean_detected_genes))
    dkw = _dataset_kwargs(compression, compression_level)
    frac = NON_INTEGER_FRACTION if non_integer else 0.0
    if threads is None:
        threads = max(1, min(4, (os.cpu_count() or 2) - 1))
    blocks = _blocks(design, model, int(chunk_rows), frac, np_dtype, float(mean_detected_genes), int(threads))

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            for k, v in _ANNDATA_ENCODING.items():
                f.attrs[k] = v
            if x_format == "csr":
                est = int(n_cells * mean_detected_genes)
                _write_x_csr(f, blocks, int(n_cells), design.measured.size, np_dtype, est, dkw)
            else:
                _write_x_csc(f, blocks, int(n_cells), design.measured.size, np_dtype, dkw)
            _write_obs(f, design, dkw)
            _write_var(f, uni, design.measured, dkw)
            for key in ("layers", "obsm", "obsp", "uns", "varm", "varp"):
                write_elem(f, key, {})
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def _generate_one(kwargs: dict[str, Any]) -> Path:
    return generate_experiment(**kwargs)


def generate_sources(
    out_dir: str | os.PathLike[str],
    *,
    n_experiments: int,
    cells_per_experiment: int | tuple[int, int],
    species: str | Sequence[str] = ("Homo_sapiens", "Mus_musculus"),
    seed: int = 0,
    processes: int = 1,
    first_index: int = 1,
    **kwargs: Any,
) -> list[Path]:
    """Write ``n_experiments`` files under ``out_dir`` in Bgee's directory layout.

    Experiments are ``SRPS<5 digits>`` numbered from ``first_index`` and take species in turn, so a
    run is reproducible and later runs can add experiments without clashing. A ``(min, max)``
    ``cells_per_experiment`` draws sizes log-uniformly, since real atlases mix small and large
    studies. ``processes > 1`` writes files in parallel (gzip is single-threaded per file) using
    the ``spawn`` start method: scripts calling this must guard their entry point with
    ``if __name__ == "__main__":``. Other keyword arguments go to :func:`generate_experiment`.
    """
    if n_experiments < 0:
        raise ValueError(f"n_experiments must be >= 0, got {n_experiments}")
    species_list = [species] if isinstance(species, str) else list(species)
    if not species_list:
        raise ValueError("species must name at least one species")
    for sp in species_list:
        _check_species(sp)
    rng = np.random.default_rng([int(seed), 0xB6EE])
    jobs = []
    for i in range(n_experiments):
        if isinstance(cells_per_experiment, int):
            n = cells_per_experiment
        else:
            lo, hi = cells_per_experiment
            n = round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        exp_seed = int(np.random.SeedSequence([int(seed), i + first_index]).generate_state(1)[0])
        jobs.append(
            dict(
                path=out_dir,
                n_cells=n,
                species=species_list[i % len(species_list)],
                experiment_id=f"SRPS{i + first_index:05d}",
                seed=exp_seed,
                **kwargs,
            )
        )
    if processes > 1 and "threads" not in kwargs:
        for job in jobs:
            job["threads"] = 1  # the processes already use the CPUs
    if processes <= 1 or len(jobs) <= 1:
        return [_generate_one(j) for j in jobs]
    with ProcessPoolExecutor(max_workers=min(processes, len(jobs)), mp_context=get_context("spawn")) as ex:
        return list(ex.map(_generate_one, jobs))
