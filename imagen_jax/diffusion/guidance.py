"""Classifier-free guidance (Ho & Salimans 2021) with Imagen's conventions (Sec. 2.2).

Training zeroes the text condition of a random 10% of examples (`drop_text_condition`); the
unconditional condition is ``text_embeds = 0`` with an all-False ``text_mask`` (DESIGN.md).
Sampling evaluates the conditional and unconditional halves in ONE model call on the doubled
batch and combines them as ``uncond + w (cond - uncond)``: weight 1 is no guidance.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
ModelFn = Callable[[Array, Array], Array]

DEFAULT_COND_DROP_PROB = 0.1  # Imagen Sec. 2.2 / App. F: 10% in every stage


def drop_text_condition(
    rng: Array, text_embeds: Array, text_mask: Array, drop_prob: float = DEFAULT_COND_DROP_PROB
) -> tuple[Array, Array]:
    """Replaces each example's text condition by the null condition with prob ``drop_prob``.

    text_embeds [B, L, D], text_mask bool [B, L] -> same shapes; dropped rows get zero
    embeddings and an all-False mask.
    """
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop_prob={drop_prob} must lie in [0, 1] (the paper uses 0.1)")
    if text_embeds.ndim != 3 or text_mask.shape != text_embeds.shape[:2]:
        raise ValueError(
            f"text_embeds {text_embeds.shape} must be [B, L, D] and text_mask {text_mask.shape} "
            "[B, L]"
        )
    keep = jax.random.bernoulli(rng, 1.0 - drop_prob, (text_embeds.shape[0],))  # [B]
    embeds = jnp.where(keep[:, None, None], text_embeds, jnp.zeros_like(text_embeds))
    mask = jnp.logical_and(text_mask.astype(bool), keep[:, None])
    return embeds, mask


def with_null_condition(text_embeds: Array, text_mask: Array) -> tuple[Array, Array]:
    """Doubles a text batch for `guided_model_fn`: (cond, uncond), [2B, L, D] and [2B, L]."""
    embeds = jnp.concatenate([text_embeds, jnp.zeros_like(text_embeds)], axis=0)
    mask = jnp.concatenate([text_mask.astype(bool), jnp.zeros(text_mask.shape, bool)], axis=0)
    return embeds, mask


def guided_model_fn(model_fn_2b: ModelFn, guidance_weight: ArrayLike) -> ModelFn:
    """``model_fn(x_t [B, ...], t [B])`` applying classifier-free guidance with one model call.

    ``model_fn_2b(x [2B, ...], t [2B])`` must predict the first B rows conditionally and the
    last B unconditionally (see `with_null_condition`). ``guidance_weight`` is a scalar or a
    per-example [B] array, possibly traced (one compiled sampler serves a whole sweep);
    prediction = uncond + w (cond - uncond), the paper's convention (w = 1: conditional only).
    Guidance is linear, so it is the same whether the network predicts eps, v or x0.
    """

    def model_fn(x_t: Array, t: Array) -> Array:
        batch = x_t.shape[0]
        pred = model_fn_2b(jnp.concatenate([x_t, x_t], axis=0), jnp.concatenate([t, t], axis=0))
        if pred.shape[0] != 2 * batch:
            raise ValueError(
                f"model_fn_2b returned batch {pred.shape[0]}; expected 2 * {batch} rows "
                "(conditional first, unconditional second)"
            )
        cond, uncond = pred[:batch], pred[batch:]
        w = jnp.asarray(guidance_weight, jnp.result_type(pred.dtype, jnp.float32))
        if w.ndim == 1:
            w = w.reshape((-1,) + (1,) * (pred.ndim - 1))
        return (uncond + w * (cond - uncond)).astype(pred.dtype)

    return model_fn
