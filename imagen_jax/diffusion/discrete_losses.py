"""Training losses of a discrete learned-range model (DeepFloyd IF): the hybrid loss.

Nichol & Dhariwal 2021 ("Improved DDPM", Sec. 3.1) train eps AND the variance value v of a
learned-range model with ``L_hybrid = L_simple + lambda L_vlb`` (lambda = 0.001):

- ``L_simple``: the eps mean squared error (Ho et al. 2020, eq. 14), mean over pixels.
- ``L_vlb = L_0 + ... + L_{T-1}``, estimated at a uniform t as ``T L_t``, with a stop-gradient on
  the predicted mean (on eps) "so that L_vlb guides Sigma while L_simple is still the main source
  of influence over mu". ``L_t = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))`` for t > 0 and
  ``L_0 = -log p(x0 | x_1)``, the discretized Gaussian decoder (Ho et al. 2020, eq. 13: 256 bins
  of width 2/255 over [-1, 1], the edge bins open). p's log-variance is the learned-range
  interpolation ``frac log beta_t + (1 - frac) log beta~_t``, frac = (v + 1) / 2 (eq. 15).

Why the hybrid loss rather than eps-MSE with the variance head frozen: IF's U-Nets were trained
with it (IF is built on the ADM code base, whose learned-range models train with this loss), so
fine-tuning with it keeps the variance the sampler reads (`learned_range_step`) consistent with
the fine-tuned eps; a frozen head would keep variances matched to the old eps.

As ADM's ``GaussianDiffusion._vb_terms_bpd`` / ``training_losses``: L_t in bits per dimension
(mean over pixels, / ln 2), added as ``lambda * T * L_t`` (ADM: ``vb * T / 1000``);
``beta~_0`` (0: x_0 is clean) is replaced by ``beta~_1`` in the log ("clipped", ADM's
``posterior_log_variance_clipped``). One difference, our choice: the decoder's CDF is the exact
Gaussian CDF (``jax.scipy.special.ndtr`` / ``log_ndtr``), not ADM's tanh approximation; it
changes only the t = 0 term, by well under 1e-3 of its value.

Conventions as `imagen_jax.diffusion.discrete`: NHWC, the model output is eps then v on the last
axis, integer timesteps.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr, ndtr

from imagen_jax.diffusion.discrete import DiscreteSchedule
from imagen_jax.diffusion.predictions import broadcast_to_image

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

HYBRID_VLB_WEIGHT = 1e-3  # lambda of L_hybrid (Improved DDPM, Sec. 3.1)
# Half the width of one of the 256 pixel bins over [-1, 1] (Ho et al. 2020, eq. 13).
PIXEL_BIN_HALF_WIDTH = 1.0 / 255.0
# x0 beyond +-EDGE is in an edge bin, open towards -inf / +inf (eq. 13's delta_-, delta_+).
EDGE = 0.999
PROBABILITY_FLOOR = 1e-12  # ADM's clamp before a log, so an impossible bin costs ~ 40 bits


def normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Array, mean: Array, log_scale: Array) -> Array:
    """log P(x) elementwise, in nats, of N(mean, exp(log_scale)^2) integrated over x's pixel bin.

    x in [-1, 1] on the 256 levels of 8-bit images; the bin is x +- 1/255, the lowest one open to
    -inf and the highest to +inf (Ho et al. 2020, eq. 13).
    """
    inv_std = jnp.exp(-log_scale)
    upper = inv_std * (x - mean + PIXEL_BIN_HALF_WIDTH)
    lower = inv_std * (x - mean - PIXEL_BIN_HALF_WIDTH)
    log_delta = jnp.log(jnp.maximum(ndtr(upper) - ndtr(lower), PROBABILITY_FLOOR))
    return jnp.where(x < -EDGE, log_ndtr(upper), jnp.where(x > EDGE, log_ndtr(-lower), log_delta))


def _tables(schedule: DiscreteSchedule) -> dict[str, np.ndarray]:
    """float64 [T] tables of the posterior q(x_{t-1} | x_t, x0) (Ho et al. 2020, eqs. 6-7) and
    of the learned-range bounds."""
    betas = schedule.betas()
    alpha_bar = schedule.alphas_cumprod()
    alpha_bar_prev = np.concatenate([[1.0], alpha_bar[:-1]])
    posterior_variance = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
    # beta~_0 = 0; ADM logs beta~_1 there (the t = 0 term reads only p's variance).
    clipped = np.concatenate([posterior_variance[1:2], posterior_variance[1:]])
    return {
        "x0_coef": betas * np.sqrt(alpha_bar_prev) / (1.0 - alpha_bar),
        "xt_coef": (1.0 - alpha_bar_prev) * np.sqrt(1.0 - betas) / (1.0 - alpha_bar),
        "min_log": np.log(clipped),
        "max_log": np.log(betas),
        "recip_sqrt_alpha_bar": np.sqrt(1.0 / alpha_bar),
        "eps_coef": np.sqrt(1.0 / alpha_bar - 1.0),
    }


def discrete_logsnr(t: ArrayLike, schedule: DiscreteSchedule) -> Array:
    """log(alpha_bar_t / (1 - alpha_bar_t)) at integer timesteps t, float32 (for metrics)."""
    alpha_bar = schedule.alphas_cumprod()
    table = jnp.asarray(np.log(alpha_bar) - np.log1p(-alpha_bar), jnp.float32)
    return table[jnp.asarray(t, jnp.int32)]


def vlb_terms(
    model_output: Array, x0: Array, x_t: Array, t: ArrayLike, schedule: DiscreteSchedule
) -> Array:
    """L_t per example in bits per dimension, float32 [B], gradients reaching v only.

    Args:
      model_output: [B, H, W, 2C]: eps, then v in [-1, 1] (no gradient flows into eps).
      x0: the clean image [B, H, W, C] in [-1, 1]; x_t: its noised copy at t.
      t: int [B] in [0, T).

    Returns KL(q(x_{t-1} | x_t, x0) || p) for t > 0 and the decoder's -log p(x0 | x_1) for t = 0,
    each averaged over the B's pixels and divided by ln 2 (module docstring).
    """
    channels = x0.shape[-1]
    tables = {k: broadcast_to_image(jnp.asarray(v, jnp.float32)[jnp.asarray(t, jnp.int32)], x0)
              for k, v in _tables(schedule).items()}
    x0, x_t = x0.astype(jnp.float32), x_t.astype(jnp.float32)
    eps = jax.lax.stop_gradient(model_output[..., :channels].astype(jnp.float32))
    frac = (model_output[..., channels:].astype(jnp.float32) + 1.0) / 2.0
    log_var = frac * tables["max_log"] + (1.0 - frac) * tables["min_log"]
    x0_hat = tables["recip_sqrt_alpha_bar"] * x_t - tables["eps_coef"] * eps
    mean = tables["x0_coef"] * x0_hat + tables["xt_coef"] * x_t
    true_mean = tables["x0_coef"] * x0 + tables["xt_coef"] * x_t
    kl = normal_kl(true_mean, tables["min_log"], mean, log_var)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)
    per_pixel = jnp.where(broadcast_to_image(jnp.asarray(t) == 0, x0), nll, kl)
    return jnp.mean(per_pixel.reshape(per_pixel.shape[0], -1), axis=1) / math.log(2.0)


def hybrid_loss_per_example(
    model_output: Array,
    x0: Array,
    x_t: Array,
    eps: Array,
    t: ArrayLike,
    schedule: DiscreteSchedule,
    vlb_weight: float = HYBRID_VLB_WEIGHT,
) -> tuple[Array, Array, Array]:
    """``L_hybrid = L_simple + vlb_weight * T * L_t`` per example (module docstring).

    Args:
      model_output: float [B, H, W, 2C], eps then v (IF's 6 channels).
      x0, x_t, eps: float [B, H, W, C]: the clean image, ``add_discrete_noise(x0, eps, t)`` and
        the noise.
      t: int [B] in [0, T) (T = ``schedule.num_train_timesteps``).
      vlb_weight: lambda (0.001 in the paper and in ADM/IF).

    Returns:
      (L_hybrid, L_simple, L_t in bits per dimension), float32 [B] each.

    Raises ValueError unless model_output has 2C channels.
    """
    channels = x0.shape[-1]
    if model_output.shape != (*x0.shape[:-1], 2 * channels):
        raise ValueError(f"model output has shape {model_output.shape}; the hybrid loss needs eps "
                         f"and v concatenated on the last axis, {(*x0.shape[:-1], 2 * channels)}")
    err = jnp.square(model_output[..., :channels].astype(jnp.float32) - eps.astype(jnp.float32))
    mse = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
    vlb = vlb_terms(model_output, x0, x_t, t, schedule)
    return mse + vlb_weight * schedule.num_train_timesteps * vlb, mse, vlb
