"""Write a small RANDOM T5 encoder for the tiny CPU configs, the tests and first experiments.

    python -m launch.make_tiny_t5 --out=data/t5_tiny \
        [--dataset=imagen_shapes/tiny --data_dir=data/tfds] [--size=tiny] [--vocab_size=512]

`gin_configs/tiny/*.gin` read a T5 from `T5_PATH` (default `data/t5_tiny`, relative to the
working directory). No real T5 can be downloaded at run time, so this writes one in Hugging Face
format (`config.json`, `model.safetensors`, `spiece.model`) with random weights and a
sentencepiece vocabulary trained on the captions of a prepared tfds dataset (its train split).
Random weights still give every caption a distinct, deterministic embedding, which is all a
tiny stage needs to learn prompt conditioning; for real work bring a pretrained T5 (README).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import app, flags

from imagen_jax.data import pipeline
from imagen_jax.text.testing import DEFAULT_VOCAB_SIZE, write_random_t5
from launch import shared_flags as sf

sf.DEFINE_string("out", None, "output directory of the random T5 (required)")
sf.DEFINE_string("dataset", None, "prepared tfds dataset whose train captions train the "
                 "vocabulary (default imagen_shapes/tiny, as gin_configs/tiny/common.gin)")
sf.DEFINE_string("data_dir", None, "tfds data_dir of --dataset (default data/tfds)")
sf.DEFINE_enum("size", "tiny", ["tiny", "tiny_wide", "small", "base"],
               "T5 shape: tiny (d_model 32, the tiny configs' TEXT_EMBED_DIM) or a preset")
sf.DEFINE_enum("variant", "v1_1", ["v1_0", "v1_1"], "T5 v1.0 (ReLU) or v1.1 (gated GELU)")
sf.DEFINE_integer("vocab_size", None, "sentencepiece pieces = embedding rows (default 512)")
sf.DEFINE_integer("seed", 0, "weight seed")
sf.DEFINE_integer("max_captions", 4000, "train captions read to fit the vocabulary")
FLAGS = flags.FLAGS

DEFAULT_DATASET = "imagen_shapes/tiny"
DEFAULT_DATA_DIR = "data/tfds"


def read_captions(dataset: str, data_dir: str, limit: int) -> list[str]:
    """Up to ``limit`` captions of ``dataset``'s train split (a prepared tfds dataset)."""

    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"--data_dir {data_dir!r} does not exist; prepare the dataset first, e.g. "
            f"python -m imagen_jax.data.shapes_tfds --config=tiny --data_dir={data_dir}")
    table = pipeline.CaptionTable(pipeline.SourceSpec(name=dataset, split="train",
                                                      data_dir=data_dir))
    return [table[i][1] for i in range(min(len(table), limit))]


def main(argv: Sequence[str]) -> None:
    del argv
    if not FLAGS.out:
        raise app.UsageError("missing required flag --out (the T5 directory to write)")

    captions = read_captions(FLAGS.dataset or DEFAULT_DATASET,
                             FLAGS.data_dir or DEFAULT_DATA_DIR, FLAGS.max_captions)
    write_random_t5(FLAGS.out, texts=captions, size=FLAGS.size, variant=FLAGS.variant,
                    seed=FLAGS.seed, vocab_size=FLAGS.vocab_size or DEFAULT_VOCAB_SIZE)
    print(f"wrote a random {FLAGS.size} T5 {FLAGS.variant} to {FLAGS.out} "
          f"(vocabulary from {len(captions)} captions)")


if __name__ == "__main__":
    app.run(main)
