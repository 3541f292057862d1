"""Encode a prompt file with a frozen T5 encoder into an ``.npz`` of embeddings.

    python -m launch.encode_text --t5=PATH [--vocab=SPM] --prompts=FILE --out=OUT.npz \
        [--max_length=128] [--batch_size=N] [--dtype=float32]

Prompts come from a ``.txt`` file (one per line) or a ``.csv`` / ``.tsv`` with a ``Prompt`` or
``Prompts`` column. Writes ``embeddings`` float32 [N, L, D], ``mask`` bool [N, L], ``prompts``
[N] and the encoder ``fingerprint``. Batches are split over all local devices (parameters
replicated, batch data-parallel).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags
from tqdm import tqdm

from imagen_jax import partitioning
from imagen_jax.text import load_t5
from launch import shared_flags as sf

sf.DEFINE_string("t5", None, "Hugging Face or T5X checkpoint directory (required)")
sf.DEFINE_string("vocab", None, "sentencepiece model (default: T5/spiece.model)")
sf.DEFINE_string("prompts", None, ".txt (one per line) or .csv/.tsv prompt file (required)")
sf.DEFINE_string("out", None, "output .npz path (required)")
sf.DEFINE_integer("max_length", 128, "tokens per prompt, EOS included")
sf.DEFINE_integer("batch_size", None, "prompts per step (default: 8 per local device)")
sf.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "weight / matmul dtype")
FLAGS = flags.FLAGS

PROMPT_COLUMNS = ("Prompt", "Prompts", "prompt", "prompts")


def read_prompts(path: str) -> list[str]:
    """Prompts from ``path``: ``.txt`` one per line, ``.csv``/``.tsv`` a Prompt(s) column."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8", newline="") as f:
        if ext in (".csv", ".tsv"):
            reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
            column = next((c for c in PROMPT_COLUMNS if c in (reader.fieldnames or ())), None)
            if column is None:
                raise ValueError(f"{path}: no Prompt/Prompts column (columns: "
                                 f"{reader.fieldnames}); name the prompt column 'Prompt'")
            prompts = [row[column] or "" for row in reader]
        else:
            prompts = [line.rstrip("\r\n") for line in f]
            while prompts and not prompts[-1].strip():  # trailing blank lines
                prompts.pop()
    if not prompts:
        raise ValueError(f"prompt file {path!r} holds no prompts")
    return prompts


def encode_prompts(encoder, prompts: Sequence[str], batch_size: int, progress: bool = True):
    """Encodes ``prompts`` in batches; returns (embeddings float32 [N, L, D], mask bool [N, L])."""

    embeds = np.zeros((len(prompts), encoder.max_length, encoder.embed_dim), np.float32)
    masks = np.zeros((len(prompts), encoder.max_length), bool)
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="encoding", unit="batch", disable=not progress):
        chunk = list(prompts[start: start + batch_size])
        ids, mask = encoder.tokenize(chunk)
        if len(chunk) < batch_size:  # keep one compiled shape: pad the last batch
            pad = batch_size - len(chunk)
            ids = np.pad(ids, ((0, pad), (0, 0)))
            mask = np.pad(mask, ((0, pad), (0, 0)))
        out = np.asarray(encoder.encode(ids, mask))
        embeds[start: start + len(chunk)] = out[: len(chunk)]
        masks[start: start + len(chunk)] = mask[: len(chunk)]
    return embeds, masks


def main(argv: Sequence[str]) -> None:
    del argv
    # Checked here rather than with absl's required=True: launchers share flag definitions.
    missing = [f"--{name}" for name in ("t5", "prompts", "out") if not FLAGS[name].value]
    if missing:
        raise app.UsageError(f"missing required flag(s): {', '.join(missing)}")


    prompts = read_prompts(FLAGS.prompts)
    devices = jax.local_devices()
    mesh = partitioning.make_mesh(data=-1, devices=devices)
    batch_size = FLAGS.batch_size or 8 * len(devices)
    if batch_size % len(devices):
        batch_size += len(devices) - batch_size % len(devices)  # whole batches per device
    encoder = load_t5(FLAGS.t5, vocab=FLAGS.vocab, dtype=FLAGS.dtype,
                      max_length=FLAGS.max_length, mesh=mesh,
                      rules=partitioning.DATA_PARALLEL_RULES, progress=True)
    embeds, mask = encode_prompts(encoder, prompts, batch_size)
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    np.savez(FLAGS.out, embeddings=embeds, mask=mask, prompts=np.asarray(prompts),
             fingerprint=np.asarray(encoder.fingerprint))
    print(f"wrote {FLAGS.out}: {len(prompts)} prompts, embeddings {embeds.shape}, "
          f"fingerprint {encoder.fingerprint}")


if __name__ == "__main__":
    app.run(main)
