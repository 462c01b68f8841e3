"""The package's one-way order of layers, and no imports from other packages' private modules.

schema and support -> sources (H5AD) -> format (Zarr layout) -> converter -> catalog -> query -> api
-> bgee downloads, cluster, CLI. A module may import its own layer and those before it; imports
under ``if TYPE_CHECKING:`` (annotations only) are not counted.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "bgee_dask"
LAYERS = {
    "schema": 0,
    "_version": 0,
    "_jit": 0,
    "_runtime": 0,
    "cancellation": 0,
    "failpoints": 0,
    "workdirs": 0,
    "sources": 1,
    "synthetic": 1,
    "format": 2,
    "converter": 3,
    "catalog": 4,
    "query": 5,
    "api": 6,
    "bgee": 7,
    "cluster": 7,
    "demo": 7,
    "cli": 8,
    "__init__": 9,
}
PRIVATE = ("zarr.core", "anndata._", "deflate._", "numcodecs._", "dask._", "distributed._")


def _modules() -> list[pathlib.Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    parts = module.split(".")
    if parts == ["bgee_dask"]:
        return LAYERS["__init__"]
    return LAYERS[parts[1]]


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import outside ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for b in node.body for n in ast.walk(b))
    package = _name(path) if path.name == "__init__.py" else _name(path).rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if base.startswith("bgee_dask")]
    return out


def test_every_module_has_a_layer():
    assert all(_layer(_name(p)) >= 0 for p in _modules())


@pytest.mark.parametrize("path", _modules(), ids=lambda p: _name(p))
def test_nothing_imports_upward(path):
    own = _layer(_name(path))
    upward = []
    for line, module in _imports(path):
        if module.startswith("bgee_dask.") and module.split(".")[1] in LAYERS and _layer(module) > own:
            upward.append(f"line {line}: {module}")
    assert not upward, f"{_name(path)} (layer {own}) imports a later layer: {upward}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: _name(p))
def test_no_private_modules_of_other_packages(path):
    private = [f"line {line}: {m}" for line, m in _imports(path) if m.startswith(PRIVATE)]
    assert not private, private
