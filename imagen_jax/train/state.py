"""The train state (a pure pytree) and its sharded initialisation.

`init_train_state` follows the t5x recipe: `jax.eval_shape` of the initialiser gives the abstract
state with logical axis names on the parameters; the names map through the gin rules to mesh
shardings; `jax.jit(init, out_shardings=...)` then creates every array directly in its shards, so
a 2 B-parameter model is never materialised on one device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from imagen_jax import partitioning
from imagen_jax.stage import Stage, model_inputs


@flax.struct.dataclass
class TrainState:
    """Everything a training run needs to continue bit-exactly.

    Attributes:
      step: int32 [] number of train steps taken (= batches consumed), skipped ones included.
      params: float32 master parameters.
      ema_params: exponential moving average of `params` (used for sampling).
      opt_state: optax state.
      rng: uint32 [2] base key; step `n` uses `fold_in(rng, n)`, so resuming replays the same noise.
      bad_steps: int32 [] consecutive steps skipped for a non-finite loss or gradient.
      skipped_steps: int32 [] total skipped steps (the optimizer applied step - skipped updates).
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array
    bad_steps: jax.Array
    skipped_steps: jax.Array


def _opt_state_shardings(abstract_opt_state: Any, params_shardings: Any, abstract_params: Any,
                         mesh: Mesh) -> Any:
    """Shards optimizer slots like their parameters; replicates everything else.

    Any subtree of the optimizer state with the parameters' tree structure holds per-parameter
    slots (Adam's mu/nu, Adafactor's v); a slot with its parameter's shape takes the parameter's
    sharding, a factored one (Adafactor's row/column statistics, far smaller) is replicated.
    """
    params_def = jax.tree_util.tree_structure(abstract_params)
    replicated = NamedSharding(mesh, PartitionSpec())

    def is_params_like(x):
        return jax.tree_util.tree_structure(x) == params_def

    def shard(sub):
        if is_params_like(sub) and params_def.num_leaves > 0:
            return jax.tree.map(
                lambda slot, p, s: s if slot.shape == p.shape else replicated,
                sub, abstract_params, params_shardings,
            )
        return jax.tree.map(lambda _: replicated, sub)

    return jax.tree.map(shard, abstract_opt_state, is_leaf=is_params_like)


def init_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    stage: Stage,
    seed: int,
    mesh: Mesh,
    rules: partitioning.LogicalRules,
    params: Any | None = None,
) -> tuple[TrainState, TrainState]:
    """Initialises the state directly into its shards; returns (state, state shardings).

    ``params`` (e.g. imported weights, already sharded like the state's params) replaces the
    random initialisation: params and EMA both start from them, the optimizer from scratch.
    """
    init_fn, shardings = _state_init_fn_and_shardings(model, tx, stage, mesh, rules)
    with partitioning.mesh_context(mesh), nn.logical_axis_rules(tuple(rules)):
        init = jax.jit(init_fn, out_shardings=shardings, compiler_options=_init_compiler_options())
        state = init(jnp.asarray(seed, jnp.uint32), params)
    return state, shardings


# XLA's CPU backend spends most of a small model's start-up compiling the initialiser at full
# LLVM optimisation (one unrolled threefry per parameter: 14 of the learning guard's 33 s of
# compilation). The initialiser runs once, so it is compiled without backend optimisation there
# (14 s -> 5 s). The random bits are the same; the normal samplers' float arithmetic is contracted
# differently, so ~3% of the initial values differ in their last bits
# (tests/test_train_sharding.py).
_CPU_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0,
                              "xla_llvm_disable_expensive_passes": True}


def _init_compiler_options() -> dict[str, Any] | None:
    return _CPU_INIT_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None


def abstract_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    stage: Stage,
    mesh: Mesh,
    rules: partitioning.LogicalRules,
) -> tuple[TrainState, TrainState]:
    """(abstract state of `jax.ShapeDtypeStruct`s carrying shardings, state shardings)."""
    init_fn, shardings = _state_init_fn_and_shardings(model, tx, stage, mesh, rules)
    abstract = jax.eval_shape(init_fn, jnp.asarray(0, jnp.uint32))
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return abstract, shardings


def _state_init_fn_and_shardings(
    model: nn.Module,
    tx: optax.GradientTransformation,
    stage: Stage,
    mesh: Mesh,
    rules: partitioning.LogicalRules,
) -> tuple[Callable[[jax.Array], TrainState], TrainState]:
    inputs = model_inputs(stage)

    def init_params(seed):
        rng = jax.random.PRNGKey(seed)
        variables = model.init({"params": jax.random.fold_in(rng, 1)}, **inputs)
        return variables["params"]

    with nn.logical_axis_rules(tuple(rules)):
        boxed = jax.eval_shape(init_params, jnp.asarray(0, jnp.uint32))
    params_shardings = partitioning.logical_to_shardings(
        partitioning.logical_specs(boxed), mesh, rules
    )
    abstract_params = nn.meta.unbox(boxed)
    abstract_opt_state = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = _opt_state_shardings(
        abstract_opt_state, params_shardings, abstract_params, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = TrainState(
        step=replicated,
        params=params_shardings,
        ema_params=params_shardings,
        opt_state=opt_shardings,
        rng=replicated,
        bad_steps=replicated,
        skipped_steps=replicated,
    )

    def init_fn(seed, params=None):
        if params is None:
            params = nn.meta.unbox(init_params(seed))
        params = jax.tree.map(lambda p: p.astype(jnp.float32), params)  # float32 master copy
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=params,
            opt_state=tx.init(params),
            rng=jax.random.fold_in(jax.random.PRNGKey(seed), 2),
            bad_steps=jnp.zeros((), jnp.int32),
            skipped_steps=jnp.zeros((), jnp.int32),
        )

    return init_fn, shardings


def param_shapes(params: Any) -> dict[str, list[int]]:
    """{'/'-joined path: shape}: the model's signature, stored with every checkpoint."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {
        "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): list(np.shape(v))
        for path, v in flat
    }


def count_params(params: Any) -> int:
    return int(sum(np.prod(np.shape(p)) for p in jax.tree.leaves(params)))
