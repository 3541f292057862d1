"""The 64x64 base U-Net of Imagen (App. F.1): ADM (Dhariwal & Nichol 2021) with text conditioning.

Layout per level (channels = ``channels * channel_mult[level]``): ``num_res_blocks`` residual
blocks (each followed by attention when the level's resolution is in ``attn_resolutions``), then a
BigGAN-style downsampling residual block; a middle ResBlock-Attention-ResBlock; the mirror-image
decoder with ``num_res_blocks + 1`` blocks per level reading the concatenated skip activations.
Attention is self-attention with the text tokens concatenated to its keys/values (App. D.3.1).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from imagen_jax.nn.layers import Conv, as_tuple, space_to_depth
from imagen_jax.nn.unet import UNet

Array = jax.Array


@gin.configurable
class BaseUNet(UNet):
    """Text-conditional ADM U-Net predicting eps / v / x0 (whatever the loss trains).

    Call: ``apply(variables, x [B,H,W,C_in], t [B], text_embeds [B,L,D], text_mask bool [B,L],
    lowres=None, aug_level=None, train=False) -> [B, H, W, out_channels]``.

    The defaults are the paper's 2 B base model (gin_configs/models/base_2b.gin); the fields
    shared with `EfficientUNet` (text conditioning, dtypes, remat, ...) are `UNet`'s.
    """

    channels: int = 512  # App. F.1 "embed dim 512"
    channel_mult: Sequence[int] = (1, 2, 3, 4)
    num_res_blocks: int | Sequence[int] = 3
    attn_resolutions: Sequence[int] = (32, 16, 8)
    image_size: int = 64
    # Side of the square pixel patches folded into channels before the first conv and unfolded
    # after the last (space-to-depth; Hoogeboom et al. 2023, "simple diffusion", Sec. 3.3): the
    # U-Net runs at image_size / patch_size for about the cost of that smaller image. 1 = the
    # paper's base U-Net. ``attn_resolutions`` name feature-map sides, i.e. after patching.
    patch_size: int = 1
    head_dim: int = 64
    embed_dim: int | None = None  # timestep-embedding width; None -> 4 * channels (ADM)
    sinusoid_dim: int | None = None  # None -> channels
    text_cond_dim: int = 512  # the 2 B model's text projection (overrides UNet's 1024)
    resblock_updown: bool = True  # BigGAN-style resampling residual blocks

    @nn.nowrap
    def check_image_size(self, x: Array) -> None:
        name = type(self).__name__
        num_levels = len(self.channel_mult)
        patch = self.patch_size
        if patch < 1:
            raise ValueError(f"{name}: patch_size must be >= 1, got {patch}")
        factor = patch * 2 ** (num_levels - 1)
        _, height, width, _ = x.shape
        if height != width or height % factor:
            raise ValueError(f"{name}: x must be square with a side divisible by {factor}, got "
                             f"{x.shape}; the model has {num_levels} levels and patch_size "
                             f"{patch}")

    @nn.compact
    def __call__(self, x: Array, t: Array, text_embeds: Array, text_mask: Array,
                 lowres: Array | None = None, aug_level: Array | None = None,
                 train: bool = False) -> Array:
        self.check_inputs(x, t, text_embeds, text_mask, lowres, aug_level)
        num_levels = len(self.channel_mult)
        patch = self.patch_size
        kw = self.dtypes()
        blocks_per_level = as_tuple(self.num_res_blocks, num_levels, "num_res_blocks")

        def resblock(ch: int, name: str, resample: str | None = None) -> nn.Module:
            return self.res_block(ch, name, train, resample=resample)

        def attention(h: Array, name: str) -> Array:
            return self.attention_block(name, head_dim=self.head_dim)(h, text_tokens, text_mask)

        emb, text_tokens = self.conditioning(self.embed_dim or 4 * self.channels,
                                             self.sinusoid_dim or self.channels, t, text_embeds,
                                             text_mask, aug_level)

        h = self.stem(space_to_depth(x, patch), self.channels * self.channel_mult[0])
        skips = [h]
        for level, mult in enumerate(self.channel_mult):
            ch = self.channels * mult
            use_attn = self.image_size // patch // 2**level in self.attn_resolutions
            for i in range(blocks_per_level[level]):
                h = resblock(ch, f"down_{level}_res_{i}")(h, emb)
                if use_attn:
                    h = attention(h, f"down_{level}_attn_{i}")
                skips.append(h)
            if level != num_levels - 1:
                if self.resblock_updown:
                    h = resblock(ch, f"down_{level}_downsample", "down")(h, emb)
                else:
                    h = Conv(ch, 3, strides=2, name=f"down_{level}_downsample", **kw)(h)
                skips.append(h)

        ch_mid = self.channels * self.channel_mult[-1]
        h = resblock(ch_mid, "mid_res_0")(h, emb)
        h = attention(h, "mid_attn")
        h = resblock(ch_mid, "mid_res_1")(h, emb)

        for level in reversed(range(num_levels)):
            ch = self.channels * self.channel_mult[level]
            use_attn = self.image_size // patch // 2**level in self.attn_resolutions
            for i in range(blocks_per_level[level] + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = resblock(ch, f"up_{level}_res_{i}")(h, emb)
                if use_attn:
                    h = attention(h, f"up_{level}_attn_{i}")
            if level != 0:
                if self.resblock_updown:
                    h = resblock(ch, f"up_{level}_upsample", "up")(h, emb)
                else:
                    h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
                    h = Conv(ch, 3, name=f"up_{level}_upsample", **kw)(h)

        return self.head(h, patch)  # [B, H, W, out_channels] float32
