"""Exact denoisers for Gaussian-mixture data: ground truth for sampler tests and benchmarks.

For data whose every coordinate is drawn i.i.d. from a 1-D mixture sum_k pi_k N(mu_k, s_k^2),
the noisy marginal is sum_k pi_k N(alpha mu_k, alpha^2 s_k^2 + sigma^2) and the posterior means
E[x0 | x_t], E[eps | x_t] are closed form. A sampler driven by them should reproduce the data
distribution up to its discretisation error.
"""

from __future__ import annotations

import dataclasses
import functools
import math
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
        # Components are a static Python loop (K is tiny): a trailing [..., K] axis would
        # defeat vectorisation over the pixels.
        log_resp, x0_k, eps_k = [], [], []
        for w, mu, std in zip(self.weights, self.means, self.stds):
            var = alpha**2 * std**2 + sigma**2  # variance of x_t given the component
            resid = x_t - alpha * mu
            log_resp.append(math.log(w) - 0.5 * (jnp.log(var) + resid**2 / var))
            # E[x0|x_t,k] = mu + a s^2 / var * resid and E[eps|x_t,k] = sigma resid / var,
            # written separately (not eps = (x_t - a x0) / sigma) to stay exact as sigma -> 0.
            x0_k.append(mu + alpha * std**2 / var * resid)
            eps_k.append(sigma * resid / var)
        if len(log_resp) == 1:
            return x0_k[0], eps_k[0]
        top = functools.reduce(jnp.maximum, log_resp)
        resp = [jnp.exp(lr - top) for lr in log_resp]
        norm = sum(resp)
        x0 = sum(r * v for r, v in zip(resp, x0_k)) / norm
        eps = sum(r * v for r, v in zip(resp, eps_k)) / norm
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
