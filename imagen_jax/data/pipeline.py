"""Per-stage training batches from any tfds dataset with an image and a caption feature.

Pipeline (grain, per host)::

    tfds.data_source ─ host shard (strided) ─ shuffle(seed, per epoch) ─ repeat
      ─ random_map(decode, resize, crop, low-res, join cached text embeddings)   [workers]
      ─ batch (skipping too-small / unreadable images, counted)                   [workers]
      ─ mp_prefetch(worker processes) ─ tokenize captions (on-the-fly mode) ─ skip counter

Every step is a pure function of (seed, host, epoch, index), so the iterator state that grain
checkpoints (``get_state`` / ``set_state``, or orbax via ``checkpoint_args``) restores exactly
the batches an uninterrupted run would have produced, in a new process too. The state depends on
the number of worker processes: resume with the same ``worker_count``.

Stages (Appendix F of the paper): the base model trains on R x R images (``resolution=64``); the
super-resolution models on (high-res crop, its downsampled copy) pairs, e.g. 256 with a 64
``lowres``; the 1024 model is trained on 256 x 256 crops of 1024 images with their 64 x 64
copies (``source_resolution=1024, resolution=256, lowres_resolution=64``) and sampled on full
images (it is fully convolutional apart from text cross-attention).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import gin
import grain
import grain.checkpoint
import jax
import numpy as np
from absl import flags
from PIL import Image

from imagen_jax.data.embed_cache import EmbeddingCache
from imagen_jax.data.images import (
    NonFiniteImageError,
    check_finite,
    read_rgb,
    uint8_to_unit,
)
from imagen_jax.errors import DataError

# Keys of the per-batch skip counters that travel from the workers to the main process.
_SKIP_REASONS = ("too_small", "unreadable")
_SKIP_KEY = "_skipped"
_RECORD_KEY = "_record"  # index of the example in the tfds split (stable across runs)
_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


# --------------------------------------------------------------------------------------------
# Configuration (gin edges).
# --------------------------------------------------------------------------------------------


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """Which tfds split to read and which features hold the image, caption and example id.

    Nested features are addressed with ``/`` (``"captions/text"``); a caption feature that is a
    sequence (several captions per image, as in coco_captions) contributes its
    ``caption_index``-th element. ``id_feature=None`` keys examples by their record index in
    the split instead (stable for a prepared dataset).
    """

    name: str = "imagen_shapes/r64"
    split: str = "train"
    data_dir: str | None = None
    image_feature: str = "image"
    caption_feature: str = "caption"
    id_feature: str | None = "id"
    caption_index: int = 0


@gin.configurable
@dataclasses.dataclass(frozen=True)
class StageSpec:
    """How one cascade stage sees an image.

    The image is resized (aspect preserved) so its shorter side is ``source_resolution``
    (default: ``resolution``), then cropped to ``resolution`` x ``resolution`` (centre or
    random). SR stages also get ``lowres``: the crop downsampled to ``lowres_resolution``.
    Images whose shorter side is below ``source_resolution`` are skipped and counted
    (``small_images="skip"``) or raise (``"error"``); undecodable images likewise per
    ``unreadable_images``. No flips: they would contradict captions such as "left of".
    """

    resolution: int = 64
    lowres_resolution: int | None = None
    source_resolution: int | None = None
    crop: str = "center"
    resize_method: str = "bicubic"
    small_images: str = "skip"
    unreadable_images: str = "error"

    def __post_init__(self):
        src = self.crop_source_resolution
        if self.resolution < 1 or src < self.resolution:
            raise DataError(
                f"StageSpec: need 1 <= resolution ({self.resolution}) <= source_resolution ({src})"
            )
        if self.lowres_resolution is not None and not 1 <= self.lowres_resolution < self.resolution:
            raise DataError(
                f"StageSpec: lowres_resolution ({self.lowres_resolution}) must be below "
                f"resolution ({self.resolution}); leave it None for the base stage"
            )
        for field, value, allowed in (
            ("crop", self.crop, ("center", "random")),
            ("resize_method", self.resize_method, tuple(_RESAMPLE)),
            ("small_images", self.small_images, ("skip", "error")),
            ("unreadable_images", self.unreadable_images, ("skip", "error")),
        ):
            if value not in allowed:
                raise DataError(f"StageSpec.{field}={value!r}; use one of {allowed}")

    @property
    def crop_source_resolution(self) -> int:
        return self.source_resolution or self.resolution


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TextSpec:
    """Where text conditioning comes from.

    ``mode="cache"``: batches carry ``text_embeds`` + ``text_mask`` read from the embedding
    cache at ``cache_dir`` (launch.cache_embeddings); the pipeline refuses a cache built by an
    encoder whose fingerprint differs from the one passed to ``make_iterator``.
    ``mode="tokens"``: batches carry ``text_ids`` + ``text_mask``, tokenised in the main process
    by the tokenizer passed to ``make_iterator``; the trainer encodes them with the jitted
    ``TextEncoder.encode`` (which zeroes padded positions, as the cache does).
    """

    mode: str = "cache"
    cache_dir: str | None = None

    def __post_init__(self):
        if self.mode not in ("cache", "tokens"):
            raise DataError(f"TextSpec.mode={self.mode!r}; use 'cache' or 'tokens'")
        if self.mode == "cache" and not self.cache_dir:
            raise DataError(
                "TextSpec(mode='cache') needs cache_dir (build one with launch.cache_embeddings),"
                " or set mode='tokens' to encode on the fly"
            )


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoaderSpec:
    """Batching, shuffling, host sharding and parallelism of the grain loader.

    ``batch_size`` is per host. Each host reads the strided slice ``process_index::process_count``
    of the split (truncated so all hosts hold the same number of examples: at most
    ``process_count - 1`` examples per epoch are never read). ``process_index`` /
    ``process_count`` default to jax's; tests override them to simulate hosts.
    """

    batch_size: int = 64
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    worker_count: int = 0  # 0: decode in the main process
    worker_buffer_size: int = 2  # batches buffered per worker
    read_threads: int = 4  # threads per process reading + decoding records
    read_buffer_size: int = 64  # elements buffered by those threads
    process_index: int | None = None
    process_count: int | None = None

    def __post_init__(self):
        for field in ("batch_size", "read_threads", "read_buffer_size", "worker_buffer_size"):
            if getattr(self, field) < 1:
                raise DataError(f"LoaderSpec.{field} must be >= 1, got {getattr(self, field)}")
        if self.worker_count < 0:
            raise DataError(f"LoaderSpec.worker_count must be >= 0, got {self.worker_count}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise DataError(f"LoaderSpec.num_epochs must be >= 1 or None, got {self.num_epochs}")
        if not 0 <= self.seed < 2**31:
            raise DataError(f"LoaderSpec.seed must be in [0, 2**31), got {self.seed}")

    def host(self) -> tuple[int, int]:

        index = jax.process_index() if self.process_index is None else self.process_index
        count = jax.process_count() if self.process_count is None else self.process_count
        if not 0 <= index < count:
            raise DataError(f"LoaderSpec: process_index {index} not in [0, {count})")
        return index, count


# --------------------------------------------------------------------------------------------
# tfds source.
# --------------------------------------------------------------------------------------------


def _feature_paths(features, prefix: str = "") -> dict[str, Any]:
    """Flattens a tfds FeaturesDict into ``{"a/b": feature}`` (through Sequence features)."""
    import tensorflow_datasets as tfds  # heavy (TensorFlow): tfds only

    out = {}
    if isinstance(features, tfds.features.Sequence):
        return _feature_paths(features.feature, prefix)
    if isinstance(features, tfds.features.FeaturesDict):
        for key in features.keys():
            path = f"{prefix}{key}"
            out[path] = features[key]
            out.update(_feature_paths(features[key], path + "/"))
    return out


def _get_path(example: Mapping[str, Any], path: str) -> Any:
    value: Any = example
    for key in path.split("/"):
        value = value[key]
    return value


class TfdsSource:
    """Random-access view of a prepared tfds split: ``source[i]`` is the example dict with the
    image left encoded (decoded later, in the workers, with a clear error) plus its record index.
    """

    def __init__(self, spec: SourceSpec, decode_images: bool = False):
        import tensorflow_datasets as tfds  # heavy (TensorFlow): tfds only

        self.spec = spec
        try:
            builder = tfds.builder(spec.name, data_dir=spec.data_dir)
        except tfds.core.registered.DatasetNotFoundError as e:
            raise DataError(
                f"unknown tfds dataset {spec.name!r} (data_dir={spec.data_dir!r}): no registered "
                "builder and no prepared copy there. Check the name (and config, e.g. "
                "'imagen_shapes/r64'), or pass the data_dir it was prepared into."
            ) from e
        if not builder.is_prepared():
            raise DataError(
                f"tfds dataset {spec.name!r} is not prepared in {builder.data_dir!r}; nothing is "
                "downloaded at run time: prepare it offline first (e.g. `tfds build` or the "
                "dataset's own builder script) and pass its data_dir"
            )
        splits = list(builder.info.splits.keys())
        if spec.split not in builder.info.splits:
            raise DataError(f"{spec.name!r} has no split {spec.split!r}; it has {splits}")
        paths = _feature_paths(builder.info.features)
        wanted = {"image_feature": spec.image_feature, "caption_feature": spec.caption_feature}
        if spec.id_feature is not None:
            wanted["id_feature"] = spec.id_feature
        for field, path in wanted.items():
            if path not in paths:
                raise DataError(
                    f"{spec.name!r} has no feature {path!r} (SourceSpec.{field}); its features "
                    f"are {sorted(paths)}"
                )
        decoders = None
        if not decode_images and isinstance(paths[spec.image_feature], tfds.features.Image):
            # Keep PNG/JPEG bytes: decoding happens in our workers, where a bad image can be
            # reported with its id (tfds would fail deep inside its own reader).
            decoders = {}
            node = decoders
            keys = spec.image_feature.split("/")
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = tfds.decode.SkipDecoding()
        self.num_examples = builder.info.splits[spec.split].num_examples
        self._source = builder.as_data_source(split=spec.split, decoders=decoders)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} examples")
        example = dict(self._source[index])
        example[_RECORD_KEY] = int(index)
        return example

    def example_id(self, example: Mapping[str, Any]) -> int:
        if self.spec.id_feature is None:
            return int(example[_RECORD_KEY])
        value = _get_path(example, self.spec.id_feature)
        try:
            return int(value)
        except (TypeError, ValueError) as e:
            raise DataError(
                f"id feature {self.spec.id_feature!r} holds {value!r}, not an integer; set "
                "SourceSpec.id_feature=None to key examples by record index"
            ) from e

    def caption(self, example: Mapping[str, Any]) -> str:
        value = _get_path(example, self.spec.caption_feature)
        if isinstance(value, (list, tuple, np.ndarray)):
            if len(value) <= self.spec.caption_index:
                raise DataError(
                    f"example {self.example_id(example)} has {len(value)} captions in "
                    f"{self.spec.caption_feature!r}; caption_index={self.spec.caption_index}"
                )
            value = value[self.spec.caption_index]
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def source_info(spec: SourceSpec) -> dict[str, Any]:
    """What identifies a split's captions (stored in an embedding cache, checked on use)."""
    return {
        "name": spec.name,
        "split": spec.split,
        "caption_feature": spec.caption_feature,
        "caption_index": spec.caption_index,
        "id_feature": spec.id_feature,
    }


