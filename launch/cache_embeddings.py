r"""Precomputes the T5 embeddings of a tfds split's captions (imagen_jax.data.embed_cache).

    python -m launch.cache_embeddings --t5=/ckpt/t5-v1_1-xxl --dataset=imagen_shapes/r64 \
        --data_dir=~/tensorflow_datasets --out=/cache/shapes_r64_train

Resumable: rerunning the same command after an interruption keeps the finished shards and
computes only the missing ones. A directory built with another encoder (or max_length) is
refused.
"""

from __future__ import annotations

import os

from absl import app, logging

from imagen_jax.data import embed_cache, pipeline
from imagen_jax.text import load_t5
from launch import shared_flags as sf

_T5 = sf.DEFINE_string("t5", None, "T5 checkpoint directory (Hugging Face or T5X).")
_VOCAB = sf.DEFINE_string("vocab", None, "sentencepiece model (default: <t5>/spiece.model).")
_DATASET = sf.DEFINE_string("dataset", None, "tfds name[/config], e.g. imagen_shapes/r64.")
_SPLIT = sf.DEFINE_string("split", "train", "tfds split to encode.")
_DATA_DIR = sf.DEFINE_string("data_dir", None, "tfds data_dir the dataset is prepared in.")
_OUT = sf.DEFINE_string("out", None, "Cache directory to write (or resume).")
_CAPTION = sf.DEFINE_string("caption_feature", "caption", "Caption feature ('a/b' nests).")
_CAPTION_INDEX = sf.DEFINE_integer("caption_index", 0, "Which caption of a caption list.")
_ID = sf.DEFINE_string("id_feature", "id", "Integer example id feature; '' = record index.")
_IMAGE = sf.DEFINE_string("image_feature", "image", "Image feature (checked to exist).")
_MAX_LENGTH = sf.DEFINE_integer("max_length", 128, "Token length (PAPER_NOTES: default 128).")
_T5_DTYPE = sf.DEFINE_enum("t5_dtype", "float32", ["float32", "bfloat16"], "Encoder dtype.")
_DTYPE = sf.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Storage dtype.")
_SHARD_SIZE = sf.DEFINE_integer("shard_size", 4096, "Examples per shard (resume granularity).")
_BATCH = sf.DEFINE_integer("batch_size", None, "Encoder batch size (64).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for flag in (_T5, _DATASET, _OUT):
        if not flag.value:
            raise app.UsageError(f"--{flag.name} is required")

    source = pipeline.SourceSpec(
        name=_DATASET.value,
        split=_SPLIT.value,
        data_dir=_DATA_DIR.value,
        image_feature=_IMAGE.value,
        caption_feature=_CAPTION.value,
        id_feature=_ID.value or None,
        caption_index=_CAPTION_INDEX.value,
    )
    captions = pipeline.CaptionTable(source)
    encoder = load_t5(
        _T5.value, vocab=_VOCAB.value, dtype=_T5_DTYPE.value, max_length=_MAX_LENGTH.value
    )
    logging.info("encoding %d captions of %s:%s with %r", len(captions), source.name,
                 source.split, encoder)
    report = embed_cache.build_cache(
        os.path.expanduser(_OUT.value),
        encoder,
        captions,
        shard_size=_SHARD_SIZE.value,
        encode_batch_size=_BATCH.value or 64,
        dtype=_DTYPE.value,
        dataset_info=pipeline.source_info(source),
    )
    print(
        f"cache {_OUT.value}: {report.num_shards} shards, computed {len(report.computed_shards)}, "
        f"kept {len(report.skipped_shards)} finished earlier, {report.seconds:.1f}s"
    )


if __name__ == "__main__":
    app.run(main)
