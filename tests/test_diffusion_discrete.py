"""The discrete learned-range sampler against diffusers (issue 18, must show 3).

DeepFloyd IF samples with diffusers' ``DDPMScheduler(variance_type="learned_range")`` driven by
the IF pipelines. Here:
  1. the schedule table and the respaced timesteps (even spacing, IF's named lists) equal
     diffusers';
  2. one respaced step equals ``DDPMScheduler.step`` to 1e-5 at every step of a list, for each
     thresholding;
  3. a whole 27-step stage-I loop with guidance 7 and thresholding capped at 1.5 equals
     ``IFPipeline.__call__`` on a tiny deterministic model to 1e-4, and stage II's upsampled,
     noise-augmented input (and its loop) equal ``IFSuperResolutionPipeline``'s;
  4. the loop is one scan with one batched model call; `SamplingConfig` selects it.

Noise is made identical on both sides by recording every draw diffusers makes (its
``randn_tensor``, patched where the pipelines and the scheduler call it) and handing the same
arrays to our sampler as ``init_noise`` / ``step_noise``. The tiny model is a fixed random
per-pixel linear map (plus a shifted copy, the timestep, the noise level and the mean text
embedding), written once for both frameworks (`_toy_forward`).

torch and diffusers are imported inside the helpers (the suite's convention: collecting other
test modules does not pay for them).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import diffusion as D
from imagen_jax.diffusion import discrete
from imagen_jax.errors import ConfigError

T = 1000
BATCH, SIZE, LOW, CH = 2, 8, 4, 3
TEXT_LEN, TEXT_DIM = 5, 16
STAGE_I = dict(thresholding="dynamic", percentile=95.0, threshold_max=1.5)  # IF-I's scheduler
STAGE_II = dict(thresholding="dynamic", percentile=95.0, threshold_max=1.0)  # IF-II's


def _scheduler(threshold_max: float = 1.5, thresholding: str = "dynamic"):
    """IF's scheduler config (``scheduler/scheduler_config.json`` of IF-I-XL / IF-II-L)."""
    from diffusers import DDPMScheduler  # torch reference, imported only where needed

    return DDPMScheduler(
        num_train_timesteps=T,
        beta_schedule="squaredcos_cap_v2",
        variance_type="learned_range",
        prediction_type="epsilon",
        thresholding=thresholding == "dynamic",
        dynamic_thresholding_ratio=0.95,
        sample_max_value=threshold_max,
        clip_sample=thresholding == "static",
    )


def _nchw(x):
    import torch  # torch reference, imported only where needed

    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(x) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture
def diffusers_noise(monkeypatch):
    """Every normal draw diffusers makes, in order, as (site, NHWC float32 array)."""
    import torch  # torch reference, imported only where needed
    from diffusers.pipelines.deepfloyd_if import pipeline_if, pipeline_if_superresolution
    from diffusers.schedulers import scheduling_ddpm

    rng = np.random.default_rng(1234)
    draws: list[tuple[str, np.ndarray]] = []

    def recorder(site):
        def randn_tensor(shape, generator=None, device=None, dtype=None, **unused):
            array = rng.standard_normal(tuple(shape)).astype(np.float32)  # NCHW
            draws.append((site, array.transpose(0, 2, 3, 1)))
            return torch.from_numpy(array).to(device=device, dtype=dtype or torch.float32)

        return randn_tensor

    monkeypatch.setattr(pipeline_if, "randn_tensor", recorder("pipeline"))
    monkeypatch.setattr(pipeline_if_superresolution, "randn_tensor", recorder("pipeline"))
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", recorder("step"))
    return draws


# ------------------------------------------------------------------------------------------
# 1. The table and the timesteps.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta_schedule", D.BETA_SCHEDULES)
def test_schedule_table_equals_diffusers(beta_schedule):
    from diffusers import DDPMScheduler  # torch reference, imported only where needed

    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule)
    ours = D.DiscreteSchedule(beta_schedule)
    np.testing.assert_allclose(ours.betas(), ref.betas.double().numpy(), rtol=1e-6)
    # diffusers multiplies 1,000 float32 factors; ours is the float64 product (rounding of
    # diffusers' accumulates to ~1.3e-5 relative at t = 999).
    np.testing.assert_allclose(ours.alphas_cumprod(), ref.alphas_cumprod.double().numpy(),
                               rtol=3e-5)
    np.testing.assert_allclose(ours.alphas_cumprod(), np.cumprod(1 - ours.betas()), rtol=1e-12)


