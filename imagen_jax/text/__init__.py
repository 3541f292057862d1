"""imagen_jax.text."""
