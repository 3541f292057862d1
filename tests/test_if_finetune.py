"""Fine-tuning a DeepFloyd IF stage through our trainer (issue 18, must-show 5).

A tiny random diffusers ``UNet2DConditionModel`` with IF-I's options (the network of
gin_configs/if/models/tiny_if_I.gin) is saved with ``save_pretrained``; ``launch.train`` on
gin_configs/if/tiny_stage_I.gin imports it (``TrainConfig.init_from="if:PATH"``) and fine-tunes
it as a discrete stage (integer t, the empty prompt as the dropped condition, the hybrid loss).
A run killed with SIGKILL and restarted ends bit-identical to an uninterrupted one (params, EMA,
optimizer state); its loss is finite and the variance channels of the output head move. The
in-process tests cover the discrete step's inputs (stage II: upsampled, integer-level low-res),
that params and EMA start from the imported weights, and the one-line refusals.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import gin_utils, partitioning
from imagen_jax.cascade.loading import load_stage
from imagen_jax.data.embed_cache import masked_encode_fn
from imagen_jax.diffusion import IF_STAGE_I_SAMPLING, IF_STAGE_II_SAMPLING
from imagen_jax.errors import CheckpointError, ConfigError
from imagen_jax.nn import IFUNetConfig, load_if_unet, read_if_config
from imagen_jax.stage import Stage, model_inputs
from imagen_jax.train import optim, state, step, trainer
from imagen_jax.train.testing import synthetic_data, tiny_test_stage
from tests.support import REPO, leaves_equal, subprocess_env
from tests.test_cascade_if import STAGE_I as CASCADE_STAGE_I
from tests.test_cascade_if import STAGE_II as CASCADE_STAGE_II
from tests.test_cascade_if import save_if_model

# diffusers configs of the networks gin_configs/if/models/tiny_if_{I,II}.gin bind: the cascade
# test's IF-shaped configs at 16 / 64 px with 32-wide text.
STAGE_I = dict(CASCADE_STAGE_I, sample_size=16, encoder_hid_dim=32)
STAGE_II = dict(CASCADE_STAGE_II, sample_size=64, encoder_hid_dim=32)
TEXT_LENGTH = 8
GIN_I, GIN_II = "gin_configs/if/tiny_stage_I.gin", "gin_configs/if/tiny_stage_II.gin"
# Synthetic in-memory data (its iterator provides the "empty prompt" embedding), no T5.
SYNTHETIC = [
    "--gin.train.data_fn=@synthetic_data", "--gin.train.text_encoder=None",
    f"--gin.TEXT_LENGTH={TEXT_LENGTH}", f"--gin.synthetic_data.text_length={TEXT_LENGTH}",
    "--gin.synthetic_data.text_embed_dim=32", "--gin.TrainConfig.progress_bar=False",
    "--gin.TrainConfig.log_every=1", "--gin.TrainConfig.batch_size=4",
]
STEPS = ["--gin.TrainConfig.num_steps=4", "--gin.CheckpointConfig.save_every=2",
         "--gin.CheckpointConfig.keep=10"]


@pytest.fixture(scope="module")
def if_dir(tmp_path_factory):
    return save_if_model(STAGE_I, tmp_path_factory.mktemp("IF-I-tiny"), seed=0)


def _gin_stage(gin_file: str, *bindings: str) -> Stage:
    gin.clear_config()
    try:
        gin_utils.parse([gin_file], [f"TEXT_LENGTH = {TEXT_LENGTH}", *bindings])
        return gin.get_configurable("Stage")()
    finally:
        gin.clear_config()


# ---- In-process: the gin configs, the discrete step, the imported start, the refusals.


def test_the_tiny_if_gin_configs_are_the_diffusers_networks():
    for gin_file, config in ((GIN_I, STAGE_I), (GIN_II, STAGE_II)):
        stage = _gin_stage(gin_file)
        assert stage.is_discrete and stage.sampling.sampler == "learned_range"
        assert stage.model.config == IFUNetConfig.from_diffusers(json.loads(json.dumps(config)))
        assert stage.resolution == config["sample_size"]


def test_the_real_weight_if_configs_build_the_published_networks(if_dir, tmp_path):
    """gin_configs/if/stage_{I,II}.gin (for IF's published weights) build the network the
    directory's config.json describes, start from its weights and encode 77 tokens on the fly
    with padding kept; sampling settings are IF's pipelines'."""
    sr_dir = save_if_model(STAGE_II, tmp_path, seed=1)
    cases = (("gin_configs/if/stage_I.gin", if_dir, IF_STAGE_I_SAMPLING),
             ("gin_configs/if/stage_II.gin", sr_dir, IF_STAGE_II_SAMPLING))
    for gin_file, model_dir, sampling in cases:
        gin.clear_config()
        try:
            gin_utils.parse([gin_file], [f"IF_WEIGHTS = 'if:{model_dir}'"])
            with pytest.raises(ConfigError, match="set TEXT_EMBED_DIM = 32"):  # tiny: 32 wide
                gin.get_configurable("Stage")()
            gin.clear_config()
            gin_utils.parse([gin_file], [f"IF_WEIGHTS = 'if:{model_dir}'", "TEXT_EMBED_DIM = 32"])
            stage = gin.get_configurable("Stage")()
            config = trainer.TrainConfig()
            zero_padding = gin.query_parameter("load_t5.zero_padding")
        finally:
            gin.clear_config()
        assert stage.model.config == read_if_config(model_dir)
        assert stage.is_discrete and stage.text_length == 77
        assert config.init_from == f"if:{model_dir}"
        assert zero_padding is False
        assert {k: getattr(stage.sampling, k) for k in sampling} == sampling
        step.check_trainable(stage)


def test_discrete_sr_step_inputs_follow_ifs_contract():
    stage = _gin_stage(GIN_II, "Stage.train_aug_max = 0.3", "Stage.cond_drop_prob = 0.5",
                       "RESOLUTION = 32", "LOWRES_RESOLUTION = 8")  # 8 -> 32: a quick compile
    batch = next(synthetic_data(batch_size=16, resolution=32, lowres_resolution=8,
                                text_length=TEXT_LENGTH, text_embed_dim=32))
    null = np.full((TEXT_LENGTH, 32), 7.0, np.float32)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items() if k != "id"}
    out = jax.jit(step.make_prepare_fn(stage))({**jbatch, "null_embeds": jnp.asarray(null)},
                                               jax.random.PRNGKey(3))
    assert out["t"].dtype == jnp.int32 and out["noise_level"].dtype == jnp.int32
    assert 0 <= int(out["t"].min()) and int(out["t"].max()) < 1000
    assert int(out["noise_level"].max()) <= 300  # train_aug_max * T
    assert out["lowres"].shape == (16, 32, 32, 3)  # upsampled to the stage's side
    dropped = np.all(np.asarray(out["text_embeds"]) == 7.0, axis=(1, 2))
    kept = np.all(np.asarray(out["text_embeds"]) == batch["text_embeds"], axis=(1, 2))
    assert np.all(dropped ^ kept) and 0 < dropped.sum() < 16  # rows: the text or the null
    # The loss calls the stage II model with them (IF's contract) and is finite.
    params = jax.jit(stage.model.init)(jax.random.PRNGKey(0), **model_inputs(stage))["params"]
    loss_fn = step.make_loss_fn(stage, step.StepConfig())
    loss, aux = jax.jit(loss_fn)(params, out, jax.random.PRNGKey(1))
    assert np.isfinite(float(loss)) and float(aux["bucket_count"].sum()) == 16


def test_params_and_ema_start_from_the_imported_weights(if_dir):
    stage = _gin_stage(GIN_I, f"TEXT_LENGTH = {TEXT_LENGTH}")
    mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tx = optim.make_optimizer(optim.learning_rate_schedule())
    _, shardings = state.abstract_train_state(stage.model, tx, stage, mesh, ())
    imported = trainer.imported_if_params(f"if:{if_dir}", stage, shardings.params)
    start, _ = state.init_train_state(stage.model, tx, stage, 0, mesh, (), imported)
    _, reference = load_if_unet(os.path.join(if_dir, "unet"))
    leaves_equal(start.params, reference)
    leaves_equal(start.ema_params, reference)


def test_unsupported_discrete_training_is_refused_in_one_line(if_dir):
    stage = _gin_stage(GIN_I)
    cases = [
        (stage.replace(prediction="v"), "set Stage.prediction='eps'"),
        (stage.replace(loss_weighting="min_snr"), "set Stage.loss_weighting='uniform'"),
        (stage.replace(model=stage.model.clone(config=dataclasses.replace(
            stage.model.config, out_channels=3))), "out_channels=6"),
    ]
    for bad, message in cases:
        with pytest.raises(ConfigError, match=message) as e:
            step.check_trainable(bad)
        assert "\n" not in str(e.value)
    sr = _gin_stage(GIN_II)
    with pytest.raises(ConfigError, match="set Stage.train_crop=None"):
        step.check_trainable(sr.replace(train_crop=32))
    data = synthetic_data(batch_size=2, text_length=TEXT_LENGTH, tokenizer=object())
    with pytest.raises(ConfigError, match="pass train.text_encoder"):
        trainer.null_embeds_for(stage, data, None, None)
    with pytest.raises(ConfigError, match=r"IFUNetConfig.block_out_channels=\(8, 16\) in gin"):
        trainer.imported_if_params(f"if:{if_dir}", sr, None)
    with pytest.raises(ConfigError, match="Stage.model is a BaseUNet"):
        trainer.imported_if_params(f"if:{if_dir}", tiny_test_stage(), None)
    with pytest.raises(CheckpointError, match="does not exist") as e:  # launch.train: one line
        trainer.imported_if_params(f"if:{if_dir}/absent", stage, None)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="expected 'if:PATH'"):
        trainer.TrainConfig(init_from=str(if_dir))


class _Encoder:
    """A text encoder as the trainer sees one: `encode` gives 1 everywhere, padding included."""

    def __init__(self, zero_padding):
        self.zero_padding = zero_padding

    def encode(self, ids, mask):
        return jnp.ones(ids.shape + (32,))


def test_if_stages_train_on_t5_outputs_at_padded_positions(tmp_path):
    """IF's pipelines feed T5's outputs at padded positions: the trainer refuses an encoder that
    zeroes them for a discrete stage, and encodes with them kept (what the cascade samples with).
    """
    stage = _gin_stage(GIN_I)
    mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with pytest.raises(ConfigError, match="bind load_t5.zero_padding = False") as e:
        trainer.train(str(tmp_path), stage=stage, data_fn=None, text_encoder=_Encoder(True),
                      config=trainer.TrainConfig(batch_size=2), mesh=mesh)
    assert "bind load_t5" in str(e.value).splitlines()[0]  # gin appends its call site below
    ids, mask = np.zeros((1, TEXT_LENGTH), np.int32), np.arange(TEXT_LENGTH)[None] < 2
    kept = masked_encode_fn(_Encoder(False))(ids, mask)
    zeroed = masked_encode_fn(_Encoder(True))(ids, mask)
    assert np.all(np.asarray(kept) == 1.0)
    np.testing.assert_array_equal(np.asarray(zeroed)[0, :, 0], mask[0].astype(np.float32))


class _Tokenizer:
    """Token ids of '' as a T5 tokenizer gives them: EOS (1), then padding."""

    def tokenize(self, texts):
        mask = np.arange(TEXT_LENGTH)[None] < 1
        return mask.astype(np.int32), mask


def test_the_empty_prompt_is_encoded_like_the_training_texts():
    stage = _gin_stage(GIN_I)

    def encode_fn(ids, mask):  # the trainer's masked_encode_fn shape: zeros at padding
        return jnp.where(jnp.asarray(mask)[..., None], 3.0 + jnp.asarray(ids)[..., None], 0.0
                         ) * jnp.ones((1, TEXT_LENGTH, 32))

    null = trainer.null_embeds_for(stage, None, _Tokenizer(), encode_fn)
    assert null.shape == (TEXT_LENGTH, 32) and null.dtype == np.float32
    assert np.all(null[0] == 4.0) and not np.any(null[1:])
    data = synthetic_data(batch_size=2, text_length=TEXT_LENGTH)  # precomputed embeddings
    np.testing.assert_array_equal(trainer.null_embeds_for(stage, data, None, None),
                                  data.null_embeds)
    assert trainer.null_embeds_for(tiny_test_stage(), data, None, None) is None
    with pytest.raises(ConfigError, match=r"has shape \(6, 32\); the stage reads \[8, 32\]"):
        trainer.null_embeds_for(stage, synthetic_data(batch_size=2, text_length=6), None, None)


# ---- Must show 5: launch.train fine-tunes imported IF weights; kill -9 and resume is exact.


def _run(env, workdir, if_dir, *extra, timeout=400):
    cmd = [sys.executable, "-m", "launch.train", f"--workdir={workdir}", f"--gin_file={GIN_I}",
           *SYNTHETIC, *STEPS, f"--gin.TrainConfig.init_from='if:{if_dir}'", *extra]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_finetune_imported_if_stage_kill9_resume_is_bit_exact(if_dir, tmp_path):
    from tests.test_train_resume import saved_state, steps_of  # the resume tests' readers

    env = subprocess_env(1)
    env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    whole, broken = str(tmp_path / "whole"), str(tmp_path / "broken")
    proc = _run(env, whole, if_dir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    killed = _run(env, broken, if_dir, "--gin.train.step_callback=@signal_at_step()",
                  "--gin.signal_at_step.step=3", "--gin.signal_at_step.signum=9")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert max(steps_of(broken)) <= 3
    resumed = _run(env, broken, if_dir)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming from" in resumed.stderr
    a, b = saved_state(whole, 4), saved_state(broken, 4)
    assert int(np.asarray(b["step"])) == 4
    for key in ("params", "ema_params", "opt_state"):
        leaves_equal(a[key], b[key])

    with open(os.path.join(whole, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == 4 and np.all(np.isfinite(losses))
    # The head's variance channels (the last 3 outputs of conv_out) were trained, as were eps'.
    _, imported = load_if_unet(os.path.join(if_dir, "unet"))
    kernel = np.asarray(a["params"]["conv_out"]["conv"]["kernel"])
    moved = np.abs(kernel - np.asarray(imported["conv_out"]["conv"]["kernel"])).max(axis=(0, 1, 2))
    assert np.all(moved[3:] > 0) and np.all(moved[:3] > 0), moved
    # The cascade loads the fine-tuned stage from its checkpoint record (its EMA params).
    mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tuned, ema = load_stage(whole, mesh=mesh, rules=())
    assert tuned.is_discrete and tuned.model == _gin_stage(GIN_I).model
    leaves_equal(ema, a["ema_params"])
