"""The layering the README's Architecture section promises, read from the source's imports:
no import cycle between folders, and an engine core (and model code) free of Ray, gRPC and the
cluster layer, directly or through anything it imports."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Packages whose imports must never reach these roots (the engine runs in one plain process).
PLAIN_PROCESS = ("specray.workers.engine", "specray.workers.models", "specray.kernels")
FORBIDDEN_ROOTS = ("ray", "grpc", "specray.cluster", "specray.router")


def _source_modules() -> dict[str, Path]:
    """Every module of the distribution, by dotted name, from pyproject's package-dir map."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    modules = {}
    for package, folder in setuptools["package-dir"].items():
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _imports(path: Path, module: str) -> set[str]:
    """Absolute names this module imports (relative imports resolved)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: -node.level]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


MODULES = _source_modules()
IMPORTS = {name: {i for i in _imports(path, name)} for name, path in MODULES.items()}


def _folder(module: str) -> str:
    """The package (folder) a module lives in; a package's own __init__ belongs to it."""
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _internal(name: str) -> str | None:
    """The source module an imported name refers to (longest known prefix), if any."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def folder_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, names in IMPORTS.items():
        for target in filter(None, map(_internal, names)):
            a, b = _folder(module), _folder(target)
            # A folder may use its own subfolders (and the namespace root is no layer).
            if a != b and not b.startswith(a + ".") and "specray" not in (a, b):
                graph.setdefault(a, set()).add(b)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a path (depth-first search), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_folders_import_each_other_one_way():
    cycle = find_cycle(folder_graph())
    assert cycle is None, "folder-level import cycle: " + " -> ".join(cycle or [])


def test_engine_core_reaches_no_ray_grpc_or_cluster():
    for root in PLAIN_PROCESS:
        for module in [m for m in MODULES if m == root or m.startswith(root + ".")]:
            seen, todo = set(), [module]
            while todo:
                current = todo.pop()
                if current in seen:
                    continue
                seen.add(current)
                for name in IMPORTS[current]:
                    bad = [r for r in FORBIDDEN_ROOTS if name == r or name.startswith(r + ".")]
                    assert not bad, f"{module} reaches {name} (through {current})"
                    if (target := _internal(name)) is not None:
                        todo.append(target)


def test_the_check_would_see_a_reverse_import():
    """The walker works: the verifier really imports the engine core, and a planted import the
    other way is reported as a cycle."""
    graph = folder_graph()
    assert "specray.workers.engine" in graph["specray.workers.verifier"]
    graph.setdefault("specray.workers.engine", set()).add("specray.workers.verifier")
    assert find_cycle(graph) is not None
