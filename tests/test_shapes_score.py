"""The shapes prompt-adherence scorer: ground truth, mismatched captions, noise, single edits."""

from __future__ import annotations

import numpy as np
import pytest

from imagen_jax.data import shapes
from imagen_jax.eval import shapes_score


def _rendered(split: str, n: int, resolution: int, seed: int = 0):
    scenes = [shapes.sample_scene(split, i, seed) for i in range(n)]
    images = np.stack([shapes.render(s, resolution) for s in scenes])
    return scenes, images


# Ground truth must score (almost) perfectly at every resolution the cascade produces; 1024 px
# images are few because rendering them dominates the test time.
@pytest.mark.parametrize(
    "split, resolution, n",
    [("train", 32, 200), ("train", 64, 300), ("heldout", 64, 150), ("train", 256, 80),
     ("train", 1024, 16)],
)  # fmt: skip
def test_ground_truth_exact_match(split, resolution, n):
    scenes, images = _rendered(split, n, resolution, seed=11)
    result = shapes_score.score(images, [s.caption for s in scenes])
    assert result["exact_match"] >= 0.99, result
    for attr in ("colour", "shape", "size", "position", "relation", "count"):
        assert result[attr] >= 0.99, (attr, result)
    assert result["num_images"] == n
    assert result["num_relation"] + result["num_position"] == n


def test_ground_truth_at_16px_is_mostly_right():
    # 16 px is below what the shapes were designed for (a small object is ~3 px across); the
    # score still works, so a 16 px base model can be tracked.
    scenes, images = _rendered("train", 150, 16, seed=5)
    result = shapes_score.score(images, [s.caption for s in scenes])
    assert result["exact_match"] >= 0.9, result


def test_mismatched_captions_score_low():
    scenes, images = _rendered("train", 200, 64, seed=1)
    others = [shapes.sample_scene("train", i, seed=2).caption for i in range(200)]
    result = shapes_score.score(images, others)
    assert result["exact_match"] <= 0.10, result


def test_noise_scores_near_chance():
    rng = np.random.default_rng(0)
    scenes = [shapes.sample_scene("train", i) for i in range(100)]
    noise = rng.integers(0, 256, (100, 64, 64, 3), dtype=np.uint8)
    result = shapes_score.score(noise, [s.caption for s in scenes])
    chance = shapes_score.chance_levels()
    assert result["exact_match"] <= 0.02
    # Pixel noise forms no object: attributes are at most chance (colour / shape / ... are 0
    # because nothing is found; the background guess is the one non-trivial check).
    for attr in ("colour", "shape", "size", "position", "relation", "background"):
        assert result[attr] <= chance[attr] + 0.1, (attr, result)


def _caption_one(colour, shape, size, position):
    return f"a {size} {colour} {shape} {shapes.POSITION_PHRASES[position][0]}"


def _other(values, value, k):
    return [v for v in values if v != value][k % (len(values) - 1)]


def test_each_single_attribute_edit_is_caught():
    """Changing exactly one attribute of a true caption fails exactly that check."""
    n_checked = 0
    for i in range(400):
        scene = shapes.sample_scene("train", i, seed=3)
        if len(scene.objects) != 1:
            continue
        o = scene.objects[0]
        image = shapes.render(scene, 64)
        truth = (o.colour, o.shape, o.size, scene.position)
        assert shapes_score.score_image(image, _caption_one(*truth)).exact
        edits = {
            "shape": (o.colour, _other(shapes.SHAPES, o.shape, i), o.size, scene.position),
            "size": (o.colour, o.shape, _other(shapes.SIZES, o.size, i), scene.position),
            "position": (o.colour, o.shape, o.size, _other(shapes.POSITIONS, scene.position, i)),
            "colour": (_other(shapes.COLOUR_NAMES, o.colour, i), o.shape, o.size, scene.position),
        }
        for attr, caption in edits.items():
            verdict = shapes_score.score_image(image, _caption_one(*caption))
            assert not verdict.exact, caption
            assert verdict.checks[attr] == [False], (attr, caption, verdict.checks)
        n_checked += 1
        if n_checked == 40:
            break
    assert n_checked == 40


def test_swapped_relation_is_caught():
    for i in range(60):
        scene = shapes.sample_scene("train", i, seed=4)
        if len(scene.objects) != 2:
            continue
        a, b = scene.objects
        image = shapes.render(scene, 64)
        flipped = {"left_of": "right_of", "right_of": "left_of", "above": "below",
                   "below": "above"}[scene.relation]  # fmt: skip
        for relation, ok in ((scene.relation, True), (flipped, False)):
            phrase = shapes.RELATION_PHRASES[relation][0]
            caption = f"a {a.size} {a.colour} {a.shape} {phrase} a {b.size} {b.colour} {b.shape}"
            verdict = shapes_score.score_image(image, caption)
            assert verdict.checks["relation"] == [ok] and verdict.exact == ok, caption


def test_robust_to_model_like_degradations():
    """Generated images are noisy and blurry: the score must not collapse on them."""
    rng = np.random.default_rng(0)
    scenes, images = _rendered("train", 120, 32, seed=9)
    captions = [s.caption for s in scenes]
    noisy = np.clip(images + rng.normal(0, 20, images.shape), 0, 255).astype(np.uint8)
    assert shapes_score.score(noisy, captions)["exact_match"] >= 0.9
    # A 4x nearest-neighbour upsample (what a do-nothing super-resolution stage gives) scores as
    # the original.
    blocky = images.repeat(4, axis=1).repeat(4, axis=2)
    assert shapes_score.score(blocky, captions)["exact_match"] >= 0.99


def test_float_images_in_model_range_score_like_uint8():
    scenes, images = _rendered("train", 40, 64, seed=6)
    captions = [s.caption for s in scenes]
    as_float = images.astype(np.float32) / 127.5 - 1.0
    assert shapes_score.score(as_float, captions) == shapes_score.score(images, captions)


def test_bad_inputs_raise_clear_errors():
    scenes, images = _rendered("train", 2, 32)
    captions = [s.caption for s in scenes]
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        shapes_score.score(images, captions[:1])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        shapes_score.score(images.astype(np.float32), captions)
    with pytest.raises(ValueError, match="square"):
        shapes_score.score_image(images[0, :, :20], captions[0])
    with pytest.raises(shapes_score.CaptionParseError, match="position"):
        shapes_score.score(images, ["a small red circle", captions[1]])
    with pytest.raises(TypeError, match="uint8"):
        shapes_score.score(images.astype(np.int32), captions)
