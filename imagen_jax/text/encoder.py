"""``load_t5`` and ``TextEncoder``: frozen T5 weights + tokenizer + one jitted encode function."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from imagen_jax import partitioning
from imagen_jax.text.checkpoints import abstract_params, load_params, open_checkpoint
from imagen_jax.text.config import DTYPES, T5Config
from imagen_jax.text.t5 import T5Encoder
from imagen_jax.text.tokenizer import (
    DEFAULT_MAX_LENGTH,
    T5_EXTRA_IDS,
    Tokenizer,
    VocabularyError,
)

SPM_FILENAME = "spiece.model"
# Marks the fingerprint of an encoder that keeps its outputs at padded positions
# (``zero_padding=False``): its embeddings differ there, so caches and stages must not mix them.
PADDING_KEPT_TAG = "padkept"


class TextEncoder:
    """A frozen T5 encoder with its tokenizer.

    ``tokenize(texts) -> (ids int32 [B, L], mask bool [B, L])``; ``encode(ids, mask) -> float32
    [B, L, D]`` (jitted; padded positions zeroed, or with ``zero_padding=False`` kept as the
    encoder computed them, DeepFloyd IF's convention); ``__call__(texts)`` does both.
    With a ``mesh``, parameters live sharded by the logical ``rules`` and the batch is split over
    the mesh's batch axes (padded up to a multiple of their size and cut back).
    """

    def __init__(
        self,
        config: T5Config,
        params: Any,
        tokenizer: Tokenizer,
        *,
        dtype: str = "float32",
        weights_digest: str = "",
        mesh: Mesh | None = None,
        rules: partitioning.LogicalRules = (),
        param_shardings: Any = None,
        zero_padding: bool = True,
    ):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.mesh = mesh
        self.rules = tuple(rules)
        self.zero_padding = zero_padding
        self.model = T5Encoder(config, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype),
                               zero_padding=zero_padding)
        self._weights_digest = weights_digest

        def apply(params, ids, mask):
            return self.model.apply({"params": params}, ids, mask)

        if mesh is None:
            self._batch_multiple = 1
            self._apply = jax.jit(apply)
        else:
            batch = partitioning.batch_sharding(mesh, 2)
            self._batch_multiple = int(np.prod([mesh.shape[a] for a in batch.spec[0]]))
            self._apply = jax.jit(
                apply,
                in_shardings=(param_shardings, batch, batch),
                out_shardings=NamedSharding(mesh, PartitionSpec(batch.spec[0], None, None)),
            )

    @property
    def embed_dim(self) -> int:
        return self.config.d_model

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    @property
    def fingerprint(self) -> str:
        """Identifies weights + vocabulary + max_length + padding mode (caches refuse to mix
        encoders); `fingerprint_for` of this encoder's ``zero_padding``."""
        return self.fingerprint_for(self.zero_padding)

    def fingerprint_for(self, zero_padding: bool) -> str:
        """The fingerprint of these weights, vocabulary and max_length in a padding mode:
        ``t5-<D>d<layers>l-<hash>`` zeroed, ``t5-<D>d<layers>l-padkept-<hash>`` kept."""
        h = hashlib.sha256()
        h.update(self._weights_digest.encode())
        h.update(self.tokenizer.sha256.encode())
        h.update(str(self.max_length).encode())
        mode = "" if zero_padding else f"{PADDING_KEPT_TAG}-"
        return f"t5-{self.config.d_model}d{self.config.num_layers}l-{mode}{h.hexdigest()[:16]}"

    def tokenize(self, texts: Sequence[str] | str) -> tuple[np.ndarray, np.ndarray]:
        return self.tokenizer(texts)

    def encode(self, ids: Any, mask: Any) -> jax.Array:
        """Token ids int [B, L] + mask bool [B, L] -> float32 [B, L, D] embeddings."""
        if ids.ndim != 2 or tuple(ids.shape) != tuple(mask.shape):
            raise ValueError(f"encode expects ids and mask of one shape [B, L]; got "
                             f"{tuple(ids.shape)} and {tuple(mask.shape)}")
        if isinstance(ids, np.ndarray) and ids.size and ids.max() >= self.config.vocab_size:
            raise ValueError(f"token id {int(ids.max())} >= vocab_size "
                             f"{self.config.vocab_size}; wrong vocabulary for this checkpoint?")
        ids = jnp.asarray(ids, jnp.int32)
        mask = jnp.asarray(mask, bool)
        batch = ids.shape[0]
        pad = -batch % self._batch_multiple
        if pad:  # all-False rows: finite outputs, cut off below
            ids = jnp.pad(ids, ((0, pad), (0, 0)))
            mask = jnp.pad(mask, ((0, pad), (0, 0)))
        if self.mesh is None or isinstance(ids, jax.core.Tracer):
            # Inside a caller's jit the mesh context is the caller's (set_mesh is not allowed
            # under jit); the in/out shardings still place the computation.
            with nn.logical_axis_rules(self.rules):
                out = self._apply(self.params, ids, mask)
        else:
            with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
                out = self._apply(self.params, ids, mask)
        return out[:batch] if pad else out

    def __call__(self, texts: Sequence[str] | str) -> tuple[jax.Array, np.ndarray]:
        ids, mask = self.tokenize(texts)
        return self.encode(ids, mask), mask

    def __repr__(self) -> str:
        return (f"TextEncoder(d_model={self.embed_dim}, layers={self.config.num_layers}, "
                f"dtype={self.dtype}, max_length={self.max_length}, "
                f"fingerprint={self.fingerprint})")


@gin.configurable
def load_t5(
    path: str,
    *,
    vocab: str | None = None,
    dtype: str = "float32",
    max_length: int = DEFAULT_MAX_LENGTH,
    mesh: Mesh | None = None,
    rules: partitioning.LogicalRules | None = None,
    config: T5Config | None = None,
    progress: bool = False,
    extra_ids: int | None = None,
    zero_padding: bool = True,
) -> TextEncoder:
    """Loads a frozen T5 encoder from a Hugging Face or T5X checkpoint directory.

    Args:
      path: Hugging Face directory (``config.json`` + safetensors) or T5X ``checkpoint_N``.
      vocab: sentencepiece model; defaults to ``path/spiece.model``.
      dtype: "float32" or "bfloat16": weight storage and matmul dtype (norms and softmax stay
        float32; outputs are float32).
      max_length: fixed token length (EOS included).
      mesh: shard parameters over this mesh (default: everything on the first device).
      rules: logical -> mesh axis rules (default ``partitioning.logical_axis_rules()``).
      config: override the checkpoint's architecture (T5X directories carry none).
      progress: show a per-parameter progress bar while loading.
      extra_ids: sentinel ids ``<extra_id_0>``... after the sentencepiece pieces. None: as many
        as the embedding table has rows for, at most 100 (every public T5: 32000 pieces, 32128
        rows -> 100, matching seqio's T5 vocabulary and Hugging Face's T5Tokenizer).
      zero_padding: zero the outputs at padded positions (Imagen); False keeps them
        (transformers' ``last_hidden_state``; DeepFloyd IF's U-Nets read them). Part of the
        fingerprint.

    Raises `VocabularyError` when the vocabulary (with its extra ids) has more ids than the
    checkpoint's embedding table has rows.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not supported; use one of {DTYPES}")
    source = open_checkpoint(os.fspath(path), config)
    cfg = source.config
    vocab = vocab or os.path.join(path, SPM_FILENAME)
    tokenizer = Tokenizer(vocab, max_length)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise VocabularyError(
            f"vocabulary {vocab!r} has {tokenizer.vocab_size} pieces but the checkpoint's "
            f"embedding table has {cfg.vocab_size} rows; pass the vocab this model was trained with"
        )
    if extra_ids is None:
        extra_ids = min(T5_EXTRA_IDS, cfg.vocab_size - tokenizer.vocab_size)
    if tokenizer.num_pieces + extra_ids > cfg.vocab_size:
        raise VocabularyError(
            f"vocabulary {vocab!r} has {tokenizer.num_pieces} pieces + extra_ids={extra_ids} "
            f"sentinels, more than the checkpoint's {cfg.vocab_size} embedding rows; pass "
            f"extra_ids <= {cfg.vocab_size - tokenizer.num_pieces}"
        )
    if extra_ids:
        tokenizer = Tokenizer(vocab, max_length, extra_ids=extra_ids)
    param_dtype = jnp.dtype(dtype)
    shardings = None
    if mesh is not None:
        rules = partitioning.logical_axis_rules() if rules is None else rules
        specs = partitioning.logical_specs(abstract_params(cfg, param_dtype))
        shardings = partitioning.logical_to_shardings(specs, mesh, rules)
    bar = None
    if progress:

        bar = lambda it: tqdm(it, desc="loading T5", unit="array")  # noqa: E731
    params, digest = load_params(source, param_dtype, shardings, progress=bar)
    return TextEncoder(cfg, params, tokenizer, dtype=dtype, weights_digest=digest, mesh=mesh,
                       rules=rules or (), param_shardings=shardings, zero_padding=zero_padding)
