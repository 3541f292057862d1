"""Tiny random T5 checkpoints for tests, benchmarks and ``make demo`` (no downloads).

``write_random_t5`` writes a Hugging Face-format directory (``config.json``,
``model.safetensors``, ``spiece.model``) that both ``load_t5`` and
``transformers.T5EncoderModel.from_pretrained`` read. ``write_t5x`` writes the same weights in
the T5X layout (msgpack ``checkpoint`` + zarr arrays), without needing t5x installed.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

import numpy as np
import sentencepiece as spm
import tensorstore as ts
from flax import serialization
from safetensors.numpy import save_file

from imagen_jax.text.config import T5Config, t5_preset, to_hf_config

# CPU-sized shapes (d_model, num_heads, d_kv, d_ff, num_layers). "tiny_wide" has
# num_heads * d_kv (48) != d_model (32), as T5 v1.0 3B/11B and v1.1 small do.
TINY_SIZES = {
    "tiny": (32, 4, 8, 64, 2),
    "tiny_wide": (32, 3, 16, 48, 2),
}
DEFAULT_VOCAB_SIZE = 512


def random_config(size: str = "tiny", variant: str = "v1_1", vocab_size: int = DEFAULT_VOCAB_SIZE,
                  **overrides: Any) -> T5Config:
    """A tiny config (``TINY_SIZES``) or a public preset size with ``vocab_size`` rows."""
    if size in TINY_SIZES:
        d_model, num_heads, d_kv, d_ff, num_layers = TINY_SIZES[size]
        base = t5_preset("small", variant)
        return dataclasses.replace(base, d_model=d_model, num_heads=num_heads, d_kv=d_kv,
                                   d_ff=d_ff, num_layers=num_layers, vocab_size=vocab_size,
                                   **overrides)
    return t5_preset(size, variant, vocab_size=vocab_size, **overrides)


def random_hf_weights(cfg: T5Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 encoder weights under Hugging Face names and [out, in] layouts.

    Scales follow T5's initialisation so activations stay O(1) through the stack; norm scales
    are 1 + noise so a test notices a norm whose scale is ignored.
    """
    rng = np.random.default_rng(seed)
    d, h, k, f = cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff

    def normal(shape: Sequence[int], std: float) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std))

    def norm_scale() -> np.ndarray:
        return 1.0 + normal((d,), 0.1)

    w = {"shared.weight": normal((cfg.vocab_size, d), 1.0)}
    for i in range(cfg.num_layers):
        blk = f"encoder.block.{i}"
        att = f"{blk}.layer.0.SelfAttention"
        w[f"{blk}.layer.0.layer_norm.weight"] = norm_scale()
        w[f"{att}.q.weight"] = normal((h * k, d), (d * k) ** -0.5)
        w[f"{att}.k.weight"] = normal((h * k, d), d**-0.5)
        w[f"{att}.v.weight"] = normal((h * k, d), d**-0.5)
        w[f"{att}.o.weight"] = normal((d, h * k), (h * k) ** -0.5)
        if i == 0:
            w[f"{att}.relative_attention_bias.weight"] = normal(
                (cfg.relative_attention_num_buckets, h), 1.0)
        ff = f"{blk}.layer.1.DenseReluDense"
        w[f"{blk}.layer.1.layer_norm.weight"] = norm_scale()
        for name in (("wi_0", "wi_1") if cfg.gated else ("wi",)):
            w[f"{ff}.{name}.weight"] = normal((f, d), d**-0.5)
        w[f"{ff}.wo.weight"] = normal((d, f), f**-0.5)
    w["encoder.final_layer_norm.weight"] = norm_scale()
    return w


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out_path: str) -> int:
    """Trains a small unigram sentencepiece model with T5's special ids; returns its size.

    Ids: pad 0, eos 1, unk 2, no bos (T5 convention). ``vocab_size`` is an upper bound: small
    corpora get fewer pieces (``hard_vocab_limit=False``).
    """

    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("train_sentencepiece needs at least one non-empty text")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="unigram",
            character_coverage=1.0,
            hard_vocab_limit=False,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(
            f"sentencepiece training failed ({e}); raise vocab_size (the texts need at least one "
            "piece per distinct character plus 3 special ids)"
        ) from e
    with open(out_path, "wb") as f:
        f.write(model.getvalue())
    proc = spm.SentencePieceProcessor(model_proto=model.getvalue())
    return proc.get_piece_size()


