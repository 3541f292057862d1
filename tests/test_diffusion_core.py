"""Diffusion building blocks against independent references (numpy transcriptions, diffusers).

Schedules, eps/v/x0 conversions, losses (uniform, min-SNR), text-condition dropping, noise
augmentation, dynamic thresholding (Must show 3, first half) and the gin wiring.
"""

from __future__ import annotations

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import diffusion as D


def np_cosine_logsnr(t, logsnr_min=-20.0, logsnr_max=20.0):
    """Truncated continuous cosine schedule, transcribed (Salimans & Ho 2022, App. / code)."""
    t_min = np.arctan(np.exp(-0.5 * logsnr_max))
    t_max = np.arctan(np.exp(-0.5 * logsnr_min))
    return -2.0 * np.log(np.tan(t_min + np.asarray(t, np.float64) * (t_max - t_min)))


def np_dynamic_threshold(x0, percentile):
    """Imagen Sec. 2.3 as in the paper's pseudo-code (Fig. A.10): per sample,
    s = max(percentile_p |x0|, 1); x0 <- clip(x0, -s, s) / s."""
    out = np.array(x0, np.float64, copy=True)
    for b in range(out.shape[0]):
        s = max(np.percentile(np.abs(out[b]), percentile), 1.0)
        out[b] = np.clip(out[b], -s, s) / s
    return out


# ------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------


