"""Noise conditioning augmentation for super-resolution stages (Imagen Sec. 2.5, App. B.1).

The low-resolution conditioning image is corrupted with the same variance-preserving Gaussian
process as the diffusion itself, at level ``aug_level`` in [0, 1] (used as a diffusion time):
random during training, fixed at sampling (0 gives the best FID, 0.1-0.3 the best-looking
samples). The caller passes ``aug_level`` to the model as well, so it knows how noisy its input is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imagen_jax.diffusion.predictions import diffuse
from imagen_jax.diffusion.schedules import Schedule

Array = jax.Array
ArrayLike = jax.typing.ArrayLike


def noise_augment(lowres: Array, aug_level: ArrayLike, rng: Array, schedule: Schedule) -> Array:
    """``alpha(aug) lowres + sigma(aug) eps``; lowres [B, h, w, C], aug_level [B] or scalar."""
    aug_level = jnp.asarray(aug_level, jnp.float32)
    if aug_level.ndim == 0:
        aug_level = jnp.full((lowres.shape[0],), aug_level)
    eps = jax.random.normal(rng, lowres.shape, jnp.promote_types(lowres.dtype, jnp.float32))
    return diffuse(lowres, eps, aug_level, schedule).astype(lowres.dtype)


def random_aug_level(
    rng: Array, batch_size: int, min_level: float = 0.0, max_level: float = 1.0
) -> Array:
    """Training augmentation levels ~ U(min_level, max_level), float32 [B] (paper: U(0, 1))."""
    if not 0.0 <= min_level <= max_level <= 1.0:
        raise ValueError(
            f"need 0 <= min_level <= max_level <= 1, got min_level={min_level}, "
            f"max_level={max_level}"
        )
    return jax.random.uniform(rng, (batch_size,), jnp.float32, min_level, max_level)
