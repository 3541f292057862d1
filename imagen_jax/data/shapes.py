"""The embedded shapes dataset: procedural captioned scenes, deterministic by (split, index, seed).

Nothing can be downloaded in this project, so it ships its own text-to-image data: one or two
flat-coloured shapes on a plain background, with a caption drawn from a small grammar of templates
and paraphrases. The same grammar is parsed back by ``imagen_jax.eval.shapes_score``, which makes
prompt adherence exactly checkable (a GenEval-style metric, but with no detector to train).

Scene space (every attribute is a discrete choice; placement jitter is continuous):
  * background: ``BACKGROUNDS`` (4), mentioned in about half the captions.
  * one object: colour (``COLOURS``, 8) x shape (``SHAPES``, 4) x size (``SIZES``, 2) x position
    (``POSITIONS``: left, right, top, bottom, centre).
  * two objects of different colours: subject and object, each colour x shape x size, and a
    relation of the subject to the object (``RELATIONS``: left_of, right_of, above, below).

Splits. ``heldout`` tests compositional generalisation: ``HELDOUT_PAIRS`` reserves one shape per
colour (8 of the 32 (colour, shape) pairs; every colour and every shape still occurs in
``train``). A ``train`` scene contains no reserved pair; a ``heldout`` scene contains only reserved
pairs. So the two splits share no (colour, shape) pair and hence no full attribute combination;
``combinations(split)`` enumerates the exact set of combinations a split can emit.

Public API:
  * ``SceneSpec``: geometry and sampling knobs (gin-configurable).
  * ``sample_scene(split, index, seed=0, spec=None) -> Scene`` and ``render(scene, resolution,
    spec=None) -> uint8 [R, R, 3]`` (analytic anti-aliasing, any resolution).
  * ``example(split, index, resolution, seed=0, spec=None) -> dict``: one record with the same
    fields as the tfds builder ``imagen_shapes`` (``imagen_jax.data.shapes_tfds``).
  * ``ShapesSource``: a random-access source (``__len__``/``__getitem__``) usable directly as a
    grain data source, no preparation needed (tests, demos).
  * ``parse_caption(caption) -> ParsedCaption``: the grammar's inverse.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from collections.abc import Iterator, Sequence
from typing import Any

import gin
import numpy as np

from imagen_jax.errors import DataError

# --------------------------------------------------------------------------------------------
# Vocabulary. The order of every tuple is part of the on-disk format (ClassLabel ids): append only.
# --------------------------------------------------------------------------------------------

# Object palette: hues far apart in RGB so a colour survives the blur and noise of a small
# diffusion model; none is close to a background colour.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 215, 20),
    "purple": (140, 40, 190),
    "orange": (250, 130, 10),
    "cyan": (20, 200, 220),
    "pink": (250, 120, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "gray": (128, 128, 128),
    "black": (12, 12, 12),
    "beige": (225, 205, 160),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")
RELATIONS: tuple[str, ...] = ("left_of", "right_of", "above", "below")
SPLITS: tuple[str, ...] = ("train", "heldout")

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)

# Compositional hold-out: colour i is reserved with shape i mod 4 (red circle, green square, blue
# triangle, yellow star, purple circle, orange square, cyan triangle, pink star).
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    (c, SHAPES[i % len(SHAPES)]) for i, c in enumerate(COLOUR_NAMES)
)

# Paraphrases. Each surface word maps to exactly one attribute value (the parser relies on it).
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "large": ("large", "big"),
}
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "disk"),
    "square": ("square",),
    "triangle": ("triangle",),
    "star": ("star",),
}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
    "centre": ("in the centre", "in the center", "in the middle"),
}
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left_of": ("to the left of", "left of"),
    "right_of": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
# Templates: {o}, {o1}, {o2} are object phrases, {p} a position phrase, {r} a relation phrase.
SINGLE_TEMPLATES: tuple[str, ...] = (
    "{o} {p}",
    "{ob} {p}",
    "there is {o} {p}",
    "a picture of {o} {p}",
    "{P}, {o}",
)
PAIR_TEMPLATES: tuple[str, ...] = (
    "{o1} {r} {o2}",
    "{o1b} {r} {o2}",
    "there is {o1} {r} {o2}",
    "a picture of {o1} {r} {o2}",
)


# --------------------------------------------------------------------------------------------
# Geometry. Shapes live in "radius units" around their centre (x right, y down); an object of size
# r (a fraction of the image side) is the unit shape scaled by r.
# --------------------------------------------------------------------------------------------


def _star_polygon(points: int = 5, inner: float = 0.5) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    verts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=-1)
    # Centre the bounding box vertically (the top tip reaches -1, the lower tips cos(36 deg)).
    verts[:, 1] -= (verts[:, 1].max() + verts[:, 1].min()) / 2
    return verts


def _triangle_polygon() -> np.ndarray:
    verts = np.array([[0.0, -1.0], [np.sqrt(3) / 2, 0.5], [-np.sqrt(3) / 2, 0.5]])
    verts *= 1.1  # slightly larger than the circumcircle so its area is not far below the others
    verts[:, 1] -= (verts[:, 1].max() + verts[:, 1].min()) / 2
    return verts


# Unit polygons (None = circle). The star's fat inner radius (0.5) keeps its notches visible at
# 32 px while staying distinct from the triangle.
CIRCLE_RADIUS = 0.9
POLYGONS: dict[str, np.ndarray | None] = {
    "circle": None,
    "square": np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]]),
    "triangle": _triangle_polygon(),
    "star": _star_polygon(),
}


def _polygon_area_centroid(verts: np.ndarray) -> tuple[float, np.ndarray]:
    x, y = verts[:, 0], verts[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    area = cross.sum() / 2
    cx = ((x + xn) * cross).sum() / (6 * area)
    cy = ((y + yn) * cross).sum() / (6 * area)
    return abs(float(area)), np.array([cx, cy])


def shape_area_centroid(shape: str) -> tuple[float, np.ndarray]:
    """Area and centroid offset of the unit ``shape`` (radius units, relative to its centre)."""
    verts = POLYGONS[shape]
    if verts is None:
        return float(np.pi * CIRCLE_RADIUS**2), np.zeros(2)
    return _polygon_area_centroid(verts)


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {tuple(allowed)}")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SceneSpec:
    """Geometry and sampling of shapes scenes. Fractions are of the image side.

    Attributes:
      size_radius: radius of a "small" and a "large" object. Large is twice small (4x the area) so
        size stays unambiguous after a 16-32 px model's blur; large objects of a pair never touch.
      position_offset: distance of the left/right/top/bottom anchors from the image centre; pair
        objects sit at the same offsets on either side of the centre.
      jitter: uniform placement jitter (both axes) around each anchor.
      pair_prob: probability that a scene holds two objects rather than one.
      mention_background_prob: probability that the caption names the background.
    """

    size_radius: tuple[float, float] = (0.095, 0.19)
    position_offset: float = 0.23
    jitter: float = 0.03
    pair_prob: float = 0.5
    mention_background_prob: float = 0.5

    def __post_init__(self) -> None:
        small, large = self.size_radius
        if not 0 < small < large:
            raise ValueError(f"size_radius must be 0 < small < large, got {self.size_radius}")
        # A pair's two large objects must not overlap: their anchors are 2*offset apart.
        if 2 * (self.position_offset - self.jitter) <= 2 * large:
            raise ValueError(
                f"position_offset {self.position_offset} - jitter {self.jitter} must exceed the "
                f"large radius {large} so the two objects of a pair never overlap"
            )
        if self.position_offset + self.jitter + large > 0.5:
            raise ValueError("position_offset + jitter + large radius must stay inside the image")

    def anchor(self, position: str) -> tuple[float, float]:
        """(x, y) of a position anchor in [0, 1]^2, y down."""
        d = self.position_offset
        return {
            "left": (0.5 - d, 0.5),
            "right": (0.5 + d, 0.5),
            "top": (0.5, 0.5 - d),
            "bottom": (0.5, 0.5 + d),
            "centre": (0.5, 0.5),
        }[position]

    def radius(self, size: str) -> float:
        return self.size_radius[SIZES.index(size)]


DEFAULT_SPEC = SceneSpec()
# Named scene geometries (`make demo --preset`, the learning race and its regression guard).
# 'single': one object per scene (no relations), drawn larger than the dataset default so that its
# shape stays legible at a 32 px base resolution (small/large radius 4.2 / 6.7 px there instead of
# 3.0 / 6.1). 'full': the dataset's own scenes (half of them two objects and a relation).
SCENE_PRESETS = {
    "single": SceneSpec(size_radius=(0.13, 0.21), position_offset=0.25, jitter=0.03,
                        pair_prob=0.0),
    "full": DEFAULT_SPEC,
}


def scene_spec(preset: str = "single") -> SceneSpec:
    """The `SceneSpec` of a named preset (`SCENE_PRESETS`); DataError for an unknown name."""
    if preset not in SCENE_PRESETS:
        raise DataError(f"unknown scene preset {preset!r}; choose one of {tuple(SCENE_PRESETS)}")
    return SCENE_PRESETS[preset]


# --------------------------------------------------------------------------------------------
# Scenes.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One shape. ``x, y``: its centre in [0, 1]^2 (y down)."""

    colour: str
    shape: str
    size: str
    x: float
    y: float


