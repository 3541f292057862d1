"""Behaviours above the train step that would hurt users most (issue 13, section 3, items 5-7).

5. Noise augmentation at sampling: every SR stage of the compiled cascade sees the previous
   stage's output noised at its configured ``aug_level`` (checked against a float64 numpy
   transcription of ``alpha x + sigma eps``), and the level itself.
6. ``launch.evaluate fid | sweep | drawbench --stages=...`` on checkpoints of the real trainer:
   ``--guidance`` changes the stage ``--guidance_stage`` names and no other.
7. A run of non-finite steps reaching ``max_bad_steps`` stops with a one-line error and leaves
   finite, restorable checkpoints holding exactly the last good parameters.

The networks are one-conv stand-ins with the U-Net signature (what is checked is the plumbing
around them: noise augmentation, sampler settings, the bad-step guard and the checkpoints), so
every train step and cascade program compiles in seconds on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import cascade, partitioning
from imagen_jax.stage import Stage

# ------------------------------------------------------------------------------------------
# 5. Noise augmentation at sampling.
# ------------------------------------------------------------------------------------------

# (stage tag, t, lowres, aug_level) of every SR model call, filled by a host callback.
_SEEN: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []


def _record(tag: str, t, lowres, aug_level) -> None:
    _SEEN.append((tag, np.asarray(t), np.asarray(lowres), np.asarray(aug_level)))


class _ZeroBase(nn.Module):
    """A base 'U-Net' predicting eps = 0 (the cascade only needs some base output)."""

    @nn.compact
    def __call__(self, x, t, text_embeds, text_mask, lowres=None, aug_level=None):
        bias = self.param("bias", nn.initializers.zeros, (3,))
        return jnp.zeros_like(x) + bias


class _SpySR(nn.Module):
    """An SR 'U-Net' that records the low-res input and aug level of every call it gets."""

    tag: str

    @nn.compact
    def __call__(self, x, t, text_embeds, text_mask, lowres=None, aug_level=None):
        bias = self.param("bias", nn.initializers.zeros, (3,))
        jax.debug.callback(functools.partial(_record, self.tag), t, lowres, aug_level)
        return jnp.zeros_like(x) + bias


def _np_cosine_alpha_sigma(t: float, logsnr_min: float = -20.0, logsnr_max: float = 20.0):
    """Float64 transcription of the truncated cosine schedule (schedules.py docstring, App. A):
    logsnr(t) = -2 log tan(theta_min + t (theta_max - theta_min)), alpha^2 = sigmoid(logsnr)."""
    theta_min = math.atan(math.exp(-0.5 * logsnr_max))
    theta_max = math.atan(math.exp(-0.5 * logsnr_min))
    logsnr = -2.0 * math.log(math.tan(theta_min + t * (theta_max - theta_min)))
    return math.sqrt(1.0 / (1.0 + math.exp(-logsnr))), math.sqrt(1.0 / (1.0 + math.exp(logsnr)))


def _spy_cascade(aug_levels: tuple[float, float]) -> cascade.Cascade:
    """Base 8 px -> SR 16 px (aug schedule = its cosine diffusion schedule, no guidance) ->
    SR 32 px (shifted diffusion schedule but a cosine aug schedule, guidance 2.5)."""
    sampling = functools.partial(cascade.SamplingConfig, sampler="ddpm", num_steps=3,
                                 thresholding="dynamic")
    stages = [
        Stage(model=_ZeroBase(), resolution=8,
                             sampling=sampling(), text_embed_dim=4, name="base"),
        Stage(model=_SpySR("sr1"), resolution=16, lowres_resolution=8,
                             text_embed_dim=4, name="sr1",
                             sampling=sampling(aug_level=aug_levels[0])),
        Stage(model=_SpySR("sr2"), resolution=32, lowres_resolution=16,
                             schedule="shifted_cosine", schedule_kwargs={"shift": 2.0},
                             aug_schedule="cosine", text_embed_dim=4, name="sr2",
                             sampling=sampling(aug_level=aug_levels[1], guidance_weight=2.5)),
    ]
    params = [cascade.random_params(s, seed=i) for i, s in enumerate(stages)]
    mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    return cascade.Cascade(stages, params, mesh=mesh, embed_dim=4)


def _sample_and_record(c: cascade.Cascade, seed: int = 7):
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((2, 5, 4)).astype(np.float32)
    mask = np.ones((2, 5), bool)
    _SEEN.clear()
    out = c.sample(text_embeds=embeds, text_mask=mask, seed=seed)
    seen = {tag: [(t, low, aug) for g, t, low, aug in _SEEN if g == tag] for tag in ("sr1", "sr2")}
    return out, seen


def _expected_lowres(clean: np.ndarray, aug_level: float, seed: int, index: int) -> np.ndarray:
    """alpha(aug) x + sigma(aug) eps in float64, eps drawn from the stage's documented key:
    ``split(fold_in(PRNGKey(seed), stage_index))[1]`` (cascade.sample_stage)."""
    _, aug_rng = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), index))
    eps = np.asarray(jax.random.normal(aug_rng, clean.shape, jnp.float32), np.float64)
    alpha, sigma = _np_cosine_alpha_sigma(aug_level)
    return alpha * clean.astype(np.float64) + sigma * eps


def test_sr_stages_see_the_noised_lowres_and_their_aug_level():
    seed, levels = 7, (0.25, 0.6)
    c = _spy_cascade(levels)
    out, seen = _sample_and_record(c, seed)
    for index, tag, level in ((1, "sr1", levels[0]), (2, "sr2", levels[1])):
        calls = seen[tag]
        # One model call per sampling step (distinct t), no more.
        assert len(calls) == 3 and len({float(t[0]) for t, _, _ in calls}) == 3
        clean = out.float_images[index - 1]
        want = _expected_lowres(clean, level, seed, index)
        for _t, low, aug in calls:
            # sr2 runs guided: the model gets the doubled batch, both halves augmented alike.
            halves = 2 if tag == "sr2" else 1
            assert low.shape == (2 * halves, *clean.shape[1:]) and aug.shape == (2 * halves,)
            np.testing.assert_array_equal(aug, np.full(aug.shape, level, np.float32))
            for h in range(halves):
                np.testing.assert_allclose(low[2 * h: 2 * h + 2], want, rtol=0, atol=2e-5)
        # Noised, not clean: at these levels sigma is 0.38 / 0.81.
        assert np.abs(calls[0][1][:2] - clean).max() > 0.3


def _sample_sr1_slice(aug_level: float, lowres: np.ndarray, seed: int) -> np.ndarray:
    """The low-res input the sr1 model sees when the slice [1:2] upsamples ``lowres``."""
    c = _spy_cascade((aug_level, 0.6))
    embeds = np.random.default_rng(0).standard_normal((2, 5, 4)).astype(np.float32)
    _SEEN.clear()
    c.sample(text_embeds=embeds, text_mask=np.ones((2, 5), bool), seed=seed, lowres=lowres,
             start=1, stop=2)
    calls = [(low, aug) for tag, _, low, aug in _SEEN if tag == "sr1"]
    assert len(calls) == 3
    np.testing.assert_array_equal(calls[0][1], np.full((2,), aug_level, np.float32))
    return calls[0][0]


def test_changing_the_aug_level_changes_what_the_sr_model_sees():
    seed = 3
    lowres = np.random.default_rng(1).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    seen = {level: _sample_sr1_slice(level, lowres, seed) for level in (0.25, 0.7, 0.0)}
    assert np.abs(seen[0.25] - seen[0.7]).max() > 0.1
    for level in (0.25, 0.7):
        want = _expected_lowres(lowres, level, seed, 1)
        np.testing.assert_allclose(seen[level], want, rtol=0, atol=2e-5)
    # At level 0 the input is clean up to sigma(0) = e^-10 (the truncated schedule).
    np.testing.assert_allclose(seen[0.0], lowres, rtol=0, atol=3e-4)


# ------------------------------------------------------------------------------------------
# 7. max_bad_steps: a clear stop, and checkpoints that hold the last good state.
# ------------------------------------------------------------------------------------------


def _assert_trees_equal(a, b) -> None:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _all_finite(tree) -> bool:
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree)
               if np.issubdtype(np.asarray(x).dtype, np.floating))


class _TinyEps(nn.Module):
    """A one-conv eps model with the U-Net signature: the guard and the checkpoints are under
    test here, not the architecture, and its train step compiles in a few CPU seconds."""

    @nn.compact
    def __call__(self, x, t, text_embeds, text_mask, lowres=None, aug_level=None, train=False):
        cond = nn.Dense(3)(text_embeds.mean(axis=1)) + t[:, None]
        return nn.Conv(3, (3, 3))(x) + cond[:, None, None, :]


def test_max_bad_steps_stops_cleanly_and_keeps_the_last_good_checkpoint(tmp_path):
    from imagen_jax.stage import Stage
    from imagen_jax.train import optim, testing, trainer
    from imagen_jax.train.checkpoint import CheckpointConfig, Checkpointer
    from imagen_jax.train.state import abstract_train_state

    stage = Stage(model=_TinyEps(), resolution=8, text_length=4, text_embed_dim=16)
    mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    rules = partitioning.DATA_PARALLEL_RULES
    workdir = str(tmp_path / "run")
    # Batch i feeds step i + 1: steps 1-4 are good, every step from 5 on sees NaN images.
    first_bad_step, max_bad = 5, 3
    data_kw = dict(resolution=8, text_length=4, text_embed_dim=16)
    nan_data = functools.partial(testing.synthetic_data, **data_kw,
                                 nan_at=tuple(range(first_bad_step - 1, 100)))
    config = trainer.TrainConfig(batch_size=4, num_steps=50, log_every=100,
                                 max_bad_steps=max_bad, progress_bar=False)
    ckpt_config = CheckpointConfig(save_every=2, keep=2, keep_period=None, async_save=True)
    host: dict[int, tuple] = {}

    def record(step, state, metrics):
        host[step] = jax.device_get((state.params, state.ema_params, state.opt_state,
                                     metrics["step_ok"]))

    gin.clear_config()
    gin.parse_config(["learning_rate_schedule.kind = 'constant'",
                      "learning_rate_schedule.peak_value = 1e-2",
                      f"logical_axis_rules.rules = {list(rules)!r}"])
    try:
        with pytest.raises(trainer.TrainingError) as info:
            trainer.train(workdir, stage=stage, data_fn=nan_data, config=config,
                          checkpoint_config=ckpt_config, mesh=mesh, step_callback=record)
        # One line (gin appends its own "In call to configurable 'train'" line after it).
        message, *gin_context = str(info.value).splitlines()
        assert all("In call to configurable" in line for line in gin_context)
        # The guard reads the counter one step late: the 3rd bad step (7) stops the run at 8.
        assert "3 consecutive steps up to step 7" in message
        assert "TrainConfig.max_bad_steps=3" in message
        assert "last checkpoint (step 6) is intact" in message

        last_good = first_bad_step - 1
        assert [bool(host[s][3]) for s in sorted(host)] == [True] * 4 + [False] * 3
        with pytest.raises(AssertionError):  # good steps move the parameters
            _assert_trees_equal(host[last_good - 1][0], host[last_good][0])
        for s in range(first_bad_step, first_bad_step + max_bad):  # bad steps do not
            _assert_trees_equal(host[s][:3], host[last_good][:3])

        tx = optim.make_optimizer(optim.learning_rate_schedule(kind="constant", peak_value=1e-2))
        abstract, _ = abstract_train_state(stage.model, tx, stage, mesh, rules)
        ckpt = Checkpointer(workdir, read_only=True)
        try:
            steps = ckpt.all_steps()
            # save_every=2, keep=2: step 4 (the last good one) and 6 (inside the bad run).
            assert sorted(steps) == [4, 6]
            for s in steps:
                state = ckpt.restore(abstract, step=s)
                assert int(state.step) == s
                got = jax.device_get((state.params, state.ema_params, state.opt_state))
                assert _all_finite(got)
                # Exactly what the run held after step s, which is the last good update.
                _assert_trees_equal(got, host[s][:3])
                _assert_trees_equal(got, host[min(s, last_good)][:3])
            # The sampler's loading path (EMA only) restores the same parameters.
            ema = ckpt.restore_params(abstract.params, step=max(steps))
            _assert_trees_equal(jax.device_get(ema), host[last_good][1])
        finally:
            ckpt.close()

        # With the data fixed, rerunning the command resumes from the latest checkpoint.
        clean = functools.partial(testing.synthetic_data, **data_kw)
        resumed = trainer.train(workdir, stage=stage, data_fn=clean,
                                config=dataclasses.replace(config, num_steps=8),
                                checkpoint_config=ckpt_config, mesh=mesh)
        assert int(resumed.step) == 8 and int(resumed.bad_steps) == 0
        assert _all_finite(jax.device_get(resumed.params))
    finally:
        gin.clear_config()


# ------------------------------------------------------------------------------------------
# 6. launch.evaluate --guidance/--guidance_stage on checkpoints of the real trainer.
# ------------------------------------------------------------------------------------------


class _TinyTextNet(nn.Module):
    """A text-conditional one-conv 'U-Net' (U-Net signature): what is under test is which stage
    gets which sampler settings, and a model this small keeps every compile to seconds. The
    conditional and unconditional (zero text) predictions differ, so guidance changes images;
    the SR variant also reads its low-res input and aug level, so it passes base changes on."""

    super_res: bool = False

    @nn.compact
    def __call__(self, x, t, text_embeds, text_mask, lowres=None, aug_level=None, train=False):
        m = text_mask[..., None].astype(x.dtype)
        pooled = (text_embeds * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1.0)
        cond = nn.Dense(3)(pooled) + nn.Dense(3)(t[:, None])
        h = nn.Conv(3, (3, 3))(x)
        if self.super_res:
            up = jax.image.resize(lowres, x.shape, "nearest")
            h = h + nn.Conv(3, (3, 3))(up) + nn.Dense(3)(aug_level[:, None])[:, None, None, :]
        return h + cond[:, None, None, :]


@gin.configurable("behaviours2_tiny_net")
def _tiny_net(super_res: bool = False) -> nn.Module:
    return _TinyTextNet(super_res=super_res)


_TRAIN_COMMON = """
train.stage = @Stage()
train.data_fn = @synthetic_data
Stage.text_length = 8
Stage.text_embed_dim = 32
synthetic_data.text_length = 8
synthetic_data.text_embed_dim = 32
TrainConfig.batch_size = 8
TrainConfig.num_steps = 2
TrainConfig.log_every = 1
TrainConfig.progress_bar = False
CheckpointConfig.async_save = False
learning_rate_schedule.kind = 'constant'
learning_rate_schedule.peak_value = 1e-2
"""
_TRAIN_STAGES = {
    "base": """
