"""Gin at the edges: parse config files and ``--gin.NAME=VALUE`` flags with clear errors.

Library code takes explicit arguments; gin-configurable factories build plain objects (module
instances, dataclasses) that outlive the gin scope, so several stages with different configs can
live in one process (the cascade sampler parses each stage's saved config in turn).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pkgutil
import re
from collections.abc import Sequence

import gin

from imagen_jax.errors import ConfigError

PACKAGE = "imagen_jax"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The repository's gin_configs/ in a checkout (or an editable install); the copy installed inside
# the package (setup.py: imagen_jax/gin_configs) after `pip install .`.
GIN_CONFIG_DIR = next(
    (d for d in (os.path.join(REPO_ROOT, "gin_configs"),
                 os.path.join(os.path.dirname(os.path.abspath(__file__)), "gin_configs"))
     if os.path.isdir(d)),
    os.path.join(REPO_ROOT, "gin_configs"),
)
CONFIG_PREFIX = "gin_configs/"  # `gin_configs/tiny/base.gin` and `tiny/base.gin` name one file


class GinConfigError(ConfigError):
    """A gin file or binding that cannot be applied; the message names the fix."""


class _DropSearchMisses(logging.Filter):
    """Drops the records of gin's package-resource existence check. Gin tries every search path
    for each ``include`` and asks that reader about each one, which logs the question at INFO
    and each miss (``Path not found: ...``) at ERROR level (gin/resource_reader.py): six lines
    per include on a normal run. An include found nowhere still fails, with gin's error listing
    every path searched."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.funcName == "system_path_file_exists"
                    and record.pathname.endswith(os.path.join("gin", "resource_reader.py")))


@contextlib.contextmanager
def _quiet_search_misses():
    root = logging.getLogger()  # gin logs through the root logger
    drop = _DropSearchMisses()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def register_all() -> None:
    """Imports every module of the package so all gin configurables are registered."""
    pkg = importlib.import_module(PACKAGE)
    for info in pkgutil.walk_packages(pkg.__path__, prefix=PACKAGE + "."):
        importlib.import_module(info.name)


def rewrite_flag_bindings(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Splits ``--gin.NAME=VALUE`` arguments (t5x style) out of ``argv``.

    Returns (remaining argv, gin binding strings ``NAME = VALUE``).
    """
    rest, bindings = [], []
    for arg in argv:
        if arg.startswith("--gin."):
            key, sep, value = arg[len("--gin.") :].partition("=")
            if not sep:
                raise GinConfigError(f"gin flag {arg!r} has no value; write --gin.{key}=VALUE")
            bindings.append(f"{key} = {value}")
        else:
            rest.append(arg)
    return rest, bindings


def parse(
    gin_files: Sequence[str] = (),
    bindings: Sequence[str] = (),
    search_paths: Sequence[str] = (),
    finalize: bool = True,
) -> None:
    """Registers all configurables, then parses ``gin_files`` and ``bindings``.

    Relative gin file paths and ``include`` lines are looked up in ``search_paths``, the current
    directory, the repo root and the shipped configs (``GIN_CONFIG_DIR``), so a shipped file is
    found by name (``base64.gin``, ``tiny/base.gin``) or by its repository path
    (``gin_configs/tiny/base.gin``) from any directory, installed or not.
    """
    register_all()
    for path in [*search_paths, os.getcwd(), REPO_ROOT, GIN_CONFIG_DIR]:
        if path not in gin.config._LOCATION_PREFIXES:  # noqa: SLF001 - gin has no getter
            gin.add_config_file_search_path(path)
    resolved = []
    for f in gin_files:
        names = [f, f[len(CONFIG_PREFIX):]] if f.startswith(CONFIG_PREFIX) else [f]
        found = [os.path.join(p, n) for n in names
                 for p in ["", *gin.config._LOCATION_PREFIXES]  # noqa: SLF001
                 if os.path.exists(os.path.join(p, n))]
        if not found:
            raise GinConfigError(
                f"gin file {f!r} not found (searched the current directory, {REPO_ROOT} and "
                f"{GIN_CONFIG_DIR}); pass an existing path or add --gin_search_paths"
            )
        # Absolute: gin would otherwise try `gin_configs/...` as a Python package resource, which
        # fails with a TypeError outside the repo root (`gin_configs` is a namespace package).
        resolved.append(os.path.abspath(found[0]))
    try:
        with _quiet_search_misses():
            gin.parse_config_files_and_bindings(resolved, list(bindings), finalize_config=False)
    except (ValueError, KeyError, SyntaxError, NameError) as e:
        token = re.search(r"Failed to parse token '([^']*)'", str(e))
        if token:  # gin values are Python literals; say so instead of echoing the parser
            raise GinConfigError(
                f"bad gin value {token.group(1)!r}: gin values are Python literals (numbers, "
                "'quoted strings', [lists], None); NaN cannot be written") from e
        raise GinConfigError(
            f"bad gin configuration: {e}\nCheck the binding's spelling against the configurable's "
            "parameters (the shipped gin files are under gin_configs/)."
        ) from e
    if finalize:
        gin.finalize()


def operative_config() -> str:
    return gin.operative_config_str()