class CaptionTable:
    """``(example id, caption)`` rows of a tfds split, images never decoded (cache builder)."""

    def __init__(self, spec: SourceSpec):
        self.source = TfdsSource(spec)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[int, str]:
        example = self.source[index]
        return self.source.example_id(example), self.source.caption(example)

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return (self[i] for i in range(len(self)))


# --------------------------------------------------------------------------------------------
# Image processing (pure numpy / PIL; runs in the workers).
# --------------------------------------------------------------------------------------------


def decode_image(value: Any) -> np.ndarray:
    """Encoded bytes or an array -> uint8 [H, W, 3]. Raises ``OSError``/``ValueError`` if bad.

    A float image (array, or a float TIFF's bytes) holding NaN/Inf raises
    ``NonFiniteImageError`` (a ValueError) instead of decoding to black pixels.
    """
    if isinstance(value, (bytes, np.bytes_)):
        return read_rgb(bytes(value))
    array = check_finite(np.asarray(value), "image")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4) or array.dtype != np.uint8:
        raise ValueError(f"expected uint8 [H, W, 3] pixels, got {array.dtype} {array.shape}")
    return array[..., :3]


def _resize(image: np.ndarray, height: int, width: int, method: str) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    # PIL widens its filter support when shrinking, i.e. it anti-aliases (jax.image does too).
    return np.asarray(Image.fromarray(image).resize((width, height), _RESAMPLE[method]))


