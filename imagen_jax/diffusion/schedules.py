"""Continuous-time noise schedules written in log-SNR.

A schedule maps diffusion time t in [0, 1] (0 = clean, 1 = pure noise) to
``logsnr(t) = log(alpha_t^2 / sigma_t^2)``; the variance-preserving process is
``x_t = alpha_t x_0 + sigma_t eps`` with ``alpha_t^2 = sigmoid(logsnr)``,
``sigma_t^2 = sigmoid(-logsnr)`` (Imagen App. A follows Kingma et al. 2021 in writing everything
in log-SNR). Schedules are frozen dataclasses: hashable, so samplers can take them as static
arguments, and free of gin so several stages with different schedules live in one process
(gin builds them through `get_schedule`).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math

import gin
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

# The truncation of the cosine schedule used by Salimans & Ho (2022, progressive distillation,
# the Imagen authors' diffusion code base): log-SNR is clipped to [-20, 20], so
# sigma(0) = e^-10 and alpha(1) = e^-10 instead of exactly 0.
DEFAULT_LOGSNR_MIN = -20.0
DEFAULT_LOGSNR_MAX = 20.0


def alpha_sigma_from_logsnr(logsnr: ArrayLike) -> tuple[Array, Array]:
    """(alpha, sigma) with alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr).

    Through the sigmoid rather than 1/sqrt(1 + e^-logsnr) so both stay accurate at |logsnr| = 20.
    ``logsnr = +inf`` gives (1, 0) exactly (the samplers' final, clean step).
    """
    logsnr = jnp.asarray(logsnr)
    return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


class Schedule(abc.ABC):
    """A continuous-time variance-preserving noise schedule, t in [0, 1]."""

    @abc.abstractmethod
    def logsnr(self, t: ArrayLike) -> Array:
        """log(alpha_t^2 / sigma_t^2), decreasing in t; same shape as ``t``."""

    def alpha_sigma(self, t: ArrayLike) -> tuple[Array, Array]:
        """(alpha_t, sigma_t), each the shape of ``t``; alpha^2 + sigma^2 = 1."""
        return alpha_sigma_from_logsnr(self.logsnr(t))


def _as_float(t: ArrayLike) -> Array:
    t = jnp.asarray(t)
    return t if jnp.issubdtype(t.dtype, jnp.floating) else t.astype(jnp.float32)


def _check_logsnr_range(name: str, logsnr_min: float, logsnr_max: float) -> None:
    if not logsnr_min < logsnr_max:
        raise ValueError(
            f"{name}: logsnr_min={logsnr_min} must be below logsnr_max={logsnr_max} "
            "(e.g. the defaults -20, 20)"
        )


@dataclasses.dataclass(frozen=True)
class CosineSchedule(Schedule):
    """The cosine schedule (Nichol & Dhariwal 2021) in continuous time, Imagen's default (App. A).

    ``alpha_t = cos(pi t / 2)``, i.e. ``logsnr(t) = -2 log tan(pi t / 2)``, truncated to
    [logsnr_min, logsnr_max] by mapping t linearly onto the matching angle interval (so the
    endpoints are hit exactly and the schedule stays smooth).
    """

    logsnr_min: float = DEFAULT_LOGSNR_MIN
    logsnr_max: float = DEFAULT_LOGSNR_MAX

    def __post_init__(self):
        _check_logsnr_range(type(self).__name__, self.logsnr_min, self.logsnr_max)

    def logsnr(self, t: ArrayLike) -> Array:
        t = _as_float(t)
        # Angles whose -2 log tan equal logsnr_max (t = 0) and logsnr_min (t = 1).
        theta_min = math.atan(math.exp(-0.5 * self.logsnr_max))
        theta_max = math.atan(math.exp(-0.5 * self.logsnr_min))
        return -2.0 * jnp.log(jnp.tan(theta_min + t * (theta_max - theta_min)))


@dataclasses.dataclass(frozen=True)
class ShiftedCosineSchedule(Schedule):
    """Cosine schedule shifted for high resolutions (simple diffusion, Hoogeboom et al. 2023).

    ``logsnr(t) = logsnr_cosine(t) - 2 log(shift)``: an image ``shift`` times larger (per side)
    than the reference resolution the cosine schedule was tuned for (64 px) needs ``shift^2``
    times more noise for the same destruction of its coarse structure. ``shift = 1`` is the
    cosine schedule; ``ShiftedCosineSchedule.for_resolution(256)`` gives shift 4.
    """

    shift: float = 1.0
    logsnr_min: float = DEFAULT_LOGSNR_MIN
    logsnr_max: float = DEFAULT_LOGSNR_MAX

    def __post_init__(self):
        if not self.shift > 0:
            raise ValueError(
                f"ShiftedCosineSchedule: shift={self.shift} must be positive (the ratio of the "
                "image side to the reference side, e.g. 256 / 64 = 4)"
            )
        _check_logsnr_range(type(self).__name__, self.logsnr_min, self.logsnr_max)

    @classmethod
    def for_resolution(
        cls, resolution: int, reference_resolution: int = 64, **kw: float
    ) -> ShiftedCosineSchedule:
        return cls(shift=resolution / reference_resolution, **kw)

    def logsnr(self, t: ArrayLike) -> Array:
        base = CosineSchedule(self.logsnr_min, self.logsnr_max).logsnr(t)
        return base - 2.0 * math.log(self.shift)


@functools.lru_cache(maxsize=16)
def _linear_beta_log_alpha_bar(beta_start: float, beta_end: float, num_steps: int) -> np.ndarray:
    """log(alpha_bar) at t = 0, 1/N, ..., 1 for DDPM's discrete linear betas (float64 [N+1])."""
    betas = np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    return np.concatenate([[0.0], np.cumsum(np.log1p(-betas))])


@dataclasses.dataclass(frozen=True)
class LinearBetaSchedule(Schedule):
    """DDPM's discrete linear-beta schedule (Ho et al. 2020) as a continuous-time schedule.

    Imagen App. F.3 mentions a "1000-step linear schedule 1e-4 -> 0.02" for the 1024 model. The
    discrete step i (0-based, ``alpha_bar_i = prod_{j<=i} (1 - beta_j)``) sits at
    t = (i + 1) / num_train_steps; log(alpha_bar) is interpolated linearly in t between those
    points (from 0 at t = 0), so the schedule matches the discrete one exactly at its steps.
    log-SNR is capped at ``logsnr_max`` (it is +inf at t = 0).
    """

    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_train_steps: int = 1000
    logsnr_max: float = DEFAULT_LOGSNR_MAX

    def __post_init__(self):
        if not (0 < self.beta_start <= self.beta_end < 1):
            raise ValueError(
                f"LinearBetaSchedule: need 0 < beta_start <= beta_end < 1, got "
                f"beta_start={self.beta_start}, beta_end={self.beta_end} (paper: 1e-4, 0.02)"
            )
        if self.num_train_steps < 1:
            raise ValueError(f"LinearBetaSchedule: num_train_steps={self.num_train_steps} < 1")

    def log_alpha_bar_table(self) -> np.ndarray:
        return _linear_beta_log_alpha_bar(self.beta_start, self.beta_end, self.num_train_steps)

    def logsnr(self, t: ArrayLike) -> Array:
        t = _as_float(t)
        table = self.log_alpha_bar_table()
        grid = np.linspace(0.0, 1.0, len(table))
        log_alpha_sq = jnp.interp(t, grid.astype(t.dtype), table.astype(t.dtype))
        # logsnr = log(a^2) - log(1 - a^2); expm1 keeps 1 - a^2 accurate near t = 0.
        logsnr = log_alpha_sq - jnp.log(-jnp.expm1(log_alpha_sq))
        return jnp.minimum(logsnr, self.logsnr_max)


SCHEDULES = {
    "cosine": CosineSchedule,
    "shifted_cosine": ShiftedCosineSchedule,
    "linear": LinearBetaSchedule,
}


@gin.configurable
def get_schedule(name: str = "cosine", **kwargs: float) -> Schedule:
    """Builds a schedule by name: 'cosine' (default), 'shifted_cosine' or 'linear'.

    ``kwargs`` go to the schedule's constructor (e.g. ``shift=4.0`` for 'shifted_cosine').
    """
    if isinstance(name, Schedule):
        return name
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    cls = SCHEDULES[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(
            f"schedule {name!r} has no argument(s) {unknown}; it takes {sorted(fields)}"
        )
    return cls(**kwargs)
