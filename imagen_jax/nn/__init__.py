"""imagen_jax.nn: the Imagen U-Nets (flax linen) and their gin presets."""

from imagen_jax.nn.base_unet import BaseUNet
from imagen_jax.nn.efficient_unet import EfficientUNet
from imagen_jax.nn.presets import base_2b, sr256_600m, sr1024_400m, tiny_base, tiny_sr

__all__ = ["BaseUNet", "EfficientUNet", "base_2b", "sr256_600m", "sr1024_400m", "tiny_base",
           "tiny_sr"]