@pytest.mark.parametrize("name", D.IF_RESPACINGS)
def test_named_timesteps_equal_if_lists(name):
    from diffusers.pipelines.deepfloyd_if import timesteps  # the lists diffusers ships

    expected = getattr(timesteps, f"{name}_timesteps")
    got = D.respaced_timesteps(name, len(expected), T)
    assert got.tolist() == expected


@pytest.mark.parametrize("num_steps", [1, 7, 27, 50, 100, 333, 1000])
def test_even_timesteps_equal_leading_spacing(num_steps):
    scheduler = _scheduler()
    scheduler.set_timesteps(num_steps)
    assert D.respaced_timesteps("even", num_steps, T).tolist() == scheduler.timesteps.tolist()


def test_bad_timesteps_are_refused():
    with pytest.raises(ValueError, match="27 steps"):
        D.respaced_timesteps("smart27", 26, T)
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        D.respaced_timesteps("smart28", 28, T)
    with pytest.raises(ValueError, match=r"\[1, 1000\]"):
        D.respaced_timesteps("even", 1001, T)
    for bad in ([5, 5, 0], [0, 5], [1000, 0], [], [3.5, 0]):
        with pytest.raises(ValueError, match="timesteps"):
            D.sample_learned_range(lambda x, t: x, (1, 2, 2, 3), jax.random.PRNGKey(0),
                                   timesteps=bad)


# ------------------------------------------------------------------------------------------
# 2. One step.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("thresholding", ["dynamic", "static", "none"])
def test_one_step_equals_ddpm_scheduler(diffusers_noise, thresholding):
    """Every step of 'smart27' (t = 999 where alpha_bar ~ 2e-9, adjacent steps 858 -> 857, the
    last, noiseless step 24 -> 0) from random x_t and model outputs with v in [-1, 1]."""
    import torch  # torch reference, imported only where needed

    scheduler = _scheduler(1.5, thresholding)
    steps = D.respaced_timesteps("smart27", 27, T)
    scheduler.set_timesteps(timesteps=steps.tolist())
    # The step is checked on diffusers' own (float32) table; ours is checked above.
    table = scheduler.alphas_cumprod.numpy()
    rng = np.random.default_rng(0)
    for i, t in enumerate(steps):
        x_t = (1.5 * rng.standard_normal((BATCH, SIZE, SIZE, CH))).astype(np.float32)
        eps = rng.standard_normal((BATCH, SIZE, SIZE, CH))
        v = rng.uniform(-1, 1, (BATCH, SIZE, SIZE, CH))
        out = np.concatenate([eps, v], axis=-1).astype(np.float32)
        diffusers_noise.clear()
        ref = scheduler.step(_nchw(out), torch.tensor(int(t)), _nchw(x_t)).prev_sample
        noise = diffusers_noise[0][1] if t > 0 else np.zeros_like(x_t)
        assert len(diffusers_noise) == (1 if t > 0 else 0)
        prev = table[steps[i + 1]] if i + 1 < len(steps) else 1.0
        ours, _ = D.learned_range_step(
            jnp.asarray(x_t), jnp.asarray(out), table[t], prev, jnp.asarray(noise),
            thresholding=thresholding, percentile=95.0, threshold_max=1.5)
        # 1e-5 absolute; rtol covers float32 rounding of the unthresholded x0 (~1e4 at t=999).
        np.testing.assert_allclose(np.asarray(ours), _nhwc(ref), atol=1e-5, rtol=1e-6,
                                   err_msg=f"step at t={t}")


def test_step_checks_channels():
    x = jnp.zeros((1, 2, 2, 3))
    with pytest.raises(ValueError, match="eps and v"):
        D.learned_range_step(x, x, 0.5, 0.9, x)


# ------------------------------------------------------------------------------------------
# 3. Whole loops against the IF pipelines, on a tiny deterministic model.
# ------------------------------------------------------------------------------------------


