"""The forward process and the eps / v / x0 parameterisations, converted in one place.

With ``x_t = alpha x0 + sigma eps`` (alpha^2 + sigma^2 = 1):
  * ``eps``: the noise (Imagen, App. A; Ho et al. 2020);
  * ``v = alpha eps - sigma x0`` (Salimans & Ho 2022), well conditioned at both ends of t;
  * ``x0``: the clean image.
Every function takes images [B, ...] and per-example times t [B] (or scalar) and broadcasts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imagen_jax.diffusion.schedules import Schedule

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

PREDICTIONS = ("eps", "v", "x0")


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(
            f"unknown prediction {prediction!r}; choose one of {PREDICTIONS} "
            "('eps' is the paper's, 'v' is Salimans & Ho 2022)"
        )
    return prediction


def broadcast_to_image(a: ArrayLike, x: Array) -> Array:
    """Per-example values ``a`` [B] (or scalar) reshaped to [B, 1, ..., 1] to broadcast with x."""
    a = jnp.asarray(a, dtype=jnp.result_type(x.dtype, jnp.float32))
    if a.ndim == 0:
        return a
    if a.ndim != 1 or a.shape[0] != x.shape[0]:
        raise ValueError(
            f"per-example values have shape {a.shape}; expected a scalar or [B] with "
            f"B = {x.shape[0]} (the batch size of the image of shape {x.shape})"
        )
    return a.reshape((-1,) + (1,) * (x.ndim - 1))


def alpha_sigma_like(t: ArrayLike, x: Array, schedule: Schedule) -> tuple[Array, Array]:
    alpha, sigma = schedule.alpha_sigma(t)
    return broadcast_to_image(alpha, x), broadcast_to_image(sigma, x)


def diffuse(x0: Array, eps: Array, t: ArrayLike, schedule: Schedule) -> Array:
    """q(x_t | x0) sample: ``alpha_t x0 + sigma_t eps``; x0, eps [B, ...], t [B]."""
    alpha, sigma = alpha_sigma_like(t, x0, schedule)
    return alpha * x0 + sigma * eps


def prediction_from_x0_eps(
    x0: Array, eps: Array, alpha: Array, sigma: Array, prediction: str
) -> Array:
    """The network target for ``prediction`` given the clean image and the noise."""
    check_prediction(prediction)
    if prediction == "eps":
        return eps
    if prediction == "v":
        return alpha * eps - sigma * x0
    return x0


def x0_eps_from_prediction(
    pred: Array, x_t: Array, alpha: Array, sigma: Array, prediction: str
) -> tuple[Array, Array]:
    """(x0_hat, eps_hat) implied by a network output at x_t with coefficients alpha, sigma.

    The eps -> x0 division by alpha loses precision as alpha -> 0 (t -> 1); that is intrinsic to
    eps prediction and the reason thresholding and v prediction exist.
    """
    check_prediction(prediction)
    if prediction == "eps":
        return (x_t - sigma * pred) / alpha, pred
    if prediction == "v":
        # Inverting v = alpha eps - sigma x0 with x_t = alpha x0 + sigma eps, alpha^2+sigma^2=1.
        return alpha * x_t - sigma * pred, sigma * x_t + alpha * pred
    return pred, (x_t - alpha * pred) / sigma


def prediction_target(
    x0: Array, eps: Array, t: ArrayLike, schedule: Schedule, prediction: str = "eps"
) -> Array:
    """The regression target of the network: eps, v or x0 (all [B, ...])."""
    alpha, sigma = alpha_sigma_like(t, x0, schedule)
    return prediction_from_x0_eps(x0, eps, alpha, sigma, prediction)


def to_x0_eps(
    pred: Array, x_t: Array, t: ArrayLike, schedule: Schedule, prediction: str = "eps"
) -> tuple[Array, Array]:
    """(x0_hat, eps_hat) from a network output ``pred`` at (x_t, t)."""
    alpha, sigma = alpha_sigma_like(t, x_t, schedule)
    return x0_eps_from_prediction(pred, x_t, alpha, sigma, prediction)


def convert_prediction(
    pred: Array, x_t: Array, t: ArrayLike, schedule: Schedule, *, source: str, target: str
) -> Array:
    """Re-expresses a network output in another parameterisation (e.g. 'v' -> 'eps')."""
    alpha, sigma = alpha_sigma_like(t, x_t, schedule)
    x0, eps = x0_eps_from_prediction(pred, x_t, alpha, sigma, source)
    return prediction_from_x0_eps(x0, eps, alpha, sigma, target)
