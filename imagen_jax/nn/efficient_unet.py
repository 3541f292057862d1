"""The Efficient U-Net of Imagen's super-resolution stages (App. B.1, F.2, F.3, Fig. A.27-A.31).

Versus the base U-Net: parameters are shifted to low resolutions (more residual blocks there),
a DBlock downsamples *before* its convolutions and a UBlock upsamples *after* them (less
activation memory at high resolution), and skip connections are scaled by 1/sqrt(2). The noised
low-resolution image is upsampled (bilinear) and concatenated to the input; its augmentation level
is embedded like the timestep. The network is fully convolutional (attention only at the lowest
resolution), so a model trained on crops samples at full size (the 1024 stage, App. F.3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from imagen_jax.nn.layers import CombineEmbs, Conv, as_tuple, upsample_nearest
from imagen_jax.nn.unet import UNet

Array = jax.Array


@gin.configurable
class EfficientUNet(UNet):
    """Text-conditional super-resolution U-Net.

    Call: ``apply(variables, x [B,H,W,C], t [B], text_embeds [B,L,D], text_mask bool [B,L],
    lowres [B,h,w,C] (noise-augmented by the caller), aug_level [B], train=False)
    -> [B, H, W, out_channels]``. H and W must be divisible by 2**len(blocks).

    The defaults are the paper's 64->256 model (gin_configs/models/sr256_600m.gin); the fields
    shared with `BaseUNet` (text conditioning, dtypes, remat, ...) are `UNet`'s.
    """

    # (channels, residual blocks) per DBlock/UBlock, highest resolution first (App. F.2).
    blocks: Sequence[Sequence[int]] = ((128, 2), (256, 4), (512, 8), (1024, 8))
    stem_channels: int = 128
    self_attention: bool | Sequence[bool] = (False, False, False, True)
    cross_attention: bool | Sequence[bool] = (False, False, False, True)
    # One attention layer after every residual block of an attention block (True) or one per
    # block (False): the paper does not say; see README.md (U-Nets) for the parameter counts.
    attn_every_res_block: bool = True
    # Fig. A.27 draws a 1x1 shortcut conv in every ResNetBlock; the paper configs keep the
    # identity where widths match (see README.md (U-Nets): with it the 1024 stage is 0.46 B,
    # not 0.4 B).
    conv_shortcut: bool = False
    num_heads: int = 8  # App. B.1: 8 heads
    attn_hidden_mult: int = 2  # App. B.1: hidden width 2x channels
    embed_dim: int = 512
    sinusoid_dim: int = 256
    skip_scale: float = 1 / math.sqrt(2)  # App. B.1
    resize_method: str = "bilinear"

    super_res = True

    @nn.nowrap
    def check_image_size(self, x: Array) -> None:
        num_levels = len(self.blocks)
        factor = 2**num_levels
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"{type(self).__name__}: x's height and width must be divisible by "
                             f"{factor} ({num_levels} stride-2 blocks), got {x.shape}; crop or "
                             "pad")

    @nn.compact
    def __call__(self, x: Array, t: Array, text_embeds: Array, text_mask: Array,
                 lowres: Array | None = None, aug_level: Array | None = None,
                 train: bool = False) -> Array:
        self.check_inputs(x, t, text_embeds, text_mask, lowres, aug_level)
        b, height, width, _ = x.shape
        num_levels = len(self.blocks)
        kw = self.dtypes()
        self_attn = as_tuple(self.self_attention, num_levels, "self_attention")
        cross_attn = as_tuple(self.cross_attention, num_levels, "cross_attention")

        emb, text_tokens = self.conditioning(self.embed_dim, self.sinusoid_dim, t, text_embeds,
                                             text_mask, aug_level)

        def stage(h: Array, level: int, prefix: str) -> Array:
            """The residual blocks (+ attention) shared by a DBlock and a UBlock."""
            ch, num_blocks = self.blocks[level]
            use_attn = self_attn[level] or cross_attn[level]
            for i in range(num_blocks):
                h = self.res_block(ch, f"{prefix}_{level}_res_{i}", train,
                                   conv_shortcut=self.conv_shortcut)(h)
                if use_attn and (self.attn_every_res_block or i == num_blocks - 1):
                    h = self.attention_block(
                        f"{prefix}_{level}_attn_{i}", num_heads=self.num_heads, head_dim=None,
                        hidden_mult=self.attn_hidden_mult, self_attention=self_attn[level],
                        cross_attention=cross_attn[level])(h, text_tokens, text_mask)
            return h

        # The low-resolution conditioning image, resized to x's size and concatenated.
        lowres_up = jax.image.resize(lowres.astype(jnp.float32),
                                     (b, height, width, lowres.shape[-1]), self.resize_method)
        h = self.stem(jnp.concatenate([x.astype(jnp.float32), lowres_up], axis=-1),
                      self.stem_channels)
        stem = h

        skips = []
        for level, (ch, _) in enumerate(self.blocks):
            # DBlock: downsample first, then convolve at the lower resolution (Fig. A.28).
            h = Conv(ch, 3, strides=2, name=f"down_{level}_downsample", **kw)(h)
            h = CombineEmbs(self.num_groups, name=f"down_{level}_combine_embs", **kw)(h, emb)
            h = stage(h, level, "down")
            skips.append(h)

        for level in reversed(range(num_levels)):
            skip = skips.pop()
            h = CombineEmbs(self.num_groups, name=f"up_{level}_combine_embs", **kw)(h, emb)
            if level != num_levels - 1:  # the lowest UBlock continues from its own DBlock
                h = jnp.concatenate([h, skip * self.skip_scale], axis=-1)
            h = stage(h, level, "up")
            # UBlock: convolve, then upsample to the next resolution (Fig. A.29).
            out_ch = self.blocks[level - 1][0] if level else self.stem_channels
            h = Conv(out_ch, 3, name=f"up_{level}_upsample", **kw)(upsample_nearest(h))

        return self.head(jnp.concatenate([h, stem * self.skip_scale], axis=-1))