def test_cosine_schedule_matches_formula_and_endpoints():
    sched = D.CosineSchedule()
    t = np.linspace(0.0, 1.0, 101)
    np.testing.assert_allclose(sched.logsnr(t), np_cosine_logsnr(t), rtol=1e-4, atol=1e-4)
    alpha, sigma = sched.alpha_sigma(jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
    # Interior: the untruncated cosine alpha = cos(pi t / 2) to within the truncation (e^-10).
    np.testing.assert_allclose(alpha, np.cos(np.pi * t / 2), atol=2e-4)
    np.testing.assert_allclose(sched.logsnr(jnp.array([0.0, 1.0])), [20.0, -20.0], atol=1e-2)
    assert np.all(np.diff(np.asarray(sched.logsnr(t))) < 0)
    np.testing.assert_allclose(sched.logsnr(0.5), 0.0, atol=1e-5)


def test_shifted_cosine_and_get_schedule():
    t = jnp.linspace(0.05, 0.95, 7)
    shifted = D.get_schedule("shifted_cosine", shift=4.0)
    assert shifted == D.ShiftedCosineSchedule.for_resolution(256)
    np.testing.assert_allclose(
        shifted.logsnr(t), D.CosineSchedule().logsnr(t) - 2 * np.log(4.0), rtol=1e-6, atol=1e-5
    )
    assert D.get_schedule() == D.CosineSchedule()
    with pytest.raises(ValueError, match="choose one of"):
        D.get_schedule("cosnie")
    with pytest.raises(ValueError, match="no argument"):
        D.get_schedule("cosine", shift=2.0)
    with pytest.raises(ValueError, match="positive"):
        D.ShiftedCosineSchedule(shift=0.0)


def test_linear_beta_schedule_matches_diffusers_ddpm_table():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod.numpy()
    sched = D.LinearBetaSchedule()  # paper App. F.3: 1000 steps, 1e-4 -> 0.02
    t = (np.arange(1000) + 1) / 1000.0
    alpha, _ = sched.alpha_sigma(jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(np.asarray(alpha) ** 2, ref, rtol=2e-5, atol=1e-7)
    assert float(sched.logsnr(0.0)) == 20.0  # capped instead of +inf


# ------------------------------------------------------------------------------------------
# Predictions and losses
# ------------------------------------------------------------------------------------------


def _batch(seed=0, shape=(4, 6, 6, 3)):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    x0 = jax.random.uniform(k1, shape, minval=-1, maxval=1)
    eps = jax.random.normal(k2, shape)
    t = jax.random.uniform(k3, (shape[0],), minval=0.02, maxval=0.98)
    return x0, eps, t


@pytest.mark.parametrize("prediction", D.PREDICTIONS)
def test_prediction_round_trip_and_numpy_targets(prediction):
    sched = D.CosineSchedule()
    x0, eps, t = _batch()
    x_t = D.diffuse(x0, eps, t, sched)
    a, s = (np.asarray(v)[:, None, None, None] for v in sched.alpha_sigma(t))
    np.testing.assert_allclose(x_t, a * x0 + s * eps, rtol=1e-6, atol=1e-6)
    target = D.prediction_target(x0, eps, t, sched, prediction)
    expected = {"eps": eps, "v": a * eps - s * np.asarray(x0), "x0": x0}[prediction]
    np.testing.assert_allclose(target, expected, rtol=1e-6, atol=1e-6)
    x0_hat, eps_hat = D.to_x0_eps(target, x_t, t, sched, prediction)
    np.testing.assert_allclose(x0_hat, x0, atol=2e-4)
    np.testing.assert_allclose(eps_hat, eps, atol=2e-4)
    for other in D.PREDICTIONS:
        converted = D.convert_prediction(target, x_t, t, sched, source=prediction, target=other)
        np.testing.assert_allclose(
            converted, D.prediction_target(x0, eps, t, sched, other), atol=2e-4
        )


@pytest.mark.parametrize("prediction", D.PREDICTIONS)
def test_losses_uniform_and_min_snr(prediction):
    sched = D.CosineSchedule()
    x0, eps, t = _batch(1)
    pred = jax.random.normal(jax.random.PRNGKey(9), x0.shape)
    target = np.asarray(D.prediction_target(x0, eps, t, sched, prediction))
    mse = ((np.asarray(pred) - target) ** 2).reshape(4, -1).mean(1)
    uniform = D.loss_per_example(pred, x0, eps, t, sched, prediction)
    np.testing.assert_allclose(uniform, mse, rtol=1e-5)
    # Hang et al. 2023: weight in x0 space min(snr, 5), so eps-MSE / snr, v-MSE / (snr + 1).
    snr = np.exp(np.asarray(sched.logsnr(t), np.float64))
    base = np.minimum(snr, 5.0)
    weight = {"eps": base / snr, "v": base / (snr + 1), "x0": base}[prediction]
    weighted = D.loss_per_example(pred, x0, eps, t, sched, prediction, weighting="min_snr")
    np.testing.assert_allclose(weighted, mse * weight, rtol=1e-4)
    assert np.all(np.isfinite(D.min_snr_weight(jnp.array([-20.0, 0.0, 20.0]), prediction)))
    # The clipped SNR+1 weighting: x0-space weight min(snr, 5) + 1 (Salimans & Ho's SNR+1,
    # clipped like min-SNR); on v it is exactly 1 below snr = 5.
    plus_one = base + 1.0
    weight = {"eps": plus_one / snr, "v": plus_one / (snr + 1), "x0": plus_one}[prediction]
    weighted = D.loss_per_example(pred, x0, eps, t, sched, prediction,
                                  weighting="min_snr_plus_one")
    np.testing.assert_allclose(weighted, mse * weight, rtol=1e-4)
    if prediction == "v":
        low = jnp.array([-20.0, -5.0, 0.0, np.log(5.0) - 1e-3])
        np.testing.assert_allclose(D.min_snr_plus_one_weight(low, "v"), 1.0, rtol=1e-5)
    # A smaller weight at high noise (race 4's 0.1): x0-space min(snr, 5) + 0.1.
    plus_c = base + 0.1
    weight = {"eps": plus_c / snr, "v": plus_c / (snr + 1), "x0": plus_c}[prediction]
    weighted = D.loss_per_example(pred, x0, eps, t, sched, prediction,
                                  weighting="min_snr_plus_one", min_snr_offset=0.1)
    np.testing.assert_allclose(weighted, mse * weight, rtol=1e-4)
    with pytest.raises(ValueError, match="min_snr_offset"):
        D.min_snr_plus_one_weight(jnp.zeros(2), prediction, offset=-0.5)
    with pytest.raises(ValueError, match="loss weighting"):
        D.loss_per_example(pred, x0, eps, t, sched, prediction, weighting="snr")


def test_min_snr_gives_equal_x0_space_weight_across_predictions():
    """The three weighted losses of the same x0 error agree (they weight the same x0 error)."""
    sched = D.CosineSchedule()
    x0, eps, t = _batch(2)
    x_t = D.diffuse(x0, eps, t, sched)
    x0_hat = x0 + 0.1 * jax.random.normal(jax.random.PRNGKey(3), x0.shape)
    alpha, sigma = (v[:, None, None, None] for v in sched.alpha_sigma(t))
    eps_hat = (x_t - alpha * x0_hat) / sigma
    losses = [
        D.loss_per_example(
            D.prediction_target(x0_hat, eps_hat, t, sched, p), x0, eps, t, sched, p, "min_snr"
        )
        for p in D.PREDICTIONS
    ]
    np.testing.assert_allclose(losses[0], losses[2], rtol=2e-3)
    np.testing.assert_allclose(losses[1], losses[2], rtol=2e-3)


# ------------------------------------------------------------------------------------------
# Guidance conditioning, noise augmentation
# ------------------------------------------------------------------------------------------


def test_drop_text_condition_rate_and_null_condition():
    b, length, dim = 4000, 3, 2
    embeds = jnp.ones((b, length, dim))
    mask = jnp.ones((b, length), bool)
    out_e, out_m = D.drop_text_condition(jax.random.PRNGKey(0), embeds, mask, 0.1)
    dropped = ~np.asarray(out_m).any(1)
    assert abs(dropped.mean() - 0.1) < 0.015  # 10%, Imagen Sec. 2.2; 3 sigma = 0.014
    np.testing.assert_array_equal(np.asarray(out_e)[dropped], 0.0)
    np.testing.assert_array_equal(np.asarray(out_e)[~dropped], 1.0)
    keep_e, keep_m = D.drop_text_condition(jax.random.PRNGKey(0), embeds, mask, 0.0)
    assert np.asarray(keep_m).all() and np.asarray(keep_e).all()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        D.drop_text_condition(jax.random.PRNGKey(0), embeds, mask, 1.5)
    doubled_e, doubled_m = D.with_null_condition(embeds[:2], mask[:2])
    assert doubled_e.shape == (4, length, dim)
    np.testing.assert_array_equal(doubled_m, [[True] * 3] * 2 + [[False] * 3] * 2)


def test_guided_model_fn_one_batched_call_paper_convention():
    calls = []

    def model_fn_2b(x, t):
        calls.append(x.shape)
        return jnp.concatenate([jnp.full_like(x[:2], 3.0), jnp.full_like(x[2:], 1.0)])

    x = jnp.zeros((2, 4, 4, 3))
    t = jnp.full((2,), 0.5)
    np.testing.assert_allclose(D.guided_model_fn(model_fn_2b, 1.0)(x, t), 3.0)  # w=1: cond
    np.testing.assert_allclose(D.guided_model_fn(model_fn_2b, 0.0)(x, t), 1.0)  # w=0: uncond
    np.testing.assert_allclose(D.guided_model_fn(model_fn_2b, 10.0)(x, t), 1.0 + 10 * 2.0)
    per_example = D.guided_model_fn(model_fn_2b, jnp.array([1.0, 2.0]))(x, t)
    np.testing.assert_allclose(per_example[:, 0, 0, 0], [3.0, 5.0])
    assert calls == [(4, 4, 4, 3)] * 4


def test_noise_augment_is_the_forward_process():
    sched = D.CosineSchedule()
    lowres = jnp.full((3, 64, 64, 3), 0.5)
    aug = jnp.array([0.0, 0.5, 1.0])
    out = np.asarray(D.noise_augment(lowres, aug, jax.random.PRNGKey(0), sched))
    alpha, sigma = (np.asarray(v) for v in sched.alpha_sigma(aug))
    np.testing.assert_allclose(out[0], 0.5, atol=1e-3)  # level 0: (almost) clean
    for i in range(3):
        assert abs(out[i].mean() - 0.5 * alpha[i]) < 4 * sigma[i] / 110 + 1e-4
        assert abs(out[i].std() - sigma[i]) < 0.03 * sigma[i] + 1e-4
    levels = D.random_aug_level(jax.random.PRNGKey(1), 1000)
    assert levels.shape == (1000,) and 0 <= levels.min() and levels.max() <= 1
    assert abs(float(levels.mean()) - 0.5) < 0.05


# ------------------------------------------------------------------------------------------
# Thresholding (Must show 3, first half)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 8, 8, 3), (5, 17, 3), (3, 1000)])
@pytest.mark.parametrize("percentile", [99.5, 90.0, 50.0, 100.0])
def test_dynamic_threshold_matches_numpy_transcription(shape, percentile):
    rng = np.random.default_rng(sum(shape) + int(percentile))
    # Per-sample scales from 0.3 (no-op, s < 1) to 4 (heavily clipped).
    scale = np.geomspace(0.2, 4.0, shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))
    x0 = (rng.standard_normal(shape) * scale).astype(np.float32)
    x0.reshape(shape[0], -1)[0, 0] = 3.0  # one outlier in a sample whose percentile is < 1
    got = np.asarray(D.dynamic_threshold(jnp.asarray(x0), percentile=percentile))
    np.testing.assert_allclose(got, np_dynamic_threshold(x0, percentile), rtol=1e-6, atol=1e-6)
    assert np.abs(got).max() <= 1.0 + 1e-6
    # Per sample, not per batch: a sample whose percentile is <= 1 is only clipped to [-1, 1].
    low = np.percentile(np.abs(x0).reshape(shape[0], -1), percentile, axis=1) <= 1
    assert (~low).any() and (low.any() or percentile == 100.0)
    np.testing.assert_array_equal(got[low], np.clip(x0[low], -1, 1))


def test_dynamic_threshold_matches_diffusers_and_default_percentile():
    import torch
    from diffusers import DDIMScheduler

    x0 = np.random.default_rng(0).standard_normal((4, 3, 16, 16)) * np.array([0.2, 1, 2, 5])[
        :, None, None, None
    ]
    sched = DDIMScheduler(thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=1e9)
    ref = sched._threshold_sample(torch.from_numpy(x0)).numpy()
    got = D.dynamic_threshold(jnp.asarray(x0.transpose(0, 2, 3, 1), jnp.float32))  # NHWC
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), ref, atol=1e-6)
    np.testing.assert_allclose(
        D.apply_thresholding(jnp.asarray(x0), "static"), np.clip(x0, -1, 1), atol=1e-6
    )


