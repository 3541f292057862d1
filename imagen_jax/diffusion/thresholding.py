"""Thresholding of the predicted clean image x0_hat inside the sampling loop (Imagen Sec. 2.3).

* static: clip x0_hat to [-1, 1];
* dynamic: per sample, s = the p-th percentile of |x0_hat| over that sample's pixels; if s > 1,
  clip x0_hat to [-s, s] and divide by s (p = 99.5, Fig. A.10). This pushes saturated pixels
  inwards, which is what lets large guidance weights produce photorealistic images. As in the
  paper's pseudo-code (Fig. A.10: ``s = max(s, 1); x0 = clip(x0, -s, s) / s``), a sample with
  s <= 1 is still clipped to [-1, 1], so the output always lies in [-1, 1].
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

Array = jax.Array

THRESHOLDINGS = ("none", "static", "dynamic")
DEFAULT_PERCENTILE = 99.5  # Imagen Fig. A.10


def check_percentile(percentile: float, label: str = "percentile") -> float:
    """The dynamic-thresholding percentile as a float in [1, 100]; ``label`` names it in errors.

    Raises TypeError for a non-number, ValueError (one line) for NaN/Inf, values outside
    (0, 100] and values below 1 (a quantile passed as a percentile).
    """
    if not isinstance(percentile, numbers.Real) or isinstance(percentile, bool):
        raise TypeError(
            f"{label} must be a Python number (static), got {type(percentile).__name__}"
        )
    percentile = float(percentile)
    if not 0.0 < percentile <= 100.0:  # also refuses NaN
        raise ValueError(f"{label}={percentile} must lie in (0, 100], e.g. 99.5 (the paper's)")
    if percentile < 1.0:
        # imagen-pytorch's 0.95 is a quantile; as a percentile it would clip almost every pixel.
        raise ValueError(
            f"{label}={percentile} looks like a quantile; percentiles are in percent, in [1, 100], "
            f"e.g. 99.5 (pass {percentile * 100:g} for the {percentile} quantile)"
        )
    return percentile


def check_thresholding(thresholding: str) -> str:
    if thresholding not in THRESHOLDINGS:
        raise ValueError(f"unknown thresholding {thresholding!r}; choose one of {THRESHOLDINGS}")
    return thresholding


def per_sample_percentile(x: Array, percentile: float) -> Array:
    """p-th percentile over all but the leading axis, [B]; numpy's default 'linear' method.

    Only the top ``N - floor(p/100 (N-1))`` values of each sample are needed, so this runs a
    partial sort (`lax.top_k`) instead of sorting all H*W*C pixels: k = 62 of 12,288 for a
    64x64x3 image at p = 99.5.
    """
    percentile = check_percentile(percentile)
    flat = x.reshape(x.shape[0], -1)  # [B, N]
    n = flat.shape[1]
    position = percentile / 100.0 * (n - 1)  # fractional index into the ascending sort
    lower = min(int(math.floor(position)), n - 1)
    frac = position - lower
    k = n - lower  # top_k (descending) holds ascending indices n-1 ... lower
    top = jax.lax.top_k(flat, k)[0]  # [B, k]
    lo_val = top[:, k - 1]  # ascending index `lower`
    if frac == 0.0 or k == 1:
        return lo_val
    hi_val = top[:, k - 2]  # ascending index `lower + 1`
    return lo_val + frac * (hi_val - lo_val)


def dynamic_threshold(x0: Array, percentile: float = DEFAULT_PERCENTILE) -> Array:
    """Imagen's dynamic thresholding of x0 [B, ...], per sample (Sec. 2.3, p = 99.5).

    s = max(1, percentile_p |x0[b]|); returns clip(x0[b], -s, s) / s (the paper's pseudo-code,
    Fig. A.10; a sample with s <= 1 is only clipped to [-1, 1]). Computed in float32, returned
    in x0's dtype.
    """
    if x0.ndim < 2:
        raise ValueError(
            f"dynamic_threshold expects a batch [B, ...] of images, got shape {x0.shape}; add a "
            "leading batch axis"
        )
    x = x0.astype(jnp.promote_types(x0.dtype, jnp.float32))
    s = jnp.maximum(per_sample_percentile(jnp.abs(x), percentile), 1.0)  # [B]
    s = s.reshape((-1,) + (1,) * (x.ndim - 1))
    return (jnp.clip(x, -s, s) / s).astype(x0.dtype)


def static_threshold(x0: Array) -> Array:
    """Clips x0 to [-1, 1] (Imagen Sec. 2.3 'static thresholding')."""
    return jnp.clip(x0, -1.0, 1.0)


def apply_thresholding(
    x0: Array, thresholding: str, percentile: float = DEFAULT_PERCENTILE
) -> Array:
    """Dispatch on ``thresholding`` in ('none', 'static', 'dynamic')."""
    check_thresholding(thresholding)
    if thresholding == "static":
        return static_threshold(x0)
    if thresholding == "dynamic":
        return dynamic_threshold(x0, percentile)
    return x0
