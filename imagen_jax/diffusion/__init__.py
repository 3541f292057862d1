"""imagen_jax.diffusion."""
