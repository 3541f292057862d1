"""``imagen_shapes``: the shapes dataset as a tfds ``GeneratorBasedBuilder`` (array_record files).

Importing this module registers the dataset with tfds. Preparation renders every image locally
(nothing is downloaded) and writes array_record shards, so ``tfds.data_source`` / grain can read
it with random access::

    from imagen_jax.data import shapes_tfds  # registers "imagen_shapes"
    builder = shapes_tfds.prepare("r64", data_dir="/tmp/tfds")   # idempotent
    source = tfds.data_source("imagen_shapes/r64", data_dir="/tmp/tfds", split="train")
    # or: python -m imagen_jax.data.shapes_tfds --config=r64 --data_dir=/tmp/tfds

Configs (name: resolution, train / heldout examples):
  ``tiny``: 64 px, 64 / 16 (tests); ``r32``, ``r64``: 50,000 / 2,000; ``r128``, ``r256``:
  20,000 / 1,000; ``r512``: 5,000 / 500; ``r1024``: 2,000 / 200. Any other size:
  ``ImagenShapes(config=ShapesConfig(name=..., resolution=R, num_train=N, num_heldout=M),
  data_dir=...)``.

Splits: ``train`` and ``heldout`` (attribute combinations never in train; see
``imagen_jax.data.shapes``). Record ``i`` of a split is ``shapes.example(split, i, R, seed)``
(writing keeps generator order: ``disable_shuffling``).

Features of one record:
  * ``image``: uint8 [R, R, 3] (PNG-encoded, lossless).
  * ``caption``: str (``bytes`` from ``tfds.data_source``).
  * ``id``: int64, unique across splits (``shapes.example_id``: split << 32 | index).
  * ``background``: ClassLabel over ``shapes.BACKGROUND_NAMES``.
  * ``num_objects``: int64 (1 or 2).
  * ``colour``, ``shape``, ``size``: int64 [2], indices into ``shapes.COLOUR_NAMES``,
    ``shapes.SHAPES``, ``shapes.SIZES``; -1 pads a one-object scene.
  * ``center``: float32 [2, 2], (x, y) in [0, 1] of each object (y down); -1 pads.
  * ``position``: ClassLabel over ``shapes.POSITIONS + ("none",)`` (one-object scenes).
  * ``relation``: ClassLabel over ``shapes.RELATIONS + ("none",)`` (``objects[0] rel
    objects[1]``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from imagen_jax.data import shapes, shapes_tfds

NAME = "imagen_shapes"
FILE_FORMAT = "array_record"


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    """One prepared variant: resolution, example counts, generator seed and scene geometry.

    ``spec`` None is `shapes.DEFAULT_SPEC` (one or two objects); `launch.demo` prepares its
    single-object scenes with its own spec.
    """

    resolution: int = 64
    num_train: int = 50_000
    num_heldout: int = 2_000
    seed: int = 0
    spec: shapes.SceneSpec | None = None


def _config(name: str, resolution: int, num_train: int, num_heldout: int) -> ShapesConfig:
    return ShapesConfig(
        name=name,
        description=f"{resolution}x{resolution} px, {num_train} train / {num_heldout} heldout",
        resolution=resolution,
        num_train=num_train,
        num_heldout=num_heldout,
    )


CONFIGS: tuple[ShapesConfig, ...] = (
    _config("tiny", 64, 64, 16),
    _config("r32", 32, 50_000, 2_000),
    _config("r64", 64, 50_000, 2_000),
    _config("r128", 128, 20_000, 1_000),
    _config("r256", 256, 20_000, 1_000),
    _config("r512", 512, 5_000, 500),
    _config("r1024", 1024, 2_000, 200),
)


# Not registered when run as `python -m` (the CLI registers the package module instead).
class ImagenShapes(tfds.core.GeneratorBasedBuilder, skip_registration=__name__ == "__main__"):
    """Procedural captioned shapes scenes (rendered locally; nothing to download)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = list(CONFIGS)
    DEFAULT_CONFIG_NAME = "r64"

    def __init__(self, *, file_format: str | None = FILE_FORMAT, **kwargs: Any):
        # array_record by default: grain and `tfds.data_source` need random access.
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        r = self.builder_config.resolution
        return self.dataset_info_from_configs(
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(r, r, 3), encoding_format="png"),
                    "caption": tfds.features.Text(),
                    "id": tfds.features.Scalar(dtype=np.int64),
                    "background": tfds.features.ClassLabel(names=shapes.BACKGROUND_NAMES),
                    "num_objects": tfds.features.Scalar(dtype=np.int64),
                    "colour": tfds.features.Tensor(shape=(shapes.MAX_OBJECTS,), dtype=np.int64),
                    "shape": tfds.features.Tensor(shape=(shapes.MAX_OBJECTS,), dtype=np.int64),
                    "size": tfds.features.Tensor(shape=(shapes.MAX_OBJECTS,), dtype=np.int64),
                    "center": tfds.features.Tensor(shape=(shapes.MAX_OBJECTS, 2), dtype=np.float32),
                    "position": tfds.features.ClassLabel(names=(*shapes.POSITIONS, shapes.NONE)),
                    "relation": tfds.features.ClassLabel(names=(*shapes.RELATIONS, shapes.NONE)),
                }
            ),
            supervised_keys=("image", "caption"),
            disable_shuffling=True,
            homepage="https://arxiv.org/abs/2205.11487",
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
        del dl_manager  # everything is rendered locally
        cfg = self.builder_config
        return {
            "train": self._generate_examples("train", cfg.num_train),
            "heldout": self._generate_examples("heldout", cfg.num_heldout),
        }

    def _generate_examples(self, split: str, num: int) -> Iterator[tuple[int, dict]]:
        cfg = self.builder_config
        for index in range(num):
            record = shapes.example(split, index, cfg.resolution, cfg.seed, cfg.spec)
            # A PIL image is PNG-encoded by PIL; a numpy array would go through a TF graph
            # (slower per image, and it imports TensorFlow only to encode).
            record["image"] = Image.fromarray(record["image"])
            yield index, record


