"""Exported stages (`imagen_jax.cascade.export`): the EMA parameters and the stage record in a
small directory that `load_cascade` reads like a trainer workdir (the pretrained demo cascade is
shipped this way). Values must come back as the stored dtype rounds them, on any mesh; damaged
exports are refused in one line."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from imagen_jax import cascade, partitioning
from imagen_jax.cascade import export
from imagen_jax.errors import CheckpointError
from tests.test_stage_record import build_sr_stage

RULES = tuple(partitioning.logical_axis_rules())


@pytest.fixture
def gin_stage():
    return build_sr_stage()


def _flat(params) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in
            traverse_util.flatten_dict(jax.device_get(params), sep="/").items()}


def _export(stage, path, dtype="float16", seed=0):
    params = cascade.random_params(stage, seed=seed)
    size = cascade.export_stage(stage, params, str(path), step=7, dtype=dtype)
    return params, size


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_an_exported_stage_loads_on_a_sharded_mesh_as_its_dtype_rounds_it(tmp_path, gin_stage,
                                                                           dtype):
    params, size = _export(gin_stage, tmp_path / "sr", dtype)
    assert cascade.is_exported_stage(str(tmp_path / "sr"))
    n = sum(x.size for x in _flat(params).values())
    assert size > n * np.dtype(dtype).itemsize  # every parameter stored, at its width
    assert size < n * np.dtype(dtype).itemsize + 200_000  # and nothing else of weight
    mesh = partitioning.make_mesh(2, 2, 2)
    stage, loaded = cascade.load_exported_stage(str(tmp_path / "sr"), mesh=mesh, rules=RULES)
    assert stage == gin_stage.replace(name="sr")
    want, got = _flat(params), _flat(loaded)
    assert sorted(want) == sorted(got)
    for key, value in want.items():
        assert got[key].dtype == value.dtype
        np.testing.assert_array_equal(got[key], value.astype(dtype).astype(value.dtype), key)
    record = json.loads((tmp_path / "sr" / export.STAGE_FILE).read_text())
    assert record["step"] == 7 and record["dtype"] == dtype


def test_damaged_exports_are_refused_in_one_line(tmp_path, gin_stage):
    mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])

    def refused(path, match):
        with pytest.raises(CheckpointError, match=match) as e:
            cascade.load_exported_stage(str(path), mesh=mesh, rules=RULES)
        assert "\n" not in str(e.value)

    _export(gin_stage, tmp_path / "ok")
    tensors = load_file(str(tmp_path / "ok" / export.PARAMS_FILE))
    record = json.loads((tmp_path / "ok" / export.STAGE_FILE).read_text())

    def variant(name, *, tensors=tensors, record=record):
        os.makedirs(tmp_path / name)
        save_file(tensors, str(tmp_path / name / export.PARAMS_FILE))
        (tmp_path / name / export.STAGE_FILE).write_text(json.dumps(record))
        return tmp_path / name

    key = sorted(tensors)[0]
    refused(variant("missing", tensors={k: v for k, v in tensors.items() if k != key}),
            f"missing \\['{key}'\\]")
    refused(variant("extra", tensors={**tensors, "head/w": np.zeros(2, np.float16)}),
            "unexpected \\['head/w'\\]")
    refused(variant("shape", tensors={**tensors, key: np.zeros((3,), np.float16)}),
            f"parameter '{key}' has shape \\(3,\\)")
    refused(variant("format", record={**record, "format": "orbax"}),
            "format 'orbax', expected")
    truncated = variant("truncated")
    data = (truncated / export.PARAMS_FILE).read_bytes()
    (truncated / export.PARAMS_FILE).write_bytes(data[: len(data) // 2])
    refused(truncated, "cannot read the exported parameters")
    (truncated / export.STAGE_FILE).write_text("{")
    refused(truncated, "cannot read the exported stage record")


def test_a_parameter_float16_cannot_hold_is_refused_not_stored_as_inf(tmp_path, gin_stage):
    params = cascade.random_params(gin_stage, seed=0)
    flat = traverse_util.flatten_dict(params, sep="/")
    key = sorted(flat)[0]
    flat[key] = np.full_like(flat[key], 1e6)
    params = traverse_util.unflatten_dict(flat, sep="/")
    with pytest.raises(CheckpointError, match=f"parameter '{key}'.*not finite in float16"):
        cascade.export_stage(gin_stage, params, str(tmp_path / "x"), step=1)
    cascade.export_stage(gin_stage, params, str(tmp_path / "x"), step=1, dtype="float32")
