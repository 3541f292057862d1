"""The hybrid loss of a learned-range model (Improved DDPM Sec. 3.1; DeepFloyd IF's training).

`hybrid_loss_per_example` is checked against a float64 numpy transcription of the papers'
formulas written here from scratch (Gaussian KL in variances, the discretized Gaussian decoder
with the exact CDF from math.erf and 1/255 half-bins, the posterior of DDPM eqs. 6-7, the
learned-range variance of Improved DDPM eq. 15), at timesteps 0, 1 and across the schedule; and
the stop-gradient: the variational term sends no gradient into the eps channels.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import DiscreteSchedule, add_discrete_noise, hybrid_loss_per_example
from imagen_jax.diffusion.discrete_losses import vlb_terms

SIDE, CHANNELS = 4, 3


def _phi(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))


def _reference(out, x0, x_t, eps, t, schedule, lam):
    """float64 L_hybrid [B], transcribed from the papers (not from the code under test)."""
    betas = np.asarray(schedule.betas(), np.float64)
    num_steps = len(betas)
    alpha_bar = np.cumprod(1.0 - betas)
    losses = []
    for b, step in enumerate(t):
        beta, a = betas[step], alpha_bar[step]
        a_prev = alpha_bar[step - 1] if step > 0 else 1.0
        eps_hat, v = out[b, ..., :CHANNELS], out[b, ..., CHANNELS:]
        # DDPM eq. 7: the posterior q(x_{t-1} | x_t, x0); beta~ of step 1 stands in at step 0.
        def post_mean(x_start, b=b, beta=beta, a=a, a_prev=a_prev):
            return (math.sqrt(a_prev) * beta / (1 - a) * x_start
                    + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a) * x_t[b])
        post_var = (1 - a_prev) / (1 - a) * beta if step > 0 else (
            (1 - alpha_bar[0]) / (1 - alpha_bar[1]) * betas[1])
        x0_hat = (x_t[b] - math.sqrt(1 - a) * eps_hat) / math.sqrt(a)
        mu = post_mean(x0_hat)
        frac = (v + 1) / 2
        var = np.exp(frac * math.log(beta) + (1 - frac) * math.log(post_var))  # IDDPM eq. 15
        if step == 0:  # DDPM eq. 13
            sd = np.sqrt(var)
            upper = np.where(x0[b] > 0.999, 1.0, _phi((x0[b] + 1 / 255 - mu) / sd))
            lower = np.where(x0[b] < -0.999, 0.0, _phi((x0[b] - 1 / 255 - mu) / sd))
            nats = -np.log(upper - lower)
        else:  # KL of two Gaussians, in variances
            diff = post_mean(x0[b]) - mu
            nats = 0.5 * (np.log(var / post_var) + (post_var + diff ** 2) / var - 1)
        vlb_bits = nats.mean() / math.log(2)
        losses.append(np.mean((eps_hat - eps[b]) ** 2) + lam * num_steps * vlb_bits)
    return np.array(losses)


def _batch(t, seed=0, schedule=None):
    schedule = schedule or DiscreteSchedule()
    rng = np.random.default_rng(seed)
    b = len(t)
    x0 = rng.integers(0, 256, (b, SIDE, SIDE, CHANNELS)) / 127.5 - 1.0  # 8-bit levels, edges too
    x0[:, 0, 0] = -1.0
    x0[:, 0, 1] = 1.0
    eps = rng.standard_normal(x0.shape)
    x_t = np.asarray(add_discrete_noise(jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(t),
                                        schedule), np.float64)
    eps_hat = eps + 0.3 * rng.standard_normal(x0.shape)
    v = rng.uniform(-1, 1, x0.shape)
    out = np.concatenate([eps_hat, v], axis=-1)
    return out, x0, x_t, eps, np.asarray(t, np.int32), schedule


@pytest.mark.parametrize("schedule", [DiscreteSchedule(), DiscreteSchedule("linear", 20)],
                         ids=["if_cosine_1000", "linear_20"])
def test_hybrid_loss_matches_the_papers_formulas(schedule):
    num = schedule.num_train_timesteps
    t = [0, 1, 2, num // 2, num - 2, num - 1, 0, 3]
    out, x0, x_t, eps, t, schedule = _batch(t, schedule=schedule)
    lam = 0.001
    loss, mse, vlb = hybrid_loss_per_example(
        *(jnp.asarray(a, jnp.float32) for a in (out, x0, x_t, eps)), jnp.asarray(t), schedule,
        vlb_weight=lam)
    want = _reference(out, x0, x_t, eps, t, schedule, lam)
    np.testing.assert_allclose(np.asarray(loss), want, rtol=2e-4)
    np.testing.assert_allclose(np.asarray(mse + lam * num * vlb), want, rtol=2e-4)
    # The variational term is a real part of it at every step (not swamped by the MSE).
    assert np.all(np.asarray(lam * num * vlb) > 1e-3 * np.asarray(mse))


def test_the_variational_term_trains_only_the_variance():
    out, x0, x_t, eps, t, schedule = _batch([0, 5, 300, 999], seed=1)
    args = [jnp.asarray(a, jnp.float32) for a in (x0, x_t)]

    grad = jax.grad(lambda o: vlb_terms(o, *args, jnp.asarray(t), schedule).sum())(
        jnp.asarray(out, jnp.float32))
    assert np.all(np.asarray(grad[..., :CHANNELS]) == 0.0)  # stop-gradient on eps (the mean)
    assert np.all(np.abs(np.asarray(grad[..., CHANNELS:])).sum(axis=(1, 2, 3)) > 0)

    def total(o):
        return hybrid_loss_per_example(o, *args, jnp.asarray(eps, jnp.float32), jnp.asarray(t),
                                       schedule)[0].sum()

    def mse_only(o):
        return hybrid_loss_per_example(o, *args, jnp.asarray(eps, jnp.float32), jnp.asarray(t),
                                       schedule)[1].sum()

    g_total = jax.grad(total)(jnp.asarray(out, jnp.float32))
    g_mse = jax.grad(mse_only)(jnp.asarray(out, jnp.float32))
    np.testing.assert_array_equal(np.asarray(g_total[..., :CHANNELS]),
                                  np.asarray(g_mse[..., :CHANNELS]))


def test_a_model_without_variance_channels_is_refused():
    out, x0, x_t, eps, t, schedule = _batch([1])
    with pytest.raises(ValueError, match="eps and v concatenated"):
        hybrid_loss_per_example(jnp.asarray(out[..., :CHANNELS]), jnp.asarray(x0),
                                jnp.asarray(x_t), jnp.asarray(eps), jnp.asarray(t), schedule)
