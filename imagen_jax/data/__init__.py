"""imagen_jax.data."""