def process_image(
    image: np.ndarray, stage: StageSpec, rng: np.random.Generator | None
) -> dict[str, np.ndarray]:
    """uint8 [H, W, 3] -> ``image`` float32 [R, R, 3] (+ ``lowres`` [r, r, 3]) in [-1, 1].

    Resize so the shorter side is ``source_resolution``, crop ``resolution`` (random crops draw
    from ``rng``), and for SR stages downsample the crop to ``lowres_resolution``.
    """
    src, res = stage.crop_source_resolution, stage.resolution
    h, w = image.shape[:2]
    scale = src / min(h, w)
    # round() keeps the shorter side exactly `src` and the longer one within half a pixel.
    new_h, new_w = max(src, round(h * scale)), max(src, round(w * scale))
    image = _resize(image, new_h, new_w, stage.resize_method)
    if stage.crop == "random":
        top = int(rng.integers(0, new_h - res + 1))
        left = int(rng.integers(0, new_w - res + 1))
    else:
        top, left = (new_h - res) // 2, (new_w - res) // 2
    crop = image[top : top + res, left : left + res]  # uint8 [R, R, 3]
    out = {"image": uint8_to_unit(crop)}
    if stage.lowres_resolution is not None:
        r = stage.lowres_resolution
        out["lowres"] = uint8_to_unit(_resize(crop, r, r, stage.resize_method))
    return out


