"""The shapes generator: determinism, caption grammar, held-out split, rendering, tfds."""

from __future__ import annotations

import glob
import itertools
import os

import numpy as np
import pytest
from matplotlib.path import Path

from imagen_jax.data import shapes

# ---------------------------------------------------------------------------------------------
# Scenes and captions.
# ---------------------------------------------------------------------------------------------


def test_scene_is_a_pure_function_of_split_index_seed():
    a = shapes.sample_scene("train", 17, seed=3)
    assert a == shapes.sample_scene("train", 17, seed=3)
    np.testing.assert_array_equal(shapes.render(a, 64), shapes.render(a, 64))
    others = [
        shapes.sample_scene("train", 18, seed=3),
        shapes.sample_scene("train", 17, seed=4),
        shapes.sample_scene("heldout", 17, seed=3),
    ]
    assert all(o != a for o in others)


@pytest.mark.parametrize("split", shapes.SPLITS)
def test_captions_parse_back_to_the_scene(split):
    used_templates, used_words = set(), set()
    for i in range(1500):
        scene = shapes.sample_scene(split, i)
        parsed = shapes.parse_caption(scene.caption)
        want = [(o.colour, o.shape, o.size) for o in scene.objects]
        assert [(o.colour, o.shape, o.size) for o in parsed.objects] == want, scene.caption
        assert (parsed.position, parsed.relation) == (scene.position, scene.relation)
        assert parsed.background == (scene.background if scene.mentions_background else None)
        used_words.update(scene.caption.replace(",", " ").split())
        used_templates.add(("there is" in scene.caption, "picture" in scene.caption))
    # Paraphrases are all exercised: every synonym of every attribute occurs.
    for table in (shapes.SIZE_WORDS, shapes.SHAPE_WORDS):
        for words in table.values():
            assert set(words) <= used_words
    assert len(used_templates) == 3


def test_caption_paraphrases_from_the_issue_parse():
    p = shapes.parse_caption("a blue star, small, under a big red disc")
    assert p.objects == (
        shapes.ParsedObject("blue", "star", "small"),
        shapes.ParsedObject("red", "circle", "large"),
    )
    assert p.relation == "below" and p.position is None and p.background is None
    p = shapes.parse_caption("A large red circle above a small blue star.")
    assert p.relation == "above" and p.objects[0].colour == "red"
    p = shapes.parse_caption("In the middle, a tiny green triangle, on a beige background")
    assert (p.position, p.background, p.objects[0].size) == ("centre", "beige", "small")


@pytest.mark.parametrize(
    "caption, problem",
    [
        ("a red circle on the left", "size"),
        ("a small circle on the left", "colour"),
        ("a small red blob on the left", "shape"),
        ("a small red circle", "position"),
        ("a small red circle left of a big red star", "both objects are red"),
        ("a small red circle above a big blue star below a green square", "several relations"),
    ],
)
def test_bad_captions_name_the_problem(caption, problem):
    with pytest.raises(shapes.CaptionParseError, match=problem):
        shapes.parse_caption(caption)


# ---------------------------------------------------------------------------------------------
# Held-out split: proven over the whole attribute space.
# ---------------------------------------------------------------------------------------------


def _pairs(combo):
    if combo[0] == "one":
        return {(combo[2], combo[3])}
    return {(combo[2], combo[3]), (combo[5], combo[6])}


