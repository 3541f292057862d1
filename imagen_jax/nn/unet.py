"""What both Imagen U-Nets share: their common fields and the parts around their bodies.

`BaseUNet` (App. F.1) and `EfficientUNet` (App. B.1, F.2, F.3) subclass `UNet`. It holds the
fields they have in common (text conditioning, output channels, dropout, GroupNorm groups, remat,
attention kernel, dtypes) and builds, from inside the subclass's compact ``__call__``, the parts
they share: input validation with one-line errors, the timestep / augmentation-level / pooled-text
conditioning (``cond``), the stem convolution (``conv_in``), the residual and attention block
factories (rematerialised when ``remat``), and the zero-initialised output head (``norm_out``,
``conv_out``). The parts are created in the subclass's scope under those fixed names, so the
parameter tree is that of one flat module: checkpoints never see this class.

Fields are frozen on construction: gin and JSON give lists, the module holds (nested) tuples, so
a gin-built model equals (and hashes like) the same model written in Python.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax.nn.attention import AttentionBlock
from imagen_jax.nn.conditioning import Conditioning
from imagen_jax.nn.layers import (
    Conv,
    GroupNorm,
    ResBlock,
    check_text_inputs,
    check_time,
    constrain_image,
    depth_to_space,
)

Array = jax.Array
# Rematerialised block classes, made once: `UNet.remat` recomputes each block's activations in
# the backward pass instead of storing them.
_REMAT_RES_BLOCK = nn.remat(ResBlock)
_REMAT_ATTENTION_BLOCK = nn.remat(AttentionBlock)


def _freeze(value: Any) -> Any:
    """Lists (gin, JSON) to tuples, recursively; anything else unchanged."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


