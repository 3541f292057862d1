"""Flax linen T5 encoder: architecture only (weights come from `checkpoints`, never trained here).

Covers T5 v1.0 (ReLU feed-forward) and v1.1 / Flan-T5 (gated GELU): pre-norm RMSNorm blocks,
no biases anywhere, no 1/sqrt(d_kv) score scaling (T5 folds it into the query initialisation),
one bucketed relative-position table shared by all layers. Matmuls run in ``dtype``; RMSNorm,
the position bias and the softmax run in float32 so bfloat16 stays close to the float32 result.

Parameter names follow the T5X layout (``token_embedder/embedding``,
``layers_0/attention/query/kernel`` ...) so checkpoints map one to one, and every parameter
carries logical axis names (``vocab, embed, heads, kv, mlp, relpos_buckets``).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.text.config import T5Config

# Additive score for masked keys: large enough to zero the softmax weight in float32, finite so
# a (never produced) all-masked row stays NaN-free.
MASKED_SCORE = -1e9

_ACT = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
}


def _normal(std: float) -> nn.initializers.Initializer:
    return nn.initializers.normal(stddev=std)


def relative_position_buckets(
    query_len: int, key_len: int, num_buckets: int, max_distance: int
) -> np.ndarray:
    """Bidirectional T5 bucket index of every (query, key) pair: int32 [query_len, key_len].

    Half the buckets hold keys after the query. In each half, distances below ``num_buckets/4``
    get one bucket each; larger ones share log-spaced buckets up to ``max_distance``, beyond
    which all distances share the last bucket (T5 paper, Section 2.1). Computed with numpy at
    trace time (the shape is static), in float32 as the reference implementations do.
    """
    rel = np.arange(key_len)[None, :] - np.arange(query_len)[:, None]  # key - query
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int32) * half
    dist = np.abs(rel)
    max_exact = half // 2
    # Distances below max_exact take the exact branch; clamp so log() sees no zero there.
    log_ratio = np.log(np.maximum(dist, 1).astype(np.float32) / np.float32(max_exact)) / (
        np.float32(math.log(max_distance / max_exact))
    )
    large = max_exact + (log_ratio * np.float32(half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    buckets = buckets + np.where(dist < max_exact, dist, large)
    return buckets.astype(np.int32)


class RMSNorm(nn.Module):
    """T5 layer norm: scale only, no mean subtraction, no bias; computed in float32."""

    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (x.shape[-1],), self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
        return y.astype(self.dtype)


class RelativePositionBias(nn.Module):
    """The shared relative position table -> additive attention bias float32 [1, H, Lq, Lk]."""

    num_heads: int
    num_buckets: int
    max_distance: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, query_len: int, key_len: int) -> jax.Array:
        table = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(_normal(1.0), ("heads", "relpos_buckets")),
            (self.num_heads, self.num_buckets), self.param_dtype,
        )  # [H, buckets]
        buckets = relative_position_buckets(query_len, key_len, self.num_buckets, self.max_distance)
        bias = jnp.take(table.astype(jnp.float32), jnp.asarray(buckets), axis=1)  # [H, Lq, Lk]
        return bias[None]


class T5Module(nn.Module):
    """What every part of the encoder stack holds: the architecture (``config``), the matmul /
    residual ``dtype`` and the storage ``param_dtype`` of the weights."""

    config: T5Config
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def dtypes(self) -> dict[str, jnp.dtype]:
        """This module's dtypes as keyword arguments, for its sub-modules."""
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)


