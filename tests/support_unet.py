"""Helpers shared by the U-Net tests. Not a test module."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def random_params(model: nn.Module, args: Sequence[Any], seed: int = 1) -> Any:
    """Random parameters with the model's tree structure, none zero (so zero-initialised output
    layers do not hide anything). Shapes come from eval_shape and values from numpy: compiling
    the real init costs tens of seconds on a shared CPU and is exercised once, in test_unet.

    ``args`` are the model's positional call arguments; returns the float32 "params" tree
    (norm scales ~1 +- 0.05, biases ~0.05 * N(0, 1), kernels N(0, 1 / fan_in)).
    """
    abstract = jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a), *args)
    rng = np.random.default_rng(seed)

    def sample(path, leaf):
        name = str(getattr(path[-1], "key", ""))
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if name == "scale":
            return jnp.asarray(1.0 + 0.05 * noise)
        if name == "bias":
            return jnp.asarray(0.05 * noise)
        fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 1
        return jnp.asarray(noise / np.sqrt(fan_in))

    return jax.tree_util.tree_map_with_path(sample, nn.meta.unbox(abstract)["params"])
