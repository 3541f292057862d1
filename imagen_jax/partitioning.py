"""Device mesh and logical-axis sharding shared by every model in the project.

Parameters are annotated with *logical* axis names (``embed``, ``heads``, ``conv_out`` ...) via
``flax.linen.with_logical_partitioning``; a list of rules maps logical names to the mesh axes
``(data, fsdp, tensor)``. Changing the parallelism strategy means changing the rules, not the
models (the t5x / maxdiffusion approach).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# Mesh axes the batch dimension is split over.
BATCH_AXES = ("data", "fsdp")

LogicalRules = Sequence[tuple[str, Any]]

# Pure data parallel: parameters replicated, batch split over (data, fsdp).
DATA_PARALLEL_RULES: LogicalRules = (("batch", BATCH_AXES),)

# FSDP: the largest parameter dimension of every weight split over `fsdp`.
FSDP_RULES: LogicalRules = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("conv_out", "fsdp"),
    ("vocab", "fsdp"),
)

# FSDP + tensor (Megatron-style) parallelism.
FSDP_TENSOR_RULES: LogicalRules = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("conv_out", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("conv_in", "tensor"),
)


@gin.configurable
def logical_axis_rules(rules: LogicalRules = DATA_PARALLEL_RULES) -> tuple[tuple[str, Any], ...]:
    """The operative logical->mesh rules; bind `logical_axis_rules.rules` in gin."""
    return tuple((name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in rules)


@gin.configurable
def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (all devices by default).

    One axis may be -1: it takes whatever the others leave.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    n_fill = sum(1 for s in sizes if s == -1)
    if n_fill > 1:
        raise ValueError(
            f"make_mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}"
        )
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
        raise ValueError(
            f"make_mesh: mesh {dict(zip(MESH_AXES, sizes))} does not divide the {len(devices)} "
            "available devices; choose axis sizes whose product divides the device count "
            "(use -1 on one axis to fill the rest)."
        )
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"make_mesh: mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices but "
            f"{len(devices)} are available; make the product equal the device count or use -1."
        )
    try:
        device_grid = jax.experimental.mesh_utils.create_device_mesh(sizes, devices)
    except Exception:  # noqa: BLE001 - odd topologies: plain reshape is always valid
        device_grid = np.asarray(devices).reshape(sizes)
    return Mesh(device_grid, MESH_AXES)


def mesh_context(mesh: Mesh):
    """Context that makes ``mesh`` current for jit and logical constraints.

    ``jax.set_mesh`` where available: the legacy ``with mesh:`` silently drops
    ``nn.with_logical_constraint`` inside jit on recent JAX.
    """
    return jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else mesh


def logical_specs(abstract_tree: Any) -> Any:
    """Logical PartitionSpecs of a tree holding ``nn.LogicallyPartitioned`` boxes."""
    return nn.get_partition_spec(abstract_tree)


def logical_to_shardings(logical_spec_tree: Any, mesh: Mesh, rules: LogicalRules) -> Any:
    """Maps a tree of logical PartitionSpecs to ``NamedSharding``s on ``mesh``."""
    return nn.logical_to_mesh_sharding(logical_spec_tree, mesh, tuple(rules))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Sharding for an array whose leading axis is the batch."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(axes, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def sharded_init(
    init_fn: Callable[..., Any],
    mesh: Mesh,
    rules: LogicalRules,
    *args: Any,
) -> tuple[Any, Any]:
    """Initialises ``init_fn(*args)`` directly into its shards; returns (tree, shardings).

    ``jax.eval_shape`` -> logical specs -> mesh shardings -> ``jax.jit(out_shardings=...)``: the
    full tree is never materialised on one device. Returned arrays are unboxed (plain arrays).
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = logical_to_shardings(logical_specs(abstract), mesh, rules)

    def _init(*a):
        return nn.meta.unbox(init_fn(*a))

    with mesh_context(mesh), nn.logical_axis_rules(tuple(rules)):
        tree = jax.jit(_init, out_shardings=shardings)(*args)
    return tree, shardings