class SelfAttention(T5Module):
    """Multi-head self-attention without biases or score scaling; heads*kv may differ from D."""

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        cfg = self.config
        d, h, k = cfg.d_model, cfg.num_heads, cfg.d_kv

        def proj(name: str, std: float) -> jax.Array:
            kernel = self.param(
                name,
                nn.with_logical_partitioning(_normal(std), ("embed", "heads", "kv")),
                (d, h, k), self.param_dtype,
            )
            return jnp.einsum("bld,dhk->blhk", x, kernel.astype(self.dtype))

        # T5 (Mesh TF / T5X) initialisation: the 1/sqrt(d_kv) softmax scale lives in the query.
        q = proj("query", (d * k) ** -0.5)  # [B, L, H, K]
        kk = proj("key", d**-0.5)
        v = proj("value", d**-0.5)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
        scores = jnp.einsum("bqhk,bshk->bhqs", q, kk, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores + bias, axis=-1).astype(self.dtype)  # float32 softmax
        ctx = jnp.einsum("bhqs,bshk->bqhk", probs, v)  # [B, L, H, K]
        out_kernel = self.param(
            "out",
            nn.with_logical_partitioning(_normal((h * k) ** -0.5), ("heads", "kv", "embed")),
            (h, k, d), self.param_dtype,
        )
        return jnp.einsum("bqhk,hkd->bqd", ctx, out_kernel.astype(self.dtype))


class FeedForward(T5Module):
    """``act(x wi) wo`` (v1.0) or ``(act(x wi_0) * x wi_1) wo`` (v1.1, gated)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        act = _ACT[cfg.activation]

        def kernel(name: str, shape: tuple[int, int], axes: tuple[str, str]) -> jax.Array:
            init = nn.with_logical_partitioning(_normal(shape[0] ** -0.5), axes)
            return self.param(name, init, shape, self.param_dtype).astype(self.dtype)

        if cfg.gated:
            hidden = act(x @ kernel("wi_0", (cfg.d_model, cfg.d_ff), ("embed", "mlp")))
            hidden = hidden * (x @ kernel("wi_1", (cfg.d_model, cfg.d_ff), ("embed", "mlp")))
        else:
            hidden = act(x @ kernel("wi", (cfg.d_model, cfg.d_ff), ("embed", "mlp")))
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        return hidden @ kernel("wo", (cfg.d_ff, cfg.d_model), ("mlp", "embed"))


class EncoderLayer(T5Module):
    """Pre-norm residual block: x + Attn(RMSNorm(x)), then x + FFN(RMSNorm(x))."""

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        cfg = self.config
        kw = self.dtypes()
        y = RMSNorm(cfg.layer_norm_epsilon, name="pre_attention_layer_norm", **kw)(x)
        x = x + SelfAttention(cfg, name="attention", **kw)(y, bias)
        y = RMSNorm(cfg.layer_norm_epsilon, name="pre_mlp_layer_norm", **kw)(x)
        x = x + FeedForward(cfg, name="mlp", **kw)(y)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class T5Encoder(T5Module):
    """T5 encoder stack: token ids int32 [B, L] + mask bool [B, L] -> float32 [B, L, D].

    ``dtype`` is the matmul / residual dtype; ``param_dtype`` the storage dtype of the weights.
    With ``zero_padding`` (Imagen's convention) positions where ``mask`` is False are zeroed in the
    output (they are padding); without it every position keeps the encoder's output, as
    transformers' ``T5EncoderModel(input_ids, attention_mask).last_hidden_state`` and DeepFloyd
    IF's pipelines (which feed all 77 positions, unmasked, to the U-Net) do. The mask always
    hides padded keys from attention.
    """

    zero_padding: bool = True

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        kw = self.dtypes()
        embedding = self.param(
            "token_embedder",
            nn.with_logical_partitioning(_normal(1.0), ("vocab", "embed")),
            (cfg.vocab_size, cfg.d_model), self.param_dtype,
        )
        x = jnp.take(embedding, ids, axis=0).astype(self.dtype)  # [B, L, D]
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        length = ids.shape[1]
        bias = RelativePositionBias(
            cfg.num_heads, cfg.relative_attention_num_buckets,
            cfg.relative_attention_max_distance, self.param_dtype, name="relpos_bias",
        )(length, length)  # [1, H, L, L]
        key_bias = jnp.where(mask[:, None, None, :], 0.0, MASKED_SCORE).astype(jnp.float32)
        bias = bias + key_bias  # [B, H, L, L]
        for i in range(cfg.num_layers):
            x = EncoderLayer(cfg, name=f"layers_{i}", **kw)(x, bias)
        x = RMSNorm(cfg.layer_norm_epsilon, name="encoder_norm", dtype=jnp.float32,
                    param_dtype=self.param_dtype)(x)
        return jnp.where(mask[..., None], x, 0.0) if self.zero_padding else x
