"""Reading images without letting a NaN/Inf pixel become a black one.

PIL converts a float image (mode ``F``, e.g. a 32-bit TIFF) to RGB by clamping each value to
[0, 255] and NaN to 0, so a NaN pixel silently turns black, and a float array with a NaN makes
every pixel a diffusion model derives from it NaN. Every image the product reads -- low-res inputs
of ``launch.sample``, FID reference sets (``imagen_jax.eval.fid``), dataset images
(``imagen_jax.data.pipeline``) -- goes through `check_finite` / `pil_to_rgb` / `read_rgb`, which
refuse such an image with a one-line `NonFiniteImageError` naming it.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image

from imagen_jax.errors import DataError


class NonFiniteImageError(DataError):
    """An image holds NaN or Inf values; the message names the image.

    ``problem`` is the message without the image's name and the fix, for callers that name the
    image their own way.
    """

    def __init__(self, message: str, problem: str = ""):
        super().__init__(message)
        self.problem = problem or message


def check_finite(pixels: np.ndarray, what: str) -> np.ndarray:
    """Returns ``pixels`` (any shape, any dtype) unchanged if every value is finite.

    Raises:
      NonFiniteImageError: naming ``what``, the number of NaN/Inf values and the first one's
        position. Integer images are always finite.
    """
    x = np.asarray(pixels)
    if x.dtype.kind not in "fc":
        return x
    bad = ~np.isfinite(x)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        problem = f"holds {int(bad.sum())} NaN/Inf pixel value(s) (first at index {first})"
        raise NonFiniteImageError(f"{what} {problem}; repair or remove the image", problem)
    return x


def pil_to_rgb(image: Image.Image, what: str) -> np.ndarray:
    """A PIL image as uint8 [H, W, 3], refusing float (mode ``F``) images holding NaN/Inf."""
    if image.mode == "F":
        check_finite(np.asarray(image), what)
    return np.asarray(image.convert("RGB"))


def read_rgb(source: str | bytes | os.PathLike, what: str | None = None) -> np.ndarray:
    """A file path or encoded bytes -> uint8 [H, W, 3] (first frame).

    Raises ``NonFiniteImageError`` for a float image with NaN/Inf, and PIL's ``OSError`` /
    ``ValueError`` / ``SyntaxError`` for a file that cannot be decoded.
    """
    if isinstance(source, bytes | np.bytes_):
        what = what or "image"
        with Image.open(io.BytesIO(source)) as im:
            return pil_to_rgb(im, what)
    what = what or f"image {os.fspath(source)!r}"
    with Image.open(source) as im:
        return pil_to_rgb(im, what)


def uint8_to_unit(pixels: Any) -> Any:
    """uint8 pixels [0, 255] (any shape) -> float32 in [-1, 1], the models' convention.

    A numpy or jax array keeps its kind (a jax array may be traced: the inception network
    converts inside its compiled program); anything else (lists) becomes a numpy array.
    """
    if not hasattr(pixels, "astype"):
        pixels = np.asarray(pixels)
    return pixels.astype(np.float32) / 127.5 - 1.0


def unit_to_uint8(x: np.ndarray) -> np.ndarray:
    """Floats in [-1, 1] (any shape) -> uint8 pixels, rounded and clipped to [0, 255].

    The caller checks finiteness first where it matters (`check_finite`): NaN casts to 0 here.
    """
    return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