def _toy_weights(in_channels: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = 2 * CH

    def w(*shape, scale):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    return {
        "w_x": w(in_channels, out, scale=1.0 / math.sqrt(in_channels)),
        "w_shift": w(in_channels, out, scale=0.5 / math.sqrt(in_channels)),
        "w_text": w(TEXT_DIM, out, scale=1.0 / math.sqrt(TEXT_DIM)),
        "w_t": w(out, scale=1.0),
        "w_level": w(out, scale=1.0),
    }


def _toy_forward(xp, concat, x, t, text, level, w):
    """eps and v of a fixed random model, NHWC, in numpy-like namespace ``xp`` (jnp or torch):
    x [N, H, W, Cin], t and level int [N] or scalar, text [N, L, D] -> [N, H, W, 2C]."""
    h = x @ w["w_x"] + xp.roll(x, 1, 2) @ w["w_shift"]
    h = h + (text.mean(1) @ w["w_text"]).reshape(-1, 1, 1, 2 * CH)
    h = h + (t.reshape(-1, 1, 1, 1) / T) * w["w_t"]
    if level is not None:
        h = h + (level.reshape(-1, 1, 1, 1) / T) * w["w_level"]
    return concat([h[..., :CH], xp.tanh(h[..., CH:])], -1)


def _torch_toy_unet(in_channels: int, seed: int):
    """The toy model as a diffusers model the IF pipelines accept in place of their U-Net."""
    import torch  # torch reference, imported only where needed
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config

    class ToyIFUNet(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, in_channels: int = 3, sample_size: int = SIZE, seed: int = 0):
            super().__init__()
            self.w = torch.nn.ParameterDict({
                k: torch.nn.Parameter(torch.from_numpy(v), requires_grad=False)
                for k, v in _toy_weights(in_channels, seed).items()})

        def forward(self, sample, timestep, encoder_hidden_states, class_labels=None,
                    cross_attention_kwargs=None, return_dict=True):
            x = sample.permute(0, 2, 3, 1)
            out = _toy_forward(torch, torch.cat, x, torch.as_tensor(timestep),
                               encoder_hidden_states, class_labels, self.w)
            return (out.permute(0, 3, 1, 2),)

    return ToyIFUNet(in_channels=in_channels, seed=seed).eval()


def _texts():
    rng = np.random.default_rng(7)
    cond = rng.standard_normal((BATCH, TEXT_LEN, TEXT_DIM)).astype(np.float32)
    uncond = rng.standard_normal((1, TEXT_LEN, TEXT_DIM)).repeat(BATCH, 0).astype(np.float32)
    return cond, uncond  # uncond: IF's encoded empty prompt (not zeros, no mask)


def _step_noise(draws, timesteps) -> np.ndarray:
    """The scheduler's draws as [N, B, H, W, C]. diffusers draws none at t = 0; that row gets
    large noise that the sampler must not use."""
    steps = [a for site, a in draws if site == "step"]
    assert len(steps) == int(np.sum(np.asarray(timesteps) > 0))
    return np.stack(steps + [np.full_like(steps[0], 5.0)] * (len(timesteps) - len(steps)))


def test_stage_one_loop_equals_if_pipeline(diffusers_noise):
    """fast27, guidance 7 on eps only, dynamic thresholding at quantile 0.95 capped at 1.5."""
    import torch  # torch reference, imported only where needed
    from diffusers import IFPipeline
    from diffusers.pipelines.deepfloyd_if import timesteps as if_timesteps

    cond, uncond = _texts()
    pipe = IFPipeline(tokenizer=None, text_encoder=None, unet=_torch_toy_unet(CH, seed=0),
                      scheduler=_scheduler(1.5), safety_checker=None, feature_extractor=None,
                      watermarker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    timesteps = if_timesteps.fast27_timesteps
    ref = pipe(prompt_embeds=torch.from_numpy(cond),
               negative_prompt_embeds=torch.from_numpy(uncond), timesteps=timesteps,
               guidance_scale=7.0, output_type="pt").images
    init = diffusers_noise[0][1]
    assert diffusers_noise[0][0] == "pipeline"

    weights = {k: jnp.asarray(v) for k, v in _toy_weights(CH, seed=0).items()}
    text_2b = jnp.concatenate([cond, uncond])  # ours: conditional rows first

    def model_fn_2b(x2, t2):
        return _toy_forward(jnp, jnp.concatenate, x2, t2, text_2b, None, weights)

    ours = D.sample_learned_range(
        D.guided_learned_range_model_fn(model_fn_2b, 7.0), init.shape, jax.random.PRNGKey(0),
        timesteps=D.respaced_timesteps("fast27", 27, T), init_noise=jnp.asarray(init),
        step_noise=jnp.asarray(_step_noise(diffusers_noise, timesteps)), **STAGE_I)
    ref = _nhwc(ref)
    assert np.abs(ref).max() > 0.5  # a non-trivial sample (thresholded x0 at the end)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


def test_stage_two_noise_augmentation_and_loop_equal_if_superresolution(diffusers_noise):
    """Stage II: the low-res input upsampled (align corners) to 8x8 and noised at level 250,
    the level fed to the model as its second timestep; then a short guided loop (cap 1.0)."""
    import torch  # torch reference, imported only where needed
    from diffusers import IFSuperResolutionPipeline

    cond, uncond = _texts()
    lowres = np.random.default_rng(3).uniform(-1, 1, (BATCH, LOW, LOW, CH)).astype(np.float32)
    unet = _torch_toy_unet(2 * CH, seed=1)
    seen = []
    unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0].clone(), kwargs["class_labels"])),
        with_kwargs=True)
    pipe = IFSuperResolutionPipeline(
        tokenizer=None, text_encoder=None, unet=unet, scheduler=_scheduler(1.0),
        image_noising_scheduler=_scheduler(1.0), safety_checker=None, feature_extractor=None,
        watermarker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    timesteps = [999, 600, 250, 60, 0]
    ref = pipe(image=_nchw(lowres), prompt_embeds=torch.from_numpy(cond),
               negative_prompt_embeds=torch.from_numpy(uncond), timesteps=timesteps,
               guidance_scale=4.0, noise_level=250, height=SIZE, width=SIZE,
               output_type="pt").images
    (_, init), (_, aug_noise) = diffusers_noise[:2]

    level = D.noise_level_from_aug(D.IF_STAGE_II_SAMPLING["aug_level"], D.DiscreteSchedule())
    assert level == 250
    upsampled, levels = D.noise_augment_upsampled(
        jnp.asarray(lowres), SIZE, level, jax.random.PRNGKey(1), D.DiscreteSchedule(),
        noise=jnp.asarray(aug_noise))
    model_input, class_labels = seen[0]
    # The pipeline's model input is (x_t, upsampled) on the doubled (uncond, cond) batch.
    np.testing.assert_allclose(np.tile(np.asarray(upsampled), (2, 1, 1, 1)),
                               _nhwc(model_input[:, CH:]), atol=1e-6, rtol=0)
    assert levels.tolist() == [250] * BATCH and class_labels.tolist() == [250] * 2 * BATCH

    weights = {k: jnp.asarray(v) for k, v in _toy_weights(2 * CH, seed=1).items()}
    text_2b = jnp.concatenate([cond, uncond])
    up_2b = jnp.concatenate([upsampled, upsampled])
    levels_2b = jnp.concatenate([levels, levels])

    def model_fn_2b(x2, t2):
        x_in = jnp.concatenate([x2, up_2b], axis=-1)
        return _toy_forward(jnp, jnp.concatenate, x_in, t2, text_2b, levels_2b, weights)

    ours = D.sample_learned_range(
        D.guided_learned_range_model_fn(model_fn_2b, 4.0), init.shape, jax.random.PRNGKey(0),
        timesteps=timesteps, init_noise=jnp.asarray(init),
        step_noise=jnp.asarray(_step_noise(diffusers_noise, timesteps)), **STAGE_II)
    np.testing.assert_allclose(np.asarray(ours), _nhwc(ref), atol=1e-4, rtol=0)


def test_resize_align_corners_equals_torch():
    import torch  # torch reference, imported only where needed

    x = np.random.default_rng(0).standard_normal((2, 5, 3, 4)).astype(np.float32)
    for size in [(16, 7), (5, 3), (1, 2), (3, 1)]:
        ref = torch.nn.functional.interpolate(_nchw(x), size, mode="bilinear", align_corners=True)
        ours = D.resize_bilinear_align_corners(jnp.asarray(x), size)
        np.testing.assert_allclose(np.asarray(ours), _nhwc(ref), atol=1e-6, err_msg=str(size))


def test_noise_level_must_be_a_whole_timestep():
    schedule = D.DiscreteSchedule()
    assert D.noise_level_from_aug(0.1, schedule) == 100
    for bad in (0.2505, 1.0):
        with pytest.raises(ConfigError, match="whole level"):
            D.noise_level_from_aug(bad, schedule)


# ------------------------------------------------------------------------------------------
# 4. One compiled loop; selection through SamplingConfig.
# ------------------------------------------------------------------------------------------


def _toy_model_fn_2b():
    weights = {k: jnp.asarray(v) for k, v in _toy_weights(CH, seed=0).items()}
    cond, uncond = _texts()
    text_2b = jnp.concatenate([cond, uncond])
    calls = []

    def model_fn_2b(x2, t2):
        calls.append(x2.shape)
        return _toy_forward(jnp, jnp.concatenate, x2, t2, text_2b, None, weights)

    return model_fn_2b, calls


@pytest.mark.parametrize("timesteps", ["smart27", "smart50"])
def test_one_scan_and_one_batched_model_call(timesteps):
    model_fn_2b, calls = _toy_model_fn_2b()
    cfg = D.SamplingConfig(**{**D.IF_STAGE_I_SAMPLING, "timesteps": timesteps,
                              "num_steps": int(timesteps[-2:])})

    def program(rng):
        return cfg.sample_guided(model_fn_2b, (BATCH, SIZE, SIZE, CH), rng,
                                 schedule=D.DiscreteSchedule())

    jaxpr = jax.make_jaxpr(program)(jax.random.PRNGKey(0))
    loops = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("scan", "while")]
    assert len(loops) == 1 and loops[0].params["length"] == cfg.num_steps
    assert calls == [(2 * BATCH, SIZE, SIZE, CH)]  # traced once, cond + uncond in one call