@dataclasses.dataclass(frozen=True)
class Scene:
    """A scene and its caption. With two objects, ``objects[0] <relation> objects[1]``."""

    background: str
    objects: tuple[SceneObject, ...]
    position: str | None
    relation: str | None
    caption: str
    mentions_background: bool

    @property
    def combination(self) -> tuple[str, ...]:
        """The discrete attribute combination (see ``combinations``)."""
        if len(self.objects) == 1:
            o = self.objects[0]
            return ("one", self.background, o.colour, o.shape, o.size, self.position)
        a, b = self.objects
        return (
            "two", self.background, a.colour, a.shape, a.size, b.colour, b.shape, b.size,
            self.relation,
        )  # fmt: skip


def split_pairs(split: str) -> tuple[tuple[str, str], ...]:
    """(colour, shape) pairs a split may use."""
    _check_choice("split", split, SPLITS)
    pairs = itertools.product(COLOUR_NAMES, SHAPES)
    return tuple(p for p in pairs if (p in HELDOUT_PAIRS) == (split == "heldout"))


def combinations(split: str) -> Iterator[tuple[str, ...]]:
    """Every discrete attribute combination ``sample_scene`` can emit for ``split``."""
    pairs = split_pairs(split)
    for bg, (c, s), z, p in itertools.product(BACKGROUND_NAMES, pairs, SIZES, POSITIONS):
        yield ("one", bg, c, s, z, p)
    for bg, (c1, s1), z1, (c2, s2), z2, r in itertools.product(
        BACKGROUND_NAMES, pairs, SIZES, pairs, SIZES, RELATIONS
    ):
        if c1 != c2:
            yield ("two", bg, c1, s1, z1, c2, s2, z2, r)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _object_phrase(rng: np.random.Generator, obj: SceneObject, trailing_size: bool) -> str:
    size = str(rng.choice(SIZE_WORDS[obj.size]))
    shape = str(rng.choice(SHAPE_WORDS[obj.shape]))
    if trailing_size:  # "a blue star, small," (the paraphrase)
        return f"{_article(obj.colour)} {obj.colour} {shape}, {size},"
    return f"{_article(size)} {size} {obj.colour} {shape}"


