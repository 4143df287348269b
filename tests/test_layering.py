"""The package's shape: one-way layers, no import cycle, short functions, one top-level name.

Layers (README, Layout): cli -> matrix | report | accuracy -> plugins -> profilers | results
-> modules. A module may import attnbench packages strictly below its own, and its own.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
RANK = {"modules": 0, "configs": 0, "profilers": 1, "results": 1, "plugins": 2,
        "matrix": 3, "report": 3, "accuracy": 3, "cli": 4}
MAX_FUNCTION_LINES = 60


def source_files() -> Iterator[Tuple[str, Path]]:
    """(dotted module name, path) for every module of the attnbench package."""
    for folder, prefix in ((ROOT / "bench", "attnbench"), (ROOT / "modules", "attnbench.modules")):
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join([prefix] + parts), path


def imports(name: str, path: Path, module_level_only: bool = False) -> Set[str]:
    """attnbench modules imported by ``name`` (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if module_level_only else ast.walk(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: Set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m == "attnbench" or m.startswith("attnbench.")}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def known_modules() -> Dict[str, Path]:
    return dict(source_files())


def test_layers_point_one_way():
    bad: List[str] = []
    for name, path in source_files():
        src = layer(name)
        if src not in RANK:  # the package root (public API, __main__) may use any layer
            continue
        for target in imports(name, path):
            dst = layer(target)
            if dst == src or dst not in RANK:
                continue
            if RANK[dst] >= RANK[src]:
                bad.append(f"{path.relative_to(ROOT)}: {src} imports {target}")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_no_import_cycle_at_module_level():
    mods = known_modules()
    graph = {n: {t for t in imports(n, p, module_level_only=True) if t in mods and t != n}
             for n, p in mods.items()}
    # a package's __init__ importing its own submodules is not a cycle of concern
    state: Dict[str, int] = {}
    cycles: List[str] = []

    def visit(node: str, stack: List[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_function_over_sixty_lines():
    long = []
    for _, path in source_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 60 lines:\n" + "\n".join(long)


def test_argparse_only_in_the_cli_layer():
    """No module outside attnbench.cli imports argparse or adds parsers or arguments."""
    offenders = []
    for name, path in source_files():
        if layer(name) == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            hit = (isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names)) \
                or (isinstance(node, ast.ImportFrom) and node.module == "argparse") \
                or (isinstance(node, ast.Attribute)
                    and node.attr in ("add_argument", "add_parser", "add_subparsers"))
            if hit:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
                break
    assert not offenders, f"argparse outside attnbench.cli: {offenders}"


def test_nothing_imports_the_old_top_level_names():
    bad = []
    for path in list(ROOT.glob("bench/**/*.py")) + list(ROOT.glob("modules/*.py")) + \
            list(ROOT.glob("tests/**/*.py")) + list(ROOT.glob("examples/**/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad += [f"{path.relative_to(ROOT)}: {m}" for m in names
                    if m.split(".")[0] in ("modules", "bench")]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("old, new", [("modules", "attnbench.modules"), ("bench", "attnbench")])
def test_old_top_level_import_in_a_checkout_names_the_new_one(old, new):
    """From the repository root the folders are importable by their old names; they refuse."""
    out = subprocess.run([sys.executable, "-c", f"import {old}"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert f"is now '{new}'" in out.stderr.strip().splitlines()[-1], out.stderr
