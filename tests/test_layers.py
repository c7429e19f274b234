"""The layer rules of docs/architecture.md, read from the source of every module of the package with ``ast``
(imports at module level and inside functions alike): the engine imports neither QGIS nor the trainer, the
trainer never imports QGIS, and the plugin imports, besides QGIS and the standard library, only engine
modules whose import loads the standard library alone (no torch, numpy, rasterio, ...)."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

from conftest import REPO

LAYERS = ("engine", "trainer", "qgis_plugin")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(("geochange", *(parts[:-1] if parts[-1] == "__init__" else parts)))


# The repository root is the package ``geochange``; its __init__ is what QGIS loads first.
MODULES = {module_name(p): p for p in [REPO / "__init__.py", *(p for layer in LAYERS
                                                                for p in sorted((REPO / layer).rglob("*.py")))]}


def imports(name: str, at_import: bool = False) -> set[str]:
    """The modules that module ``name`` imports, relative imports made absolute; ``from m import x`` counts
    ``m``, and ``m.x`` too when that is a module of the package. ``at_import``: only the imports that
    importing the module runs (those inside functions are left out)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if at_import and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                anchor = package.rsplit(".", child.level - 1)[0] if child.level else ""
                base = ".".join(part for part in (anchor, child.module) if part)
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in child.names if f"{base}.{alias.name}" in MODULES)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return found


def is_stdlib(module: str) -> bool:
    return module.split(".")[0] in sys.stdlib_module_names


def within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def stdlib_only() -> set[str]:
    """The package's modules whose import loads the standard library alone: every import they run when
    imported, and their packages' ``__init__``s (which importing them runs first), is one of the standard
    library or another such module."""
    loads = {name: imports(name, at_import=True) | {name.rsplit(".", n)[0] for n in range(1, name.count(".") + 1)}
             for name in MODULES}
    kept = set(MODULES)
    while dropped := {n for n in kept if any(not is_stdlib(m) and m not in kept for m in loads[n])}:
        kept -= dropped
    return kept


def breaches(names, allowed) -> list[str]:
    """``path: module`` for every import of the modules ``names`` that ``allowed(module)`` refuses."""
    return [f"{MODULES[name].relative_to(REPO)}: {module}" for name in sorted(names)
            for module in sorted(imports(name)) if not allowed(module)]


def layer(name: str) -> list[str]:
    return [module for module in MODULES if within(module, [f"geochange.{name}"])]


def test_the_engine_imports_neither_qgis_nor_the_trainer():
    forbidden = ("qgis", "processing", "geochange.trainer", "geochange.qgis_plugin")
    assert breaches(layer("engine"), lambda module: not within(module, forbidden)) == []


def test_the_trainer_never_imports_qgis():
    forbidden = ("qgis", "processing", "geochange.qgis_plugin")
    assert breaches(layer("trainer"), lambda module: not within(module, forbidden)) == []


def test_the_plugin_imports_qgis_and_only_light_engine_modules():
    """QGIS's own Python has no torch: besides QGIS (and its Processing plugin) the plugin, with the root
    ``__init__`` that QGIS loads, may import only the standard library, itself, and the engine modules
    whose import loads the standard library alone."""
    light = stdlib_only()

    def allowed(module: str) -> bool:
        return (is_stdlib(module) or module == "geochange" or (within(module, ["geochange.engine"]) and module in light)
                or within(module, ("qgis", "processing", "geochange.qgis_plugin")))

    assert breaches(["geochange", *layer("qgis_plugin")], allowed) == []