def _caption(rng: np.random.Generator, scene: Scene) -> str:
    if len(scene.objects) == 1:
        template = str(rng.choice(SINGLE_TEMPLATES))
        p = str(rng.choice(POSITION_PHRASES[scene.position]))
        text = template.format(
            o=_object_phrase(rng, scene.objects[0], False),
            ob=_object_phrase(rng, scene.objects[0], True),
            p=p,
            P=p[0].upper() + p[1:],
        )
    else:
        template = str(rng.choice(PAIR_TEMPLATES))
        text = template.format(
            o1=_object_phrase(rng, scene.objects[0], False),
            o1b=_object_phrase(rng, scene.objects[0], True),
            r=str(rng.choice(RELATION_PHRASES[scene.relation])),
            o2=_object_phrase(rng, scene.objects[1], False),
        )
    if scene.mentions_background:
        text += f", on {_article(scene.background)} {scene.background} background"
    return text


def _rng(split: str, index: int, seed: int) -> np.random.Generator:
    _check_choice("split", split, SPLITS)
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    return np.random.default_rng([seed, SPLITS.index(split), index])


def sample_scene(split: str, index: int, seed: int = 0, spec: SceneSpec | None = None) -> Scene:
    """The scene at ``index`` of ``split``: a pure function of (split, index, seed, spec)."""
    spec = spec or DEFAULT_SPEC
    rng = _rng(split, index, seed)
    pairs = split_pairs(split)
    background = str(rng.choice(BACKGROUND_NAMES))

    def jittered(anchor: tuple[float, float]) -> tuple[float, float]:
        dx, dy = rng.uniform(-spec.jitter, spec.jitter, size=2)
        return float(anchor[0] + dx), float(anchor[1] + dy)

    def new_object(pair: tuple[str, str], anchor: tuple[float, float]) -> SceneObject:
        size = str(rng.choice(SIZES))
        return SceneObject(pair[0], pair[1], size, *jittered(anchor))

    position = relation = None
    if rng.uniform() >= spec.pair_prob:
        position = str(rng.choice(POSITIONS))
        objects = (new_object(pairs[rng.integers(len(pairs))], spec.anchor(position)),)
    else:
        relation = str(rng.choice(RELATIONS))
        first = pairs[rng.integers(len(pairs))]
        others = [p for p in pairs if p[0] != first[0]]  # two objects never share a colour
        second = others[rng.integers(len(others))]
        subject_at, object_at = {
            "left_of": ("left", "right"),
            "right_of": ("right", "left"),
            "above": ("top", "bottom"),
            "below": ("bottom", "top"),
        }[relation]
        objects = (
            new_object(first, spec.anchor(subject_at)),
            new_object(second, spec.anchor(object_at)),
        )
    mentions = bool(rng.uniform() < spec.mention_background_prob)
    scene = Scene(background, objects, position, relation, "", mentions)
    return dataclasses.replace(scene, caption=_caption(rng, scene))


