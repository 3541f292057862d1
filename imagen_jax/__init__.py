"""imagen-jax: Imagen (Saharia et al. 2022) cascaded text-to-image diffusion in JAX/Flax."""

__version__ = "0.1.0"
