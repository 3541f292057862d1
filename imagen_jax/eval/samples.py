"""One writer for every launcher's outputs: PNG images, a JSON manifest, HTML pages.

``launch.sample`` (a PNG per image, a grid per prompt, ``samples.json``), ``launch.demo``
(``grid.png``, ``index.html``, ``results.json``), DrawBench (``imagen_jax.eval.drawbench``:
``images/``, ``grids/``, ``run.json``) and its pages (``imagen_jax.eval.report``: ``index.html``,
``side_by_side.html`` + ``assignment.json``) all write through :func:`write_samples`. Callers
decide what to write (file names, grids, manifest keys); this module decides how.

Every file goes to a temporary name first and is renamed into place, so a preempted run never
leaves a truncated PNG or manifest behind (DrawBench resumes by checking which PNGs exist).

HTML comes from the jinja2 templates in ``imagen_jax/eval/templates/`` (package data, found
through the installed package from any directory), rendered with autoescaping: prompts, labels
and paths are always text, never markup.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import io
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jinja2
import numpy as np
from PIL import Image

SAMPLES_FILE = "samples.json"  # launch.sample's manifest, the default
TEMPLATE_PACKAGE = "imagen_jax.eval"
TEMPLATE_DIR = "templates"
MANIFEST_INDENT = 2
PNG_DATA_URI_PREFIX = "data:image/png;base64,"


@dataclasses.dataclass(frozen=True)
class Page:
    """An HTML page to write: ``template`` (a file in ``imagen_jax/eval/templates/``) rendered
    with ``context`` (its variables)."""

    template: str
    context: Mapping[str, Any]


def format_number(value: float | None, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals; ``"n/a"`` for None (a metric that does not apply)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_percent(value: float) -> str:
    """A fraction in [0, 1] as a percentage with one decimal (0.25 -> ``"25.0%"``)."""
    return f"{value:.1%}"


@functools.cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader(TEMPLATE_PACKAGE, TEMPLATE_DIR),
        autoescape=True,  # every page is HTML: prompts and labels must never become markup
        undefined=jinja2.StrictUndefined,  # a misspelt variable fails instead of printing ""
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["number"] = format_number
    env.filters["percent"] = format_percent
    return env


def render_page(page: Page) -> str:
    """The HTML text of ``page``.

    Raises ``jinja2.TemplateNotFound`` for an unknown template and ``jinja2.UndefinedError`` for
    a variable the template uses but ``page.context`` lacks.
    """
    return _environment().get_template(page.template).render(**page.context)


def data_uri(png: bytes) -> str:
    """A ``data:`` URI of PNG bytes, for pages that must travel as one file."""
    return PNG_DATA_URI_PREFIX + base64.b64encode(png).decode("ascii")


def image_data_uri(image: np.ndarray, size: int | None = None) -> str:
    """A ``data:`` URI of a uint8 [H, W, 3] image as PNG, resized to ``size`` x ``size`` first
    when given (nearest neighbour: a small image stays pixel-exact, only magnified).

    Raises ``ValueError`` for an image that is not uint8 [H, W, 3].
    """
    im = Image.fromarray(_checked_image(image, "image"))
    if size is not None:
        im = im.resize((size, size), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return data_uri(buf.getvalue())


def _checked_image(image: np.ndarray, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{name}: expected a uint8 [H, W, 3] image, got {image.dtype} "
                         f"{image.shape}")
    return image


def _write_atomically(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path``. The temporary name keeps the extension:
    PIL picks the image format from it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext}"
    write(tmp)
    os.replace(tmp, path)


def _write_text(text: str) -> Callable[[str], None]:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return write


def write_samples(
    out_dir: str,
    images: Mapping[str, np.ndarray] | None = None,
    *,
    manifest: Mapping[str, Any] | None = None,
    manifest_file: str = SAMPLES_FILE,
    pages: Mapping[str, Page] | None = None,
) -> dict[str, str]:
    """Writes images, a JSON manifest and HTML pages into ``out_dir``.

    Args:
      out_dir: created if missing, as are the folders of relative names (``images/001_0.png``).
      images: relative file name -> uint8 [H, W, 3] image (samples and grids alike), as PNG.
      manifest: JSON-able record written to ``manifest_file`` (UTF-8, indented, prompts kept
        readable: no ``\\u`` escapes).
      pages: relative file name -> :class:`Page`, rendered with autoescaping.

    Returns:
      relative file name -> path of every file written, in the order written: images, pages,
      then the manifest (last, so a manifest on disk means its files are there too).

    Raises:
      ValueError: an image that is not uint8 [H, W, 3] (nothing after it is written).
      jinja2.TemplateError: a page whose template is missing or lacks a variable.
    """
    os.makedirs(out_dir, exist_ok=True)  # also when there is nothing to write
    written: dict[str, str] = {}
    for name, image in (images or {}).items():
        path = os.path.join(out_dir, name)
        image = _checked_image(image, path)
        _write_atomically(path, lambda tmp, im=image: Image.fromarray(im).save(tmp))
        written[name] = path
    for name, page in (pages or {}).items():
        path = os.path.join(out_dir, name)
        _write_atomically(path, _write_text(render_page(page)))
        written[name] = path
    if manifest is not None:
        path = os.path.join(out_dir, manifest_file)
        text = json.dumps(manifest, indent=MANIFEST_INDENT, ensure_ascii=False)
        _write_atomically(path, _write_text(text))
        written[manifest_file] = path
    return written