class _PrepareExample:
    """tfds example -> model-ready element (or a skip marker); a grain random_map transform."""

    def __init__(
        self, source: TfdsSource, stage: StageSpec, text: TextSpec, cache: EmbeddingCache | None
    ):
        self.source, self.stage, self.text, self.cache = source, stage, text, cache

    def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        example_id = self.source.example_id(example)
        where = (
            f"example id={example_id} (record {example[_RECORD_KEY]} of "
            f"{self.source.spec.name}:{self.source.spec.split})"
        )
        try:
            pixels = decode_image(_get_path(example, self.source.spec.image_feature))
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three on bad files.
            if self.stage.unreadable_images == "skip":
                return {_SKIP_KEY: "unreadable"}
            problem = (
                e.problem
                if isinstance(e, NonFiniteImageError)
                else f"cannot be decoded ({type(e).__name__}: {e})"
            )
            raise DataError(
                f"{where}: image feature {self.source.spec.image_feature!r} {problem}; repair or "
                "drop the record, or set StageSpec.unreadable_images='skip'"
            ) from e
        if min(pixels.shape[:2]) < self.stage.crop_source_resolution:
            if self.stage.small_images == "skip":
                return {_SKIP_KEY: "too_small"}
            raise DataError(
                f"{where}: image is {pixels.shape[0]}x{pixels.shape[1]}, smaller than this "
                f"stage's {self.stage.crop_source_resolution}px; set StageSpec.small_images="
                "'skip' to drop such images (they are counted), or use a higher-resolution "
                "dataset"
            )
        out = process_image(pixels, self.stage, rng)
        out["id"] = np.int64(example_id)
        if self.cache is not None:
            out["text_embeds"], out["text_mask"] = self.cache.lookup(example_id)
        else:
            out["caption"] = self.source.caption(example)
        return out


