"""The import rules of DESIGN.md, checked on the source: who may import whom.

- contracts imports nothing of the project, and only the standard library at module level;
- model imports only torch (and the standard library) and contracts;
- estimate imports no torch at import time and never train;
- data_prep imports nothing of the other packages;
- train may import model, estimate's catalog (estimate.hardware) and contracts.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("contracts", "model", "train", "data_prep", "estimate")

# package -> project modules it may import (a prefix match: "model" allows model.flops)
ALLOWED = {
    "contracts": ("contracts",),
    "model": ("model", "contracts"),
    "estimate": ("estimate", "model.config", "model.flops", "model.precision", "contracts"),
    "data_prep": ("data_prep", "contracts"),
    "train": ("train", "model", "estimate.hardware", "contracts"),
}
# package -> third-party modules allowed at module level (None: any)
TOP_LEVEL_THIRD_PARTY = {"contracts": (), "model": ("torch",), "estimate": None,
                         "data_prep": None, "train": None}
NEVER_AT_TOP = {"estimate": ("torch",)}


def imports(path: Path, root: Path = ROOT) -> list[tuple[str, bool, int]]:
    """(module, at module level, line) for every import in a file; relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            # `from model import flops` imports model.flops
            out += [(f"{base}.{a.name}" if base in PROJECT else base, id(node) in top, node.lineno)
                    for a in node.names]
    return out


def violations(package: str, root: Path = ROOT) -> list[str]:
    """Every import in `package` that breaks its rule, as 'file:line: module'."""
    bad = []
    for path in sorted((root / package).rglob("*.py")):
        for module, top_level, line in imports(path, root):
            first = module.split(".")[0]
            where = f"{path.relative_to(root)}:{line}: {module}"
            if first in PROJECT:
                if not any(module == a or module.startswith(a + ".") for a in ALLOWED[package]):
                    bad.append(where)
            elif top_level and first not in sys.stdlib_module_names:
                allowed = TOP_LEVEL_THIRD_PARTY[package]
                if (allowed is not None and first not in allowed) or first in NEVER_AT_TOP.get(package, ()):
                    bad.append(where + " (at module level)")
    return bad


@pytest.mark.parametrize("package", list(ALLOWED))
def test_package_imports_follow_the_rules(package):
    assert violations(package) == []


def test_the_checker_catches_a_broken_rule(tmp_path):
    """A model module importing train, and an estimate module importing torch at the top."""
    for package, text in (("model", "from train.loop import run\n"),
                          ("estimate", "import torch\n\ndef f():\n    import torch\n")):
        (tmp_path / package).mkdir()
        (tmp_path / package / "bad.py").write_text(text)
    assert violations("model", tmp_path) == ["model/bad.py:1: train.loop"]
    assert violations("estimate", tmp_path) == ["estimate/bad.py:1: torch (at module level)"]


def test_estimate_loads_no_torch():
    """Importing every estimate module (and the model modules it uses) leaves torch unloaded."""
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts)
                     for p in (ROOT / "estimate").rglob("*.py") if p.name != "__main__.py")
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "import estimate.__main__\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
