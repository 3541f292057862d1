"""Test helpers: a deterministic in-memory data source, and tiny U-Nets and stages.

`synthetic_data` is a valid `train.data_fn`: batch `i` of host `h` is a pure function of
(seed, h, i), and the iterator state is `{"index": i}`, so it resumes exactly like the grain
pipeline does. Images are smooth random colour fields in [-1, 1]; text embeddings are random with
a random number of real tokens.

`tiny_base` / `tiny_sr` build the CPU-sized U-Nets of gin_configs/tiny/models/*.gin in Python
(tests/test_unet.py checks that they equal the gin-built ones).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import gin
import numpy as np

from imagen_jax.nn import BaseUNet, EfficientUNet
from imagen_jax.stage import Stage

# The fields gin_configs/tiny/models/*.gin bind (at their RESOLUTION 16 and TEXT_EMBED_DIM 32).
TINY_BASE = dict(channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                 head_dim=16, num_groups=8, text_embed_dim=32, text_cond_dim=32, image_size=16,
                 attn_pool_heads=4)
TINY_SR = dict(blocks=((16, 1), (32, 2)), stem_channels=16, self_attention=(False, True),
               cross_attention=(False, True), num_heads=4, num_groups=8, text_embed_dim=32,
               text_cond_dim=32, embed_dim=64, sinusoid_dim=32, attn_pool_heads=4)


def tiny_base(**fields: Any) -> BaseUNet:
    """The tiny base U-Net (~0.85 M parameters, 16 px), any `BaseUNet` field overridden."""
    return BaseUNet(**{**TINY_BASE, **fields})


def tiny_sr(**fields: Any) -> EfficientUNet:
    """The tiny Efficient U-Net (~0.19 M parameters), any `EfficientUNet` field overridden."""
    return EfficientUNet(**{**TINY_SR, **fields})


def gin_model_bindings(model: Any) -> str:
    """Gin text that builds ``model`` as the stage's model: ``Stage.model = @BaseUNet()`` and a
    ``BaseUNet.<field> = <value>`` line for every field, for tests that write a stage's gin
    config. Field values must be gin literals (numbers, strings, None, tuples): give dtypes as
    strings ("float32"), as the tiny constructors do."""
    name = type(model).__name__
    lines = [f"Stage.model = @{name}()"]
    lines += [f"{name}.{f.name} = {getattr(model, f.name)!r}" for f in dataclasses.fields(model)
              if f.init and f.name not in ("parent", "name")]
    return "\n".join(lines) + "\n"


# Seeds `SyntheticIterator.null_embeds` apart from every batch's (seed, host, index) stream.
NULL_EMBEDS_STREAM = 0xE0


class SyntheticIterator(Iterator[dict[str, np.ndarray]]):
    """Host-local batches with `get_state`/`set_state` (checkpointed by the trainer).

    With embeddings (not tokens) it also has ``null_embeds`` float32 [L, D], random from the
    seed alone (the same on every host): its "encoding of the empty prompt", which a discrete
    stage's trainer reads (`imagen_jax.train.trainer.null_embeds_for`).
    """

    def __init__(self, *, batch_size: int, resolution: int, lowres_resolution: int | None,
                 text_length: int, text_embed_dim: int, process_index: int = 0,
                 process_count: int = 1, seed: int = 0, tokens: bool = False,
                 vocab_size: int = 100, nan_at: tuple[int, ...] = ()):
        self.batch_size, self.resolution, self.lowres = batch_size, resolution, lowres_resolution
        self.text_length, self.text_embed_dim = text_length, text_embed_dim
        self.process_index, self.process_count, self.seed = process_index, process_count, seed
        self.tokens, self.vocab_size, self.nan_at = tokens, vocab_size, tuple(nan_at)
        self.index = 0
        self.null_embeds = None if tokens else np.random.default_rng(
            (seed, NULL_EMBEDS_STREAM)).standard_normal((text_length, text_embed_dim)).astype(
                np.float32)

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng((self.seed, self.process_index, self.index))
        b, r, length = self.batch_size, self.resolution, self.text_length
        coarse = rng.uniform(-1, 1, (b, 4, 4, 3)).astype(np.float32)
        image = np.repeat(np.repeat(coarse, r // 4, axis=1), r // 4, axis=2)
        image = np.clip(image + 0.1 * rng.standard_normal(image.shape), -1, 1).astype(np.float32)
        num_tokens = rng.integers(1, length + 1, (b,))
        mask = np.arange(length)[None, :] < num_tokens[:, None]
        batch = {"image": image, "text_mask": mask,
                 "id": (self.index * self.process_count + self.process_index) * b + np.arange(b)}
        if self.tokens:
            batch["text_ids"] = np.where(mask, rng.integers(1, self.vocab_size, (b, length)), 0
                                         ).astype(np.int32)
        else:
            embeds = rng.standard_normal((b, length, self.text_embed_dim)).astype(np.float32)
            batch["text_embeds"] = embeds * mask[..., None]
        if self.lowres is not None:
            f = r // self.lowres
            batch["lowres"] = image.reshape(b, self.lowres, f, self.lowres, f, 3).mean((2, 4))
        if self.index in self.nan_at:
            batch["image"] = np.full_like(image, np.nan)
        self.index += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"index": self.index}

    def set_state(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])


@gin.configurable
def synthetic_data(
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    tokenizer: Any | None = None,
    stage: Any = None,
    resolution: int = 16,
    lowres_resolution: int | None = None,
    text_length: int = 8,
    text_embed_dim: int = 32,
    seed: int = 0,
    nan_at: tuple[int, ...] = (),
) -> SyntheticIterator:
    """A `train.data_fn` of synthetic batches (token ids instead of embeddings with a tokenizer).

    The batch shapes are the explicit arguments (tests set them, mismatches included); ``stage``,
    which the trainer passes every data_fn, is not read.
    """
    del stage
    return SyntheticIterator(
        batch_size=batch_size, resolution=resolution, lowres_resolution=lowres_resolution,
        text_length=text_length, text_embed_dim=text_embed_dim, process_index=process_index,
        process_count=process_count, seed=seed, tokens=tokenizer is not None, nan_at=nan_at,
    )


def tiny_test_stage(super_res: bool = False) -> Any:
    """A very small stage (8x8 images, ~40k parameters) whose step compiles in seconds on CPU;
    it still has every logical axis the rule sets shard (conv, embed, heads, mlp)."""

    if super_res:
        model = tiny_sr(blocks=((8, 1), (8, 1)), stem_channels=8, num_heads=2,
                        text_embed_dim=16, text_cond_dim=16, embed_dim=16, sinusoid_dim=16,
                        num_groups=4)
        return Stage(model=model, resolution=16, lowres_resolution=8, text_length=4,
                     text_embed_dim=16, cond_drop_prob=0.1)
    # 16 channels / head_dim 8 = 2 heads, so `heads` divides a tensor axis of 2.
    model = tiny_base(channels=16, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(8,),
                      head_dim=8, text_embed_dim=16, text_cond_dim=16, image_size=8,
                      num_groups=4)
    return Stage(model=model, resolution=8, text_length=4, text_embed_dim=16)


@gin.configurable
def signal_at_step(step: int, signum: int = 9) -> Any:
    """Fault injection for `train.step_callback`: the process sends itself `signum` (default
    SIGKILL) right after train step `step`."""

    def callback(current: int, state: Any, metrics: Any) -> None:
        del state, metrics
        if current == step:
            os.kill(os.getpid(), signum)

    return callback