# --------------------------------------------------------------------------------------------
# grain plumbing: skip-aware batching and the skip counter.
# --------------------------------------------------------------------------------------------


class _SkippingBatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, batch_size: int):
        super().__init__(parent)
        self._batch_size = batch_size

    def __next__(self) -> dict[str, np.ndarray]:
        elements, skipped = [], dict.fromkeys(_SKIP_REASONS, 0)
        while len(elements) < self._batch_size:
            element = next(self._parent)  # StopIteration ends the epoch (partial batch dropped).
            if _SKIP_KEY in element:
                skipped[element[_SKIP_KEY]] += 1
            else:
                elements.append(element)
        batch = {k: np.stack([e[k] for e in elements]) for k in elements[0]}
        batch[_SKIP_KEY] = np.asarray([skipped[r] for r in _SKIP_REASONS], np.int64)
        return batch

    # No element is carried between batches, so the parent's state is the whole state.
    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


class _SkippingBatch(grain.IterDataset):
    """Batches ``batch_size`` kept elements, counting the skip markers it drops on the way."""

    def __init__(self, parent: grain.IterDataset, batch_size: int):
        super().__init__(parent)
        self._batch_size = batch_size

    def __iter__(self) -> _SkippingBatchIterator:
        return _SkippingBatchIterator(self._parent.__iter__(), self._batch_size)


