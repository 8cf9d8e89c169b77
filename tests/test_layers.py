"""Imports point down: each package imports only the packages below it (docs/architecture.md draws the layers), and
no module imports one of ours inside a function, where a cycle could hide."""

from __future__ import annotations

import ast

from conftest import ROOT

# lower numbers sit lower; a package may import its own layer's other packages only where listed in SIDEWAYS
LAYERS = {"utils": 0, "models": 1, "eval": 1, "optims": 1, "data": 2, "losses": 2, "deploy": 3, "engine": 4,
          "serving": 4, "<root>": 5, "benchmarks": 6}
SIDEWAYS = {("<root>", "<root>")}  # the scripts use captioner.py, the Python API beside them
OURS = set(LAYERS) - {"<root>"}
# imports placed inside a function on purpose, not to dodge a cycle: the API's port opens (/health answers) before
# torch and the model code load in the background (tests/test_api.py::test_api_import_loads_no_model)
DEFERRED = {"api.py"}


def _modules() -> dict[str, ast.Module]:
    files = [p for p in ROOT.glob("*.py")] + [p for pkg in OURS for p in (ROOT / pkg).rglob("*.py")]
    return {str(p.relative_to(ROOT)): ast.parse(p.read_text(encoding="utf-8")) for p in files}


def _package(relative: str) -> str:
    return relative.split("/")[0] if "/" in relative else "<root>"


def _imported_packages(node: ast.AST) -> list[str]:
    """The packages of ours (or '<root>' for a root module) an import statement names."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module]
    else:
        return []
    roots = {p.stem for p in ROOT.glob("*.py")}
    return [n.split(".")[0] if n.split(".")[0] in OURS else "<root>" for n in names
            if n.split(".")[0] in OURS or n.split(".")[0] in roots]


def test_every_package_imports_only_packages_below_it():
    upward = []
    for relative, tree in _modules().items():
        source = _package(relative)
        for node in ast.walk(tree):
            for target in _imported_packages(node):
                if target != source and LAYERS[target] >= LAYERS[source] and (source, target) not in SIDEWAYS:
                    upward.append(f"{relative}:{node.lineno} imports {target}")
    assert upward == []


def test_no_module_imports_ours_inside_a_function():
    hidden = []
    for relative, tree in _modules().items():
        if _package(relative) == "benchmarks" or relative in DEFERRED:
            continue  # benchmark helpers import what one measurement needs, not what the module needs
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                hidden += [f"{relative}:{node.lineno}" for node in ast.walk(fn) if _imported_packages(node)]
    assert hidden == []
