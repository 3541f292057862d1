"""Prompt adherence on the shapes dataset: does an image show what its caption asks?

The project's GenEval-style automatic metric. The caption is parsed with the generator's own
grammar (``imagen_jax.data.shapes.parse_caption``); the image is checked with no learned parts:

  1. Images larger than ``ScorerConfig.analysis_resolution`` are box-filtered down to it (the
     shapes are flat, so nothing is lost and 1024 px costs what 128 px does).
  2. Background: the median colour of the one-pixel border (objects never touch it).
  3. Segmentation: every pixel gets the nearest of {background, the 8 palette colours}; an
     object of colour c is the largest 8-connected component labelled c. Its anti-aliased
     coverage ("alpha", which also undoes blur) is the projection of each pixel onto the
     background->c colour segment, near that component only.
  4. Shape and size: for each candidate shape the generator's exact outline is fitted by moments
     (radius from the coverage area, centre from its centroid), rendered with the generator's
     renderer, and compared by soft IoU; the best shape wins, its radius gives the size.
  5. Position: nearest anchor of the object's centre; relation: the dominant axis of the offset
     between the two objects' centres.

Public API: ``score(images, captions) -> dict`` (per-attribute and exact-match accuracy),
``score_image(image, caption) -> ImageScore`` (one image, with predictions), ``summarize(image
scores) -> dict`` (the same accuracies from ``score_image`` results), ``parse_caption``.
Images are uint8 [N, H, W, 3] or float in [-1, 1] (the model convention), square.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import gin
import numpy as np
from PIL import Image
from scipy import ndimage

from imagen_jax.data import shapes
from imagen_jax.data.shapes import CaptionParseError, ParsedCaption, parse_caption

__all__ = [
    "CaptionParseError",
    "ImageScore",
    "ParsedCaption",
    "ScorerConfig",
    "parse_caption",
    "score",
    "score_image",
    "summarize",
]

ATTRIBUTES = ("colour", "shape", "size", "position", "relation", "background", "count")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ScorerConfig:
    """Scorer knobs.

    Attributes:
      analysis_resolution: images above this side length are box-downsampled to it first.
      min_area_frac: an object "is there" if its coverage is at least this fraction of the area
        of the smallest object the generator draws (a small triangle); keeps specks of a colour
        (noise, anti-aliasing of other colours) from counting as objects.
      min_iou: ... and only if its best-fitting outline overlaps it with at least this soft IoU
        (ground truth fits at > 0.9; specks of pixel noise form no shape and fit far worse).
      min_fit_resolution: coarsest level of the outline-fit pyramid (see ``_fit_shape``).
      spec: the generator geometry the images were drawn with.
    """

    analysis_resolution: int = 128
    min_area_frac: float = 0.35
    min_iou: float = 0.4
    min_fit_resolution: int = 32
    spec: shapes.SceneSpec = shapes.DEFAULT_SPEC


@dataclasses.dataclass(frozen=True)
class DetectedObject:
    """What the scorer sees for one colour. Coordinates are fractions of the image side."""

    colour: str
    area: float  # coverage, fraction of the image area
    x: float
    y: float
    shape: str
    size: str
    iou: float  # soft IoU of the best-fitting outline


@dataclasses.dataclass(frozen=True)
class ImageScore:
    """Per-attribute verdicts for one image (None: the caption does not ask for it)."""

    checks: dict[str, list[bool]]
    exact: bool
    parsed: ParsedCaption
    background: str
    objects: dict[str, DetectedObject]


def _to_float255(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32)
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(
            f"images must be uint8 in [0, 255] or float in [-1, 1], got dtype {images.dtype}"
        )
    lo, hi = float(np.min(images)), float(np.max(images))
    if lo < -1.5 or hi > 1.5:
        raise ValueError(
            f"float images must be in [-1, 1] (model convention), got range [{lo:.3g}, {hi:.3g}];"
            " pass uint8 for [0, 255] images"
        )
    return ((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.float32)


def _downsample(image: np.ndarray, target: int) -> np.ndarray:
    """Box filter [H, H, 3] -> [target, target, 3] when H is larger (area average)."""
    h = image.shape[0]
    if h <= target:
        return image
    if h % target == 0:
        f = h // target
        return image.reshape(target, f, target, f, 3).mean(axis=(1, 3))

    return np.stack(
        [
            np.asarray(Image.fromarray(image[..., ch]).resize((target, target), Image.BOX))
            for ch in range(3)
        ],
        axis=-1,
    )


_PALETTE = np.array(list(shapes.COLOURS.values()), np.float32)  # [8, 3]
_BG_PALETTE = np.array(list(shapes.BACKGROUNDS.values()), np.float32)  # [4, 3]
_SHAPE_GEOMETRY = {s: shapes.shape_area_centroid(s) for s in shapes.SHAPES}


def _background(image: np.ndarray) -> np.ndarray:
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
    return np.median(border, axis=0)  # [3]


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / max(float(np.maximum(a, b).sum()), 1e-9))


def _fit_shape(
    alpha: np.ndarray, cfg: ScorerConfig
) -> tuple[str, float, float, float, float] | None:
    """Best generator outline for a coverage map: (shape, radius, x, y, iou) or None if empty.

    The IoU of each candidate is averaged over the analysis resolution and its box-filtered
    halvings down to ``cfg.min_fit_resolution``: an image upsampled from a low-resolution stage
    (blocky or blurred rims) is judged at the scale its detail actually has, while a sharp image
    still profits from its fine outline.
    """
    res = alpha.shape[0]
    area = float(alpha.sum())
    if area <= 0:
        return None
    ys, xs = np.indices(alpha.shape, dtype=np.float32)
    cx = float((alpha * (xs + 0.5)).sum() / area) / res
    cy = float((alpha * (ys + 0.5)).sum() / area) / res
    area_frac = area / res**2
    pyramid = [alpha]  # [n, n] coverage maps, n halving
    while pyramid[-1].shape[0] % 2 == 0 and pyramid[-1].shape[0] // 2 >= cfg.min_fit_resolution:
        n = pyramid[-1].shape[0] // 2
        pyramid.append(pyramid[-1].reshape(n, 2, n, 2).mean(axis=(1, 3)))
    best = None
    for shape, (unit_area, centroid) in _SHAPE_GEOMETRY.items():
        radius = float(np.sqrt(area_frac / unit_area))
        ox, oy = cx - centroid[0] * radius, cy - centroid[1] * radius
        ious = []
        for level in pyramid:
            n = level.shape[0]
            cov, (y0, y1, x0, x1) = shapes.shape_coverage(shape, ox, oy, radius, n)
            template = np.zeros_like(level)
            template[y0:y1, x0:x1] = cov
            ious.append(_soft_iou(level, template))
        iou = float(np.mean(ious))
        if best is None or iou > best[4]:
            best = (shape, radius, ox, oy, iou)
    return best


def _detect(image: np.ndarray, cfg: ScorerConfig) -> tuple[str, dict[str, DetectedObject]]:
    """Background name and one detected object per palette colour present (float [R, R, 3])."""
    res = image.shape[0]
    bg = _background(image)
    bg_name = shapes.BACKGROUND_NAMES[int(np.argmin(((_BG_PALETTE - bg) ** 2).sum(-1)))]
    # Each pixel is explained as a mix of the background and one palette colour (what the
    # anti-aliased renderer draws): alpha_c is its position on the background->c segment, dist_c
    # its distance from that segment. It belongs to the colour with the smallest distance, if it
    # is more colour than background. (Nearest-colour labels would turn e.g. the yellow-on-black
    # rim into "orange" specks.)
    rel = image - bg  # [R, R, 3]
    d = _PALETTE - bg  # [8, 3]
    alpha = np.clip((rel @ d.T) / (d * d).sum(-1), 0.0, 1.0)  # [R, R, 8]
    dist = np.linalg.norm(rel[..., None, :] - alpha[..., None] * d, axis=-1)  # [R, R, 8]
    best = np.argmin(dist, axis=-1)  # [R, R]
    labels = np.where(np.take_along_axis(alpha, best[..., None], -1)[..., 0] >= 0.5, best, -1)
    spec = cfg.spec
    small = spec.size_radius[0]
    min_area = cfg.min_area_frac * small**2 * min(a for a, _ in _SHAPE_GEOMETRY.values())
    small_large = np.sqrt(spec.size_radius[0] * spec.size_radius[1])  # size decision boundary
    found = {}
    for k, name in enumerate(shapes.COLOUR_NAMES):
        mask = labels == k
        if not mask.any():
            continue
        comp, n = ndimage.label(mask, structure=np.ones((3, 3)))
        if n > 1:
            mask = comp == (np.argmax(np.bincount(comp.ravel())[1:]) + 1)
        # Coverage near the component: this colour's alpha on the component and its rim, minus
        # pixels that belong to another colour.
        roi = ndimage.binary_dilation(mask, structure=np.ones((3, 3)))
        roi &= (labels == k) | (labels == -1)
        cover = np.where(roi, alpha[..., k], 0.0)
        area = float(cover.sum()) / res**2
        if area < min_area:
            continue
        fit = _fit_shape(cover.astype(np.float32), cfg)
        if fit is None or fit[4] < cfg.min_iou:
            continue
        shape, radius, x, y, iou = fit
        size = shapes.SIZES[int(radius > small_large)]
        found[name] = DetectedObject(name, area, x, y, shape, size, iou)
    return bg_name, found


def _relation(a: DetectedObject, b: DetectedObject) -> str:
    dx, dy = b.x - a.x, b.y - a.y  # y grows downwards
    if abs(dx) >= abs(dy):
        return "left_of" if dx > 0 else "right_of"
    return "above" if dy > 0 else "below"


def _position(obj: DetectedObject, spec: shapes.SceneSpec) -> str:
    dist = [np.hypot(obj.x - ax, obj.y - ay) for ax, ay in map(spec.anchor, shapes.POSITIONS)]
    return shapes.POSITIONS[int(np.argmin(dist))]


def score_image(image: np.ndarray, caption: str, cfg: ScorerConfig | None = None) -> ImageScore:
    """Checks one square image (uint8 [H, H, 3] or float in [-1, 1]) against ``caption``."""
    cfg = cfg or ScorerConfig()
    image = _to_float255(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"expected one square RGB image [H, H, 3], got shape {image.shape}")
    parsed = parse_caption(caption)
    image = _downsample(image, cfg.analysis_resolution)
    bg_name, found = _detect(image, cfg)
    checks: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    detected = [found.get(o.colour) for o in parsed.objects]
    for want, got in zip(parsed.objects, detected):
        checks["colour"].append(got is not None)
        checks["shape"].append(got is not None and got.shape == want.shape)
        checks["size"].append(got is not None and got.size == want.size)
    if parsed.position is not None:
        got = detected[0]
        checks["position"].append(got is not None and _position(got, cfg.spec) == parsed.position)
    if parsed.relation is not None:
        a, b = detected
        checks["relation"].append(
            a is not None and b is not None and _relation(a, b) == parsed.relation
        )
    if parsed.background is not None:
        checks["background"].append(bg_name == parsed.background)
    checks["count"].append(len(found) == len(parsed.objects))
    exact = all(all(v) for v in checks.values())
    return ImageScore(checks, exact, parsed, bg_name, found)


def score(
    images: np.ndarray | Sequence[np.ndarray],
    captions: Sequence[str],
    cfg: ScorerConfig | None = None,
) -> dict[str, Any]:
    """Prompt adherence of ``images`` (uint8 [N, H, H, 3] or float in [-1, 1]) to ``captions``.

    Returns accuracies in [0, 1]: ``exact_match`` (every requested attribute right, and no extra
    object), and per attribute ``colour`` / ``shape`` / ``size`` (per requested object; colour =
    an object of that colour was found), ``position`` (one-object captions), ``relation``
    (two-object captions), ``background`` (captions naming it), ``count``; ``num_images``; and
    ``num_<attribute>``, how many checks each accuracy averages (0 -> accuracy is NaN).
    """
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    if len(images) == 0:
        raise ValueError("score needs at least one image")
    return summarize([score_image(image, caption, cfg) for image, caption in zip(images, captions)])


def summarize(results: Sequence[ImageScore]) -> dict[str, Any]:
    """The accuracies of `score` from per-image verdicts (``score_image`` results)."""
    if not results:
        raise ValueError("summarize needs at least one ImageScore")
    totals = {a: [] for a in ATTRIBUTES}
    for result in results:
        for a in ATTRIBUTES:
            totals[a].extend(result.checks[a])
    exact = [r.exact for r in results]
    out: dict[str, Any] = {"exact_match": float(np.mean(exact)), "num_images": len(exact)}
    for a in ATTRIBUTES:
        out[a] = float(np.mean(totals[a])) if totals[a] else float("nan")
        out[f"num_{a}"] = len(totals[a])
    return out


def chance_levels() -> dict[str, float]:
    """Accuracy of guessing each attribute uniformly at random (reference for "near chance")."""
    return {
        "shape": 1 / len(shapes.SHAPES),
        "size": 1 / len(shapes.SIZES),
        "position": 1 / len(shapes.POSITIONS),
        "relation": 1 / len(shapes.RELATIONS),
        "background": 1 / len(shapes.BACKGROUND_NAMES),
        "colour": 1 / len(shapes.COLOUR_NAMES),
    }


def scorer_config(preset: str = "single") -> ScorerConfig:
    """The scorer for a scene preset (`shapes.SCENE_PRESETS`): the same scorer, told the scenes'
    geometry (the anchors of the positions and the small/large radii)."""
    return ScorerConfig(spec=shapes.scene_spec(preset))