Stage.model = @behaviours2_tiny_net()
Stage.resolution = 8
synthetic_data.resolution = 8
SamplingConfig.sampler = 'ddim'
SamplingConfig.num_steps = 4
SamplingConfig.guidance_weight = 1.5
SamplingConfig.thresholding = 'static'
""",
    "sr": """
Stage.model = @behaviours2_tiny_net()
behaviours2_tiny_net.super_res = True
Stage.resolution = 16
Stage.lowres_resolution = 8
synthetic_data.resolution = 16
synthetic_data.lowres_resolution = 8
SamplingConfig.sampler = 'ddpm'
SamplingConfig.num_steps = 3
SamplingConfig.guidance_weight = 1.0
SamplingConfig.aug_level = 0.2
""",
}
# What each stage was saved with, after the launcher's --num_steps=2 (which applies to all).
_SAVED = [
    cascade.SamplingConfig(sampler="ddim", num_steps=2, guidance_weight=1.5,
                           thresholding="static", aug_level=0.0),
    cascade.SamplingConfig(sampler="ddpm", num_steps=2, guidance_weight=1.0,
                           thresholding="dynamic", aug_level=0.2),
]


@pytest.fixture(scope="module")
def trained_stages(tmp_path_factory):
    """Base 8 px and SR 8->16 px trained 2 steps each by `trainer.train` from gin (so their
    checkpoints carry the operative config the cascade loader rebuilds them from), and a random
    tiny T5 with 32-dim embeddings."""
    from imagen_jax import gin_utils
    from imagen_jax.text.testing import drawbench_prompts, write_random_t5
    from imagen_jax.train import trainer

    root = tmp_path_factory.mktemp("evaluate_stages")
    t5 = write_random_t5(str(root / "t5"), texts=drawbench_prompts(), vocab_size=128)
    mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    dirs = []
    for name, config in _TRAIN_STAGES.items():
        gin_utils.register_all()
        gin.clear_config()
        gin.parse_config(_TRAIN_COMMON + config)
        try:
            trainer.train(str(root / name), mesh=mesh)
        finally:
            gin.clear_config()
        dirs.append(str(root / name))
    return {"dirs": dirs, "t5": t5, "root": root}


@pytest.fixture
def recorded(monkeypatch):
    """Every `Cascade.sample` call of the launcher: (each stage's sampling config, each stage's
    float images)."""
    calls: list[tuple[list[cascade.SamplingConfig], list[np.ndarray]]] = []
    original = cascade.Cascade.sample

    def sample(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append(([s.sampling for s in self.stages], out.float_images))
        return out

    monkeypatch.setattr(cascade.Cascade, "sample", sample)
    return calls


# Stage.text_length is 8: the launcher warns about every longer prompt it truncates.
_TRUNCATION = pytest.mark.filterwarnings(r"ignore:prompt \d+ .* truncated:UserWarning")


def _evaluate(*args: str) -> None:
    from launch import evaluate

    try:
        evaluate.main(evaluate.parse_flags(["evaluate", *args]))
    finally:
        evaluate.FLAGS.unparse_flags()
        gin.clear_config()


def _cascade_flags(stages: dict, out) -> list[str]:
    return [f"--stages={','.join(stages['dirs'])}", f"--t5={stages['t5']}", f"--out={out}",
            "--num_steps=2"]


def _guided(stage: int, weight: float = 4.0) -> list[cascade.SamplingConfig]:
    return [dataclasses.replace(s, guidance_weight=weight) if i == stage else s
            for i, s in enumerate(_SAVED)]


@_TRUNCATION
def test_evaluate_fid_guidance_changes_only_the_named_stage(trained_stages, recorded, tmp_path):
    fid_flags = ["fid", "--num_samples=4", "--batch_size=4"]
    _evaluate(*fid_flags, *_cascade_flags(trained_stages, tmp_path / "plain"))
    _evaluate(*fid_flags, *_cascade_flags(trained_stages, tmp_path / "sr"),
              "--guidance=4", "--guidance_stage=1")
    _evaluate(*fid_flags, *_cascade_flags(trained_stages, tmp_path / "base"),
              "--guidance=4", "--guidance_stage=0")
    (plain_cfg, plain), (sr_cfg, sr), (base_cfg, base) = recorded
    assert plain_cfg == _SAVED
    assert sr_cfg == _guided(1)
    assert base_cfg == _guided(0)
    # Same prompts and seeds: guiding the SR stage leaves the base images bit for bit.
    np.testing.assert_array_equal(sr[0], plain[0])
    assert np.abs(sr[1] - plain[1]).max() > 1e-3
    assert np.abs(base[0] - plain[0]).max() > 1e-3 and np.abs(base[1] - plain[1]).max() > 1e-3


@_TRUNCATION
def test_evaluate_sweep_guidance_changes_only_the_named_stage(trained_stages, recorded, tmp_path):
    _evaluate("sweep", "--guidance=1,4", "--guidance_stage=1", "--num_samples=4",
              "--batch_size=4", *_cascade_flags(trained_stages, tmp_path))
    (cfg_1, images_1), (cfg_4, images_4) = recorded
    assert cfg_1 == _guided(1, 1.0) and cfg_4 == _guided(1, 4.0)
    np.testing.assert_array_equal(images_4[0], images_1[0])
    assert np.abs(images_4[1] - images_1[1]).max() > 1e-3


@_TRUNCATION
def test_evaluate_drawbench_guidance_and_gin_overrides_stay_on_their_stage(
        trained_stages, recorded, tmp_path):
    _evaluate("drawbench", "--guidance=4", "--guidance_stage=1", "--categories=Rare Words",
              "--num_per_prompt=1", "--batch_size=8",
              "--gin.stage0/SamplingConfig.percentile=97.0",
              *_cascade_flags(trained_stages, tmp_path))
    assert recorded, "the launcher never sampled the cascade"
    want = _guided(1)
    want[0] = dataclasses.replace(want[0], percentile=97.0)
    for cfg, _ in recorded:
        assert cfg == want
