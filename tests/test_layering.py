"""The import graph of the library: dependencies point one way.

Parses every module of zeroadam/, triton_kernels/ (zeroadam.triton_kernels) and integrations/
(zeroadam.integrations) — imports at the top and inside functions alike, ``if TYPE_CHECKING:`` blocks aside — and
fails on any import cycle and on any import of ``zeroadam.integrations`` from the core.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"zeroadam": ROOT / "zeroadam", "zeroadam.triton_kernels": ROOT / "triton_kernels", "zeroadam.integrations": ROOT / "integrations"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The library modules that module ``name`` imports (a ``from pkg import x`` counts as pkg.x when x is a module)."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.add(alias.name)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                for alias in child.names:
                    found.add(f"{mod}.{alias.name}" if f"{mod}.{alias.name}" in modules else mod)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_graph_sees_the_library() -> None:
    g = _graph()
    assert "zeroadam.optimizer" in g and "zeroadam.integrations.accelerate" in g and "zeroadam.triton_kernels.adamw" in g
    assert "zeroadam.engines.base" in g["zeroadam.optimizer"] or "zeroadam.engines" in g["zeroadam.optimizer"]


def test_core_never_imports_integrations() -> None:
    bad = [
        f"{m} imports {d}"
        for m, deps in _graph().items()
        if not m.startswith("zeroadam.integrations")
        for d in deps
        if d.startswith("zeroadam.integrations")
    ]
    assert not bad, "the core must not import integrations (an integration registers what the core needs): " + "; ".join(bad)


def test_no_import_cycles() -> None:
    g = _graph()
    # The package root re-exports the public API and imports nearly everything; a module importing the root back
    # (``from zeroadam import x`` for a name, not a module) closes a cycle through it, which counts.
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                dfs(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            dfs(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
