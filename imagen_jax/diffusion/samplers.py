"""Compiled samplers: ancestral (DDPM), DDIM and DPM-Solver++(2M), one `lax.scan` over steps.

All three run on the same time grid t_i = 1 - i / N (i = 0..N) and share one step body:

  1. one model call ``model_fn(x_t, t [B])`` (guidance, if any, is batched inside it:
     `guided_model_fn`);
  2. conversion of the prediction to x0_hat (`predictions.x0_eps_from_prediction`);
  3. thresholding of x0_hat (none / static / dynamic, Imagen Sec. 2.3);
  4. the sampler's update from (x_t, x0_hat) to x_s.

Every update is written in terms of the thresholded x0_hat and x_t only (eps_hat is re-derived
as (x_t - alpha_t x0_hat) / sigma_t), so thresholding acts consistently on all samplers. The last
step goes to log-SNR = +inf (alpha = 1, sigma = 0): the returned sample is the final step's
(thresholded) x0_hat, as in Ho et al. 2020 and diffusers' ``set_alpha_to_one`` /
``final_sigmas_type="zero"``.

Per-step coefficients depend only on the (static) schedule and step count, so they are computed
once as [N] tables and scanned over; the compiled program has one loop whose size does not depend
on N.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion.discrete import (
    DiscreteSchedule,
    guided_learned_range_model_fn,
    sample_with_settings,
)
from imagen_jax.diffusion.guidance import guided_model_fn
from imagen_jax.diffusion.predictions import check_prediction, x0_eps_from_prediction
from imagen_jax.diffusion.respacing import EVEN_SPACING
from imagen_jax.diffusion.schedules import CosineSchedule, Schedule, alpha_sigma_from_logsnr
from imagen_jax.diffusion.settings import (
    DISCRETE_SAMPLERS,
    NO_THRESHOLD_CAP,
    SAMPLERS,
    check_sampling_settings,
)
from imagen_jax.diffusion.thresholding import (
    DEFAULT_PERCENTILE,
    apply_thresholding,
    check_percentile,
    check_thresholding,
)

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]

# Step counts used when `num_steps` is not given (the paper states none): practical defaults for
# images. Matching the mean and variance of unit-scale Gaussian-mixture data within 2% takes more
# for the first-order samplers, whose variance bias is O(1/N): 1000 (ddpm), 250 (ddim), 25
# (dpmpp_2m); see tests/test_diffusion_samplers.py and README.md (Diffusion core).
DEFAULT_NUM_STEPS = {"ddpm": 256, "ddim": 50, "dpmpp_2m": 25}


def check_sampler(sampler: str) -> str:
    if sampler not in SAMPLERS:
        hint = " (discrete: use SamplingConfig.sample)" if sampler in DISCRETE_SAMPLERS else ""
        raise ValueError(f"unknown sampler {sampler!r}{hint}; choose one of {SAMPLERS}")
    return sampler


# ------------------------------------------------------------------------------------------
# Single-step updates (pure; scalars logsnr_t, logsnr_s are shared by the whole batch).
# ------------------------------------------------------------------------------------------


def ddim_step(x_t: Array, x0_hat: Array, logsnr_t: Array, logsnr_s: Array) -> Array:
    """Deterministic DDIM (Song et al. 2021, eta = 0) from t to s < t.

    x_s = alpha_s x0_hat + sigma_s eps_hat with eps_hat = (x_t - alpha_t x0_hat) / sigma_t,
    i.e. x_s = (sigma_s / sigma_t) x_t - alpha_s expm1(-h) x0_hat with h = (logsnr_s -
    logsnr_t) / 2 (the first-order DPM-Solver++ form; expm1 keeps small steps accurate).
    """
    alpha_s, sigma_s = alpha_sigma_from_logsnr(logsnr_s)
    _, sigma_t = alpha_sigma_from_logsnr(logsnr_t)
    h = 0.5 * (logsnr_s - logsnr_t)
    return (sigma_s / sigma_t) * x_t - alpha_s * jnp.expm1(-h) * x0_hat


def dpmpp_2m_step(
    x_t: Array, x0_hat: Array, x0_prev: Array, logsnr_t: Array, logsnr_s: Array, h_ratio: Array
) -> Array:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2, midpoint form) from t to s.

    ``h_ratio = h / h_prev`` (h = half log-SNR increments); the previous step's x0_hat
    extrapolates D = x0_hat + h_ratio / 2 (x0_hat - x0_prev). ``h_ratio = 0`` is first order
    (the first and the final step).
    """
    d = x0_hat + 0.5 * h_ratio * (x0_hat - x0_prev)
    return ddim_step(x_t, d, logsnr_t, logsnr_s)


