"""data_prep's modules import each other without a circle (issue 23: stage.py and ray_exec.py
imported each other), counting imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def module_graph(package: Path) -> dict[str, set[str]]:
    """Module (dotted, under the package) -> the package's modules it imports, anywhere in it."""
    name = package.name
    mods = {".".join(p.relative_to(package.parent).with_suffix("").parts): p
            for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # `from data_prep import ray_exec` imports data_prep.ray_exec
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            else:
                continue
            deps |= {t for t in targets if t in mods and t != mod and t != name}
        graph[mod] = deps
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (its modules in order, the first repeated), or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_data_prep_has_no_import_circle():
    assert cycle(module_graph(ROOT / "data_prep")) is None


def test_the_checker_finds_a_circle_inside_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import a\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    assert cycle(module_graph(pkg)) == ["pkg.a", "pkg.b", "pkg.a"]
