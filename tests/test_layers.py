"""The package's import graph follows the layers of docs/design.md §1 and has no cycles.

kernels -> model -> weights -> applications -> cli: each module imports only from its own layer or
the layers before it, function-local imports included. ``vmamba_cli.errors`` and
``vmamba_cli.version`` import nothing and may be imported by every layer except the kernels; the
package root only re-exports the public API, so no module of the package imports it.

The graph is read from the source with ``ast`` (nothing is imported), folders mapped to packages as
pyproject.toml's [tool.setuptools.package-dir] does (kernels/ -> vmamba_cli.kernels, weights/ ->
vmamba_cli.weights).
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "vmamba_cli"

LAYERS = ("kernels", "model", "weights", "apps", "cli")
# Import-free modules any layer but the kernels may use.
BASE_MODULES = {"vmamba_cli.errors", "vmamba_cli.version"}
CLI_MODULES = {"vmamba_cli.cli", "vmamba_cli.__main__"}


# ------------------------------------------------------------------------------------------------
# Reading the graph
# ------------------------------------------------------------------------------------------------

def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    config = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    dirs = config.get("tool", {}).get("setuptools", {}).get("package-dir") or {PACKAGE: PACKAGE}
    return {name: root / folder for name, folder in dirs.items() if name}


def find_modules(dirs: dict[str, Path]) -> dict[str, Path]:
    """Module name -> source file. Packages mapped to their own folder win over a folder reached
    through another package (the worktree's git-ignored symlinks vmamba_cli/kernels, vmamba_cli/weights)."""
    modules: dict[str, Path] = {}
    for package, folder in sorted(dirs.items(), key=lambda item: len(item[0])):
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
            for name in filenames:
                if not name.endswith(".py"):
                    continue
                path = Path(dirpath, name)
                parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
                modules[".".join([package, *parts])] = path
    return modules


def _resolve(target: str, modules) -> str | None:
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def imports_of(name: str, source: str, is_package: bool, modules) -> set[str]:
    """Project modules that ``name`` imports anywhere in its source (top level, functions, TYPE_CHECKING)."""
    base = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = base.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                module = ".".join(parts + ([node.module] if node.module else []))
            submodules = [f"{module}.{alias.name}" for alias in node.names]
            # `from pkg import sub` imports pkg.sub (and runs pkg); `from mod import obj` imports mod.
            targets = submodules if all(s in modules for s in submodules) else [module, *submodules]
        else:
            continue
        for target in targets:
            resolved = _resolve(target, modules)
            if resolved is not None and resolved != name:
                found.add(resolved)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = find_modules(package_dirs(root))
    return {name: imports_of(name, path.read_text(encoding="utf-8"), path.name == "__init__.py", modules)
            for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


# ------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------

def layer_of(module: str) -> str:
    if module == PACKAGE:
        return "root"
    if module in BASE_MODULES:
        return "base"
    if module in CLI_MODULES or module.startswith(f"{PACKAGE}.commands"):
        return "cli"
    for layer, prefix in (("kernels", f"{PACKAGE}.kernels"), ("weights", f"{PACKAGE}.weights")):
        if module == prefix or module.startswith(prefix + "."):
            return layer
    if module == f"{PACKAGE}.model":
        return "model"
    return "apps"  # data, predict, evaluate, train, profile, erf, export, flops, runtime ...


def allowed(importer: str, imported: str) -> bool:
    source, target = layer_of(importer), layer_of(imported)
    if target == "root":
        return False
    if source == "root":
        return target in ("base", "model", "weights")
    if target == "base":
        return source != "kernels"
    if source == "base":
        return False
    return LAYERS.index(target) <= LAYERS.index(source)


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} ({layer_of(a)}) imports {b} ({layer_of(b)})"
                  for a, targets in graph.items() for b in targets if not allowed(a, b))


def _without_kernels(graph):
    return {a: {b for b in targets if layer_of(b) != "kernels"}
            for a, targets in graph.items() if layer_of(a) != "kernels"}


@pytest.fixture(scope="module")
def graph():
    return import_graph()


# ------------------------------------------------------------------------------------------------
# The checker itself
# ------------------------------------------------------------------------------------------------

def test_cycle_finder_and_layer_rules_on_a_synthetic_graph():
    graph = {
        "a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(),       # a -> b -> c -> a
        "e": {"e2"}, "e2": {"e"},                                   # two-module cycle
        "f": {"d"},                                                 # no cycle
    }
    assert sorted(find_cycles(graph)) == [["a", "b", "c"], ["e", "e2"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert not allowed("vmamba_cli.kernels.scan_cpu", "vmamba_cli.flops")
    assert not allowed("vmamba_cli.model", "vmamba_cli.weights.loading")
    assert not allowed("vmamba_cli.weights.model_io", "vmamba_cli.data")
    assert not allowed("vmamba_cli.predict", "vmamba_cli.commands._common")
    assert not allowed("vmamba_cli.weights.download", "vmamba_cli")
    assert not allowed("vmamba_cli.kernels", "vmamba_cli.errors")
    assert not allowed("vmamba_cli.errors", "vmamba_cli.model")
    assert allowed("vmamba_cli.weights.model_io", "vmamba_cli.model")
    assert allowed("vmamba_cli.model", "vmamba_cli.errors")
    assert allowed("vmamba_cli.commands.predict", "vmamba_cli.predict")
    assert allowed("vmamba_cli", "vmamba_cli.weights")


def test_import_reader_sees_local_relative_and_type_checking_imports():
    modules = {"pkg": None, "pkg.a": None, "pkg.b": None, "pkg.sub": None, "pkg.sub.c": None}
    source = (
        "from typing import TYPE_CHECKING\n"
        "import os\n"
        "from . import b\n"
        "if TYPE_CHECKING:\n"
        "    from pkg.sub.c import Thing\n"
        "def f():\n"
        "    from .sub import helper\n"
    )
    assert imports_of("pkg.a", source, False, modules) == {"pkg.b", "pkg.sub.c", "pkg.sub"}


def test_the_package_is_read_with_its_folder_mapping(graph):
    assert {"vmamba_cli.model", "vmamba_cli.kernels", "vmamba_cli.weights.model_io", "vmamba_cli.cli"} <= set(graph)
    assert "vmamba_cli.kernels" in graph["vmamba_cli.model"]
    assert "vmamba_cli.model" in graph["vmamba_cli.weights.model_io"]


# ------------------------------------------------------------------------------------------------
# The package
# ------------------------------------------------------------------------------------------------

def test_layers_above_the_kernels_import_only_earlier_layers(graph):
    assert layer_violations(_without_kernels(graph)) == []


def test_no_import_cycles_above_the_kernels(graph):
    assert find_cycles(_without_kernels(graph)) == []


def test_no_import_cycles_and_kernels_import_no_later_layer(graph):
    assert find_cycles(graph) == []
    assert [v for v in layer_violations(graph) if v.split(" ")[1] == "(kernels)"] == []