def ddpm_step(
    x_t: Array, x0_hat: Array, logsnr_t: Array, logsnr_s: Array, noise: Array
) -> Array:
    """Ancestral step: a sample of q(x_s | x_t, x0 = x0_hat) (Ho et al. 2020, eq. 6-7).

    With c = 1 - exp(logsnr_t - logsnr_s) = -expm1(...): mean = alpha_s ((1 - c) x_t / alpha_t
    + c x0_hat), variance = c sigma_s^2 (Kingma et al. 2021, App. A). ``logsnr_s = +inf`` gives
    x0_hat with no noise.
    """
    alpha_s, sigma_s = alpha_sigma_from_logsnr(logsnr_s)
    alpha_t, _ = alpha_sigma_from_logsnr(logsnr_t)
    delta = logsnr_t - logsnr_s  # <= 0
    c = -jnp.expm1(delta)
    mean = (alpha_s / alpha_t) * jnp.exp(delta) * x_t + alpha_s * c * x0_hat
    return mean + jnp.sqrt(c) * sigma_s * noise


# ------------------------------------------------------------------------------------------
# The sampling loop.
# ------------------------------------------------------------------------------------------


def step_tables(schedule: Schedule, num_steps: int, dtype: Any = jnp.float32) -> dict[str, Array]:
    """Per-step [N] tables: model time t, logsnr_t, logsnr_s (+inf at the end), h_ratio."""
    t_grid = jnp.linspace(1.0, 0.0, num_steps + 1, dtype=dtype)  # [N + 1]
    logsnr = schedule.logsnr(t_grid).astype(dtype)
    logsnr = logsnr.at[-1].set(jnp.inf)  # last step denoises completely
    logsnr_t, logsnr_s = logsnr[:-1], logsnr[1:]
    h = 0.5 * (logsnr_s - logsnr_t)  # [N], +inf at the last step
    h_prev = jnp.concatenate([jnp.ones((1,), dtype), h[:-1]])
    step = jnp.arange(num_steps)
    second_order = (step > 0) & (step < num_steps - 1)  # DPM-Solver++ lower order at both ends
    h_ratio = jnp.where(second_order, h / h_prev, 0.0).astype(dtype)
    return {"t": t_grid[:-1], "logsnr_t": logsnr_t, "logsnr_s": logsnr_s, "h_ratio": h_ratio}


def _sample_impl(
    model_fn: ModelFn,
    shape: tuple[int, ...],
    rng: Array,
    init_noise: Array | None,
    *,
    schedule: Schedule,
    sampler: str,
    num_steps: int,
    prediction: str,
    thresholding: str,
    percentile: float,
    return_trajectory: bool,
) -> Array | tuple[Array, Array]:
    rng_init, rng_steps = jax.random.split(rng)
    if init_noise is None:
        x_init = jax.random.normal(rng_init, shape, jnp.float32)
    else:
        x_init = init_noise.astype(jnp.promote_types(init_noise.dtype, jnp.float32))
    dtype = x_init.dtype
    batch = shape[0]
    tables = step_tables(schedule, num_steps, dtype)
    tables["key"] = jax.random.split(rng_steps, num_steps)

    def body(carry, xs):
        x_t, x0_prev = carry  # [B, ...] each
        t = jnp.full((batch,), xs["t"], dtype)
        pred = model_fn(x_t, t)
        if pred.shape != x_t.shape:
            raise ValueError(
                f"model_fn returned shape {pred.shape}; the sampler needs a prediction of the "
                f"shape of x_t, {x_t.shape}"
            )
        alpha_t, sigma_t = alpha_sigma_from_logsnr(xs["logsnr_t"])
        x0_hat, _ = x0_eps_from_prediction(pred.astype(dtype), x_t, alpha_t, sigma_t, prediction)
        x0_hat = apply_thresholding(x0_hat, thresholding, percentile)
        if sampler == "ddpm":
            noise = jax.random.normal(xs["key"], shape, dtype)
            x_s = ddpm_step(x_t, x0_hat, xs["logsnr_t"], xs["logsnr_s"], noise)
        elif sampler == "ddim":
            x_s = ddim_step(x_t, x0_hat, xs["logsnr_t"], xs["logsnr_s"])
        else:
            x_s = dpmpp_2m_step(
                x_t, x0_hat, x0_prev, xs["logsnr_t"], xs["logsnr_s"], xs["h_ratio"]
            )
        return (x_s, x0_hat), (x_s if return_trajectory else None)

    (x_final, _), trajectory = jax.lax.scan(body, (x_init, jnp.zeros_like(x_init)), tables)
    if return_trajectory:
        return x_final, trajectory
    return x_final


