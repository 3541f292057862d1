"""Exact denoisers for Gaussian-mixture data: ground truth for sampler tests and benchmarks.

For data whose every coordinate is drawn i.i.d. from a 1-D mixture sum_k pi_k N(mu_k, s_k^2),
the noisy marginal is sum_k pi_k N(alpha mu_k, alpha^2 s_k^2 + sigma^2) and the posterior means
E[x0 | x_t], E[eps | x_t] are closed form. A sampler driven by them should reproduce the data
distribution up to its discretisation error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion.predictions import (
    broadcast_to_image,
    check_prediction,
    prediction_from_x0_eps,
)
from imagen_jax.diffusion.schedules import Schedule

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GaussianMixture1D:
    """Per-coordinate i.i.d. 1-D Gaussian mixture; one component is a plain Gaussian."""

    weights: tuple[float, ...] = (1.0,)
    means: tuple[float, ...] = (0.0,)
    stds: tuple[float, ...] = (1.0,)

    def __post_init__(self):
        if not len(self.weights) == len(self.means) == len(self.stds) >= 1:
            raise ValueError("weights, means and stds need the same (nonzero) length")
        if abs(sum(self.weights) - 1.0) > 1e-6 or min(self.weights) <= 0:
            raise ValueError(f"mixture weights {self.weights} must be positive and sum to 1")
        if min(self.stds) <= 0:
            raise ValueError(f"mixture stds {self.stds} must be positive")

    @property
    def mean(self) -> float:
        return float(np.dot(self.weights, self.means))

    @property
    def variance(self) -> float:
        w, m, s = (np.asarray(a, np.float64) for a in (self.weights, self.means, self.stds))
        return float(np.dot(w, s**2 + m**2) - np.dot(w, m) ** 2)

    def sample(self, rng: Array, shape: tuple[int, ...]) -> Array:
        rng_k, rng_z = jax.random.split(rng)
        k = jax.random.categorical(rng_k, jnp.log(jnp.asarray(self.weights)), shape=shape)
        z = jax.random.normal(rng_z, shape)
        return jnp.asarray(self.means)[k] + jnp.asarray(self.stds)[k] * z

    def posterior_means(self, x_t: Array, alpha: Array, sigma: Array) -> tuple[Array, Array]:
        """(E[x0 | x_t], E[eps | x_t]) elementwise; alpha, sigma broadcast against x_t."""
        x = x_t[..., None]  # [..., K]
        a, s_ = alpha[..., None], sigma[..., None]
        mu, std = jnp.asarray(self.means, x.dtype), jnp.asarray(self.stds, x.dtype)
        var = a**2 * std**2 + s_**2  # marginal variance of x_t given component k
        resid = x - a * mu
        log_resp = jnp.log(jnp.asarray(self.weights, x.dtype)) - 0.5 * (
            jnp.log(var) + resid**2 / var
        )
        resp = jax.nn.softmax(log_resp, axis=-1)
        # Per component: E[x0|x_t,k] = mu + a s^2 / var * resid, E[eps|x_t,k] = sigma resid / var
        # (written separately, not eps = (x_t - a x0) / sigma, to stay exact as sigma -> 0).
        x0 = jnp.sum(resp * (mu + a * std**2 / var * resid), axis=-1)
        eps = jnp.sum(resp * (s_ * resid / var), axis=-1)
        return x0, eps

    def model_fn(
        self, schedule: Schedule, prediction: str = "eps"
    ) -> Callable[[Array, Array], Array]:
        """The Bayes-optimal ``model_fn(x_t [B, ...], t [B]) -> prediction`` for this data."""
        check_prediction(prediction)

        def model_fn(x_t: Array, t: Array) -> Array:
            alpha, sigma = schedule.alpha_sigma(t)
            alpha, sigma = broadcast_to_image(alpha, x_t), broadcast_to_image(sigma, x_t)
            alpha, sigma = alpha.astype(x_t.dtype), sigma.astype(x_t.dtype)
            x0, eps = self.posterior_means(x_t, alpha, sigma)
            return prediction_from_x0_eps(x0, eps, alpha, sigma, prediction)

        return model_fn
