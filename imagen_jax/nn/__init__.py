"""imagen_jax.nn: the Imagen U-Nets (flax linen), gin-configurable as ``BaseUNet.*`` and
``EfficientUNet.*``; their sizes live in gin_configs/models/*.gin (paper) and
gin_configs/tiny/models/*.gin (CPU)."""

from imagen_jax.nn.base_unet import BaseUNet
from imagen_jax.nn.efficient_unet import EfficientUNet

__all__ = ["BaseUNet", "EfficientUNet"]
