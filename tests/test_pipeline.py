"""Input pipeline: per-stage batch contents, host sharding, resumption, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

# torchvision must be imported before TensorFlow is loaded (tfds preparation loads it):
# the other order segfaults in this environment.
import torchvision.transforms.functional as tvf  # isort: skip
import tensorflow_datasets as tfds
import torch
from PIL import Image

from imagen_jax.data import pipeline
from tests.support import SHAPES, CharTokenizer, loader, shapes_source, tokens_iterator
from tests.support_data import EDGE, SHAPES_TRAIN, PipelineEdgeCases, edge_image


@pytest.fixture(scope="session")
def data_dir(pipeline_data_dir) -> str:
    """A tfds data_dir with 32 px shapes (24 train / 8 heldout) and the edge-case builder
    (tests/conftest.py: pipeline_data_dir, prepared once for all pipeline tests)."""
    return pipeline_data_dir


def raw_examples(data_dir: str, name: str = SHAPES, split: str = "train") -> dict[int, dict]:
    """Reference read through plain tfds (decoded by tfds itself), keyed by example id."""
    ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    key = "key" if name == EDGE else "id"
    return {int(ex[key]): ex for ex in ds}


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.round((x + 1.0) * 127.5).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Batch contents.
# ----------------------------------------------------------------------------------------------


def test_base_stage_batches_are_the_dataset_images_and_captions(data_dir):
    it = tokens_iterator(data_dir, batch_size=8, num_epochs=1)
    batches = list(it)
    assert len(batches) == SHAPES_TRAIN // 8
    raw = raw_examples(data_dir)
    tok = CharTokenizer()
    for b in batches:
        assert set(b) == {"image", "id", "text_ids", "text_mask"}
        assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.float32
        assert b["id"].dtype == np.int64 and b["text_ids"].dtype == np.int32
        assert b["text_mask"].dtype == bool
        assert b["image"].min() >= -1.0 and b["image"].max() <= 1.0
        for i, example_id in enumerate(b["id"]):
            ex = raw[int(example_id)]
            # Same size as the stage: the pixels pass through untouched, scaled to [-1, 1].
            np.testing.assert_array_equal(b["image"][i], ex["image"] / np.float32(127.5) - 1)
            ids, mask = tok.tokenize([ex["caption"].decode()])
            np.testing.assert_array_equal(b["text_ids"][i], ids[0])
            np.testing.assert_array_equal(b["text_mask"][i], mask[0])
    # One epoch visits every example exactly once.
    assert sorted(np.concatenate([b["id"] for b in batches]).tolist()) == sorted(raw)


def test_sr_stage_pairs_match_torchvision_resize_and_crop(data_dir):
    """Shorter side -> 32, centre crop, 8 px low-res: parity with torchvision's antialiased
    bicubic (an independent implementation of PIL's filter) on non-square images. Geometry
    convention: the longer side is rounded (torchvision truncates), the crop offset floored."""
    source = pipeline.SourceSpec(name=EDGE, data_dir=data_dir, caption_feature="captions/text",
                                 id_feature="key")
    stage = pipeline.StageSpec(resolution=32, lowres_resolution=8, small_images="skip",
                               unreadable_images="skip")
    it = tokens_iterator(data_dir, stage, source, batch_size=4, num_epochs=1, shuffle=False)
    (batch,) = list(it)
    # Records 2 (20x30) is too small and 3 is corrupt: skipped and counted by reason.
    assert it.skipped == {"too_small": 1, "unreadable": 1}
    assert batch["id"].tolist() == [1000, 1001, 1004, 1005]
    assert batch["lowres"].shape == (4, 8, 8, 3)
    for i, record in enumerate([0, 1, 4, 5]):
        chw = torch.from_numpy(edge_image(record)).permute(2, 0, 1)
        h, w = PipelineEdgeCases.SIZES[record]
        size = (32, round(w * 32 / h)) if h <= w else (round(h * 32 / w), 32)
        resized = tvf.resize(chw, list(size), interpolation=tvf.InterpolationMode.BICUBIC,
                             antialias=True)
        want = tvf.crop(resized, (size[0] - 32) // 2, (size[1] - 32) // 2, 32, 32)
        want_low = tvf.resize(want, [8, 8], interpolation=tvf.InterpolationMode.BICUBIC,
                              antialias=True)
        got, got_low = to_uint8(batch["image"][i]), to_uint8(batch["lowres"][i])
        # torch's antialiased bicubic follows PIL's filter; rounding differs by a few levels.
        assert np.abs(got.astype(int) - want.permute(1, 2, 0).numpy()).max() <= 3
        assert np.abs(got_low.astype(int) - want_low.permute(1, 2, 0).numpy()).max() <= 3
    # Captions come from the nested sequence feature, first caption.
    tok = CharTokenizer()
    np.testing.assert_array_equal(batch["text_ids"][0], tok.tokenize(["first caption 0"])[0][0])


def test_1024_stage_trains_on_random_crops_with_their_lowres(data_dir):
    """Paper App. F: the 1024 model trains on 256 crops (64 -> 256) of 1024 images; here the
    same geometry at 1/32 scale: 32 px images, 16 px random crops, 4 px low-res copies."""
    stage = pipeline.StageSpec(resolution=16, lowres_resolution=4, source_resolution=32,
                               crop="random")
    raw = raw_examples(data_dir)
    epochs = [tokens_iterator(data_dir, stage, batch_size=12, num_epochs=2, seed=3)
              for _ in range(2)]
    a, b = (list(e) for e in epochs)
    offsets = {}
    for batch_a, batch_b in zip(a, b):  # deterministic: same seed, same crops
        np.testing.assert_array_equal(batch_a["image"], batch_b["image"])
        for i, example_id in enumerate(batch_a["id"]):
            full = raw[int(example_id)]["image"]
            crop = to_uint8(batch_a["image"][i])
            hits = [(y, x) for y in range(17) for x in range(17)
                    if np.array_equal(full[y : y + 16, x : x + 16], crop)]
            assert hits, "the crop is a window of the full-resolution image"
            offsets.setdefault(int(example_id), set()).add(hits[0])
            low = np.asarray(Image.fromarray(crop).resize((4, 4), Image.Resampling.BICUBIC))
            np.testing.assert_array_equal(to_uint8(batch_a["lowres"][i]), low)
    # Crops move across examples and epochs (not a disguised centre crop).
    assert len(set().union(*offsets.values())) > 5
    assert sum(len(v) > 1 for v in offsets.values()) > SHAPES_TRAIN // 2


def test_epochs_are_reshuffled_permutations(data_dir):
    ids = np.concatenate([b["id"] for b in tokens_iterator(data_dir, batch_size=6, num_epochs=3)])
    epochs = ids.reshape(3, SHAPES_TRAIN)
    for e in epochs:
        assert sorted(e.tolist()) == sorted(raw_examples(data_dir))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    other_seed = tokens_iterator(data_dir, batch_size=6, num_epochs=1, seed=1)
    assert not np.array_equal(np.concatenate([b["id"] for b in other_seed]), epochs[0])


# ----------------------------------------------------------------------------------------------
# Multi-host sharding (Must show 4).
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_hosts", [2, 5])
def test_hosts_see_disjoint_examples_covering_the_epoch(data_dir, num_hosts):
    per_host = SHAPES_TRAIN // num_hosts
    seen = []
    for host in range(num_hosts):
        it = tokens_iterator(data_dir, batch_size=per_host, num_epochs=1, process_index=host,
                             process_count=num_hosts, seed=5)
        (batch,) = list(it)  # every host gets the same number of examples (equal step counts)
        seen.append(set(batch["id"].tolist()))
        assert len(seen[-1]) == per_host
    union = set().union(*seen)
    assert sum(map(len, seen)) == len(union)  # disjoint
    # Covering: all of the epoch, except at most num_hosts - 1 examples (truncated for balance).
    assert len(union) == per_host * num_hosts
    assert SHAPES_TRAIN - len(union) == SHAPES_TRAIN % num_hosts


def test_default_host_is_jax_process():
    import jax

    assert pipeline.LoaderSpec().host() == (jax.process_index(), jax.process_count())
    with pytest.raises(pipeline.DataError, match="process_index 2 not in"):
        pipeline.LoaderSpec(process_index=2, process_count=2).host()


# ----------------------------------------------------------------------------------------------
# Checkpointing through orbax (the new-process resume test is in test_pipeline_resume.py).
# ----------------------------------------------------------------------------------------------


def test_orbax_checkpoints_the_iterator(data_dir, tmp_path):
    """The trainer's route: grain's orbax handler inside a CheckpointManager (Composite)."""
    import orbax.checkpoint as ocp

    stage = pipeline.StageSpec(resolution=32, small_images="skip", unreadable_images="skip")
    source = pipeline.SourceSpec(name=EDGE, data_dir=data_dir, caption_feature="captions/text",
                                 id_feature="key")
    want = pipeline.iterate(tokens_iterator(data_dir, stage, source, batch_size=3), 6)
    it = tokens_iterator(data_dir, stage, source, batch_size=3)
    pipeline.iterate(it, 4)
    skipped = dict(it.skipped)
    assert sum(skipped.values()) >= 2  # two bad records per epoch, two epochs read
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
        mngr.save(4, args=ocp.args.Composite(data=pipeline.checkpoint_args(it)))
        mngr.wait_until_finished()
        restored = tokens_iterator(data_dir, stage, source, batch_size=3)
        mngr.restore(4, args=ocp.args.Composite(
            data=pipeline.checkpoint_args(restored, restore=True)))
    assert restored.skipped == skipped  # skip counters are part of the state
    for a, b in zip(pipeline.iterate(restored, 2), want[4:]):
        assert all(np.array_equal(a[k], b[k]) for k in b)


# ----------------------------------------------------------------------------------------------
# Clear errors.
# ----------------------------------------------------------------------------------------------


def test_unknown_dataset_split_and_feature(data_dir):
    def make(**kw):
        return tokens_iterator(data_dir, source=pipeline.SourceSpec(data_dir=data_dir, **kw))

    with pytest.raises(pipeline.DataError, match="unknown tfds dataset 'no_such_dataset'"):
        make(name="no_such_dataset")
    with pytest.raises(pipeline.DataError, match="not prepared"):
        make(name="mnist")  # registered with tfds, never prepared here: nothing downloads
    with pytest.raises(pipeline.DataError,
                       match=r"no split 'validation'; it has \['train', 'heldout'\]"):
        make(name=SHAPES, split="validation")
    with pytest.raises(pipeline.DataError, match=r"no feature 'text' \(SourceSpec.caption_feature"):
        make(name=SHAPES, caption_feature="text")
    with pytest.raises(pipeline.DataError, match="no feature 'img'.*'image'"):
        make(name=SHAPES, image_feature="img")


def test_small_and_unreadable_images_fail_by_default_naming_the_example(data_dir):
    source = pipeline.SourceSpec(name=EDGE, data_dir=data_dir, caption_feature="captions/text",
                                 id_feature="key")
    small = pipeline.StageSpec(resolution=32, small_images="error", unreadable_images="skip")
    with pytest.raises(pipeline.DataError, match=r"id=1002 .*20x30, smaller than this stage's "
                                                 r"32px; set StageSpec.small_images='skip'"):
        next(tokens_iterator(data_dir, small, source, batch_size=4, shuffle=False))
    bad = pipeline.StageSpec(resolution=16, small_images="skip")  # unreadable: error (default)
    with pytest.raises(pipeline.DataError, match=r"id=1003 .*cannot be decoded"):
        next(tokens_iterator(data_dir, bad, source, batch_size=4, shuffle=False))


def test_bad_specs_are_refused():
    with pytest.raises(pipeline.DataError, match="lowres_resolution"):
        pipeline.StageSpec(resolution=64, lowres_resolution=64)
    with pytest.raises(pipeline.DataError, match="source_resolution"):
        pipeline.StageSpec(resolution=256, source_resolution=64)
    with pytest.raises(pipeline.DataError, match="crop='middle'"):
        pipeline.StageSpec(crop="middle")
    with pytest.raises(pipeline.DataError, match="LoaderSpec.batch_size must be >= 1"):
        pipeline.LoaderSpec(batch_size=0)
    with pytest.raises(pipeline.DataError, match="num_epochs must be >= 1 or None"):
        pipeline.LoaderSpec(num_epochs=0)
    with pytest.raises(pipeline.DataError, match="needs cache_dir"):
        pipeline.TextSpec(mode="cache")
    with pytest.raises(pipeline.DataError, match="'cache' or 'tokens'"):
        pipeline.TextSpec(mode="text")


def test_tokens_mode_needs_a_tokenizer(data_dir):
    with pytest.raises(pipeline.DataError, match="needs a tokenizer"):
        pipeline.make_iterator(shapes_source(data_dir), pipeline.StageSpec(resolution=32),
                               loader(), pipeline.TextSpec(mode="tokens"))


def test_gin_builds_the_iterator(data_dir):
    import gin

    from imagen_jax import gin_utils

    with gin.unlock_config():
        gin.clear_config()
        gin_utils.parse(bindings=[
            "make_iterator.source = @SourceSpec()",
            f"SourceSpec.name = '{SHAPES}'",
            f"SourceSpec.data_dir = '{data_dir}'",
            "make_iterator.stage = @StageSpec()",
            "StageSpec.resolution = 16",
            "StageSpec.lowres_resolution = 8",
            "make_iterator.loader = @LoaderSpec()",
            "LoaderSpec.batch_size = 2",
            "LoaderSpec.process_count = 1",
            "LoaderSpec.process_index = 0",
            "make_iterator.text = @TextSpec()",
            "TextSpec.mode = 'tokens'",
        ], finalize=False)
        try:
            batch = next(pipeline.make_iterator(tokenizer=CharTokenizer()))
        finally:
            gin.clear_config()
    assert batch["image"].shape == (2, 16, 16, 3) and batch["lowres"].shape == (2, 8, 8, 3)