def test_sampling_config_selects_the_learned_range_sampler():
    model_fn_2b, _ = _toy_model_fn_2b()
    cfg = D.SamplingConfig(**{**D.IF_STAGE_I_SAMPLING, "timesteps": "fast27", "num_steps": 27})
    rng = jax.random.PRNGKey(3)
    shape = (BATCH, SIZE, SIZE, CH)
    via_cfg = cfg.sample_guided(model_fn_2b, shape, rng, schedule=D.DiscreteSchedule())
    direct = D.sample_learned_range(
        D.guided_learned_range_model_fn(model_fn_2b, 7.0), shape, rng,
        timesteps=D.respaced_timesteps("fast27", 27, T), **STAGE_I)
    np.testing.assert_array_equal(np.asarray(via_cfg), np.asarray(direct))
    assert np.all(np.isfinite(np.asarray(direct))) and np.abs(np.asarray(direct)).max() <= 1.0
    with pytest.raises(ConfigError, match="prediction"):
        cfg.sample(model_fn_2b, shape, rng, schedule=D.DiscreteSchedule(), prediction="v")
    with pytest.raises(TypeError, match="DiscreteSchedule"):
        cfg.sample(model_fn_2b, shape, rng, schedule=D.CosineSchedule())
    with pytest.raises(ConfigError, match="1000 training timesteps"):
        cfg.sample(model_fn_2b, shape, rng, schedule=D.DiscreteSchedule(num_train_timesteps=500))


