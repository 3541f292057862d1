"""imagen_jax.nn: the Imagen U-Nets (flax linen), gin-configurable as ``BaseUNet.*`` and
``EfficientUNet.*``; their sizes live in gin_configs/models/*.gin (paper) and
gin_configs/tiny/models/*.gin (CPU). DeepFloyd IF's U-Nets (`IFUNet`) are built from their
diffusers config.json (`IFUNetConfig`, `read_if_config`) and weights (`load_if_unet`)."""

from imagen_jax.nn.base_unet import BaseUNet
from imagen_jax.nn.efficient_unet import EfficientUNet
from imagen_jax.nn.if_config import IFUNetConfig, read_if_config
from imagen_jax.nn.if_unet import IFUNet
from imagen_jax.nn.if_weights import load_if_unet

__all__ = ["BaseUNet", "EfficientUNet", "IFUNet", "IFUNetConfig", "load_if_unet",
           "read_if_config"]
