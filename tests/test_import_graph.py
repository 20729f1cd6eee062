"""The package's import graph, read statically (``ast``): the library never imports its
command-line front end (only ``aldk_tf/cli/`` imports from ``aldk_tf/cli/``, and only it
holds mains), and no modules import each other, directly or round a longer circle.

Every ``import`` counts, at module level or inside a function (a deferred import is
still a dependency): ``from aldk_tf.data import preprocess`` is an edge to the module
``aldk_tf.data.preprocess``, ``from aldk_tf.data import DataError`` one to the package
``aldk_tf.data`` (its ``__init__``).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "aldk_tf"


def module_files() -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of the package."""
    found = {}
    for path in (ROOT / PACKAGE).rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = module_files()


def _known(name: str) -> str | None:
    """The longest prefix of ``name`` that is a module of the package."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> set[str]:
    """The package's modules that ``module`` imports."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(_known(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.add(submodule if submodule in MODULES else _known(target))
    return {name for name in found if name and name != module}


GRAPH = {module: imports(module) for module in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack, on_stack, found = [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read():
    """The reader finds known edges (a test that cannot pass on an empty graph)."""
    assert "aldk_tf.data.checks" in GRAPH["aldk_tf.data.preprocess"]
    assert "aldk_tf.data.hdf5" in GRAPH["aldk_tf.data.dataset_config"]
    assert "aldk_tf.deploy.warp" in GRAPH["aldk_tf.cli.warp"]
    assert "aldk_tf.data" in GRAPH["aldk_tf.deploy.preparation"]
    assert len(GRAPH) > 60


def test_no_library_module_imports_the_command_line():
    offenders = {module: sorted(name for name in targets
                                if name.startswith(f"{PACKAGE}.cli"))
                 for module, targets in GRAPH.items()
                 if not module.startswith(f"{PACKAGE}.cli")}
    assert not {module: names for module, names in offenders.items() if names}


def test_only_the_command_line_holds_mains():
    with_main = sorted(module for module, path in MODULES.items()
                       if not module.startswith(f"{PACKAGE}.cli")
                       and any(isinstance(node, ast.FunctionDef) and node.name == "main"
                               for node in ast.parse(path.read_text()).body))
    assert not with_main


def test_no_modules_import_each_other():
    assert cycles(GRAPH) == []


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, [])])
def test_cycles_are_found(graph, expected):
    assert cycles(graph) == expected
