"""The stage record every checkpoint stores (issue 17, point 2): `Stage.to_dict` / `from_dict`
rebuild the stage without gin; a checkpoint without a record, or with one of another format, is
refused in one line."""

from __future__ import annotations

import json

import gin
import jax
import jax.numpy as jnp
import pytest

from imagen_jax import cascade, gin_utils, partitioning
from imagen_jax.errors import CheckpointError, ConfigError, ImagenError
from imagen_jax.stage import RECORD_FORMAT, Stage
from imagen_jax.train.checkpoint import CheckpointConfig, Checkpointer
from imagen_jax.train.state import TrainState, param_shapes

# A stage as the tiny SR gin file builds it, with non-default settings everywhere.
SR_BINDINGS = [
    "include 'tiny/models/tiny_sr.gin'",
    "Stage.model = %MODEL",
    "Stage.resolution = %RESOLUTION",
    "Stage.lowres_resolution = %LOWRES_RESOLUTION",
    "Stage.train_crop = %TRAIN_RESOLUTION",
    "Stage.text_embed_dim = %TEXT_EMBED_DIM",
    "Stage.schedule = 'shifted_cosine'",
    "Stage.schedule_kwargs = {'shift': 2.0}",
    "Stage.prediction = 'v'",
    "Stage.train_aug_max = 0.4",
    "SamplingConfig.sampler = 'dpmpp_2m'",
    "SamplingConfig.num_steps = 12",
    "SamplingConfig.aug_level = 0.2",
    "EfficientUNet.dtype = 'bfloat16'",
]


def build_sr_stage() -> Stage:
    """The stage `SR_BINDINGS` builds (gin cleared before and after)."""
    gin_utils.register_all()
    gin.clear_config()
    try:
        gin_utils.parse(bindings=SR_BINDINGS, finalize=False)
        return Stage()
    finally:
        gin.clear_config()


@pytest.fixture
def gin_stage() -> Stage:
    return build_sr_stage()


def test_record_rebuilds_the_gin_built_stage_without_gin(gin_stage):
    assert gin_stage.sampling.sampler == "dpmpp_2m" and gin_stage.train_crop == 32
    record = json.loads(json.dumps(gin_stage.to_dict()))  # what the checkpoint's JSON holds
    assert record["format"] == RECORD_FORMAT
    assert record["model"]["class"] == "EfficientUNet"
    assert record["sampling"]["num_steps"] == 12
    gin.clear_config()  # nothing bound: every value comes from the record
    rebuilt = Stage.from_dict(record)
    assert rebuilt == gin_stage
    assert rebuilt.model.blocks == gin_stage.model.blocks  # tuples again, not JSON lists
    assert rebuilt.get_schedule() == gin_stage.get_schedule()


def test_records_of_another_format_or_with_unknown_fields_are_refused(gin_stage):
    record = gin_stage.to_dict()
    with pytest.raises(CheckpointError, match="stage record format 0, this imagen-jax reads "
                       f"format {RECORD_FORMAT}"):
        Stage.from_dict({**record, "format": 0})
    with pytest.raises(CheckpointError, match=r"unknown stage fields \['colour'\]"):
        Stage.from_dict({**record, "colour": "red"})
    with pytest.raises(CheckpointError, match="model class 'Transformer' cannot be imported"):
        Stage.from_dict({**record, "model": {"class": "Transformer", "fields": {}}})
    with pytest.raises(CheckpointError, match="model class '__main__:Net' cannot be imported"):
        Stage.from_dict({**record, "model": {"class": "__main__:Net", "fields": {}}})
    # Damaged (hand-edited) records: one line naming the record, no traceback from inside.
    no_model = {k: v for k, v in record.items() if k != "model"}
    with pytest.raises(CheckpointError, match="unusable stage record"):
        Stage.from_dict(no_model)
    typo = {**record, "sampling": {**record["sampling"], "guidence_weight": 2.0}}
    with pytest.raises(CheckpointError, match="unusable stage record.*guidence_weight"):
        Stage.from_dict(typo)
    nan = {**record, "sampling": {**record["sampling"], "guidance_weight": float("nan")}}
    with pytest.raises(CheckpointError, match=r"stage record: unusable stage record: "
                       r"SamplingConfig\.guidance_weight=nan"):
        Stage.from_dict(nan)


def test_a_checkpoint_without_a_stage_record_is_refused_in_one_line(tmp_path, gin_stage):
    """Checkpoints written before the record existed (gin config only): one line, no gin."""
    stage = gin_stage.replace(model=gin_stage.model.clone(dtype="float32"))
    params = jax.tree.map(jnp.asarray, cascade.random_params(stage, seed=0))
    state = TrainState(step=jnp.asarray(1, jnp.int32), params=params, ema_params=params,
                       opt_state={}, rng=jax.random.PRNGKey(0),
                       bad_steps=jnp.zeros((), jnp.int32), skipped_steps=jnp.zeros((), jnp.int32))
    ckpt = Checkpointer(str(tmp_path), CheckpointConfig(save_every=1, keep=1, keep_period=None,
                                                        async_save=False))
    ckpt.save(1, state, None, {"operative_config": "Stage.resolution = 64",
                               "param_shapes": param_shapes(params)}, force=True)
    ckpt.close()
    mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with pytest.raises(ImagenError, match="holds no stage record") as e:
        cascade.load_stage(str(tmp_path), mesh=mesh, rules=())
    assert isinstance(e.value, CheckpointError) and "\n" not in str(e.value)


def test_a_base_stage_refuses_an_aug_level_it_would_ignore(gin_stage):
    """A base stage has no low-res input: an aug_level would be recorded (and reported in
    samples.json) yet change nothing. Refused in one line; records written before the rule load
    with the level they actually sampled at (0)."""
    with pytest.raises(ConfigError, match=r"stage 'base64': SamplingConfig.aug_level=0.2 on a "
                       "base stage") as e:  # the SR stage's 0.2 is meaningless without lowres
        gin_stage.replace(lowres_resolution=None, train_crop=None, name="base64")
    assert "leave it 0" in str(e.value).splitlines()[0]  # (gin appends its call site below)
    base = gin_stage.replace(lowres_resolution=None, train_crop=None,
                             sampling=gin_stage.sampling.replace(aug_level=0.0))
    with pytest.raises(ConfigError, match="aug_level=0.3 on a base stage"):
        base.with_sampling(aug_level=0.3)
    old = base.to_dict()
    old["sampling"]["aug_level"] = 0.3  # as a base record could hold before the rule
    assert Stage.from_dict(old).sampling.aug_level == 0.0
    assert Stage.from_dict(gin_stage.to_dict()).sampling.aug_level == pytest.approx(0.2)