class _Tokenize:
    """Main-process map: captions -> ``text_ids`` int32 [B, L] + ``text_mask`` bool [B, L]."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        captions = [str(c) for c in batch.pop("caption")]
        ids, mask = self.tokenizer.tokenize(captions)
        batch["text_ids"] = np.asarray(ids, np.int32)
        batch["text_mask"] = np.asarray(mask, bool)
        return batch


class InputIterator(grain.DatasetIterator):
    """The loader's iterator: batches (dicts of numpy arrays, docs/DESIGN.md) + skip counts.

    A grain ``DatasetIterator``, so grain's orbax handler checkpoints it (``checkpoint_args``);
    ``get_state``/``set_state`` give the same JSON-able state directly.
    """

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self.skipped = dict.fromkeys(_SKIP_REASONS, 0)
        # In cache mode: the fingerprint of the encoder that made the cached embeddings (the
        # trainer records it in the stage record, so the cascade refuses another encoder).
        self.text_fingerprint: str | None = None

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._parent)
        for reason, count in zip(_SKIP_REASONS, batch.pop(_SKIP_KEY).tolist()):
            self.skipped[reason] += count
        return batch

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._parent.get_state(), "skipped": dict(self.skipped)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self.skipped = {r: int(state["skipped"].get(r, 0)) for r in _SKIP_REASONS}


class _InputDataset(grain.IterDataset):
    def __iter__(self) -> InputIterator:
        return InputIterator(self._parent.__iter__())


# --------------------------------------------------------------------------------------------
# Public entry points.
# --------------------------------------------------------------------------------------------


def build_dataset(
    source: SourceSpec,
    stage: StageSpec,
    loader: LoaderSpec,
    text: TextSpec,
    *,
    tokenizer=None,
    text_fingerprint: str | None = None,
    text_max_length: int | None = None,
) -> grain.IterDataset:
    """The grain dataset of one stage's batches for this host (iterate it for an iterator).

    ``tokenizer`` (``.tokenize(texts) -> (ids, mask)``, e.g. the TextEncoder) is required in
    ``tokens`` mode. In ``cache`` mode, ``text_fingerprint`` / ``text_max_length`` (the stage's
    encoder) are checked against the cache and a mismatch is refused.
    """
    src = TfdsSource(source)
    cache = None
    if text.mode == "cache":
        cache = EmbeddingCache(text.cache_dir)
        cache.check_encoder(text_fingerprint, text_max_length)
        built_for, wanted = cache.meta.dataset, source_info(source)
        if built_for and built_for != wanted:
            raise DataError(
                f"embedding cache {text.cache_dir!r} was built for {built_for}, not {wanted}; "
                "build a cache for this split (launch.cache_embeddings) or fix TextSpec.cache_dir"
            )
        if len(cache) != len(src):
            raise DataError(
                f"embedding cache {text.cache_dir!r} has {len(cache)} examples but "
                f"{source.name}:{source.split} has {len(src)}; build the cache for this split"
            )
    elif tokenizer is None:
        raise DataError("TextSpec(mode='tokens') needs a tokenizer: pass the stage's TextEncoder")

    host, num_hosts = loader.host()
    per_host = len(src) // num_hosts
    if per_host == 0:
        raise DataError(
            f"{source.name}:{source.split} has {len(src)} examples for {num_hosts} hosts"
        )
    ds = grain.MapDataset.source(src)
    # Strided host shard: host h reads records h, h + n, ..., equal sizes on every host.
    ds = ds[host : per_host * num_hosts : num_hosts]
    if loader.shuffle:
        ds = ds.shuffle(seed=loader.seed)  # Re-seeded each epoch by grain (seed + epoch).
    if loader.num_epochs != 1:
        ds = ds.repeat(loader.num_epochs)
    # Per-element rng from (seed, host, index): random crops differ across hosts and epochs.
    ds = ds.random_map(_PrepareExample(src, stage, text, cache), seed=loader.seed + 7919 * host)
    read = grain.ReadOptions(
        num_threads=loader.read_threads, prefetch_buffer_size=loader.read_buffer_size
    )
    batches = _SkippingBatch(ds.to_iter_dataset(read), loader.batch_size)
    if loader.worker_count > 0:
        # grain's worker processes read absl flags; outside an absl app (tests, notebooks)
        # nothing has parsed them, so take the defaults instead of crashing.

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=loader.worker_count, per_worker_buffer_size=loader.worker_buffer_size
            )
        )
    if text.mode == "tokens":
        batches = batches.map(_Tokenize(tokenizer))
    return _InputDataset(batches)


@gin.configurable
def make_iterator(
    source: SourceSpec = gin.REQUIRED,
    stage: StageSpec = gin.REQUIRED,
    loader: LoaderSpec = gin.REQUIRED,
    text: TextSpec = gin.REQUIRED,
    *,
    tokenizer=None,
    text_fingerprint: str | None = None,
    text_max_length: int | None = None,
) -> InputIterator:
    """Gin entry point: the host's batch iterator for one stage (see ``build_dataset``)."""
    ds = build_dataset(
        source,
        stage,
        loader,
        text,
        tokenizer=tokenizer,
        text_fingerprint=text_fingerprint,
        text_max_length=text_max_length,
    )
    iterator = iter(ds)
    if text.mode == "cache":
        iterator.text_fingerprint = EmbeddingCache(text.cache_dir).meta.encoder_fingerprint
    return iterator


# --------------------------------------------------------------------------------------------
# Checkpointing the iterator.
# --------------------------------------------------------------------------------------------


def checkpoint_args(iterator: InputIterator, restore: bool = False):
    """orbax args for the iterator (grain's handler; one JSON file per host), e.g.
    ``ocp.args.Composite(state=..., data=checkpoint_args(it))``; restoring sets it in place."""

    return (grain.checkpoint.CheckpointRestore if restore else grain.checkpoint.CheckpointSave)(
        iterator
    )


def save_state(iterator: InputIterator, path: str) -> None:
    """Writes the iterator state as JSON (atomic rename), without orbax."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(iterator.get_state(), f)
    os.replace(tmp, path)


def restore_state(iterator: InputIterator, path: str) -> InputIterator:
    """Sets ``iterator`` to the state saved at ``path`` (by ``save_state``); returns it."""
    with open(path) as f:
        iterator.set_state(json.load(f))
    return iterator


def iterate(iterator: InputIterator, num_batches: int) -> Sequence[dict[str, np.ndarray]]:
    """The next ``num_batches`` batches as a list (small helper for tests and benchmarks)."""
    return [next(iterator) for _ in range(num_batches)]
