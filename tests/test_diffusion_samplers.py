"""Samplers on analytic models (issue 3, Must show 1-4).

The Bayes-optimal denoiser of Gaussian-mixture data is closed form
(`imagen_jax.diffusion.GaussianMixture1D`), so the samplers can be checked without any training:
  1. they reproduce the data mean and variance within 2% (every sampler x eps / v / x0);
  2. DDIM and DPM-Solver++(2M) trajectories equal diffusers' DDIMScheduler and
     DPMSolverMultistepScheduler (PyTorch) step by step to 1e-4, and DDPM equals diffusers' DDIM
     with eta = 1 fed the same noise;
  3. at guidance weight 10 dynamic thresholding keeps samples in [-1, 1] where none saturates;
  4. the sampler's jaxpr has one loop and one (batched) model call, whatever num_steps is.
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import diffusion as D

SCHEDULE = D.CosineSchedule()
GAUSSIAN = D.GaussianMixture1D(weights=(1.0,), means=(0.5,), stds=(0.5,))
MIXTURE = D.GaussianMixture1D(weights=(0.25, 0.75), means=(-0.5, 0.7), stds=(0.2, 0.3))
# Step counts at which each sampler matches the moments within 2% (documented in
# README.md (Diffusion core)). DDPM and DDIM are first order: their variance bias is O(1/N)
# (about -2% x 250/N for DDPM and -5% x 50/N for DDIM on unit-scale data), DPM-Solver++(2M)
# is second order.
MOMENT_STEPS = {"ddpm": 1000, "ddim": 250, "dpmpp_2m": 25}
PTYPE = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def np_cosine_logsnr(t, logsnr_min=-20.0, logsnr_max=20.0):
    t_min = np.arctan(np.exp(-0.5 * logsnr_max))
    t_max = np.arctan(np.exp(-0.5 * logsnr_min))
    return -2.0 * np.log(np.tan(t_min + np.asarray(t, np.float64) * (t_max - t_min)))


def np_mixture_prediction(mix, x, t, prediction):
    """float64 numpy transcription of the exact posterior means (independent of the JAX code)."""
    logsnr = np_cosine_logsnr(t)
    a, s = np.sqrt(1 / (1 + np.exp(-logsnr))), np.sqrt(1 / (1 + np.exp(logsnr)))
    log_r, x0_k, eps_k = [], [], []
    for w, mu, sd in zip(mix.weights, mix.means, mix.stds):
        var = a * a * sd * sd + s * s
        resid = x - a * mu
        log_r.append(np.log(w) - 0.5 * (np.log(var) + resid**2 / var))
        x0_k.append(mu + a * sd * sd / var * resid)
        eps_k.append(s * resid / var)
    log_r = np.stack(log_r)
    r = np.exp(log_r - log_r.max(0))
    r /= r.sum(0)
    x0, eps = (r * np.stack(x0_k)).sum(0), (r * np.stack(eps_k)).sum(0)
    return {"eps": eps, "v": a * eps - s * x0, "x0": x0}[prediction]


def two_datasets_model(prediction):
    """First half of the batch: GAUSSIAN data, second half: MIXTURE data (one compile)."""
    gauss_fn = GAUSSIAN.model_fn(SCHEDULE, prediction)
    mix_fn = MIXTURE.model_fn(SCHEDULE, prediction)

    def model_fn(x, t):
        h = x.shape[0] // 2
        return jnp.concatenate([gauss_fn(x[:h], t[:h]), mix_fn(x[h:], t[h:])])

    return model_fn


# ------------------------------------------------------------------------------------------
# Must show 1: moments of the data
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", D.PREDICTIONS)
@pytest.mark.parametrize("sampler", D.SAMPLERS)
def test_samplers_reproduce_data_mean_and_variance(sampler, prediction):
    if sampler == "ddpm":
        # Stochastic: 2^16 values per data set keep the Monte Carlo error of the variance at
        # 0.55% (1 sigma) next to the ~0.8% discretisation bias at 1000 steps.
        n, init = 2**16, None
    else:
        # Deterministic maps of the initial noise: stratified normal quantiles (quasi Monte
        # Carlo) make the sampling error negligible, so only the discretisation error is left.
        n = 2**12
        u = (jnp.arange(n) + 0.5) / n
        z = jax.scipy.special.ndtri(u)
        init = jnp.concatenate([z, z]).reshape(2 * n, 1)
    out = D.sample(
        two_datasets_model(prediction),
        (2 * n, 1),
        jax.random.PRNGKey(0),
        schedule=SCHEDULE,
        sampler=sampler,
        num_steps=MOMENT_STEPS[sampler],
        prediction=prediction,
        init_noise=init,
    )
    out = np.asarray(out, np.float64).reshape(2, n)
    for data, x in zip((GAUSSIAN, MIXTURE), out):
        assert abs(x.mean() / data.mean - 1) < 0.02, (data, x.mean(), data.mean)
        assert abs(x.var() / data.variance - 1) < 0.02, (data, x.var(), data.variance)


def test_first_order_variance_bias_matches_exact_recursion():
    """DDIM on Gaussian data is linear: its output variance has a closed form per step.

    Propagates Var[x] through the DDIM recursion in numpy (alphas_cumprod form, Song et al.
    2021 eq. 12) and compares with the sampler run on quasi-random noise: checks the coefficients
    of every step, not only that the result is close to the data.
    """
    n_steps, mu, std = 20, GAUSSIAN.means[0], GAUSSIAN.stds[0]
    logsnr = np_cosine_logsnr(np.linspace(1, 0, n_steps + 1))
    abar = 1 / (1 + np.exp(-logsnr))
    abar[-1] = 1.0
    mean, var = 0.0, 1.0
    for i in range(n_steps):
        a_t, a_s = abar[i], abar[i + 1]
        gain = a_t**0.5 * std**2 / (a_t * std**2 + 1 - a_t)  # E[x0|x] = mu + gain (x - a mu)
        coef_x = ((1 - a_s) / (1 - a_t)) ** 0.5  # x_s = sqrt(a_s) x0 + sqrt(1-a_s) eps_hat
        coef_x0 = a_s**0.5 - coef_x * a_t**0.5
        mean = coef_x * mean + coef_x0 * (mu + gain * (mean - a_t**0.5 * mu))
        lin = coef_x + coef_x0 * gain
        var = lin**2 * var
    u = (jnp.arange(8192) + 0.5) / 8192
    out = D.sample(
        GAUSSIAN.model_fn(SCHEDULE, "x0"),
        (8192, 1),
        jax.random.PRNGKey(0),
        schedule=SCHEDULE,
        sampler="ddim",
        num_steps=n_steps,
        prediction="x0",
        init_noise=jax.scipy.special.ndtri(u).reshape(-1, 1),
    )
    out = np.asarray(out, np.float64)
    assert var < 0.9 * std**2  # 20 DDIM steps are visibly biased ...
    np.testing.assert_allclose([out.mean(), out.var()], [mean, var], rtol=2e-3)  # ... exactly so


# ------------------------------------------------------------------------------------------
# Must show 2: parity with diffusers
# ------------------------------------------------------------------------------------------


def _diffusers_trajectory(sampler, prediction, init, n_steps, model, thresholding=False):
    """Runs diffusers on our schedule: discrete step j <-> t = (j + 1) / T with T = n_steps.

    ``trailing`` spacing then visits t = 1, 1 - 1/N, ..., 1/N like our sampler, and the final
    step goes to alpha_bar = 1 (DDIM ``set_alpha_to_one``, DPM ``final_sigmas_type='zero'``).
    ``alphas_cumprod`` is overwritten with our schedule's alpha^2 at those times (float64).
    """
    import torch
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    big_t = n_steps
    abar = 1 / (1 + np.exp(-np_cosine_logsnr((np.arange(big_t) + 1) / big_t)))
    common = dict(
        num_train_timesteps=big_t,
        prediction_type=PTYPE[prediction],
        timestep_spacing="trailing",
        thresholding=thresholding,
        dynamic_thresholding_ratio=0.995,  # Imagen's p = 99.5
        sample_max_value=1e30,  # no upper cap on s: the paper has none
    )
    if sampler == "ddim":
        sched = DDIMScheduler(set_alpha_to_one=True, clip_sample=False, **common)
    else:
        sched = DPMSolverMultistepScheduler(
            algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero", **common
        )
    sched.alphas_cumprod = torch.tensor(abar, dtype=torch.float64)
    sched.set_timesteps(n_steps)
    x = torch.from_numpy(np.asarray(init, np.float64))
    trajectory = []
    for step in sched.timesteps:
        out = torch.from_numpy(model(x.numpy(), (int(step) + 1) / big_t))
        if sampler == "ddim":
            # Our DDIM re-derives eps from the (thresholded) x0_hat, diffusers' option for that.
            x = sched.step(out, int(step), x, eta=0.0, use_clipped_model_output=True).prev_sample
        else:
            x = sched.step(out, int(step), x).prev_sample
        trajectory.append(x.numpy().copy())
    return np.stack(trajectory)


@pytest.mark.parametrize("prediction", D.PREDICTIONS)
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_trajectories_match_diffusers(sampler, prediction):
    n_steps, shape = 20, (3, 4, 4, 2)
    init = np.asarray(jax.random.normal(jax.random.PRNGKey(1), shape), np.float64)
    ref = _diffusers_trajectory(
        sampler, prediction, init, n_steps, lambda x, t: np_mixture_prediction(MIXTURE, x, t,
                                                                               prediction)
    )
    kw = dict(schedule=SCHEDULE, sampler=sampler, num_steps=n_steps, prediction=prediction,
              return_trajectory=True)
    with jax.enable_x64(True):  # algorithmic parity, free of float32 rounding
        _, ours64 = D.sample(MIXTURE.model_fn(SCHEDULE, prediction), shape, jax.random.PRNGKey(0),
                             init_noise=jnp.asarray(init, jnp.float64), **kw)
    assert ours64.dtype == np.float64
    np.testing.assert_allclose(np.asarray(ours64), ref, atol=1e-4, rtol=0)
    _, ours32 = D.sample(MIXTURE.model_fn(SCHEDULE, prediction), shape, jax.random.PRNGKey(0),
                         init_noise=jnp.asarray(init, jnp.float32), **kw)
    # float32 eps prediction: x0 = (x_t - sigma eps) / alpha at t = 1 (alpha = e^-10) amplifies
    # the rounding of x_t - sigma eps ~1e4-fold; the error left after the first step is ~3e-4.
    # Intrinsic to eps in float32 (v and x0 have no such division) -- see predictions.py.
    tol = 1e-3 if prediction == "eps" else 1e-4
    np.testing.assert_allclose(np.asarray(ours32, np.float64), ref, atol=tol, rtol=0)


def guided_pair(weight):
    """Conditional data MIXTURE vs unconditional data N(-0.2, 0.35^2): JAX and numpy versions."""
    uncond = D.GaussianMixture1D(weights=(1.0,), means=(-0.2,), stds=(0.35,))

    def jax_model_2b(prediction):
        cond_fn, uncond_fn = MIXTURE.model_fn(SCHEDULE, prediction), uncond.model_fn(SCHEDULE,
                                                                                    prediction)

        def model_fn_2b(x2, t2):
            h = x2.shape[0] // 2
            return jnp.concatenate([cond_fn(x2[:h], t2[:h]), uncond_fn(x2[h:], t2[h:])])

        return model_fn_2b

    def np_model(prediction):
        def fn(x, t):
            c = np_mixture_prediction(MIXTURE, x, t, prediction)
            u = np_mixture_prediction(uncond, x, t, prediction)
            return u + weight * (c - u)

        return fn

    return jax_model_2b, np_model


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_trajectories_match_diffusers_with_guidance_and_dynamic_thresholding(sampler):
    weight, n_steps, shape, prediction = 5.0, 20, (4, 8, 8, 3), "v"
    jax_model_2b, np_model = guided_pair(weight)
    init = np.asarray(jax.random.normal(jax.random.PRNGKey(2), shape), np.float64)
    ref = _diffusers_trajectory(sampler, prediction, init, n_steps, np_model(prediction),
                                thresholding=True)
    _, ours = D.sample(
        D.guided_model_fn(jax_model_2b(prediction), weight), shape, jax.random.PRNGKey(0),
        schedule=SCHEDULE, sampler=sampler, num_steps=n_steps, prediction=prediction,
        thresholding="dynamic", init_noise=jnp.asarray(init, jnp.float32), return_trajectory=True,
    )
    np.testing.assert_allclose(np.asarray(ours, np.float64), ref, atol=1e-4, rtol=0)
    # The bound holds by construction (the last step returns the thresholded x0) ...
    assert np.abs(ref[-1]).max() <= 1.0 and np.abs(ours[-1]).max() <= 1.0
    # ... so the control shows thresholding really acted: the same guided model, noise and
    # sampler without it leave [-1, 1], and differ from the thresholded trajectory throughout.
    raw = np.asarray(D.sample(
        D.guided_model_fn(jax_model_2b(prediction), weight), shape, jax.random.PRNGKey(0),
        schedule=SCHEDULE, sampler=sampler, num_steps=n_steps, prediction=prediction,
        thresholding="none", init_noise=jnp.asarray(init, jnp.float32)), np.float64)
    # (Measured: |raw| max 3.2, 99.5% of pixels outside [-1, 1], 2.7 from the thresholded.)
    raw_max, outside = float(np.abs(raw).max()), float((np.abs(raw) > 1).mean())
    assert raw_max > 2.5 and outside > 0.9, (raw_max, outside)
    assert float(np.abs(raw - ref[-1]).max()) > 1.5


def test_ddpm_equals_diffusers_ddim_eta_one_with_the_same_noise():
    """Ancestral sampling = DDIM with eta = 1 (Song et al. 2021, Sec. 4.1), given our noise."""
    import torch
    from diffusers import DDIMScheduler

    n_steps, shape, prediction = 20, (2, 4, 4, 3), "eps"
    rng = jax.random.PRNGKey(7)
    _, ours = D.sample(MIXTURE.model_fn(SCHEDULE, prediction), shape, rng, schedule=SCHEDULE,
                       sampler="ddpm", num_steps=n_steps, prediction=prediction,
                       return_trajectory=True)
    # The sampler's documented noise: split(rng) -> (initial, per-step keys split n ways).
    rng_init, rng_steps = jax.random.split(rng)
    init = np.asarray(jax.random.normal(rng_init, shape), np.float64)
    keys = jax.random.split(rng_steps, n_steps)
    abar = 1 / (1 + np.exp(-np_cosine_logsnr((np.arange(n_steps) + 1) / n_steps)))
    sched = DDIMScheduler(num_train_timesteps=n_steps, prediction_type=PTYPE[prediction],
                          timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    sched.alphas_cumprod = torch.tensor(abar, dtype=torch.float64)
    sched.set_timesteps(n_steps)
    x = torch.from_numpy(init)
    ref = []
    for i, step in enumerate(sched.timesteps):
        t = (int(step) + 1) / n_steps
        out = torch.from_numpy(np_mixture_prediction(MIXTURE, x.numpy(), t, prediction))
        noise = torch.from_numpy(np.asarray(jax.random.normal(keys[i], shape), np.float64))
        x = sched.step(out, int(step), x, eta=1.0, use_clipped_model_output=True,
                       variance_noise=noise).prev_sample
        ref.append(x.numpy().copy())
    # Steps after the first agree to float32 rounding; the first carries the eps-at-t=1
    # amplification (see test_trajectories_match_diffusers).
    np.testing.assert_allclose(np.asarray(ours, np.float64), np.stack(ref), atol=1e-3, rtol=0)
    np.testing.assert_allclose(np.asarray(ours[-1], np.float64), ref[-1], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------
# Must show 3 (second half): guidance 10 with and without dynamic thresholding
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", D.SAMPLERS)
def test_guidance_10_dynamic_threshold_stays_in_range_none_saturates(sampler):
    jax_model_2b, _ = guided_pair(10.0)
    model_fn = D.guided_model_fn(jax_model_2b("eps"), 10.0)
    kw = dict(schedule=SCHEDULE, sampler=sampler, num_steps=25, prediction="eps")
    rng, shape = jax.random.PRNGKey(3), (4, 16, 16, 3)
    raw = np.asarray(D.sample(model_fn, shape, rng, thresholding="none", **kw))
    dyn = np.asarray(D.sample(model_fn, shape, rng, thresholding="dynamic", **kw))
    # No thresholding: the guided x0 overshoots, (nearly) every pixel leaves [-1, 1].
    assert np.abs(raw).max() > 3.0 and (np.abs(raw) > 1).mean() > 0.9
    # Dynamic: inside [-1, 1], only ~0.5% of pixels (100 - p) at the boundary, detail kept.
    assert np.abs(dyn).max() <= 1.0
    assert (np.abs(dyn) > 0.999).mean() < 0.02 and dyn.std() > 2 * raw.std()
    if sampler == "ddim":  # static clipping stays in range by saturating (Imagen Sec. 2.3)
        static = np.asarray(D.sample(model_fn, shape, rng, thresholding="static", **kw))
        assert np.abs(static).max() <= 1.0 and (np.abs(static) > 0.999).mean() > 0.5


# ------------------------------------------------------------------------------------------
# Must show 4: one loop, one model call per step
# ------------------------------------------------------------------------------------------


def _eqns(jaxpr):
    """All equations of a jaxpr, recursing into sub-jaxprs (scan/while bodies, pjit, cond)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            subs = param if isinstance(param, tuple | list) else [param]
            for sub in subs:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _eqns(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _eqns(sub)


@pytest.mark.parametrize("sampler", D.SAMPLERS)
def test_jaxpr_has_one_loop_and_one_batched_model_call(sampler):
    batch = 2
    traced_calls = []

    @jax.jit
    def analytic_unet_2b(x2, t2):  # a named pjit we can find in the jaxpr
        return jnp.concatenate(
            [MIXTURE.model_fn(SCHEDULE)(x2[:batch], t2[:batch]),
             GAUSSIAN.model_fn(SCHEDULE)(x2[batch:], t2[batch:])]
        )

    def model_fn_2b(x2, t2):  # Python-level call counter (runs at trace time only)
        traced_calls.append(x2.shape)
        return analytic_unet_2b(x2, t2)

    def program(rng, num_steps):
        return D.sample(D.guided_model_fn(model_fn_2b, 7.5), (batch, 8, 8, 3), rng,
                        schedule=SCHEDULE, sampler=sampler, num_steps=num_steps,
                        thresholding="dynamic")

    sizes = []
    for num_steps in (2, 50):
        jaxpr = jax.make_jaxpr(lambda r, n=num_steps: program(r, n))(jax.random.PRNGKey(0))
        eqns = list(_eqns(jaxpr.jaxpr))
        loops = [e for e in eqns if e.primitive.name in ("scan", "while")]
        calls = [e for e in eqns if e.primitive.name in ("pjit", "jit")
                 and e.params.get("name") == "analytic_unet_2b"]
        assert len(loops) == 1, [e.primitive.name for e in loops]
        assert loops[0].params["length"] == num_steps
        in_loop = [e for e in _eqns(loops[0].params["jaxpr"].jaxpr)
                   if e.params.get("name") == "analytic_unet_2b"]
        assert len(calls) == 1 and len(in_loop) == 1  # the only model call is inside the loop
        assert calls[0].invars[0].aval.shape == (2 * batch, 8, 8, 3)  # cond + uncond batched
        sizes.append(len(eqns))
    assert sizes[0] == sizes[1]  # the program does not grow with num_steps
    assert traced_calls == [(2 * batch, 8, 8, 3)] * 2  # one call per traced program


# ------------------------------------------------------------------------------------------
# Usage inside bigger programs, errors
# ------------------------------------------------------------------------------------------


def test_sample_inside_outer_jit_and_vmap_with_traced_parameters():
    """The cascade pattern: model_fn closes over traced parameters in an outer jit."""

    def model_apply(params, x, t):
        return MIXTURE.model_fn(SCHEDULE, "v")(x * params["scale"], t)

    @jax.jit
    def generate(params, rng):
        return D.sample(lambda x, t: model_apply(params, x, t), (2, 4, 4, 1), rng,
                        schedule=SCHEDULE, sampler="dpmpp_2m", num_steps=5, prediction="v")

    rng = jax.random.PRNGKey(0)
    direct = D.sample(MIXTURE.model_fn(SCHEDULE, "v"), (2, 4, 4, 1), rng, schedule=SCHEDULE,
                      sampler="dpmpp_2m", num_steps=5, prediction="v")
    np.testing.assert_allclose(generate({"scale": jnp.float32(1.0)}, rng), direct, atol=1e-6)
    keys = jax.random.split(rng, 3)
    batched = jax.vmap(lambda k: generate({"scale": jnp.float32(1.0)}, k))(keys)
    assert batched.shape == (3, 2, 4, 4, 1)
    np.testing.assert_allclose(batched[0], generate({"scale": jnp.float32(1.0)}, keys[0]),
                               atol=1e-6)


def test_sampler_config_guided_and_defaults():
    jax_model_2b, _ = guided_pair(3.0)
    cfg = D.SamplingConfig(sampler="ddim", num_steps=6, thresholding="dynamic",
                           guidance_weight=3.0)
    rng = jax.random.PRNGKey(5)
    via_cfg = cfg.sample_guided(jax_model_2b("eps"), (2, 4, 4, 3), rng, schedule=SCHEDULE)
    direct = D.sample(D.guided_model_fn(jax_model_2b("eps"), 3.0), (2, 4, 4, 3), rng,
                      schedule=SCHEDULE, sampler="ddim", num_steps=6, thresholding="dynamic")
    np.testing.assert_allclose(via_cfg, direct, atol=1e-6)
    assert D.SamplingConfig().num_steps == D.DEFAULT_NUM_STEPS["ddpm"] == 256  # one default


def test_sample_rejects_bad_arguments_with_clear_errors():
    fn = MIXTURE.model_fn(SCHEDULE)
    rng = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="unknown sampler"):
        D.sample(fn, (2, 3), rng, schedule=SCHEDULE, sampler="euler", num_steps=3)
    with pytest.raises(ValueError, match="unknown prediction"):
        D.sample(fn, (2, 3), rng, schedule=SCHEDULE, num_steps=3, prediction="score")
    with pytest.raises(ValueError, match="num_steps"):
        D.sample(fn, (2, 3), rng, schedule=SCHEDULE, num_steps=0)
    with pytest.raises(ValueError, match="init_noise"):
        D.sample(fn, (2, 3), rng, schedule=SCHEDULE, num_steps=3, init_noise=jnp.zeros((3, 3)))
    with pytest.raises(TypeError, match="get_schedule"):
        D.sample(fn, (2, 3), rng, schedule="cosine", num_steps=3)
    with pytest.raises(ValueError, match="shape of x_t"):
        D.sample(lambda x, t: x[:, :1], (2, 3), rng, schedule=SCHEDULE, num_steps=3)