def test_threshold_errors_are_explicit():
    x = jnp.ones((2, 4))
    with pytest.raises(ValueError, match="looks like a quantile"):
        D.dynamic_threshold(x, percentile=0.995)
    with pytest.raises(ValueError, match=r"\(0, 100\]"):
        D.dynamic_threshold(x, percentile=150)
    with pytest.raises(ValueError, match="leading batch axis"):
        D.dynamic_threshold(jnp.ones((4,)))
    with pytest.raises(ValueError, match="choose one of"):
        D.apply_thresholding(x, "dyanmic")


# ------------------------------------------------------------------------------------------
# Gin wiring
# ------------------------------------------------------------------------------------------


def test_gin_builds_sampling_config_and_schedule():
    gin.clear_config()
    try:
        gin.parse_config(
            [
                "SamplingConfig.sampler = 'dpmpp_2m'",
                "SamplingConfig.num_steps = 20",
                "SamplingConfig.thresholding = 'static'",
                "SamplingConfig.guidance_weight = 5.0",
                "get_schedule.name = 'shifted_cosine'",
                "get_schedule.shift = 2.0",
            ]
        )
        cfg = D.SamplingConfig()
        sched = D.get_schedule()
    finally:
        gin.clear_config()
    assert (cfg.sampler, cfg.num_steps, cfg.thresholding, cfg.guidance_weight) == (
        "dpmpp_2m", 20, "static", 5.0
    )
    assert sched == D.ShiftedCosineSchedule(shift=2.0)
    assert D.SamplingConfig().thresholding == "dynamic"  # defaults come back after clearing
    with pytest.raises(ValueError, match="unknown sampler"):
        D.SamplingConfig(sampler="euler")