class UNet(nn.Module):
    """Fields and parts shared by the Imagen U-Nets (not a network by itself: no ``__call__``).

    Subclasses set ``super_res`` (whether the model takes ``lowres`` and ``aug_level``),
    define ``check_image_size(x)`` (a one-line ValueError for an image side the network cannot
    take) and a compact ``__call__`` with the U-Net contract of docs/DESIGN.md that starts with
    ``self.check_inputs(...)`` and builds its parts through the methods below.
    """

    text_embed_dim: int = 4096  # width D of the text encoder's output (T5-XXL)
    text_cond_dim: int = 1024  # width the text tokens are projected to once (Conditioning)
    attn_pool: bool = True  # add the attention-pooled text to the embedding (App. F.1)
    attn_pool_heads: int = 8
    out_channels: int = 3
    dropout: float = 0.0  # App. F: no dropout
    num_groups: int = 32  # GroupNorm groups (fewer on narrow layers: see layers.GroupNorm)
    remat: bool = False  # rematerialise every residual and attention block (activation memory)
    attention_impl: str | None = None  # `jax.nn.dot_product_attention` implementation
    dtype: Any = "float32"  # compute dtype ("bfloat16" on accelerators)
    param_dtype: Any = "float32"

    super_res = False  # class constant, not a field

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.init and field.name not in ("parent", "name") and isinstance(
                    value, (list, tuple)):
                # Before flax's __post_init__ the module is not yet frozen; bypass its setattr.
                object.__setattr__(self, field.name, _freeze(value))
        super().__post_init__()

    # -- input validation (shapes are static: these checks cost nothing under jit) -------------

    @nn.nowrap
    def check_image_size(self, x: Array) -> None:
        """Raises ValueError (one line) when x's spatial size does not fit the network."""
        raise NotImplementedError

    @nn.nowrap
    def check_inputs(self, x: Array, t: Array, text_embeds: Array, text_mask: Array,
                     lowres: Array | None, aug_level: Array | None) -> None:
        """One-line ValueErrors naming the model for any mis-shaped or missing input."""
        name = type(self).__name__
        b = x.shape[0]
        if self.super_res:
            self.check_image_size(x)
            if lowres is None or lowres.ndim != 4 or lowres.shape[0] != b:
                raise ValueError(f"{name} is a super-resolution model: pass lowres [B={b}, h, w, "
                                 "C] (the noise-augmented low-resolution image), got "
                                 f"{None if lowres is None else lowres.shape}")
        else:
            if lowres is not None or aug_level is not None:
                raise ValueError(f"{name} is a base (not super-resolution) model: call it with "
                                 "lowres=None and aug_level=None, or use EfficientUNet")
            self.check_image_size(x)
        check_time(t, b, "t", name)
        if self.super_res:
            check_time(aug_level, b, "aug_level", name)
        check_text_inputs(text_embeds, text_mask, b, self.text_embed_dim, name)

    # -- parts built inside the subclass's compact __call__ ------------------------------------

    @nn.nowrap
    def dtypes(self) -> dict[str, Any]:
        """``dtype`` and ``param_dtype`` as numpy dtypes (gin and JSON give strings), as the
        keyword arguments every layer takes."""
        return dict(dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))

    @nn.nowrap
    def conditioning(self, embed_dim: int, sinusoid_dim: int, t: Array, text_embeds: Array,
                     text_mask: Array, aug_level: Array | None) -> tuple[Array, Array]:
        """(emb [B, embed_dim], text_tokens [B, L, text_cond_dim]) from module ``cond``; the
        augmentation level is embedded only by super-resolution models."""
        return Conditioning(embed_dim, sinusoid_dim, self.text_cond_dim, self.attn_pool,
                            self.attn_pool_heads, use_aug_level=self.super_res, name="cond",
                            **self.dtypes())(t, text_embeds, text_mask, aug_level)

    @nn.nowrap
    def stem(self, h: Array, features: int) -> Array:
        """The first 3x3 convolution ``conv_in``: [B, H, W, C_in] (any float) -> [B, H, W,
        features] in the compute dtype. Its input side faces pixels, so it is never split."""
        h = constrain_image(h.astype(jnp.dtype(self.dtype)))
        return Conv(features, 3, channel_axes=(None, "conv_out"), name="conv_in",
                    **self.dtypes())(h)

    @nn.nowrap
    def res_block(self, channels: int, name: str, train: bool, **kwargs: Any) -> ResBlock:
        """A `ResBlock` with the model's dropout, groups and dtypes (rematerialised when
        ``remat``); ``kwargs`` are ResBlock's own (resample, conv_shortcut)."""
        cls = _REMAT_RES_BLOCK if self.remat else ResBlock
        return cls(channels, dropout=self.dropout, deterministic=not train,
                   num_groups=self.num_groups, name=name, **kwargs, **self.dtypes())

    @nn.nowrap
    def attention_block(self, name: str, **kwargs: Any) -> AttentionBlock:
        """An `AttentionBlock` with the model's groups, kernel and dtypes (rematerialised when
        ``remat``); ``kwargs`` set its heads and which attention it does."""
        cls = _REMAT_ATTENTION_BLOCK if self.remat else AttentionBlock
        return cls(num_groups=self.num_groups, implementation=self.attention_impl, name=name,
                   **kwargs, **self.dtypes())

    @nn.nowrap
    def head(self, h: Array, patch: int = 1) -> Array:
        """GroupNorm ``norm_out`` -> swish -> 3x3 conv ``conv_out``, zero-initialised so the
        untrained model predicts 0 (the mean of eps); with ``patch`` > 1 the conv predicts
        patch x patch pixels per position, unfolded (`depth_to_space`). Returns float32
        [B, H * patch, W * patch, out_channels]."""
        h = nn.swish(GroupNorm(self.num_groups, jnp.dtype(self.param_dtype), name="norm_out")(h))
        out = Conv(self.out_channels * patch * patch, 3, zero_init=True,
                   channel_axes=("conv_in", None), name="conv_out", **self.dtypes())(h)
        if patch > 1:
            out = depth_to_space(out, patch)
        return constrain_image(out.astype(jnp.float32))
