"""Parameters of a stage for sampling: their shardings, abstract shapes and random values.

The abstract tree comes from `imagen_jax.stage.abstract_params`, the same init the trainer uses.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from imagen_jax import partitioning
from imagen_jax.stage import Stage, abstract_params, model_inputs

PyTree = Any


def param_shardings(
    stage: Stage,
    mesh: Mesh,
    rules: partitioning.LogicalRules,
    params: PyTree | None = None,
) -> PyTree:
    """NamedShardings for ``stage``'s parameters from the model's logical axis annotations
    (the trainer's shardings; replicated for a ``params`` tree of another structure)."""
    abstract = abstract_params(stage)
    shardings = _shardings(abstract, mesh, rules)
    if params is not None:
        ref = jax.tree_util.tree_structure(params)
        got = jax.tree_util.tree_structure(nn.meta.unbox(abstract))
        if ref != got:
            # A custom tree: fall back to replication (still correct).
            return jax.tree_util.tree_map(lambda _: partitioning.replicated(mesh), params)
    return shardings


def sharded_abstract_params(stage: Stage, mesh: Mesh, rules: partitioning.LogicalRules) -> PyTree:
    """ShapeDtypeStructs of ``stage``'s parameters carrying their shardings (an orbax restore
    target), from one trace of the model's init."""
    abstract = abstract_params(stage)
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.meta.unbox(abstract), _shardings(abstract, mesh, rules))


def _shardings(abstract: PyTree, mesh: Mesh, rules: partitioning.LogicalRules) -> PyTree:
    return partitioning.logical_to_shardings(partitioning.logical_specs(abstract), mesh, rules)


def random_params(stage: Stage, seed: int = 0) -> PyTree:
    """Cheap random parameters of the right tree and shapes, without compiling the model's init.

    Kernels ~ N(0, 1/fan_in), norm scales 1, biases 0 (LeCun-style; enough for an untrained
    cascade in tests, benchmarks and the notebook). Use ``init_params`` for flax's exact init.
    """
    abstract = nn.meta.unbox(abstract_params(stage))
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        if "scale" in name:
            return np.ones(x.shape, x.dtype)
        if "bias" in name or x.ndim <= 1:
            return np.zeros(x.shape, x.dtype)
        fan_in = int(np.prod(x.shape[:-1]))
        return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def init_params(stage: Stage, rng: jax.Array) -> PyTree:
    """flax's own initialisation of ``stage``'s parameters (compiled; the trainer's init)."""
    init = jax.jit(lambda key: stage.model.init(key, **model_inputs(stage))["params"])
    return nn.meta.unbox(init(rng))