def test_heldout_shares_no_colour_shape_pair_and_no_combination_with_train():
    train, heldout = set(shapes.combinations("train")), set(shapes.combinations("heldout"))
    train_pairs = set().union(*map(_pairs, train))
    heldout_pairs = set().union(*map(_pairs, heldout))
    assert not train & heldout
    assert not train_pairs & heldout_pairs
    # Compositional, not novel words: every colour and shape (and size, position, relation)
    # of heldout is seen in train.
    assert {c for c, _ in train_pairs} == set(shapes.COLOUR_NAMES)
    assert {s for _, s in train_pairs} == set(shapes.SHAPES)
    assert {c for c, _ in heldout_pairs} == set(shapes.COLOUR_NAMES)

    # The whole generator space, built here from the vocabulary alone: each combination is in
    # exactly the split its pairs allow (both splits, or none when a scene would mix a reserved
    # and a train pair).
    objects = list(itertools.product(shapes.COLOUR_NAMES, shapes.SHAPES, shapes.SIZES))
    n_seen = 0
    for bg, (c, s, z), p in itertools.product(shapes.BACKGROUND_NAMES, objects, shapes.POSITIONS):
        combo = ("one", bg, c, s, z, p)
        held = (c, s) in shapes.HELDOUT_PAIRS
        assert (combo in heldout, combo in train) == (held, not held)
        n_seen += 1
    for bg, o1, o2, r in itertools.product(
        shapes.BACKGROUND_NAMES, objects, objects, shapes.RELATIONS
    ):
        combo = ("two", bg, *o1, *o2, r)
        held = [(o[0], o[1]) in shapes.HELDOUT_PAIRS for o in (o1, o2)]
        distinct = o1[0] != o2[0]
        assert (combo in heldout) == (distinct and all(held))
        assert (combo in train) == (distinct and not any(held))
        n_seen += 1
    assert n_seen == 4 * 64 * 5 + 4 * 64 * 64 * 4
    assert len(train) + len(heldout) < n_seen


@pytest.mark.parametrize("split", shapes.SPLITS)
def test_sampled_scenes_stay_inside_their_split(split):
    allowed = set(shapes.combinations(split))
    seen = {shapes.sample_scene(split, i, seed=7).combination for i in range(3000)}
    assert seen <= allowed
    # Both scene kinds and every relation / position are reached.
    assert {c[0] for c in seen} == {"one", "two"}
    assert {c[-1] for c in seen if c[0] == "two"} == set(shapes.RELATIONS)
    assert {c[-1] for c in seen if c[0] == "one"} == set(shapes.POSITIONS)


# ---------------------------------------------------------------------------------------------
# Rendering.
# ---------------------------------------------------------------------------------------------


def _reference_render(scene: shapes.Scene, resolution: int, factor: int = 8) -> np.ndarray:
    """Independent reference: hard point-in-shape tests (matplotlib) at `factor`x, box filter."""
    n = resolution * factor
    centres = (np.arange(n) + 0.5) / n
    xs, ys = np.meshgrid(centres, centres)
    canvas = np.empty((n, n, 3), np.float64)
    canvas[:] = shapes.BACKGROUNDS[scene.background]
    for obj in scene.objects:
        r = shapes.DEFAULT_SPEC.radius(obj.size)
        dx, dy = xs - obj.x, ys - obj.y
        verts = shapes.POLYGONS[obj.shape]
        if verts is None:
            inside = dx**2 + dy**2 < (shapes.CIRCLE_RADIUS * r) ** 2
        else:
            pts = np.stack([dx.ravel(), dy.ravel()], -1)
            inside = Path(verts * r).contains_points(pts).reshape(n, n)
        canvas[inside] = shapes.COLOURS[obj.colour]
    return canvas.reshape(resolution, factor, resolution, factor, 3).mean(axis=(1, 3))


@pytest.mark.parametrize("resolution, num_scenes", [(32, 8), (64, 6), (256, 2)])
def test_render_matches_supersampled_reference(resolution, num_scenes):
    for i in range(num_scenes):
        scene = shapes.sample_scene("train", i)
        ours = shapes.render(scene, resolution).astype(np.float64)
        ref = _reference_render(scene, resolution, factor=8 if resolution < 256 else 4)
        err = np.abs(ours - ref)
        # Analytic distance-based coverage vs 64-sample box filter: equal in the interior,
        # within a fraction of a colour step on the rim (corners differ the most).
        assert err.mean() < 0.6, (resolution, i, err.mean())
        assert np.quantile(err, 0.999) < 60, (resolution, i)
        # Anti-aliased: the rim holds intermediate values, not only palette colours.
        palette = np.array([*shapes.COLOURS.values(), *shapes.BACKGROUNDS.values()])
        in_palette = (ours[:, :, None, :] == palette).all(-1).any(-1)
        assert (~in_palette).any()


@pytest.mark.parametrize("resolution", [16, 1024])
def test_render_any_resolution(resolution):
    scene = shapes.sample_scene("train", 5)
    img = shapes.render(scene, resolution)
    assert img.shape == (resolution, resolution, 3) and img.dtype == np.uint8
    # Object coverage scales with the image: same colour fractions at every resolution.
    small = shapes.render(scene, 64).astype(np.float64).mean((0, 1))
    np.testing.assert_allclose(img.astype(np.float64).mean((0, 1)), small, atol=1.5)


