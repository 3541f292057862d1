"""Normalisation precision against numpy float64 (issue 15.4).

The one-pass variance E[x^2] - E[x]^2 in float32 cancels catastrophically when a group's mean is
large against its spread: on x = 100 + 0.01 N(0, 1) GroupNorm gave std 5.96 instead of 1. The
U-Net's GroupNorm and LayerNorm now use a two-pass variance on mean-shifted data; T5's RMSNorm has
no mean subtraction (its statistic is a sum of squares, no cancellation) and is checked too.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.nn.layers import GroupNorm, LayerNorm
from imagen_jax.text.t5 import RMSNorm

EPS = 1e-6  # flax's GroupNorm/LayerNorm default, T5's layer_norm_epsilon


def group_norm_f64(x, groups, scale, bias):
    """Two-pass GroupNorm in float64 over all axes but the batch, per group of channels."""
    x = np.asarray(x, np.float64)
    b, c = x.shape[0], x.shape[-1]
    xg = x.reshape(b, -1, groups, c // groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    return ((xg - mean) / np.sqrt(var + EPS)).reshape(x.shape) * scale + bias


def layer_norm_f64(x, scale, bias):
    x = np.asarray(x, np.float64)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * scale + bias


def rms_norm_f64(x, scale):
    x = np.asarray(x, np.float64)
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + EPS) * scale


def _with_params(module, x, seed=1):
    """Applies `module` with random (not identity) scale/bias, returned as float64 numpy."""
    variables = nn.meta.unbox(module.init(jax.random.PRNGKey(0), x))
    rng = np.random.default_rng(seed)
    variables = jax.tree.map(lambda p: jnp.asarray(1 + 0.5 * rng.standard_normal(p.shape),
                                                   p.dtype), variables)
    leaves = {"/".join(k.key for k in path): np.asarray(v, np.float64)
              for path, v in jax.tree_util.tree_flatten_with_path(variables)[0]}
    return module.apply(variables, x), leaves


@pytest.mark.parametrize("offset", [0.0, 100.0, 1e4])
def test_group_norm_issue_case_matches_float64(offset):
    """The issue's input: [2, 16, 16, 8], 4 groups, spread 0.01 around `offset`."""
    x = (offset + 0.01 * np.random.default_rng(0).standard_normal((2, 16, 16, 8))
         ).astype(np.float32)
    module = GroupNorm(num_groups=4)
    y = np.asarray(module.apply(module.init(jax.random.PRNGKey(0), x), x))
    ref = group_norm_f64(x, 4, 1.0, 0.0)
    assert y.dtype == np.float32
    assert abs(y.std() - 1.0) < 1e-2, y.std()  # eps 1e-6 against var 1e-4: std 0.995
    np.testing.assert_allclose(y, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("offset,spread", [(1e4, 1.0), (1e5, 0.5), (-300.0, 1e-3)])
def test_group_norm_per_group_offsets_and_affine_match_float64(offset, spread):
    """Own variant: each group has its own large mean, 32 requested groups on 64 channels,
    random scale/bias, a 3-D feature map."""
    rng = np.random.default_rng(2)
    group_means = offset * (1 + rng.uniform(-0.5, 0.5, (1, 1, 1, 32)))
    x = (np.repeat(group_means, 2, axis=-1) + spread * rng.standard_normal((3, 8, 4, 64))
         ).astype(np.float32)
    y, p = _with_params(GroupNorm(num_groups=32), x)
    ref = group_norm_f64(x, 32, p["params/norm/scale"], p["params/norm/bias"])
    np.testing.assert_allclose(np.asarray(y), ref, atol=2e-4 * np.abs(ref).max(), rtol=0)


def test_group_norm_bfloat16_keeps_float32_statistics():
    """bf16 in, bf16 out; statistics in float32: matches float64 on the bf16 input to bf16
    rounding, including a large group mean (500 +- 20: 8 units per bf16 step near 500)."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(500 + 20 * rng.standard_normal((2, 8, 8, 16)), jnp.bfloat16)
    module = GroupNorm(num_groups=4)
    y = module.apply(module.init(jax.random.PRNGKey(0), x), x)
    assert y.dtype == jnp.bfloat16
    ref = group_norm_f64(np.asarray(x.astype(jnp.float32)), 4, 1.0, 0.0)
    # bf16 keeps 8 significant bits: |y| <= 4 rounds by at most 2^-6.
    np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), ref, atol=2**-6, rtol=0)
    assert abs(float(np.asarray(y.astype(jnp.float32)).std()) - 1.0) < 1e-2


@pytest.mark.parametrize("offset", [0.0, 100.0, 1e4])
def test_layer_norm_matches_float64(offset):
    """Text-token LayerNorm [B, L, D] had the same one-pass variance."""
    rng = np.random.default_rng(4)
    x = (offset + 0.01 * rng.standard_normal((2, 6, 64))).astype(np.float32)
    y, p = _with_params(LayerNorm(), x)
    ref = layer_norm_f64(x, p["params/norm/scale"], p["params/norm/bias"])
    np.testing.assert_allclose(np.asarray(y), ref, atol=2e-4 * np.abs(ref).max(), rtol=0)
    xb = jnp.asarray(x, jnp.bfloat16)  # bf16: float32 statistics, bf16 result
    yb, _ = _with_params(LayerNorm(), xb)
    assert yb.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(yb)))


@pytest.mark.parametrize("offset", [0.0, 100.0, 1e4])
def test_t5_rms_norm_has_no_cancellation(offset):
    """RMSNorm divides by sqrt(E[x^2]) without subtracting a mean: a sum of squares has no
    cancellation, so large offsets are exact to float32 rounding (relative 1e-6)."""
    rng = np.random.default_rng(5)
    x = (offset + 0.01 * rng.standard_normal((2, 6, 64))).astype(np.float32)
    y, p = _with_params(RMSNorm(EPS), x)
    ref = rms_norm_f64(x, p["params/scale"])
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-6)
