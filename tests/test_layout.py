"""The package's layout rules: no import circle between its modules, no private name imported across modules."""

from __future__ import annotations

import ast
from pathlib import Path

import napari_spineseg

PACKAGE = Path(napari_spineseg.__file__).resolve().parent


def _modules() -> dict[str, tuple[Path, bool]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _imports(modules: dict[str, tuple[Path, bool]]) -> list[tuple[str, str, str]]:
    """(importing module, imported module, imported name or '') for every import inside the package."""
    found = []
    for module, (path, is_package) in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "napari_spineseg":
                    continue
                for alias in node.names:
                    if f"{target}.{alias.name}" in modules:  # a submodule
                        found.append((module, f"{target}.{alias.name}", ""))
                    else:
                        found.append((module, target, alias.name))
            elif isinstance(node, ast.Import):
                found += [(module, a.name, "") for a in node.names if a.name in modules]
    return found


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return components


def test_no_import_circle() -> None:
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for source, target, _ in _imports(modules):
        # A package's __init__ re-exporting its own submodules is not a circle of the code.
        if target in modules and target != source and not target.startswith(source + "."):
            edges[source].add(target)
    assert _cycles(edges) == []


def test_no_private_name_crosses_a_module_boundary() -> None:
    modules = _modules()
    crossing = sorted(
        f"{source} imports {target}.{name}"
        for source, target, name in _imports(modules)
        if name.startswith("_") and not name.startswith("__") and target != source
    )
    assert crossing == []


def test_the_checks_see_a_circle_and_a_private_import(tmp_path: Path) -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
