"""Gin-configurable U-Net presets: the three paper stages (App. F) and tiny CPU versions.

Each factory returns a module instance; every argument can be rebound in gin, e.g.
``base_2b.dtype = "bfloat16"`` or ``sr256_600m.remat = True``.
"""

from __future__ import annotations

from collections.abc import Sequence

import gin

from imagen_jax.nn.base_unet import BaseUNet
from imagen_jax.nn.efficient_unet import EfficientUNet


@gin.configurable
def base_2b(
    channels: int = 512,
    channel_mult: Sequence[int] = (1, 2, 3, 4),
    num_res_blocks: int = 3,
    attn_resolutions: Sequence[int] = (32, 16, 8),
    head_dim: int = 64,
    text_embed_dim: int = 4096,
    text_cond_dim: int = 512,
    image_size: int = 64,
    dtype: str = "float32",
    param_dtype: str = "float32",
    remat: bool = False,
    attention_impl: str | None = None,
) -> BaseUNet:
    """The 2 B-parameter 64x64 base U-Net (App. F.1): embed dim 512, mult [1,2,3,4], 3 residual
    blocks, attention at 32/16/8 with 64 channels per head."""
    return BaseUNet(channels=channels, channel_mult=tuple(channel_mult),
                    num_res_blocks=num_res_blocks, attn_resolutions=tuple(attn_resolutions),
                    head_dim=head_dim, text_embed_dim=text_embed_dim,
                    text_cond_dim=text_cond_dim, image_size=image_size, dtype=dtype,
                    param_dtype=param_dtype, remat=remat, attention_impl=attention_impl)


# App. F.2 / F.3: DBlocks (channels, residual blocks), highest resolution first.
PAPER_SR_BLOCKS = ((128, 2), (256, 4), (512, 8), (1024, 8))


@gin.configurable
def sr256_600m(
    blocks: Sequence[Sequence[int]] = PAPER_SR_BLOCKS,
    stem_channels: int = 128,
    self_attention: Sequence[bool] = (False, False, False, True),
    cross_attention: Sequence[bool] = (False, False, False, True),
    attn_every_res_block: bool = True,
    conv_shortcut: bool = False,
    num_heads: int = 8,
    text_embed_dim: int = 4096,
    text_cond_dim: int = 1024,
    embed_dim: int = 512,
    dtype: str = "float32",
    param_dtype: str = "float32",
    remat: bool = False,
    attention_impl: str | None = None,
) -> EfficientUNet:
    """The 600 M-parameter 64->256 Efficient U-Net (App. F.2): self- and cross-attention only in
    the lowest-resolution (1024-channel) block."""
    return EfficientUNet(blocks=tuple(tuple(b) for b in blocks), stem_channels=stem_channels,
                         self_attention=tuple(self_attention),
                         cross_attention=tuple(cross_attention),
                         attn_every_res_block=attn_every_res_block, conv_shortcut=conv_shortcut,
                         num_heads=num_heads,
                         text_embed_dim=text_embed_dim, text_cond_dim=text_cond_dim,
                         embed_dim=embed_dim, dtype=dtype, param_dtype=param_dtype, remat=remat,
                         attention_impl=attention_impl)


@gin.configurable
def sr1024_400m(
    blocks: Sequence[Sequence[int]] = PAPER_SR_BLOCKS,
    stem_channels: int = 128,
    self_attention: Sequence[bool] = (False, False, False, False),
    cross_attention: Sequence[bool] = (False, False, False, True),
    attn_every_res_block: bool = False,
    conv_shortcut: bool = False,
    num_heads: int = 8,
    text_embed_dim: int = 4096,
    text_cond_dim: int = 1024,
    embed_dim: int = 512,
    dtype: str = "float32",
    param_dtype: str = "float32",
    remat: bool = False,
    attention_impl: str | None = None,
) -> EfficientUNet:
    """The 400 M-parameter 256->1024 Efficient U-Net (App. F.3): no self-attention, text
    cross-attention in the last (lowest-resolution) block only; trained on 256 crops."""
    return EfficientUNet(blocks=tuple(tuple(b) for b in blocks), stem_channels=stem_channels,
                         self_attention=tuple(self_attention),
                         cross_attention=tuple(cross_attention),
                         attn_every_res_block=attn_every_res_block, conv_shortcut=conv_shortcut,
                         num_heads=num_heads,
                         text_embed_dim=text_embed_dim, text_cond_dim=text_cond_dim,
                         embed_dim=embed_dim, dtype=dtype, param_dtype=param_dtype, remat=remat,
                         attention_impl=attention_impl)


@gin.configurable
def tiny_base(
    channels: int = 32,
    channel_mult: Sequence[int] = (1, 2),
    num_res_blocks: int = 1,
    attn_resolutions: Sequence[int] = (8,),
    head_dim: int = 16,
    text_embed_dim: int = 32,
    text_cond_dim: int = 32,
    image_size: int = 16,
    patch_size: int = 1,
    resblock_updown: bool = True,
    num_groups: int = 8,
    dtype: str = "float32",
    param_dtype: str = "float32",
    remat: bool = False,
) -> BaseUNet:
    """A few-hundred-thousand-parameter base U-Net for CPU tests and demos."""
    return BaseUNet(channels=channels, channel_mult=tuple(channel_mult),
                    num_res_blocks=num_res_blocks, attn_resolutions=tuple(attn_resolutions),
                    head_dim=head_dim, text_embed_dim=text_embed_dim,
                    text_cond_dim=text_cond_dim, image_size=image_size, patch_size=patch_size,
                    resblock_updown=resblock_updown, num_groups=num_groups,
                    attn_pool_heads=4, dtype=dtype, param_dtype=param_dtype, remat=remat)


@gin.configurable
def tiny_sr(
    blocks: Sequence[Sequence[int]] = ((16, 1), (32, 2)),
    stem_channels: int = 16,
    self_attention: Sequence[bool] = (False, True),
    cross_attention: Sequence[bool] = (False, True),
    attn_every_res_block: bool = True,
    conv_shortcut: bool = False,
    num_heads: int = 4,
    text_embed_dim: int = 32,
    text_cond_dim: int = 32,
    embed_dim: int = 64,
    sinusoid_dim: int = 32,
    num_groups: int = 8,
    dtype: str = "float32",
    param_dtype: str = "float32",
    remat: bool = False,
) -> EfficientUNet:
    """A tiny Efficient U-Net for CPU tests and demos."""
    return EfficientUNet(blocks=tuple(tuple(b) for b in blocks), stem_channels=stem_channels,
                         self_attention=tuple(self_attention),
                         cross_attention=tuple(cross_attention),
                         attn_every_res_block=attn_every_res_block, conv_shortcut=conv_shortcut,
                         num_heads=num_heads,
                         text_embed_dim=text_embed_dim, text_cond_dim=text_cond_dim,
                         embed_dim=embed_dim, sinusoid_dim=sinusoid_dim, num_groups=num_groups,
                         attn_pool_heads=4, dtype=dtype, param_dtype=param_dtype, remat=remat)
