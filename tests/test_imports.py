"""The import structure the layout promises (DESIGN.md): the core never imports an app, no app imports
another, no module circle, and the training library (`monitor/`, `model/`) never imports a tool."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
# command-line tools of the core: a library module that imported one would run upward
TOOLS = {
    "src.nanollama.launcher",
    "src.nanollama.runs",
    "src.nanollama.lr_finder",
    "src.nanollama.hf",
    "src.nanollama.scaling",
}
LIBRARIES = ("src.nanollama.monitor", "src.nanollama.model")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, modules: set[str]) -> set[str]:
    """The project modules a file imports, anywhere in it (those under `if TYPE_CHECKING:` too: an
    annotation's import ties the modules as much), resolved to module names (`from .x import y` -> the
    package's x, or x.y where y is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
    return {m for m in found if m in modules}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in SRC.rglob("*.py") if "__pycache__" not in p.parts}
    return {name: imported(path, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            component.append(v)
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def app_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if parts[:2] == ["src", "apps"] and len(parts) > 2 else None


def test_the_graph_sees_relative_and_absolute_imports():
    graph = import_graph()
    assert "src.nanollama.config" in graph["src.nanollama.optim"]  # `from .config import ...`
    assert (
        "src.nanollama.monitor.logger" in graph["src.apps.gssm.train"]
    )  # `from ...nanollama.monitor.logger`


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_the_core_never_imports_an_app():
    graph = import_graph()
    upward = [(m, i) for m, deps in graph.items() if m.startswith("src.nanollama") for i in deps if app_of(i)]
    assert upward == []


def test_no_app_imports_another():
    graph = import_graph()
    across = [
        (m, i) for m, deps in graph.items() for i in deps if app_of(m) and app_of(i) not in (None, app_of(m))
    ]
    assert across == []


def test_the_training_library_never_imports_a_tool():
    graph = import_graph()
    upward = [(m, i) for m, deps in graph.items() if m.startswith(LIBRARIES) for i in deps if i in TOOLS]
    assert upward == []


def test_cycles_finds_a_circle_and_spares_a_chain():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