_STATIC_ARGS = (
    "model_fn",
    "shape",
    "schedule",
    "sampler",
    "num_steps",
    "prediction",
    "thresholding",
    "percentile",
    "return_trajectory",
)
_sample_jit = jax.jit(_sample_impl, static_argnames=_STATIC_ARGS)


def _is_traced(*xs: Any) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(xs))


def sample(
    model_fn: ModelFn,
    shape: tuple[int, ...],
    rng: Array,
    *,
    schedule: Schedule | None = None,
    sampler: str = "ddpm",
    num_steps: int | None = None,
    prediction: str = "eps",
    thresholding: str = "none",
    percentile: float = DEFAULT_PERCENTILE,
    init_noise: Array | None = None,
    return_trajectory: bool = False,
) -> Array | tuple[Array, Array]:
    """Draws samples of shape ``shape`` by running ``sampler`` for ``num_steps`` steps.

    Args:
      model_fn: ``model_fn(x_t [B, ...], t float32 [B]) -> prediction [B, ...]`` (B = shape[0]);
        called once per step. For classifier-free guidance pass `guided_model_fn(...)`.
      shape: static output shape, e.g. (B, 64, 64, 3).
      rng: PRNG key (initial noise and, for 'ddpm', the per-step noise).
      schedule: the noise schedule the model was trained with (default `CosineSchedule()`).
      sampler: 'ddpm' (ancestral), 'ddim' (deterministic) or 'dpmpp_2m' (DPM-Solver++(2M)).
      num_steps: number of model calls; default `DEFAULT_NUM_STEPS[sampler]`.
      prediction: what the model predicts: 'eps', 'v' or 'x0'.
      thresholding: 'none', 'static' or 'dynamic' (applied to x0_hat at every step).
      percentile: dynamic thresholding percentile p, in percent (paper: 99.5).
      init_noise: optional x_1 [shape] (default: standard normal from ``rng``); its dtype, if
        wider than float32, sets the sampling precision.
      return_trajectory: also return every step's x_s, [num_steps, *shape].

    Returns:
      The final sample [shape] (the last step's x0_hat), or (sample, trajectory).

    One jitted program with a single `lax.scan` over the steps. Called eagerly, it compiles once
    per (model_fn object, shape, settings). Called inside a larger jitted function it is traced
    inline into that program: that is the way to sample a network, with ``model_fn`` closing over
    parameters that are arguments of the outer jit (as the cascade does); an eager call with a
    closure over concrete parameters would make them compile-time constants.
    """
    schedule = CosineSchedule() if schedule is None else schedule
    if not isinstance(schedule, Schedule):
        raise TypeError(
            f"schedule must be a Schedule (e.g. CosineSchedule()), got {type(schedule).__name__}; "
            "build one by name with get_schedule('cosine')"
        )
    check_sampler(sampler)
    check_prediction(prediction)
    check_thresholding(thresholding)
    percentile = check_percentile(percentile)
    num_steps = DEFAULT_NUM_STEPS[sampler] if num_steps is None else num_steps
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} must be a positive int (static)")
    try:
        shape = tuple(int(d) for d in shape)
    except TypeError as e:
        raise TypeError(f"shape must be a sequence of ints like (B, H, W, C), got {shape!r}") from e
    if not shape or min(shape) < 1:
        raise ValueError(f"shape {shape} must be non-empty with positive sizes, e.g. (B, H, W, C)")
    if init_noise is not None and tuple(init_noise.shape) != shape:
        raise ValueError(f"init_noise has shape {tuple(init_noise.shape)}; expected {shape}")
    static = dict(
        model_fn=model_fn,
        shape=shape,
        schedule=schedule,
        sampler=sampler,
        num_steps=int(num_steps),
        prediction=prediction,
        thresholding=thresholding,
        percentile=percentile,
        return_trajectory=bool(return_trajectory),
    )
    if _is_traced(rng, init_noise):
        # Already inside a jit/vmap: trace inline rather than caching a closure over tracers.
        return _sample_impl(rng=rng, init_noise=init_noise, **static)
    try:
        hash(model_fn)
    except TypeError:  # unhashable callable: compile a one-off program
        fn = functools.partial(_sample_impl, **static)
        return jax.jit(fn)(rng=rng, init_noise=init_noise)
    return _sample_jit(rng=rng, init_noise=init_noise, **static)