def test_sampling_config_refuses_contradictions():
    with pytest.raises(ConfigError, match="timesteps='smart27' names a list"):
        D.SamplingConfig(timesteps="smart27", num_steps=27)  # continuous ddpm
    with pytest.raises(ConfigError, match="threshold_max"):
        D.SamplingConfig(threshold_max=1.5)
    with pytest.raises(ConfigError, match="set num_steps=27"):
        D.SamplingConfig(sampler="learned_range", timesteps="smart27")
    with pytest.raises(ConfigError, match="threshold_max"):
        D.SamplingConfig(sampler="learned_range", threshold_max=float("nan"))
    with pytest.raises(ConfigError, match="threshold_max"):
        D.SamplingConfig(sampler="learned_range", threshold_max=math.inf)  # JSON has no inf
    with pytest.raises(ConfigError, match="threshold_max"):
        D.SamplingConfig(sampler="learned_range", threshold_max=0.5)
    cfg = D.SamplingConfig(**D.IF_STAGE_II_SAMPLING)
    assert cfg.replace(timesteps="smart50").timesteps == "smart50"  # 50 steps already
    assert D.SamplingConfig().timesteps == "even" and D.SamplingConfig().threshold_max == 0.0


def test_uncapped_threshold_is_imagens_dynamic_threshold():
    x0 = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (BATCH, SIZE, SIZE, CH))
    np.testing.assert_array_equal(
        np.asarray(discrete.capped_dynamic_threshold(x0, 95.0, 0.0)),
        np.asarray(D.dynamic_threshold(x0, 95.0)))
    # |3 N(0, 1)| has its 95th percentile near 5.9: every sample's s is capped at 1.5.
    np.testing.assert_allclose(np.asarray(discrete.capped_dynamic_threshold(x0, 95.0, 1.5)),
                               np.clip(np.asarray(x0), -1.5, 1.5) / 1.5, rtol=1e-6)
