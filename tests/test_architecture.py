"""The house rules of docs/ARCHITECTURE.md, walked with ``ast``: no import cycle between modules
(imports inside functions count), a pure detection core, and a sorted ``__all__`` everywhere."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# What the pure core may import: the domain, the config model, its own modules, and the parts
# of the standard library that neither do I/O nor read the OS.
CORE_STDLIB = {"__future__", "bisect", "collections", "dataclasses", "enum", "functools",
               "heapq", "itertools", "math", "random", "statistics", "typing"}
CORE_NODEWATCH = ("nodewatch.model", "nodewatch.config", "nodewatch.detect")
# The simulator times itself (wall_s) with time.perf_counter; nothing in it reads the time of
# day to decide anything: the core runs on the virtual clock.
# The identity policy compares credential hashes in constant time (hmac.compare_digest): pure
# computation, no I/O; hashing and minting credentials stay at the edge (protocol.py).
# The φ accrual windows are arrays of doubles (8 bytes a sample, not a list's 32): pure memory.
# Shares hash node ids and coordinator names (hashlib.blake2b): pure computation.
# A history chunk (model.SampleChunk) holds its columns as arrays, for the same reason as φ.
CORE_EXCEPTIONS = {"nodewatch.model": {"array"},
                   "nodewatch.detect.simulate": {"time"},
                   "nodewatch.detect.simulate_gray": {"time"},
                   "nodewatch.detect.identity": {"hmac"},
                   "nodewatch.detect.phi": {"array"},
                   "nodewatch.detect.shares": {"hashlib"}}


def _modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(module: str, path: Path) -> Iterator[str]:
    """Every module name an import in ``module`` names, at any depth (functions included)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield target
            # ``from nodewatch import config`` names the module nodewatch.config.
            yield from (f"{target}.{alias.name}" for alias in node.names
                        if f"{target}.{alias.name}" in MODULES)


def _graph() -> dict[str, set[str]]:
    return {module: {name for name in _imports(module, path) if name in MODULES and name != module}
            for module, path in MODULES.items()}


def test_there_is_no_import_cycle_between_modules() -> None:
    graph = _graph()
    # Tarjan's strongly connected components: any component of two or more is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    for node in graph:
        if node not in index:
            visit(node)
    assert cycles == []


def test_the_walk_sees_imports_inside_functions() -> None:
    # The demo imports the renderer inside a function; the walk must count it.
    assert "nodewatch.cli.render" in _graph()["nodewatch.cli.demo"]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("nodewatch.detect")))
def test_the_detection_core_imports_nothing_from_http_stores_actions_or_the_os(
        module: str) -> None:
    allowed_stdlib = CORE_STDLIB | CORE_EXCEPTIONS.get(module, set())
    for name in _imports(module, MODULES[module]):
        top = name.partition(".")[0]
        if top == "nodewatch":
            assert name.startswith(CORE_NODEWATCH), f"{module} imports {name}"
        else:
            assert top in allowed_stdlib, f"{module} imports {name}"


@pytest.mark.parametrize("module", ["nodewatch.model"])
def test_the_domain_model_is_pure_too(module: str) -> None:
    for name in _imports(module, MODULES[module]):
        top = name.partition(".")[0]
        allowed = CORE_STDLIB | {"msgspec"} | CORE_EXCEPTIONS.get(module, set())
        assert top in allowed, f"{module} imports {name}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.endswith("__main__")))
def test_every_module_declares_a_sorted_all(module: str) -> None:
    tree = ast.parse(MODULES[module].read_text())
    declared = [node for node in tree.body
                if isinstance(node, ast.Assign | ast.AnnAssign)
                and any(isinstance(t, ast.Name) and t.id == "__all__"
                        for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))]
    assert declared, f"{module} has no __all__"
    value = declared[0].value
    assert isinstance(value, ast.List)
    names = [ast.literal_eval(element) for element in value.elts]
    assert names == sorted(names), f"{module}.__all__ is not sorted"
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef
                                                       | ast.ClassDef)}
    defined |= {t.id for n in tree.body if isinstance(n, ast.Assign)
                for t in n.targets if isinstance(t, ast.Name)}
    defined |= {n.target.id for n in tree.body
                if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    defined |= {(a.asname or a.name).split(".")[0] for n in ast.walk(tree)
                if isinstance(n, ast.Import | ast.ImportFrom) for a in n.names}
    missing = [name for name in names if name not in defined]
    assert missing == [], f"{module}.__all__ names what it does not define: {missing}"