def write_random_t5(
    out_dir: str,
    *,
    texts: Sequence[str],
    size: str = "tiny",
    variant: str = "v1_1",
    seed: int = 0,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    **config_overrides: Any,
) -> str:
    """Writes a random T5 encoder in Hugging Face format to ``out_dir``; returns ``out_dir``.

    ``size``: ``"tiny"``, ``"tiny_wide"`` (heads * d_kv != d_model) or a preset size
    (small ... xxl); ``variant``: ``"v1_0"`` (ReLU) or ``"v1_1"`` (gated GELU). The
    ``spiece.model`` is trained on ``texts`` with at most ``vocab_size`` pieces; the embedding
    table has ``vocab_size`` rows.
    """

    cfg = random_config(size, variant, vocab_size, **config_overrides)
    os.makedirs(out_dir, exist_ok=True)
    train_sentencepiece(texts, vocab_size, os.path.join(out_dir, "spiece.model"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(to_hf_config(cfg), f, indent=2)
    save_file(random_hf_weights(cfg, seed), os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    return out_dir


def hf_to_t5x_tree(hf: dict[str, np.ndarray], cfg: T5Config) -> dict[str, Any]:
    """Hugging Face weights -> the nested T5X ``target`` tree (2-D attention kernels)."""
    enc: dict[str, Any] = {
        "relpos_bias": {"rel_embedding": hf[
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].T},
        "encoder_norm": {"scale": hf["encoder.final_layer_norm.weight"]},
    }
    for i in range(cfg.num_layers):
        blk = f"encoder.block.{i}"
        att = f"{blk}.layer.0.SelfAttention"
        ff = f"{blk}.layer.1.DenseReluDense"
        mlp_names = ("wi_0", "wi_1", "wo") if cfg.gated else ("wi", "wo")
        enc[f"layers_{i}"] = {
            "pre_attention_layer_norm": {"scale": hf[f"{blk}.layer.0.layer_norm.weight"]},
            "attention": {
                t5x: {"kernel": hf[f"{att}.{p}.weight"].T}
                for t5x, p in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o"))
            },
            "pre_mlp_layer_norm": {"scale": hf[f"{blk}.layer.1.layer_norm.weight"]},
            "mlp": {n: {"kernel": hf[f"{ff}.{n}.weight"].T} for n in mlp_names},
        }
    return {"token_embedder": {"embedding": hf["shared.weight"]}, "encoder": enc}


def write_t5x(out_dir: str, target: dict[str, Any], *, step: int = 0) -> str:
    """Writes ``target`` as a T5X checkpoint: msgpack ``checkpoint`` + one zarr dir per array.

    The msgpack leaves are tensorstore specs with paths relative to ``out_dir``, named like
    ``target.encoder.layers_0.attention.query.kernel`` (T5X's layout).
    """

    os.makedirs(out_dir, exist_ok=True)

    def write(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            name = f"{prefix}.{key}"
            if isinstance(value, dict):
                out[key] = write(value, name)
                continue
            value = np.asarray(value)
            spec = {
                "driver": "zarr",
                "kvstore": {"driver": "file", "path": name},
                "metadata": {
                    "shape": list(value.shape),
                    "chunks": list(value.shape),
                    "dtype": np.dtype(value.dtype).str,
                    "compressor": {"id": "gzip"},
                },
            }
            abs_spec = json.loads(json.dumps(spec))
            abs_spec["kvstore"]["path"] = os.path.join(out_dir, name)
            arr = ts.open(abs_spec, create=True, delete_existing=True).result()
            arr.write(value).result()
            out[key] = spec
        return out

    state = {"target": write(target, "target"), "state": {"step": np.asarray(step, np.int64)}}
    with open(os.path.join(out_dir, "checkpoint"), "wb") as f:
        f.write(serialization.msgpack_serialize(state))
    return out_dir


def drawbench_prompts() -> list[str]:
    """The 200 DrawBench prompts (Saharia et al. 2022, Section 4.2) packaged with imagen_jax."""

    text = resources.files("imagen_jax").joinpath("assets/drawbench.csv").read_text("utf-8")
    return [row["Prompts"] for row in csv.DictReader(io.StringIO(text))]
