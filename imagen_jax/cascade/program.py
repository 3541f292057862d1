"""The pure cascade program: the chain check and every stage sampled in order (traceable).

Each stage is sampled by `imagen_jax.stage.sample_stage`; stage i draws its randomness from
``fold_in(rng, i)`` whichever slice of the cascade runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from imagen_jax.errors import CascadeError
from imagen_jax.stage import Stage, sample_stage
from imagen_jax.text.encoder import PADDING_KEPT_TAG

PyTree = Any


def check_chain(
    stages: Sequence[Stage],
    text_fingerprint: str | Callable[[bool], str] | None = None,
) -> None:
    """Raises ``CascadeError`` unless ``stages`` form a valid cascade (or a slice of one).

    Checks: only the first stage may be a base stage; every SR stage's low resolution equals the
    previous stage's resolution; all stages were trained with the same text encoder (the same
    weights, vocabulary and length: a DeepFloyd IF stage fine-tuned with padding kept and one of
    ours share the encoder) and, when given, with ``text_fingerprint``: a string, or the
    encoder's ``fingerprint_for(zero_padding)``, which each stage is compared with in the padding
    mode it is fed in (kept for discrete stages, zeroed for ours).
    """
    if not stages:
        raise CascadeError("the cascade has no stages; pass at least one stage")
    for i, stage in enumerate(stages):
        label = stage.name or f"stage {i}"
        if i > 0 and not stage.is_super_res:
            raise CascadeError(
                f"{label} is a base (text-to-image) stage but sits at position {i} of the cascade; "
                "only the first stage may be a base stage (order the stages base, SR, SR)"
            )
        if stage.is_super_res and stage.resolution <= stage.lowres_resolution:
            raise CascadeError(
                f"{label}: resolution {stage.resolution} is not above its low resolution "
                f"{stage.lowres_resolution}"
            )
        if i > 0 and stage.lowres_resolution != stages[i - 1].resolution:
            prev = stages[i - 1].name or f"stage {i - 1}"
            raise CascadeError(
                f"{label} expects {stage.lowres_resolution}px inputs but {prev} makes "
                f"{stages[i - 1].resolution}px images; pass stages whose resolutions chain"
            )
    dims = {s.text_embed_dim for s in stages if s.text_embed_dim is not None}
    if len(dims) > 1:
        raise CascadeError(
            "stages expect text embeddings of different sizes "
            f"({[s.text_embed_dim for s in stages]}); all stages must share one text encoder"
        )
    prints = {_encoder_weights(s.text_fingerprint) for s in stages
              if s.text_fingerprint is not None}
    mismatched = False
    if callable(text_fingerprint):
        mismatched = any(s.text_fingerprint not in (None, text_fingerprint(not s.is_discrete))
                         for s in stages)
        text_fingerprint = text_fingerprint(True)
    if text_fingerprint is not None:
        prints.add(_encoder_weights(text_fingerprint))
    if len(prints) > 1 or mismatched:
        detail = ", ".join(f"{s.name or i}={s.text_fingerprint}" for i, s in enumerate(stages))
        extra = f", encoder={text_fingerprint}" if text_fingerprint is not None else ""
        raise CascadeError(
            f"stages were trained with different text encoders ({detail}{extra}); every stage "
            "must use the T5 checkpoint and max_length it was trained with"
        )


def _encoder_weights(fingerprint: str) -> str:
    """A text fingerprint without its padding mode: the encoder's weights, vocabulary, length."""
    return fingerprint.replace(f"{PADDING_KEPT_TAG}-", "")


def check_text_encoder(stages: Sequence[Stage], encoder: Any) -> None:
    """Raises ``CascadeError`` (one line, naming both sides and the fix) unless ``encoder``
    makes what every discrete (DeepFloyd IF) stage reads: ``text_length`` tokens of
    ``text_embed_dim``-wide embeddings with the padded positions kept (``zero_padding=False``;
    IF was trained on T5 v1.1 XXL: 4096 wide, 77 tokens). IF stages carry no text fingerprint
    (our fingerprint hashes weights we never saw), so this is what the cascade can check.
    Continuous stages are checked by their fingerprint (`check_chain`).
    """
    for i, stage in enumerate(stages):
        if not stage.is_discrete:
            continue
        want = (stage.text_length, stage.text_embed_dim, False)
        have = (getattr(encoder, "max_length", None), getattr(encoder, "embed_dim", None),
                getattr(encoder, "zero_padding", True))
        if have != want:
            def shape(length, dim, zeroed):
                return f"{length} tokens x {dim} dims, padding {'zeroed' if zeroed else 'kept'}"

            raise CascadeError(
                f"{stage.name or f'stage {i}'} (DeepFloyd IF) reads T5 embeddings of "
                f"{shape(*want)} but the text encoder makes {shape(*have)}; pass IF's T5 v1.1 "
                f"XXL (--t5=IF-I-XL-v1.0/text_encoder) loaded with max_length={want[0]}, "
                "zero_padding=False (load_cascade does both)")


def sample_cascade(
    stages: Sequence[Stage],
    params: Sequence[PyTree],
    text_embeds: jax.Array,
    text_mask: jax.Array,
    rng: jax.Array,
    lowres: jax.Array | None = None,
    *,
    first_stage_index: int = 0,
    on_step: Callable[[int, jax.Array], None] | None = None,
    return_finite: bool = False,
    null_embeds: jax.Array | None = None,
    padding_kept: bool = False,
) -> tuple[jax.Array, ...] | tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """Runs ``stages`` in order; returns every stage's images (float32 [B, R_i, R_i, 3]).

    Pure and traceable. ``lowres`` is required when ``stages[0]`` is an SR stage.
    ``first_stage_index`` is the position of ``stages[0]`` in the full cascade: stage i draws
    its randomness from ``fold_in(rng, i)`` whichever slice runs it. With ``return_finite``
    returns (images, finite) where finite[i] is stage i's bool [B] (see ``sample_stage``).
    ``null_embeds`` (the encoded empty prompt, [L, D]) is the unconditional condition of the
    discrete (DeepFloyd IF) stages; the others ignore it. ``padding_kept``: ``text_embeds`` hold
    the encoder's outputs at padded positions (IF's convention, which discrete stages read);
    continuous stages then get them zeroed, as they were trained.
    """
    zeroed = text_embeds
    if padding_kept and not all(s.is_discrete for s in stages):
        zeroed = jnp.where(text_mask[..., None], text_embeds, 0.0).astype(text_embeds.dtype)
    outputs, finite = [], []
    images = lowres
    for i, (stage, stage_params) in enumerate(zip(stages, params)):
        index = first_stage_index + i
        step_cb = None if on_step is None else (lambda t, index=index: on_step(index, t))
        images, ok = sample_stage(
            stage,
            stage_params,
            text_embeds if stage.is_discrete else zeroed,
            text_mask,
            jax.random.fold_in(rng, index),
            lowres=images if stage.is_super_res else None,
            on_step=step_cb,
            return_finite=True,
            null_embeds=null_embeds,
        )
        outputs.append(images)
        finite.append(ok)
    if return_finite:
        return tuple(outputs), tuple(finite)
    return tuple(outputs)
