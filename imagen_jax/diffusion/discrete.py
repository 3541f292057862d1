"""Discrete-time DDPM with a learned-range variance: DeepFloyd IF's sampler (stages I and II).

IF's U-Nets are trained on T = 1,000 integer timesteps of the ``squaredcos_cap_v2`` schedule and
predict, per pixel, 2C channels: eps (C) and a variance interpolation value v in [-1, 1] (C)
(Nichol & Dhariwal 2021, "Improved DDPM", Sec. 3.1: the reverse-step log-variance is
``frac log beta_t + (1 - frac) log beta~_t`` with ``frac = (v + 1) / 2``, between the forward
step's variance and the true posterior's). Sampling visits a respaced subset of the timesteps
(`imagen_jax.diffusion.respacing`); each respaced step from t to t' < t is a DDPM step whose beta
is recomputed from the table, ``beta_t = 1 - alpha_bar_t / alpha_bar_t'`` (improved DDPM, Sec. 4),
and the model is fed the integer t.

This follows diffusers' ``DDPMScheduler(variance_type="learned_range")`` (``step``,
``_threshold_sample``, ``add_noise``) and the IF pipelines' loops (``pipeline_if.py``,
``pipeline_if_superresolution.py``; classifier-free guidance on eps only, the variance from the
conditional branch; dynamic thresholding of x0 at quantile 0.95 with s clamped to [1, cap]),
written for JAX: the whole loop is one `lax.scan`, like `imagen_jax.diffusion.samplers`.
tests/test_diffusion_discrete.py checks one step against the scheduler to 1e-5 and whole
pipeline loops to 1e-4.

Conventions: images NHWC (channels last); the model output concatenates eps and v on the last
axis (eps first, as IF's U-Net splits its 6 output channels). Integer timesteps are int32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion.guidance import guided_model_fn
from imagen_jax.diffusion.predictions import broadcast_to_image
from imagen_jax.diffusion.respacing import EVEN_SPACING, respaced_timesteps
from imagen_jax.diffusion.settings import NO_THRESHOLD_CAP, check_threshold_max
from imagen_jax.diffusion.thresholding import (
    apply_thresholding,
    check_percentile,
    check_thresholding,
    per_sample_percentile,
)
from imagen_jax.errors import ConfigError

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
# model_fn(x_t [B, H, W, C], t int32 [B]) -> eps and v concatenated, [B, H, W, 2C].
DiscreteModelFn = Callable[[Array, Array], Array]

BETA_SCHEDULES = ("squaredcos_cap_v2", "linear")  # diffusers' names
# `Stage.schedule` naming a `DiscreteSchedule` (its fields from ``Stage.schedule_kwargs``): a
# stage sampled by a DISCRETE_SAMPLERS sampler. Not a key of the continuous `SCHEDULES`, whose
# 'linear' means another (continuous) schedule than the beta schedule of that name.
DISCRETE_SCHEDULE = "discrete"
DEFAULT_NUM_TRAIN_TIMESTEPS = 1000  # IF, and DDPM (Ho et al. 2020)
# Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = cos^2(pi/2 (t + s) / (1 + s)), s = 0.008, with
# every beta clipped to 0.999 "to prevent singularities at the end of the diffusion process".
COSINE_OFFSET = 0.008
MAX_BETA = 0.999
# The posterior variance is 0 when a step ends at "clean" (alpha_bar_prev = 1); diffusers clamps
# it here before taking its log. It only matters if a list ends above timestep 0 (the last step
# is then noised), so the floor is kept for parity.
POSTERIOR_VARIANCE_FLOOR = 1e-20

# IF's sampler settings (diffusers' IF scheduler configs and pipeline defaults), as keyword
# arguments of `SamplingConfig`: quantile 0.95, s capped at 1.5 (stage I) / 1.0 (stage II);
# stage II noises its upsampled input at level 250 of 1,000 (aug_level = level / T).
IF_PERCENTILE = 95.0
IF_STAGE_I_SAMPLING = {
    "sampler": "learned_range",
    "num_steps": 100,
    "guidance_weight": 7.0,
    "thresholding": "dynamic",
    "percentile": IF_PERCENTILE,
    "threshold_max": 1.5,
}
IF_STAGE_II_SAMPLING = {
    **IF_STAGE_I_SAMPLING,
    "num_steps": 50,
    "guidance_weight": 4.0,
    "threshold_max": 1.0,
    "aug_level": 250 / DEFAULT_NUM_TRAIN_TIMESTEPS,
}


# ------------------------------------------------------------------------------------------
# The schedule table.
# ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _betas(beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float):
    if beta_schedule == "squaredcos_cap_v2":
        t = np.arange(num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
        alpha_bar = np.cos((t + COSINE_OFFSET) / (1.0 + COSINE_OFFSET) * (np.pi / 2)) ** 2
        betas = np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], MAX_BETA)
    else:
        betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    betas.setflags(write=False)  # cached and shared: nobody may change it
    return betas


def discrete_betas(
    beta_schedule: str = "squaredcos_cap_v2",
    num_train_timesteps: int = DEFAULT_NUM_TRAIN_TIMESTEPS,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> np.ndarray:
    """The forward process's betas, float64 [T] (read-only), of a named discrete schedule.

    Args:
      beta_schedule: 'squaredcos_cap_v2' (the cosine schedule, Nichol & Dhariwal 2021 eq. 17,
        betas clipped to 0.999; DeepFloyd IF's) or 'linear' (Ho et al. 2020: ``beta_start`` to
        ``beta_end``, which only it reads).
      num_train_timesteps: T >= 1.

    Computed in float64, as IF's own (guided-diffusion) code did. diffusers' float32 betas agree
    to 1e-6 relative; its alphas_cumprod accumulate float32 rounding, ~1.3e-5 relative at
    t = 999 (tests/test_diffusion_discrete.py).

    Raises:
      ValueError: unknown schedule, T < 1 or betas outside (0, 1).
    """
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {beta_schedule!r}; choose one of {BETA_SCHEDULES}")
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int):
        raise ValueError(f"num_train_timesteps={num_train_timesteps!r} must be an int >= 1")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps={num_train_timesteps} must be >= 1 (IF: 1000)")
    if beta_schedule == "linear" and not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(
            f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, "
            f"beta_end={beta_end} (DDPM: 1e-4, 0.02)"
        )
    return _betas(beta_schedule, num_train_timesteps, float(beta_start), float(beta_end))


@dataclasses.dataclass(frozen=True)
class DiscreteSchedule:
    """A discrete noise schedule: T integer timesteps and their betas (hashable, gin-free).

    ``DiscreteSchedule()`` is DeepFloyd IF's: 1,000 steps of 'squaredcos_cap_v2'. Timestep i
    (0-based) has ``alpha_bar_i = prod_{j <= i} (1 - beta_j)``; ``x_i = sqrt(alpha_bar_i) x0 +
    sqrt(1 - alpha_bar_i) eps``. Fields as `discrete_betas`; a bad one raises ValueError.
    """

    beta_schedule: str = "squaredcos_cap_v2"
    num_train_timesteps: int = DEFAULT_NUM_TRAIN_TIMESTEPS
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self):
        self.betas()  # validates the fields

    def betas(self) -> np.ndarray:
        """float64 [T], read-only."""
        return discrete_betas(
            self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end
        )

    def alphas_cumprod(self) -> np.ndarray:
        """alpha_bar, float64 [T], decreasing from 1 - beta_0."""
        return np.cumprod(1.0 - self.betas())


def respaced_alphas(
    schedule: DiscreteSchedule, timesteps: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """(alpha_bar at each respaced timestep, alpha_bar at the next one), float64 [N] each.

    The step after the last one ends "clean" (alpha_bar = 1). The respaced step's own beta is
    ``1 - alpha_bar_t / alpha_bar_prev`` (improved DDPM Sec. 4; diffusers' ``current_beta_t``).
    Raises ValueError unless ``timesteps`` are distinct ints in [0, T) in descending order.
    """
    steps = check_timesteps(timesteps, schedule.num_train_timesteps)
    alphas_cumprod = schedule.alphas_cumprod()
    alpha_bar = alphas_cumprod[np.array(steps)]
    alpha_bar_prev = np.concatenate([alpha_bar[1:], [1.0]])
    return alpha_bar, alpha_bar_prev


def check_timesteps(timesteps: Sequence[int], num_train_timesteps: int) -> tuple[int, ...]:
    """``timesteps`` as a tuple of Python ints; ValueError (one line) unless they are a
    non-empty, strictly descending sequence of whole numbers in [0, T)."""
    try:
        steps = tuple(int(s) for s in np.asarray(timesteps).reshape(-1))
        whole = bool(np.all(np.asarray(timesteps) == np.asarray(steps)))
    except (TypeError, ValueError):
        whole, steps = False, ()
    if not steps or not whole:
        raise ValueError(f"timesteps {timesteps!r} must be a non-empty sequence of ints")
    if any(a <= b for a, b in zip(steps, steps[1:])) or not 0 <= steps[-1] <= steps[0] < (
        num_train_timesteps
    ):
        raise ValueError(
            f"timesteps must descend strictly within [0, {num_train_timesteps}), got "
            f"{list(steps)[:8]}{'...' if len(steps) > 8 else ''}"
        )
    return steps


# ------------------------------------------------------------------------------------------
# One step.
# ------------------------------------------------------------------------------------------


def capped_dynamic_threshold(x0: Array, percentile: float, threshold_max: float) -> Array:
    """Dynamic thresholding with a cap on s (diffusers' ``_threshold_sample``), x0 [B, ...].

    s = the ``percentile`` (in percent; IF: 95) of |x0[b]| over all its pixels, clamped to
    [1, threshold_max]; returns clip(x0[b], -s, s) / s. ``threshold_max`` = `NO_THRESHOLD_CAP`
    (0) is Imagen's uncapped dynamic thresholding (`dynamic_threshold`). Computed in float32 or
    wider, returned in x0's dtype.
    """
    x = x0.astype(jnp.promote_types(x0.dtype, jnp.float32))
    cap = math.inf if threshold_max == NO_THRESHOLD_CAP else threshold_max
    s = jnp.clip(per_sample_percentile(jnp.abs(x), percentile), 1.0, cap)  # [B]
    s = s.reshape((-1,) + (1,) * (x.ndim - 1))
    return (jnp.clip(x, -s, s) / s).astype(x0.dtype)


def learned_range_step(
    x_t: Array,
    model_output: Array,
    alpha_bar_t: ArrayLike,
    alpha_bar_prev: ArrayLike,
    noise: Array,
    *,
    thresholding: str = "dynamic",
    percentile: float = IF_PERCENTILE,
    threshold_max: float = NO_THRESHOLD_CAP,
) -> tuple[Array, Array]:
    """One respaced DDPM step with a learned-range variance: (x_prev, x0_hat).

    Args:
      x_t: float [B, H, W, C], the sample at timestep t.
      model_output: [B, H, W, 2C]: predicted eps, then v in [-1, 1] (IF's 6 channels).
      alpha_bar_t, alpha_bar_prev: alpha_bar of t and of the step's target t' < t (1 for the
        final step), scalars or [B] (`respaced_alphas`).
      noise: standard normal, x_t's shape; pass zeros for a noiseless step (diffusers adds no
        noise at timestep 0).
      thresholding: 'none', 'static' (clip x0_hat to [-1, 1]) or 'dynamic'
        (`capped_dynamic_threshold`; with diffusers' ``thresholding=True`` it replaces the
        static clip).
      percentile, threshold_max: the dynamic thresholding's percentile (percent, IF: 95) and
        cap on s (IF: 1.5 stage I, 1.0 stage II; `NO_THRESHOLD_CAP`, 0, = none).

    Returns:
      x_prev and the thresholded x0_hat, x_t's shape and dtype (computed in float32 or wider).

    With beta = 1 - alpha_bar_t / alpha_bar_prev (the respaced step's): x0_hat =
    (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t); the posterior q(x_t' | x_t, x0_hat)
    has mean (Ho et al. 2020, eq. 7) ``sqrt(alpha_bar_prev) beta / (1 - alpha_bar_t) x0_hat +
    sqrt(1 - beta) (1 - alpha_bar_prev) / (1 - alpha_bar_t) x_t`` and variance beta~ =
    beta (1 - alpha_bar_prev) / (1 - alpha_bar_t); the step's log-variance interpolates between
    log beta~ (v = -1) and log beta (v = 1) (Nichol & Dhariwal 2021, eq. 15).

    Raises ValueError if model_output does not have 2C channels.
    """
    channels = x_t.shape[-1]
    if model_output.shape != (*x_t.shape[:-1], 2 * channels):
        raise ValueError(
            f"model output has shape {model_output.shape}; the learned-range sampler needs eps "
            f"and v concatenated on the last axis, {(*x_t.shape[:-1], 2 * channels)}"
        )
    dtype = jnp.promote_types(x_t.dtype, jnp.float32)  # alpha_bar ~ 2e-9 at t = 999
    x = x_t.astype(dtype)
    eps = model_output[..., :channels].astype(dtype)
    v = model_output[..., channels:].astype(dtype)
    a_t = broadcast_to_image(alpha_bar_t, x_t).astype(dtype)
    a_prev = broadcast_to_image(alpha_bar_prev, x_t).astype(dtype)
    one_minus_a_t = 1.0 - a_t
    one_minus_a_prev = 1.0 - a_prev
    step_alpha = a_t / a_prev
    step_beta = 1.0 - step_alpha

    x0_hat = (x - jnp.sqrt(one_minus_a_t) * eps) / jnp.sqrt(a_t)
    if thresholding == "dynamic":
        x0_hat = capped_dynamic_threshold(x0_hat, percentile, threshold_max)
    else:
        x0_hat = apply_thresholding(x0_hat, thresholding)
    mean = (jnp.sqrt(a_prev) * step_beta / one_minus_a_t) * x0_hat + (
        jnp.sqrt(step_alpha) * one_minus_a_prev / one_minus_a_t
    ) * x
    posterior_variance = jnp.maximum(
        one_minus_a_prev / one_minus_a_t * step_beta, POSTERIOR_VARIANCE_FLOOR
    )
    frac = (v + 1.0) / 2.0
    log_variance = frac * jnp.log(step_beta) + (1.0 - frac) * jnp.log(posterior_variance)
    x_prev = mean + jnp.exp(0.5 * log_variance) * noise.astype(dtype)
    return x_prev.astype(x_t.dtype), x0_hat.astype(x_t.dtype)


# ------------------------------------------------------------------------------------------
# Guidance and the loop.
# ------------------------------------------------------------------------------------------


def guided_learned_range_model_fn(
    model_fn_2b: DiscreteModelFn, guidance_weight: ArrayLike
) -> DiscreteModelFn:
    """``model_fn(x_t [B, ...C], t [B]) -> [B, ..., 2C]`` with classifier-free guidance on eps.

    ``model_fn_2b(x [2B, ...], t [2B])`` predicts the first B rows conditionally and the last B
    unconditionally (for IF: the encoded empty prompt), in ONE call. eps is guided as
    `guided_model_fn` guides (uncond + w (cond - uncond), w = 1: conditional only; a scalar or
    [B], possibly traced); v is the conditional rows' (IF's pipelines).
    """

    def model_fn(x_t: Array, t: Array) -> Array:
        batch, channels = x_t.shape[0], x_t.shape[-1]
        out = model_fn_2b(jnp.concatenate([x_t, x_t], axis=0), jnp.concatenate([t, t], axis=0))
        if out.shape[0] != 2 * batch or out.shape[-1] != 2 * channels:
            raise ValueError(
                f"model_fn_2b returned shape {out.shape}; expected 2 * {batch} rows "
                f"(conditional first) of {2 * channels} channels (eps, then v)"
            )
        # The one guidance formula: guided_model_fn on the eps half of this single call (its
        # own doubled input is unused and compiled away).
        eps = guided_model_fn(lambda x2, t2: out[..., :channels], guidance_weight)(x_t, t)
        return jnp.concatenate([eps, out[:batch, ..., channels:]], axis=-1)

    return model_fn


def _sample_impl(
    model_fn: DiscreteModelFn,
    shape: tuple[int, ...],
    rng: Array,
    init_noise: Array | None,
    step_noise: Array | None,
    *,
    schedule: DiscreteSchedule,
    timesteps: tuple[int, ...],
    thresholding: str,
    percentile: float,
    threshold_max: float,
) -> Array:
    rng_init, rng_steps = jax.random.split(rng)
    # x_T: the given noise (its dtype, if wider than float32, sets the precision) or a draw.
    x_init = (jax.random.normal(rng_init, shape, jnp.float32) if init_noise is None
              else init_noise.astype(jnp.promote_types(init_noise.dtype, jnp.float32)))
    dtype = x_init.dtype
    batch = shape[0]
    alpha_bar, alpha_bar_prev = respaced_alphas(schedule, timesteps)
    steps = np.array(timesteps)
    xs = {
        "t": jnp.asarray(steps, jnp.int32),
        "alpha_bar": jnp.asarray(alpha_bar, dtype),
        "alpha_bar_prev": jnp.asarray(alpha_bar_prev, dtype),
        "noisy": jnp.asarray(steps > 0, dtype),  # diffusers: no noise at timestep 0
    }
    if step_noise is None:
        xs["key"] = jax.random.split(rng_steps, len(timesteps))
    else:
        xs["noise"] = step_noise

    def body(x_t, row):
        out = model_fn(x_t, jnp.full((batch,), row["t"], jnp.int32))
        if "key" in row:
            noise = jax.random.normal(row["key"], shape, dtype)
        else:
            noise = row["noise"].astype(dtype)
        x_prev, _ = learned_range_step(
            x_t,
            out,
            row["alpha_bar"],
            row["alpha_bar_prev"],
            row["noisy"] * noise,
            thresholding=thresholding,
            percentile=percentile,
            threshold_max=threshold_max,
        )
        return x_prev, None

    x_final, _ = jax.lax.scan(body, x_init, xs)
    return x_final


_STATIC_ARGS = (
    "model_fn",
    "shape",
    "schedule",
    "timesteps",
    "thresholding",
    "percentile",
    "threshold_max",
)
_sample_jit = jax.jit(_sample_impl, static_argnames=_STATIC_ARGS)


def sample_learned_range(
    model_fn: DiscreteModelFn,
    shape: tuple[int, ...],
    rng: Array,
    *,
    timesteps: Sequence[int],
    schedule: DiscreteSchedule | None = None,
    thresholding: str = "dynamic",
    percentile: float = IF_PERCENTILE,
    threshold_max: float = NO_THRESHOLD_CAP,
    init_noise: Array | None = None,
    step_noise: Array | None = None,
) -> Array:
    """Samples a discrete learned-range model (DeepFloyd IF) on the respaced ``timesteps``.

    Args:
      model_fn: ``model_fn(x_t [B, H, W, C], t int32 [B]) -> [B, H, W, 2C]`` (eps, then v);
        called once per step. For guidance pass `guided_learned_range_model_fn(...)`.
      shape: static output shape (B, H, W, C).
      rng: PRNG key (initial noise and each step's noise).
      timesteps: the descending integer timesteps, e.g. `respaced_timesteps('smart27', 27, T)`.
      schedule: the table the model was trained with (default `DiscreteSchedule()`, IF's).
      thresholding, percentile, threshold_max: as `learned_range_step`.
      init_noise: optional x_T [shape] (default: standard normal from ``rng``); a dtype wider
        than float32 sets the sampling precision.
      step_noise: optional [N, *shape] noise of each step (default: drawn from ``rng``; the
        last row is unused when the last timestep is 0). For parity tests against another
        implementation's random numbers.

    Returns:
      The sample [shape] after the last step (for a list ending at 0, its thresholded x0_hat;
      not clipped otherwise).

    One jitted program with a single `lax.scan` over the steps; inside a caller's jit it is
    traced inline (pass parameters as arguments of the outer jit, as `samplers.sample` says).

    Raises:
      TypeError: ``schedule`` is not a `DiscreteSchedule`.
      ValueError: bad timesteps, shapes, thresholding or percentile.
    """
    schedule = DiscreteSchedule() if schedule is None else schedule
    if not isinstance(schedule, DiscreteSchedule):
        raise TypeError(
            f"the learned-range sampler needs a DiscreteSchedule (e.g. DiscreteSchedule(), IF's "
            f"1000-step squaredcos_cap_v2), got {type(schedule).__name__}"
        )
    timesteps = check_timesteps(timesteps, schedule.num_train_timesteps)
    check_thresholding(thresholding)
    percentile = check_percentile(percentile)
    threshold_max = check_threshold_max(threshold_max)
    try:
        shape = tuple(int(d) for d in shape)
    except TypeError as e:
        raise TypeError(f"shape must be a sequence of ints like (B, H, W, C), got {shape!r}") from e
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape {shape} must be (B, ..., C) with positive sizes")
    if init_noise is not None and tuple(init_noise.shape) != shape:
        raise ValueError(f"init_noise has shape {tuple(init_noise.shape)}; expected {shape}")
    if step_noise is not None and tuple(step_noise.shape) != (len(timesteps), *shape):
        raise ValueError(
            f"step_noise has shape {tuple(step_noise.shape)}; expected {(len(timesteps), *shape)}"
        )
    static = dict(model_fn=model_fn, shape=shape, schedule=schedule, timesteps=timesteps,
                  thresholding=thresholding, percentile=percentile, threshold_max=threshold_max)
    dynamic = dict(rng=rng, init_noise=init_noise, step_noise=step_noise)
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(dynamic)):
        return _sample_impl(**dynamic, **static)  # inside a jit/vmap: trace inline
    try:
        hash(model_fn)
    except TypeError:  # unhashable callable: compile a one-off program
        return jax.jit(functools.partial(_sample_impl, **static))(**dynamic)
    return _sample_jit(**dynamic, **static)


def sample_with_settings(
    settings: Any,
    model_fn: DiscreteModelFn,
    shape: tuple[int, ...],
    rng: Array,
    *,
    schedule: DiscreteSchedule,
    prediction: str = "eps",
    init_noise: Array | None = None,
) -> Array:
    """`sample_learned_range` with a `SamplingConfig`'s settings (``sampler="learned_range"``;
    typed Any: samplers.py, which defines it, imports this module): its ``timesteps`` and
    ``num_steps`` respaced over ``schedule`` (`respaced_timesteps`), its thresholding,
    percentile and ``threshold_max``. Guidance is the caller's (`SamplingConfig.sample_guided`).
    ``prediction`` must be 'eps' (the learned-range models predict eps).

    Raises ConfigError for another prediction, a step count above T or, with a named list,
    T != 1000 (the lists are IF's); TypeError for a schedule that is not a `DiscreteSchedule`.
    """
    if prediction != "eps":
        raise ConfigError(
            f"sampler 'learned_range' reads eps and a variance from the model; prediction "
            f"{prediction!r} is not supported (use 'eps')"
        )
    if not isinstance(schedule, DiscreteSchedule):
        raise TypeError(
            f"sampler 'learned_range' needs a DiscreteSchedule (IF's: DiscreteSchedule()), got "
            f"{type(schedule).__name__}"
        )
    if settings.timesteps != EVEN_SPACING and (
        schedule.num_train_timesteps != DEFAULT_NUM_TRAIN_TIMESTEPS
    ):
        raise ConfigError(
            f"timesteps {settings.timesteps!r} is DeepFloyd IF's list for "
            f"{DEFAULT_NUM_TRAIN_TIMESTEPS} training timesteps; this schedule has "
            f"{schedule.num_train_timesteps} (use timesteps={EVEN_SPACING!r})"
        )
    try:
        steps = respaced_timesteps(
            settings.timesteps, settings.num_steps, schedule.num_train_timesteps
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return sample_learned_range(
        model_fn,
        shape,
        rng,
        timesteps=steps,
        schedule=schedule,
        thresholding=settings.thresholding,
        percentile=settings.percentile,
        threshold_max=settings.threshold_max,
        init_noise=init_noise,
    )


# ------------------------------------------------------------------------------------------
# Stage II: the noise-augmented, upsampled low-resolution input.
# ------------------------------------------------------------------------------------------


def add_discrete_noise(
    x0: Array, noise: Array, timesteps: ArrayLike, schedule: DiscreteSchedule
) -> Array:
    """``sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise`` at integer ``timesteps``.

    x0, noise [B, ...]; timesteps int, scalar or [B], in [0, T) (traced is fine; out-of-range
    traced values are clamped by the gather). diffusers' ``DDPMScheduler.add_noise``; returns
    x0's dtype.
    """
    dtype = jnp.promote_types(x0.dtype, jnp.float32)
    alphas_cumprod = jnp.asarray(schedule.alphas_cumprod(), dtype)
    alpha_bar = broadcast_to_image(alphas_cumprod[jnp.asarray(timesteps, jnp.int32)], x0)
    noisy = jnp.sqrt(alpha_bar) * x0 + jnp.sqrt(1.0 - alpha_bar) * noise
    return noisy.astype(x0.dtype)


def resize_bilinear_align_corners(images: Array, size: tuple[int, int]) -> Array:
    """Bilinear resize of [B, h, w, C] to [B, *size, C] with corner pixels aligned.

    Output pixel i samples input position ``i (h - 1) / (H - 1)`` (torch's
    ``F.interpolate(mode="bilinear", align_corners=True)``, which IF's stage II pipeline uses on
    its low-res input); no anti-aliasing. A side of 1 samples position 0.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [B, h, w, C], got shape {images.shape}")
    x = images.astype(jnp.promote_types(images.dtype, jnp.float32))
    for axis, out_size in ((1, size[0]), (2, size[1])):
        in_size = x.shape[axis]
        scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        position = np.arange(out_size, dtype=np.float64) * scale
        lower = np.minimum(np.floor(position).astype(np.int64), in_size - 1)
        upper = np.minimum(lower + 1, in_size - 1)
        weight = (position - lower).reshape([-1 if a == axis else 1 for a in range(4)])
        weight = weight.astype(x.dtype)
        x = jnp.take(x, lower, axis=axis) * (1 - weight) + jnp.take(x, upper, axis=axis) * weight
    return x.astype(images.dtype)


def noise_level_from_aug(aug_level: float, schedule: DiscreteSchedule) -> int:
    """The integer noise level ``aug_level * T`` of an IF stage II (0.25 -> 250 of 1,000).

    Raises ConfigError (one line) unless it is a whole number in [0, T).
    """
    level = aug_level * schedule.num_train_timesteps
    whole = round(level)
    if not math.isclose(level, whole, rel_tol=0.0, abs_tol=1e-6) or not (
        0 <= whole < schedule.num_train_timesteps
    ):
        raise ConfigError(
            f"aug_level={aug_level!r} is noise level {level:g} of {schedule.num_train_timesteps} "
            f"discrete timesteps; it must be a whole level in [0, {schedule.num_train_timesteps}) "
            f"(IF: aug_level=0.25, level 250)"
        )
    return int(whole)


def noise_augment_upsampled(
    lowres: Array,
    resolution: int | tuple[int, int],
    noise_level: ArrayLike,
    rng: Array,
    schedule: DiscreteSchedule,
    noise: Array | None = None,
) -> tuple[Array, Array]:
    """IF stage II's conditioning: the low-res input upsampled, then noised at ``noise_level``.

    Args:
      lowres: float [B, h, w, C] in [-1, 1], the clean previous-stage output.
      resolution: the stage's output side (or (H, W)).
      noise_level: integer timestep(s) of ``schedule``, scalar or [B] (IF: 250;
        `noise_level_from_aug`).
      rng: PRNG key of the noise (unused if ``noise`` is given).
      noise: optional standard normal [B, H, W, C] (parity tests).

    Returns:
      (noisy upsampled image [B, H, W, C] in lowres' dtype, noise level int32 [B]): the model
      gets the image concatenated to x_t and the level as its second timestep. As
      ``pipeline_if_superresolution.py``: ``resize_bilinear_align_corners`` then
      `add_discrete_noise` (noise at the output resolution, not the input's).
    """
    size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    upsampled = resize_bilinear_align_corners(lowres, size)
    if noise is None:
        dtype = jnp.promote_types(lowres.dtype, jnp.float32)
        noise = jax.random.normal(rng, upsampled.shape, dtype)
    elif tuple(noise.shape) != upsampled.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {upsampled.shape}")
    levels = jnp.broadcast_to(jnp.asarray(noise_level, jnp.int32), (lowres.shape[0],))
    return add_discrete_noise(upsampled, noise, levels, schedule), levels