def prepare(
    config: str | ShapesConfig, data_dir: str, file_format: str = FILE_FORMAT
) -> ImagenShapes:
    """Renders and writes ``imagen_shapes/<config>`` into ``data_dir`` (no-op if already done)."""
    if isinstance(config, str) and config not in {c.name for c in CONFIGS}:
        raise ValueError(
            f"unknown imagen_shapes config {config!r}; choose one of "
            f"{[c.name for c in CONFIGS]} or pass a ShapesConfig"
        )
    builder = ImagenShapes(config=config, data_dir=data_dir, file_format=file_format)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return builder


def main(argv: list[str]) -> None:
    del argv
    # Run through the package module, not `__main__`: tfds locates a builder's code by module.

    builder = shapes_tfds.prepare(_CONFIG.value, _DATA_DIR.value)
    print(f"prepared {builder.info.full_name} in {builder.data_dir}: {builder.info.splits}")


if __name__ == "__main__":
    from absl import app, flags

    _CONFIG = flags.DEFINE_string("config", "r64", "imagen_shapes config name")
    _DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data_dir to write into", required=True)
    app.run(main)


def register_config(config: ShapesConfig) -> None:
    """Adds ``config`` to `ImagenShapes` so ``tfds.builder("imagen_shapes/<name>")`` finds it.

    tfds memoises the builder's config table on first use, so appending to ``BUILDER_CONFIGS``
    alone is not enough once any `imagen_shapes` builder exists: the memoised table is updated
    too. A config of the same name must be identical.
    """
    for existing in ImagenShapes.BUILDER_CONFIGS:
        if existing.name == config.name:
            if existing != config:
                raise ValueError(f"imagen_shapes config {config.name!r} is already registered "
                                 f"with other settings ({existing}); choose another name")
            return
    ImagenShapes.BUILDER_CONFIGS.append(config)
    ImagenShapes.builder_configs.setdefault(config.name, config)
