"""tfds data shared by the input-pipeline tests: the shapes dataset and awkward edge cases.

Not a test module. Heavy (imports TensorFlow Datasets): test modules reach it through the
session-scoped ``pipeline_data_dir`` fixture of tests/conftest.py, child processes never import it.
"""

from __future__ import annotations

import functools
import io
import os

# torchvision must be imported before TensorFlow is loaded (tfds preparation loads it):
# the other order segfaults in this environment (tests/conftest.py does the same).
import torchvision  # noqa: F401  # isort: skip
import numpy as np
import tensorflow_datasets as tfds

from imagen_jax.data import shapes_tfds

SHAPES_TRAIN = 24  # examples in the train split of tests.support.SHAPES (8 more in "heldout")
EDGE = "pipeline_edge_cases"  # the tfds name of PipelineEdgeCases


class PipelineEdgeCases(tfds.core.GeneratorBasedBuilder):
    """Awkward images: non-square, too small for a 32 px stage, undecodable bytes."""

    VERSION = tfds.core.Version("1.0.0")
    # Record -> (height, width) or None for a corrupt file; ids are 1000 + record.
    SIZES = [(40, 56), (48, 32), (20, 30), None, (64, 64), (33, 90)]

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
                    "key": np.int64,
                }
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, size in enumerate(self.SIZES):
            yield i, {
                "image": edge_image(i) if size else io.BytesIO(b"\x89PNG but truncated"),
                "captions": {"text": [f"first caption {i}", f"second caption {i}"]},
                "key": 1000 + i,
            }


def edge_image(record: int) -> np.ndarray:
    """Smooth gradients (no edges: resampling filters differ most at edges) of ``record``'s size,
    uint8 [h, w, 3] with (h, w) = PipelineEdgeCases.SIZES[record]."""
    h, w = PipelineEdgeCases.SIZES[record]
    y, x = np.mgrid[0:h, 0:w]
    channels = [x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 200 // (h + w - 2) + record]
    img = np.stack(channels, -1)
    return img.astype(np.uint8)


@functools.cache
def prepare_pipeline_data(root: str) -> str:
    """Prepares, once per process and ``root``, a tfds data_dir ``root``/tfds holding the 32 px
    shapes (24 train / 8 heldout) and the edge-case builder; returns its path. Nothing is
    downloaded."""
    data_dir = os.path.join(root, "tfds")
    shapes_tfds.prepare(
        shapes_tfds.ShapesConfig(name="p32", resolution=32, num_train=SHAPES_TRAIN, num_heldout=8),
        data_dir=data_dir,
    )
    PipelineEdgeCases(data_dir=data_dir, file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return data_dir
