"""Building blocks shared by the U-Nets: embeddings, convs, norms and residual blocks.

Every parameter is annotated with logical axis names (DESIGN.md "Sharding"): conv kernels
``(None, None, "conv_in", "conv_out")``, dense kernels ``("embed", "mlp")`` or as given, norm
scales/biases ``("norm",)``. GroupNorm and LayerNorm statistics are computed in float32 whatever
the compute ``dtype``, because bf16 variance estimates over large groups are unstable, and with a
two-pass variance on mean-shifted data: the one-pass E[x^2] - E[x]^2 cancels catastrophically
when a group's mean is large against its spread (x = 100 + 0.01 N(0, 1) gave std 5.96, not 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Array = jax.Array

# flax's default GroupNorm / LayerNorm epsilon, kept by our U-Nets (DeepFloyd IF's use 1e-5).
NORM_EPSILON = 1e-6
# Activation layout used for logical sharding constraints on feature maps.
IMAGE_AXES = ("batch", "height", "width", "channels")


def constrain_image(x: Array) -> Array:
    """Logical sharding constraint for an NHWC feature map (batch split over the mesh)."""
    return nn.with_logical_constraint(x, IMAGE_AXES)


def sinusoidal_embedding(t: Array, dim: int, max_period: float = 10_000.0,
                         scale: float = 1000.0) -> Array:
    """Transformer-style sinusoidal features of a scalar per example.

    t: [B] in [0, 1] (diffusion time or augmentation level). ``scale`` stretches [0, 1] to the
    [0, 1000] range the DDPM/ADM frequencies were designed for. Returns float32 [B, dim].
    """
    if dim % 2:
        raise ValueError(f"sinusoidal_embedding: dim must be even, got {dim}")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (scale * t.astype(jnp.float32))[:, None] * freqs[None, :]  # [B, half]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def dense(features: int, axes: tuple[str | None, str | None], *, name: str | None = None,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, use_bias: bool = True,
          zero_init: bool = False) -> nn.Dense:
    """A Dense layer whose kernel carries logical axes ``axes`` and bias ``axes[1]``."""
    kernel_init = nn.initializers.zeros_init() if zero_init else nn.initializers.lecun_normal()
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )


class Conv(nn.Module):
    """A 2-D convolution (NHWC) with logically partitioned kernel and bias."""

    features: int
    kernel_size: int = 3
    strides: int = 1
    zero_init: bool = False
    # Logical names of the kernel's (input, output) channel axes. The image-facing convs use
    # None on their 3-channel side: it cannot be split over a mesh axis.
    channel_axes: tuple[str | None, str | None] = ("conv_in", "conv_out")
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel_init = (nn.initializers.zeros_init() if self.zero_init
                       else nn.initializers.lecun_normal())
        return nn.Conv(
            self.features,
            (self.kernel_size, self.kernel_size),
            strides=(self.strides, self.strides),
            padding="SAME",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(kernel_init, (None, None, *self.channel_axes)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                   (self.channel_axes[1],)),
            name="conv",
        )(x)


def _subtract_group_mean(x: Array, groups: int) -> Array:
    """x [..., C] float32 minus the mean of each group of C/groups channels (over all but the
    batch axis). Normalisation is invariant to this shift; after it the group means are at
    rounding level, so the two-pass variance that follows is exact to float32 precision even
    when the mean dwarfs the spread (the shift's own rounding error is removed by that pass)."""
    shape = x.shape
    xg = x.reshape(shape[0], -1, groups, shape[-1] // groups)
    return (xg - jnp.mean(xg, axis=(1, 3), keepdims=True)).reshape(shape)


def _norm_kwargs(param_dtype: Dtype, epsilon: float) -> dict[str, Any]:
    """The settings flax's GroupNorm and LayerNorm share here: float32 statistics, the exact
    (two-pass) variance, ``("norm",)`` logical axes on scale and bias, submodule name ``norm``."""
    return dict(
        epsilon=epsilon,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        name="norm",
    )


class GroupNorm(nn.Module):
    """GroupNorm computed in float32 (two-pass variance on mean-shifted data), cast back.

    x: [B, ..., C] any float dtype -> same shape and dtype; statistics per example over the
    spatial axes and C/G channels, G = gcd(num_groups, C).
    """

    num_groups: int = 32
    param_dtype: Dtype = jnp.float32
    epsilon: float = NORM_EPSILON

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = x.shape[-1]
        # Narrow layers (tiny CPU configs) cannot have 32 groups: use the largest divisor.
        groups = math.gcd(self.num_groups, channels)
        y = nn.GroupNorm(num_groups=groups, **_norm_kwargs(self.param_dtype, self.epsilon))(
            _subtract_group_mean(x.astype(jnp.float32), groups))
        return y.astype(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis in float32 (two-pass variance on mean-shifted data), cast
    back to the input dtype (used on text tokens). x: [..., D] -> same shape and dtype."""

    param_dtype: Dtype = jnp.float32
    epsilon: float = NORM_EPSILON

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        y = nn.LayerNorm(**_norm_kwargs(self.param_dtype, self.epsilon))(
            x32 - jnp.mean(x32, axis=-1, keepdims=True))
        return y.astype(x.dtype)


def space_to_depth(x: Array, patch: int) -> Array:
    """[B, H, W, C] -> [B, H/p, W/p, p*p*C]: each p x p pixel patch folded into channels."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // patch, w // patch, patch * patch * c)


def depth_to_space(x: Array, patch: int) -> Array:
    """[B, h, w, p*p*C] -> [B, h*p, w*p, C]: the inverse of `space_to_depth`."""
    b, h, w, c = x.shape
    c //= patch * patch
    x = x.reshape(b, h, w, patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * patch, w * patch, c)


def upsample_nearest(x: Array, factor: int = 2) -> Array:
    """[B, H, W, C] -> [B, factor*H, factor*W, C] by pixel repetition."""
    x = jnp.repeat(x, factor, axis=1)
    return jnp.repeat(x, factor, axis=2)


def downsample_avg(x: Array, factor: int = 2) -> Array:
    """[B, H, W, C] -> [B, H/factor, W/factor, C] by average pooling."""
    return nn.avg_pool(x, (factor, factor), strides=(factor, factor))


class EmbeddingMLP(nn.Module):
    """Sinusoidal features of a [B] scalar -> 2-layer MLP (swish by default) -> [B, embed_dim].

    ``time_scale`` is `sinusoidal_embedding`'s ``scale``: 1000 for t in [0, 1] (our models), 1
    for integer timesteps (DeepFloyd IF, whose MLP uses exact GELU).
    """

    embed_dim: int  # E: width of the hidden layer and of the output
    sinusoid_dim: int  # width of the sinusoidal features of t (even)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    time_scale: float = 1000.0
    activation: Callable[[Array], Array] = nn.swish

    @nn.compact
    def __call__(self, t: Array) -> Array:
        h = sinusoidal_embedding(t, self.sinusoid_dim, scale=self.time_scale).astype(self.dtype)
        h = dense(self.embed_dim, (None, "embed"), name="dense_0", dtype=self.dtype,
                  param_dtype=self.param_dtype)(h)
        h = self.activation(h)
        return dense(self.embed_dim, ("embed", "mlp"), name="dense_1", dtype=self.dtype,
                     param_dtype=self.param_dtype)(h)


def scale_shift(h: Array, emb: Array, name: str, dtype: Dtype, param_dtype: Dtype) -> Array:
    """h * (1 + scale) + shift with (scale, shift) = Dense(swish(emb)); h [B,H,W,C], emb [B,E].

    Must be called inside a compact method (it creates the Dense there).
    """
    channels = h.shape[-1]
    params = dense(2 * channels, ("embed", "mlp"), name=name, dtype=dtype,
                   param_dtype=param_dtype)(nn.swish(emb.astype(dtype)))
    scale, shift = jnp.split(params[:, None, None, :], 2, axis=-1)  # [B, 1, 1, C] each
    return h * (1 + scale) + shift


class CombineEmbs(nn.Module):
    """Efficient U-Net conditioning, once per DBlock/UBlock (Fig. A.28/A.29): scale-shift norm.

    GroupNorm(h) * (1 + scale) + shift, (scale, shift) projected from the embedding [B, E].
    """

    num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: Array, emb: Array) -> Array:
        h = GroupNorm(self.num_groups, self.param_dtype, name="norm")(h)
        return constrain_image(scale_shift(h, emb, "emb_proj", self.dtype, self.param_dtype))


class ResBlock(nn.Module):
    """Residual block, optionally with scale-shift conditioning (ADM, Dhariwal & Nichol 2021).

    GroupNorm -> swish -> [resample] -> conv3x3 -> GroupNorm [* (1 + scale) + shift] -> swish ->
    dropout -> conv3x3 (zero-initialised, so the block starts as the identity), plus a shortcut
    (identity, or 1x1 conv when channels change or ``conv_shortcut``). ``resample`` "down"/"up"
    gives the BigGAN-style resampling block. ``emb`` [B, E] is projected to (scale, shift) [B, 2C];
    with ``emb=None`` the block is the unconditioned Efficient U-Net ResNetBlock (Fig. A.27).
    """

    channels: int
    resample: str | None = None  # None | "down" | "up"
    conv_shortcut: bool = False
    dropout: float = 0.0
    deterministic: bool = True
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, emb: Array | None = None) -> Array:
        if self.resample not in (None, "down", "up"):
            raise ValueError(f"ResBlock.resample must be None, 'down' or 'up', got "
                             f"{self.resample!r}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.swish(GroupNorm(self.num_groups, self.param_dtype, name="norm_0")(x))
        if self.resample == "down":
            h, x = downsample_avg(h), downsample_avg(x)
        elif self.resample == "up":
            h, x = upsample_nearest(h), upsample_nearest(x)
        h = Conv(self.channels, 3, name="conv_0", **kw)(h)

        h = GroupNorm(self.num_groups, self.param_dtype, name="norm_1")(h)
        if emb is not None:
            h = scale_shift(h, emb, "emb_proj", self.dtype, self.param_dtype)
        h = nn.swish(h)
        h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
        h = Conv(self.channels, 3, zero_init=True, name="conv_1", **kw)(h)

        if self.conv_shortcut or x.shape[-1] != self.channels:
            x = Conv(self.channels, 1, name="shortcut", **kw)(x)
        return constrain_image(x + h)


def check_text_inputs(text_embeds: Array, text_mask: Array, batch: int,
                      text_embed_dim: int, model: str) -> None:
    """Clear errors for mis-shaped text conditioning (shapes are static, so this is free)."""
    if text_embeds.ndim != 3 or text_embeds.shape[0] != batch:
        raise ValueError(f"{model}: text_embeds must be [B={batch}, L, D], got "
                         f"{text_embeds.shape}; pass the T5 encoder output for this batch")
    if text_embeds.shape[-1] != text_embed_dim:
        raise ValueError(f"{model}: text_embeds has width {text_embeds.shape[-1]} but the model "
                         f"was configured with text_embed_dim={text_embed_dim}; set "
                         f"text_embed_dim in the model gin file to the text encoder's width")
    if text_mask.shape != text_embeds.shape[:2]:
        raise ValueError(f"{model}: text_mask must be [B, L]={text_embeds.shape[:2]}, got "
                         f"{text_mask.shape}")


def check_time(t: Array | None, batch: int, name: str, model: str) -> None:
    if t is None or t.shape != (batch,):
        shape = None if t is None else t.shape
        raise ValueError(f"{model}: {name} must be float32 [B={batch}] in [0, 1], got {shape}")


def as_tuple(x: Sequence[Any] | Any, n: int, name: str) -> tuple[Any, ...]:
    """Broadcasts a scalar to n entries, or checks a sequence has n entries."""
    if isinstance(x, (list, tuple)):
        if len(x) != n:
            raise ValueError(f"{name} has {len(x)} entries but the model has {n} levels")
        return tuple(x)
    return (x,) * n
