"""Exported stages: a trained stage's EMA parameters and its record, small enough to ship.

A trainer workdir holds orbax checkpoints of the whole training state (parameters, EMA, optimizer
moments, data-iterator position): about four times the parameters in float32. To sample, only the
EMA parameters and the stage record are needed. An exported stage is a directory with

* ``stage.json``: ``{"format": EXPORT_FORMAT, "stage": Stage.to_dict(), "step": int,
  "dtype": "float16" | "bfloat16" | "float32"}``;
* ``params.safetensors``: the EMA parameters, one tensor per leaf, keyed by the leaf's path in
  the parameter tree joined with ``/``, stored in ``dtype`` and read back as float32.

`load_cascade` takes such a directory wherever it takes a trainer workdir. ``make demo`` ships a
pretrained demo cascade in this form (`launch/demo_cascade/`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy, so safetensors reads/writes BF16
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from imagen_jax import partitioning
from imagen_jax.cascade.params import sharded_abstract_params
from imagen_jax.errors import CheckpointError
from imagen_jax.stage import Stage

PyTree = Any

EXPORT_FORMAT = "imagen-jax-stage-export-1"
STAGE_FILE = "stage.json"
PARAMS_FILE = "params.safetensors"
EXPORT_DTYPES = ("float16", "bfloat16", "float32")


def is_exported_stage(path: str) -> bool:
    """True for a directory written by `export_stage` (it holds ``stage.json``)."""
    return os.path.isfile(os.path.join(path, STAGE_FILE))


def export_stage(stage: Stage, params: PyTree, out_dir: str, *, step: int,
                 dtype: str = "float16") -> int:
    """Writes ``stage`` and its ``params`` (e.g. `load_stage`'s EMA parameters) to ``out_dir``.

    ``dtype`` float16 halves the size; the demo's parameters are all well inside its range (a
    leaf that is not, or is not finite, raises CheckpointError rather than being stored as inf).
    Returns the bytes written. Raises ValueError for an unknown ``dtype``.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r} is not one of {EXPORT_DTYPES}")
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    tensors = {}
    for key, value in flat.items():
        value = np.asarray(value, np.float32)
        with np.errstate(over="ignore"):  # an overflow is reported below, with its name
            stored = value.astype(dtype)
        if not np.isfinite(stored).all():
            raise CheckpointError(f"parameter {key!r} of stage {stage.name!r} is not finite in "
                                  f"{dtype} (max |x| {np.abs(value).max():.3g}); export float32")
        tensors[key] = np.ascontiguousarray(stored)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, PARAMS_FILE))
    record = {"format": EXPORT_FORMAT, "stage": stage.to_dict(), "step": int(step), "dtype": dtype}
    with open(os.path.join(out_dir, STAGE_FILE), "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    return sum(os.path.getsize(os.path.join(out_dir, n)) for n in (PARAMS_FILE, STAGE_FILE))


def read_export_record(path: str) -> dict[str, Any]:
    """The ``stage.json`` of an `export_stage` directory: {format, stage, step, dtype}.

    Raises CheckpointError (one line) if it is missing, unreadable or of another format.
    """
    stage_file = os.path.join(path, STAGE_FILE)
    try:
        with open(stage_file) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{stage_file}: cannot read the exported stage record ({e})") from e
    if not isinstance(record, dict) or record.get("format") != EXPORT_FORMAT:
        got = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise CheckpointError(f"{stage_file}: format {got!r}, expected {EXPORT_FORMAT!r}; "
                              "write it with imagen_jax.cascade.export_stage")
    return record


def load_exported_stage(path: str, *, mesh: Mesh, rules: partitioning.LogicalRules,
                        name: str | None = None) -> tuple[Stage, PyTree]:
    """(Stage, float32 parameters sharded on ``mesh``) from an `export_stage` directory.

    Raises CheckpointError (one line) for a missing or unreadable file, another format, or a
    parameter that is missing, extra or of the wrong shape for the recorded stage's model.
    """
    record = read_export_record(path)
    stage_file = os.path.join(path, STAGE_FILE)
    stage = Stage.from_dict(record["stage"], where=stage_file).replace(
        name=name or os.path.basename(os.path.normpath(path)))
    params_file = os.path.join(path, PARAMS_FILE)
    try:
        tensors = load_file(params_file)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{params_file}: cannot read the exported parameters ({e}); "
                              "export the stage again") from e
    abstract = traverse_util.flatten_dict(sharded_abstract_params(stage, mesh, rules), sep="/")
    missing = sorted(set(abstract) - set(tensors))
    extra = sorted(set(tensors) - set(abstract))
    if missing or extra:
        raise CheckpointError(
            f"{params_file}: parameters do not match stage {stage.name!r}'s model "
            f"(missing {missing[:3]}, unexpected {extra[:3]}); export the stage again")
    out = {}
    for key, target in abstract.items():
        value = tensors[key]
        if value.shape != target.shape:
            raise CheckpointError(f"{params_file}: parameter {key!r} has shape {value.shape}, the "
                                  f"model's is {target.shape}; export the stage again")
        out[key] = jax.device_put(value.astype(target.dtype), target.sharding)
    return stage, traverse_util.unflatten_dict(out, sep="/")
