"""Attention layers of the U-Nets: image self-attention with text keys/values, and text pooling.

Both layers run through ``jax.nn.dot_product_attention`` (cuDNN fused kernel on GPUs when
``implementation="cudnn"``; its XLA path computes logits and softmax in float32). Each carries a
learned *null* key/value token that is always attendable, so the classifier-free unconditional
case (``text_mask`` all False) has a well-defined, finite output (DESIGN.md "Conventions").
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax.nn.layers import GroupNorm, LayerNorm, constrain_image

Dtype = Any
Array = jax.Array


class HeadsProjection(nn.Module):
    """[..., C] -> [..., heads, head_dim].

    The kernel is created with its full 3-D shape (not ``nn.DenseGeneral``'s flattened one) so
    its three logical axis names stay valid under a mesh.
    """

    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(init, ("embed", "heads", "kv")),
            (x.shape[-1], self.num_heads, self.head_dim), self.param_dtype)
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("heads", "kv")),
            (self.num_heads, self.head_dim), self.param_dtype)
        y = jnp.einsum("...c,chd->...hd", x.astype(self.dtype), kernel.astype(self.dtype))
        return y + bias.astype(self.dtype)


class OutProjection(nn.Module):
    """[..., heads, head_dim] -> [..., features]."""

    features: int
    zero_init: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = (nn.initializers.zeros_init() if self.zero_init
                else nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2))
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(init, ("heads", "kv", "embed")),
            (*x.shape[-2:], self.features), self.param_dtype)
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
            (self.features,), self.param_dtype)
        y = jnp.einsum("...hd,hdf->...f", x.astype(self.dtype), kernel.astype(self.dtype))
        return y + bias.astype(self.dtype)


def _heads_proj(num_heads: int, head_dim: int, name: str, dtype: Dtype,
                param_dtype: Dtype) -> HeadsProjection:
    return HeadsProjection(num_heads, head_dim, dtype=dtype, param_dtype=param_dtype, name=name)


def _out_proj(features: int, name: str, dtype: Dtype, param_dtype: Dtype,
              zero_init: bool) -> OutProjection:
    return OutProjection(features, zero_init=zero_init, dtype=dtype, param_dtype=param_dtype,
                         name=name)


def _null_kv(module: nn.Module, batch: int, num_heads: int, head_dim: int,
             dtype: Dtype, param_dtype: Dtype) -> tuple[Array, Array]:
    """Learned null key and value, each [B, 1, heads, head_dim]."""
    init = nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("heads", "kv"))
    null_k = module.param("null_key", init, (num_heads, head_dim), param_dtype)
    null_v = module.param("null_value", init, (num_heads, head_dim), param_dtype)
    shape = (batch, 1, num_heads, head_dim)
    return (jnp.broadcast_to(null_k.astype(dtype), shape),
            jnp.broadcast_to(null_v.astype(dtype), shape))


class AttentionBlock(nn.Module):
    """Residual multi-head attention over an image, optionally attending to text tokens.

    ``self_attention``: image positions are keys/values. ``cross_attention``: the (LayerNorm-ed)
    text tokens are concatenated to the keys/values (Imagen App. D.3.1) together with a learned
    null token. With both False the block is invalid. Heads: ``head_dim`` channels each
    (base U-Net, App. F.1: 64) or ``num_heads`` heads (Efficient U-Net, App. B.1: 8); the hidden
    width is ``hidden_mult`` x the input channels (Efficient U-Net DBlock: 2x).
    """

    num_heads: int | None = None
    head_dim: int | None = 64
    hidden_mult: int = 1
    self_attention: bool = True
    cross_attention: bool = True
    num_groups: int = 32
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, text: Array, text_mask: Array) -> Array:
        """x: [B, H, W, C]; text: [B, L, Dc]; text_mask: bool [B, L]. Returns x's shape."""
        if not (self.self_attention or self.cross_attention):
            raise ValueError("AttentionBlock needs self_attention or cross_attention")
        b, h, w, c = x.shape
        hidden = c * self.hidden_mult
        if self.num_heads is not None:
            num_heads = self.num_heads
        elif self.head_dim is not None:
            num_heads = max(hidden // self.head_dim, 1)
        else:
            raise ValueError("AttentionBlock: set num_heads or head_dim")
        if hidden % num_heads:
            raise ValueError(f"AttentionBlock: hidden width {hidden} is not divisible by "
                             f"{num_heads} heads; change head_dim/num_heads or the channels")
        head_dim = hidden // num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        xn = GroupNorm(self.num_groups, self.param_dtype, name="norm")(x).reshape(b, h * w, c)
        query = _heads_proj(num_heads, head_dim, "query", **kw)(xn)  # [B, T, N, Dh]

        keys, values, masks = [], [], []
        if self.self_attention:
            keys.append(_heads_proj(num_heads, head_dim, "key", **kw)(xn))
            values.append(_heads_proj(num_heads, head_dim, "value", **kw)(xn))
            masks.append(jnp.ones((b, h * w), bool))
        if self.cross_attention:
            null_k, null_v = _null_kv(self, b, num_heads, head_dim, **kw)
            tn = LayerNorm(self.param_dtype, name="text_norm")(text.astype(self.dtype))
            keys += [null_k, _heads_proj(num_heads, head_dim, "text_key", **kw)(tn)]
            values += [null_v, _heads_proj(num_heads, head_dim, "text_value", **kw)(tn)]
            masks += [jnp.ones((b, 1), bool), text_mask.astype(bool)]
        key = jnp.concatenate(keys, axis=1)  # [B, S, N, Dh]
        value = jnp.concatenate(values, axis=1)
        mask = jnp.concatenate(masks, axis=1)[:, None, None, :]  # [B, 1, 1, S]

        out = jax.nn.dot_product_attention(query, key, value, mask=mask,
                                           implementation=self.implementation)
        out = _out_proj(c, "out", zero_init=True, **kw)(out)  # [B, T, C]
        return constrain_image(x + out.reshape(b, h, w, c))


class AttentionPool(nn.Module):
    """Attention-pooled text embedding (CLIP-style), added to the timestep embedding (App. F.1).

    The query is the masked mean of the LayerNorm-ed tokens; keys/values are that mean, the
    tokens and a learned null token. text: [B, L, Dc] -> [B, out_dim].
    """

    out_dim: int
    num_heads: int = 8
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, text: Array, text_mask: Array) -> Array:
        b, _, d = text.shape
        if d % self.num_heads:
            raise ValueError(f"AttentionPool: text width {d} not divisible by {self.num_heads} "
                             "heads; change attn_pool_heads or text_cond_dim")
        head_dim = d // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tn = LayerNorm(self.param_dtype, name="text_norm")(text.astype(self.dtype))
        weights = text_mask.astype(jnp.float32)[..., None]  # [B, L, 1]
        # max(count, 1): an all-False (unconditional) mask gives a zero mean, not NaN.
        mean = (tn.astype(jnp.float32) * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
        mean = mean[:, None, :].astype(self.dtype)  # [B, 1, Dc]
        tokens = jnp.concatenate([mean, tn], axis=1)  # [B, 1 + L, Dc]

        query = _heads_proj(self.num_heads, head_dim, "query", **kw)(mean)
        null_k, null_v = _null_kv(self, b, self.num_heads, head_dim, **kw)
        key = jnp.concatenate(
            [null_k, _heads_proj(self.num_heads, head_dim, "key", **kw)(tokens)], axis=1)
        value = jnp.concatenate(
            [null_v, _heads_proj(self.num_heads, head_dim, "value", **kw)(tokens)], axis=1)
        mask = jnp.concatenate([jnp.ones((b, 2), bool), text_mask.astype(bool)], axis=1)
        out = jax.nn.dot_product_attention(query, key, value, mask=mask[:, None, None, :])
        out = _out_proj(self.out_dim, "out", zero_init=False, **kw)(out)  # [B, 1, out_dim]
        return nn.with_logical_constraint(out[:, 0], ("batch", "channels"))
