"""The package's shape: imports point one way (import-linter's contracts in setup.cfg), no import
cycles, no function-local project imports without a reason, one place that picks the platform."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp  # test extra (import-linter's graph): missing is an install error, not a skip
import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kimi_jax", "sharding")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports setup.cfg` over the packages under `root`."""
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "setup.cfg"], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def python_files():
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def test_import_contracts_hold():
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 kept, 0 broken" in out.stdout


def test_contract_catches_a_reversed_import(tmp_path):
    """A copy of the code where the model imports the runtime, from inside a function: the layers
    contract breaks and names the import."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    shutil.copy(ROOT / "setup.cfg", tmp_path / "setup.cfg")
    quant = tmp_path / "kimi_jax" / "model" / "quant.py"
    quant.write_text(quant.read_text() + "\n\ndef _reversed():\n    from kimi_jax.runtime import engine\n\n"
                                          "    return engine\n")
    out = lint_imports(tmp_path)
    assert out.returncode != 0
    assert "kimi_jax.model.quant -> kimi_jax.runtime.engine" in out.stdout, out.stdout


def test_no_import_cycles_between_modules():
    """Strongly connected components of the module import graph (function-local imports included)."""
    graph = grimp.build_graph(*PACKAGES, include_external_packages=False)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    assert cycles == []


def test_function_local_project_imports_say_why():
    """A project import inside a function only defers something heavy or optional, and says so."""
    offenders = []
    for path in python_files():
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                names = ([inner.module or ""] if isinstance(inner, ast.ImportFrom)
                         else [a.name for a in inner.names] if isinstance(inner, ast.Import) else [])
                if any(n.split(".")[0] in PACKAGES for n in names) and "deferred" not in lines[inner.lineno - 1]:
                    offenders.append(f"{path.relative_to(ROOT)}:{inner.lineno}")
    assert offenders == []


def test_the_platform_is_asked_in_one_place():
    """Only the backend policy (kimi_jax/kernels) may ask JAX which platform it runs on; benchmarks
    may report it."""
    asks = re.compile(r"default_backend\(|\bdevices?\b[\w\[\]]*\.platform")
    askers = sorted({str(p.relative_to(ROOT)) for p in python_files() if asks.search(p.read_text())})
    allowed = {"kimi_jax/kernels/__init__.py"}
    assert [a for a in askers if a not in allowed and not a.startswith("kimi_jax/bench/")] == []


def test_top_level_keeps_only_its_public_face():
    top = sorted(p.name for p in (ROOT / "kimi_jax").glob("*.py"))
    assert top == ["__init__.py", "config.py", "convert.py", "generate.py", "plan.py"]
