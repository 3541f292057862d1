"""`pip install .` gives a working product (issue 17, must show 4): every third-party module that
the package or a launcher imports when it loads is a distribution of setup.py's ``CORE``
requirements. (The quick tour runs an installed copy, but installs it with ``--no-deps`` into the
suite's environment, where the test extra provides everything: it cannot see a missing core
requirement. A fresh virtualenv found one: `launch.summary` imported grain, then an extra.)

Function-local imports are not checked: tests/test_layers.py allows them only for optional
dependencies, each with a comment.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("imagen_jax", "launch")


def core_requirements() -> set[str]:
    """Distribution names of setup.py's CORE list, normalised (PEP 503), read without running
    setup.py."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [
                "CORE"]:
            names = set()
            for spec in ast.literal_eval(node.value):
                names.add(_normalise(re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0]))
            return names
    raise AssertionError("setup.py has no CORE = [...] list")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def module_level_imports(path: Path) -> set[str]:
    """Top-level names imported when ``path`` loads: module body and its if/try blocks, not
    functions, classes' methods or ``if TYPE_CHECKING:`` blocks."""
    found: set[str] = set()

    def visit(body):
        for node in body:
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
            elif isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)  # (the handlers are the fallbacks of an optional import)
            elif isinstance(node, ast.ClassDef):
                visit([n for n in node.body if not isinstance(n, (ast.FunctionDef,
                                                                   ast.AsyncFunctionDef))])

    visit(ast.parse(path.read_text()).body)
    return found


def test_every_module_level_third_party_import_is_a_core_requirement():
    core = core_requirements()
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for root in PRODUCT:
        for path in sorted((REPO / root).rglob("*.py")):
            for name in module_level_imports(path):
                if name in sys.stdlib_module_names or name in PRODUCT or name == "__future__":
                    continue
                dists = {_normalise(d) for d in distributions.get(name, [name])}
                if not dists & core:
                    missing.setdefault(name, []).append(str(path.relative_to(REPO)))
    assert not missing, (
        "imported when the package loads but not in setup.py's CORE (a plain `pip install .` "
        f"would fail): { {k: v[:3] for k, v in missing.items()} }")