# ------------------------------------------------------------------------------------------
# Gin wiring.
# ------------------------------------------------------------------------------------------


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How one stage samples: the one definition, embedded in every ``Stage`` record.

    Defaults: ancestral (DDPM) sampling (Imagen Sec. 2.1) with 256 steps, dynamic thresholding at
    p = 99.5 (Sec. 2.3, Fig. A.10), guidance weight 1 (= none, paper convention; the paper's COCO
    FID runs use 1.35 for the base and 8.0 for SR, App. E/F) and ``aug_level`` 0, the noise level
    an SR stage's low-res input is augmented with at sampling (Sec. 2.5: 0 gives the best FID,
    0.1-0.3 the best-looking samples; ignored by a base stage).

    ``sampler="learned_range"`` samples a discrete model with a learned variance (DeepFloyd IF,
    `imagen_jax.diffusion.discrete`; settings for IF in ``discrete.IF_STAGE_I_SAMPLING`` and
    ``IF_STAGE_II_SAMPLING``): ``timesteps`` picks its integer timesteps ('even' or one of IF's
    named lists, whose length ``num_steps`` must equal), ``threshold_max`` caps the dynamic
    threshold, and an SR stage's ``aug_level`` is its noise level over T (0.25 = 250 of 1,000).
    The continuous samplers refuse other values of these two.

    Every field is validated here (`check_sampling_settings`): a NaN/Inf or out-of-range value or
    a fractional ``num_steps`` raises ``ConfigError`` naming the field and its valid range; a whole
    float step count (3.0) is stored as the int 3. Overrides are `replace` (validated again).
    """

    sampler: str = "ddpm"
    num_steps: int = DEFAULT_NUM_STEPS["ddpm"]
    guidance_weight: float = 1.0
    thresholding: str = "dynamic"
    percentile: float = DEFAULT_PERCENTILE
    aug_level: float = 0.0
    timesteps: str = EVEN_SPACING
    threshold_max: float = NO_THRESHOLD_CAP

    def __post_init__(self):
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in check_sampling_settings(settings, where="SamplingConfig.").items():
            object.__setattr__(self, name, value)  # frozen: store the normalised value

    def replace(self, *, where: str = "", **overrides: Any) -> SamplingConfig:
        """A copy with ``overrides`` applied; names and values are checked first, so the error
        names the setting as ``where`` + name (e.g. ``"stage 'sr256': "``)."""
        checked = check_sampling_settings(overrides, where=where)
        return dataclasses.replace(self, **checked)

    def sample(
        self,
        model_fn: ModelFn,
        shape: tuple[int, ...],
        rng: Array,
        *,
        schedule: Schedule | DiscreteSchedule,
        prediction: str = "eps",
        init_noise: Array | None = None,
    ) -> Array:
        """`sample` with these settings; ``model_fn`` is unguided (B rows in, B rows out).
        A discrete sampler runs `discrete.sample_with_settings` (same arguments)."""
        if self.sampler in DISCRETE_SAMPLERS:
            return sample_with_settings(
                self, model_fn, shape, rng, schedule=schedule, prediction=prediction,
                init_noise=init_noise)
        return sample(
            model_fn,
            shape,
            rng,
            schedule=schedule,
            sampler=self.sampler,
            num_steps=self.num_steps,
            prediction=prediction,
            thresholding=self.thresholding,
            percentile=self.percentile,
            init_noise=init_noise,
        )

    def sample_guided(self, model_fn_2b: ModelFn, *args: Any, **kwargs: Any) -> Array:
        """`SamplingConfig.sample` (same arguments) with classifier-free guidance at
        ``guidance_weight``: ``model_fn_2b`` takes the doubled batch (conditional rows first, see
        `guided_model_fn`; a discrete sampler guides eps only, `guided_learned_range_model_fn`)."""
        guide = (guided_learned_range_model_fn if self.sampler in DISCRETE_SAMPLERS
                 else guided_model_fn)
        return self.sample(guide(model_fn_2b, self.guidance_weight), *args, **kwargs)
