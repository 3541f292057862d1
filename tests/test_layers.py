"""Imports only run down the layers written in docs/DESIGN.md (issue 17, point 3).

The layer order is read from the ```layers block of docs/DESIGN.md (top line = top layer). Every
``import`` of the package, the launchers, the benchmarks and the experiments is walked (module
level and inside functions): a module may import its own unit and the units of lower lines only.
Function-local imports are allowed only for third-party modules, each with a comment saying why
(an optional or heavy dependency); a function-local import of the package hides a cycle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("imagen_jax", "launch", "bench", "experiments")
# Function-local imports are checked in the product only: benchmarks import their references
# (torch, imagen-pytorch after patching transformers) and set XLA flags in a set order.
PRODUCT = ("imagen_jax", "launch")


def layers() -> list[list[str]]:
    """The layers, lowest first, each a list of units (``imagen_jax.train``, ``launch``)."""
    text = (REPO / "docs" / "DESIGN.md").read_text()
    block = re.search(r"^```layers\n(.*?)^```", text, re.S | re.M)
    assert block, "docs/DESIGN.md lost its ```layers block"
    return [line.split() for line in block.group(1).splitlines() if line.strip()][::-1]


def unit_of(module: str, units: set[str]) -> str | None:
    """The longest unit that is ``module`` or a package above it."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in units:
            return name
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path):
    """(imported module, line, inside a function, source line) of every import in ``path``."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    local_nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local_nodes.update(id(n) for n in ast.walk(node) if n is not node)
    package = module_name(path).rsplit(".", 0 if path.name == "__init__.py" else 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from imagen_jax import cascade` imports the module imagen_jax.cascade.
            names = [f"{base}.{a.name}" for a in node.names] if base in ROOTS else [base]
        else:
            continue
        text = lines[node.lineno - 1]
        above = lines[node.lineno - 2] if node.lineno > 1 else ""
        commented = "#" in text or above.strip().startswith("#")
        for name in names:
            yield name, node.lineno, id(node) in local_nodes, commented


def files() -> list[Path]:
    out = []
    for root in ROOTS:
        out += sorted((REPO / root).rglob("*.py")) if (REPO / root).is_dir() else []
    return out


def test_imports_only_run_down_the_layers():
    order = layers()
    imagen = [u for line in order for u in line if u.startswith("imagen_jax")]
    rank = {u: i for i, line in enumerate(order) for u in line}
    problems = []
    for path in files():
        source = module_name(path)
        src_unit = unit_of(source, set(rank))
        if src_unit is None:
            if source != "imagen_jax":  # the package's own __init__ imports nothing
                problems.append(f"{source}: in no layer of docs/DESIGN.md; add its unit")
            continue
        for name, line, _, _ in imports(path):
            if name.split(".")[0] not in ROOTS:
                continue
            dst_unit = unit_of(name, set(rank))
            where = f"{path.relative_to(REPO)}:{line}"
            if dst_unit is None:
                if name != "imagen_jax":
                    problems.append(f"{where}: imports {name}, which is in no layer")
            elif src_unit == "experiments" and dst_unit not in ("experiments", *imagen):
                problems.append(f"{where}: experiments import only imagen_jax, not {name}")
            elif dst_unit != src_unit and rank[dst_unit] >= rank[src_unit]:
                problems.append(f"{where}: {src_unit} imports {name} ({dst_unit} is not below)")
    assert not problems, "imports that run up the layers:\n" + "\n".join(problems)


def test_function_local_imports_are_commented_third_party_only():
    problems = []
    for path in files():
        if path.relative_to(REPO).parts[0] not in PRODUCT:
            continue
        for name, line, local, commented in imports(path):
            if not local:
                continue
            where = f"{path.relative_to(REPO)}:{line}"
            if name.split(".")[0] in ROOTS:
                problems.append(f"{where}: function-local import of {name}; import it at the top")
            elif not commented:
                problems.append(f"{where}: function-local import of {name} without a comment "
                                "saying why (optional or heavy dependency)")
    assert not problems, "\n".join(problems)


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The walk itself: an upward and a local import in a scratch module are both reported."""
    fake = REPO / "imagen_jax" / "diffusion" / "_layer_probe.py"
    fake.write_text("from imagen_jax import cascade\n\ndef f():\n    import numpy\n")
    try:
        found = list(imports(fake))
        assert ("imagen_jax.cascade", 1, False, False) in found
        assert ("numpy", 4, True, False) in found
        try:
            test_imports_only_run_down_the_layers()
        except AssertionError as e:
            assert "diffusion/_layer_probe.py:1: imagen_jax.diffusion imports imagen_jax.cascade" \
                in str(e)
        else:
            raise AssertionError("an upward import went unnoticed")
    finally:
        fake.unlink()


def test_experiments_import_through_the_public_api():
    """The probes outside the product still import (they are not otherwise run)."""
    import importlib

    for path in sorted((REPO / "experiments").glob("*.py")):
        importlib.import_module(f"experiments.{path.stem}")