# --------------------------------------------------------------------------------------------
# Rendering: analytic anti-aliasing from a signed distance (in pixels) to each shape's outline,
# coverage = clip(0.5 - distance, 0, 1); evaluated only on the shape's bounding box.
# --------------------------------------------------------------------------------------------


def _polygon_signed_distance(px: np.ndarray, py: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Signed distance from points (px, py) [h, w] to a closed polygon [K, 2] (negative inside)."""
    a = verts.astype(np.float32)  # [K, 2] edge starts
    e = np.roll(a, -1, axis=0) - a  # [K, 2] edge vectors
    wx, wy = px[..., None] - a[:, 0], py[..., None] - a[:, 1]  # [h, w, K]
    t = np.clip((wx * e[:, 0] + wy * e[:, 1]) / (e * e).sum(-1), 0.0, 1.0)
    dx, dy = wx - t * e[:, 0], wy - t * e[:, 1]
    dist = np.sqrt((dx * dx + dy * dy).min(axis=-1))
    # Even-odd rule: inside iff a horizontal ray from the point crosses an odd number of edges.
    crosses = (wy >= 0) != (wy >= e[:, 1])  # the edge spans the point's y
    ey = np.where(e[:, 1] == 0, 1.0, e[:, 1]).astype(np.float32)
    left_of_edge = wx < wy * e[:, 0] / ey
    inside = (crosses & left_of_edge).sum(axis=-1) % 2 == 1
    return np.where(inside, -dist, dist)


_SDF_BLOCK_ELEMENTS = 1 << 16


def shape_coverage(
    shape: str, cx: float, cy: float, radius: float, height: int, width: int | None = None
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Anti-aliased coverage in [0, 1] of one shape on a ``height x width`` pixel grid.

    ``cx, cy, radius`` are fractions of the image side. Returns (coverage float32 [h, w] on the
    box, box (y0, y1, x0, x1)) so callers touch only the pixels the shape can reach.
    """
    _check_choice("shape", shape, SHAPES)
    width = width or height
    # Pixel units; the unit shapes fit in the unit disc, +2 px margin for the anti-aliased rim.
    r_px, cx_px, cy_px = radius * height, cx * width, cy * height
    reach = 1.15 * r_px + 2
    y0, y1 = max(int(cy_px - reach), 0), min(int(np.ceil(cy_px + reach)), height)
    x0, x1 = max(int(cx_px - reach), 0), min(int(np.ceil(cx_px + reach)), width)
    py = (np.arange(y0, y1, dtype=np.float32) + 0.5)[:, None] - cy_px
    px = (np.arange(x0, x1, dtype=np.float32) + 0.5)[None, :] - cx_px
    verts = POLYGONS[shape]
    if verts is None:
        sd = np.sqrt(px * px + py * py) - CIRCLE_RADIUS * r_px
    else:
        # Row blocks keep the [rows, w, K] temporaries cache-sized (~4x faster at 1024 px).
        step = max(1, _SDF_BLOCK_ELEMENTS // (px.size * len(verts)))
        sd = np.concatenate(
            [
                _polygon_signed_distance(px, py[i : i + step], verts * r_px)
                for i in range(0, py.shape[0], step)
            ]
        )
    return np.clip(0.5 - sd, 0.0, 1.0).astype(np.float32), (y0, y1, x0, x1)


def render(scene: Scene, resolution: int, spec: SceneSpec | None = None) -> np.ndarray:
    """Renders ``scene`` at ``resolution`` x ``resolution``: uint8 [R, R, 3]."""
    if not isinstance(resolution, int | np.integer) or resolution < 8:
        raise ValueError(f"resolution must be an int >= 8, got {resolution!r}")
    spec = spec or DEFAULT_SPEC
    canvas = np.empty((resolution, resolution, 3), np.uint8)
    canvas[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        alpha, (y0, y1, x0, x1) = shape_coverage(
            obj.shape, obj.x, obj.y, spec.radius(obj.size), resolution
        )
        # Float maths on the object's box only; objects never overlap, so rounding each box in
        # turn equals compositing everything in float and rounding once.
        patch = canvas[y0:y1, x0:x1].astype(np.float32)
        colour = np.asarray(COLOURS[obj.colour], np.float32)
        patch += alpha[..., None] * (colour - patch)  # alpha compositing over the background
        canvas[y0:y1, x0:x1] = np.clip(np.rint(patch), 0, 255).astype(np.uint8)
    return canvas


# --------------------------------------------------------------------------------------------
# Records and a random-access source.
# --------------------------------------------------------------------------------------------

MAX_OBJECTS = 2
NONE = "none"  # value of `position` / `relation` where it does not apply


def example_id(split: str, index: int) -> int:
    """A dataset-wide unique int64 id: split in the high 32 bits, index in the low 32."""
    _check_choice("split", split, SPLITS)
    if not 0 <= index < 2**32:
        raise ValueError(f"index must be in [0, 2**32), got {index}")
    return (SPLITS.index(split) << 32) | index


def scene_record(scene: Scene) -> dict[str, Any]:
    """The structured fields of a record (names as in the tfds features; -1 / "none" pad)."""
    objs = scene.objects
    pad = MAX_OBJECTS - len(objs)
    return {
        "caption": scene.caption,
        "background": scene.background,
        "num_objects": len(objs),
        "colour": np.array([COLOUR_NAMES.index(o.colour) for o in objs] + [-1] * pad, np.int64),
        "shape": np.array([SHAPES.index(o.shape) for o in objs] + [-1] * pad, np.int64),
        "size": np.array([SIZES.index(o.size) for o in objs] + [-1] * pad, np.int64),
        "center": np.array([[o.x, o.y] for o in objs] + [[-1.0, -1.0]] * pad, np.float32),
        "position": scene.position or NONE,
        "relation": scene.relation or NONE,
    }


def example(
    split: str, index: int, resolution: int, seed: int = 0, spec: SceneSpec | None = None
) -> dict[str, Any]:
    """One record: ``image`` uint8 [R, R, 3], ``caption`` str, ``id`` int, structured fields."""
    scene = sample_scene(split, index, seed, spec)
    return {
        "image": render(scene, resolution, spec),
        "id": example_id(split, index),
        **scene_record(scene),
    }


@gin.configurable
class ShapesSource:
    """Random-access shapes records (grain ``RandomAccessDataSource`` protocol), rendered on read.

    Same records as the prepared tfds dataset of the same (split, resolution, seed), minus the
    PNG round trip (lossless, so images are identical).
    """

    def __init__(
        self,
        split: str = "train",
        num_examples: int = 10_000,
        resolution: int = 64,
        seed: int = 0,
        spec: SceneSpec | None = None,
    ):
        _check_choice("split", split, SPLITS)
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        self.split, self.num_examples, self.resolution, self.seed = (
            split, num_examples, resolution, seed,
        )  # fmt: skip
        self.spec = spec or DEFAULT_SPEC

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        return example(self.split, index, self.resolution, self.seed, self.spec)

    def __repr__(self) -> str:
        return (
            f"ShapesSource(split={self.split!r}, num_examples={self.num_examples}, "
            f"resolution={self.resolution}, seed={self.seed})"
        )


# --------------------------------------------------------------------------------------------
# Parsing: the grammar's inverse, used by the scorer.
# --------------------------------------------------------------------------------------------


class CaptionParseError(DataError):
    """A caption outside the shapes grammar; the message says what is missing or ambiguous."""


@dataclasses.dataclass(frozen=True)
class ParsedObject:
    colour: str
    shape: str
    size: str


@dataclasses.dataclass(frozen=True)
class ParsedCaption:
    """What a caption asks for. With two objects: ``objects[0] <relation> objects[1]``."""

    objects: tuple[ParsedObject, ...]
    position: str | None
    relation: str | None
    background: str | None


def _word_table(table: dict[str, tuple[str, ...]]) -> dict[str, str]:
    return {word: value for value, words in table.items() for word in words}


def _alternation(phrases: Sequence[str]) -> str:
    # Longest first so "to the left of" wins over "left of".
    return "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))


_SIZE_OF = _word_table(SIZE_WORDS)
_SHAPE_OF = _word_table(SHAPE_WORDS)
_RELATION_OF = _word_table(RELATION_PHRASES)
_POSITION_OF = _word_table(POSITION_PHRASES)
_RELATION_RE = re.compile(rf"\b({_alternation(list(_RELATION_OF))})\b")
_POSITION_RE = re.compile(rf"\b({_alternation(list(_POSITION_OF))})\b")
_BACKGROUND_RE = re.compile(rf",?\s*on an? ({'|'.join(BACKGROUND_NAMES)}) background\b")


def _parse_object(text: str, caption: str) -> ParsedObject:
    words = re.findall(r"[a-z]+", text)
    found = {}
    for kind, table in (("colour", {c: c for c in COLOUR_NAMES}), ("shape", _SHAPE_OF),
                        ("size", _SIZE_OF)):  # fmt: skip
        values = [table[w] for w in words if w in table]
        if len(values) != 1:
            raise CaptionParseError(
                f"caption {caption!r}: expected exactly one {kind} word in {text.strip()!r}, "
                f"found {values or 'none'}; {kind} words are {sorted(table)}"
            )
        found[kind] = values[0]
    return ParsedObject(**found)


@functools.lru_cache(maxsize=65536)
def parse_caption(caption: str) -> ParsedCaption:
    """Parses a caption of the shapes grammar (any template / paraphrase) into its attributes."""
    text = caption.lower().strip().rstrip(".")
    background = None
    m = _BACKGROUND_RE.search(text)
    if m:
        background, text = m.group(1), text[: m.start()] + text[m.end() :]
    relations = _RELATION_RE.findall(text)
    if len(relations) > 1:
        raise CaptionParseError(f"caption {caption!r} has several relations {relations}")
    if relations:
        m = _RELATION_RE.search(text)
        subject = _parse_object(text[: m.start()], caption)
        obj = _parse_object(text[m.end() :], caption)
        if subject.colour == obj.colour:
            raise CaptionParseError(
                f"caption {caption!r}: both objects are {subject.colour}; the shapes grammar "
                "gives the two objects of a scene different colours"
            )
        return ParsedCaption((subject, obj), None, _RELATION_OF[relations[0]], background)
    positions = _POSITION_RE.findall(text)
    if len(positions) != 1:
        raise CaptionParseError(
            f"caption {caption!r}: a one-object caption needs exactly one position phrase "
            f"(e.g. 'on the left', 'in the middle'), found {positions or 'none'}; a two-object "
            f"caption needs a relation ({sorted(_RELATION_OF)})"
        )
    obj = _parse_object(_POSITION_RE.sub(" ", text), caption)
    return ParsedCaption((obj,), _POSITION_OF[positions[0]], None, background)


def heldout_prompts(n: int, preset: str = "single") -> list[str]:
    """Captions of the first ``n`` heldout scenes of a preset."""
    spec = scene_spec(preset)
    return [sample_scene("heldout", i, spec=spec).caption for i in range(n)]


def heldout_images(n: int, resolution: int, preset: str = "single") -> np.ndarray:
    """Ground truth of the first ``n`` heldout prompts of a preset, uint8 [n, R, R, 3]."""
    spec = scene_spec(preset)
    return np.stack([example("heldout", i, resolution, spec=spec)["image"] for i in range(n)])