def test_objects_do_not_overlap_or_leave_the_image():
    spec = shapes.DEFAULT_SPEC
    for i in range(500):
        scene = shapes.sample_scene("train", i)
        extents = []
        for o in scene.objects:
            reach = spec.radius(o.size) * 1.1  # unit shapes fit inside radius 1.1 (triangle)
            assert reach < o.x < 1 - reach and reach < o.y < 1 - reach
            extents.append(reach)
        if len(scene.objects) == 2:
            a, b = scene.objects
            assert np.hypot(a.x - b.x, a.y - b.y) > sum(extents)
            assert a.colour != b.colour


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown split"):
        shapes.sample_scene("validation", 0)
    with pytest.raises(ValueError, match="resolution"):
        shapes.render(shapes.sample_scene("train", 0), 4)
    with pytest.raises(ValueError, match="never overlap"):
        shapes.SceneSpec(size_radius=(0.1, 0.3))
    with pytest.raises(IndexError, match="index 3 out of range for 3 examples"):
        shapes.ShapesSource("train", num_examples=3)[3]


def test_source_records():
    src = shapes.ShapesSource("heldout", num_examples=10, resolution=32, seed=1)
    assert len(src) == 10
    rec = src[4]
    assert rec["image"].shape == (32, 32, 3)
    assert rec["id"] == (1 << 32) | 4
    scene = shapes.sample_scene("heldout", 4, seed=1)
    assert rec["caption"] == scene.caption
    assert [shapes.COLOUR_NAMES[c] for c in rec["colour"][: rec["num_objects"]]] == [
        o.colour for o in scene.objects
    ]


# ---------------------------------------------------------------------------------------------
# tfds builder.
# ---------------------------------------------------------------------------------------------


def test_tfds_builder_prepares_array_record_offline(tmp_path):
    import tensorflow_datasets as tfds

    from imagen_jax.data import shapes_tfds

    data_dir = str(tmp_path)
    builder = shapes_tfds.prepare("tiny", data_dir)
    assert tfds.builder_cls("imagen_shapes") is shapes_tfds.ImagenShapes
    assert glob.glob(os.path.join(builder.data_dir, "*.array_record*"))
    assert not glob.glob(os.path.join(builder.data_dir, "*.tfrecord*"))
    downloads = os.path.join(data_dir, "downloads")
    assert not [f for _, _, files in os.walk(downloads) for f in files]  # nothing fetched
    feats = builder.info.features
    for split, n in (("train", 64), ("heldout", 16)):
        # The route the input pipeline takes: by name, from the data_dir, random access.
        ds = tfds.data_source("imagen_shapes/tiny", data_dir=data_dir, split=split)
        assert len(ds) == n
        ref = shapes.ShapesSource(split, n, resolution=64, seed=0)
        for i in (0, 1, n - 1):
            rec, want = ds[i], ref[i]
            np.testing.assert_array_equal(rec["image"], want["image"])  # PNG is lossless
            assert rec["caption"].decode() == want["caption"]
            assert rec["id"] == want["id"]
            for k in ("num_objects", "colour", "shape", "size", "center"):
                np.testing.assert_array_equal(rec[k], want[k])
            for k in ("background", "position", "relation"):
                assert feats[k].int2str(rec[k]) == want[k]
    # Re-preparing is a no-op; the resolution-named configs exist.
    assert shapes_tfds.prepare("tiny", data_dir).data_dir == builder.data_dir
    assert {"tiny", "r64", "r256", "r512", "r1024"} <= {c.name for c in shapes_tfds.CONFIGS}
    with pytest.raises(ValueError, match="unknown imagen_shapes config"):
        shapes_tfds.prepare("r65", data_dir)


def test_tfds_custom_config(tmp_path):
    from imagen_jax.data import shapes_tfds

    config = shapes_tfds.ShapesConfig(
        name="test32", resolution=32, num_train=3, num_heldout=2, seed=2
    )
    builder = shapes_tfds.prepare(config, str(tmp_path))
    assert builder.info.features["image"].shape == (32, 32, 3)
    rec = builder.as_data_source(split="heldout")[1]
    np.testing.assert_array_equal(rec["image"], shapes.example("heldout", 1, 32, seed=2)["image"])
