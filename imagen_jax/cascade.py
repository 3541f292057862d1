"""The compiled cascade sampler: text -> base image -> super-resolved images in ONE jitted program.

Imagen (Saharia et al. 2022, Section 2 and Appendix F) chains a 64x64 text-conditional base model
with two text-conditional super-resolution models (64->256, 256->1024). Here the whole chain --
optional T5 encoding, the base stage's sampling loop, then for every SR stage the noise
augmentation of the previous stage's output at the stage's ``aug_level`` and its own sampling loop
-- is traced into a single XLA program: no host round-trips between stages, one loop per stage
(``imagen_jax.diffusion.sample``), the step count only a loop bound (programs for 10 and 50 steps
have the same size).

Any contiguous slice of the cascade runs the same way: ``start=0, stop=1`` is the base stage only;
``start=1`` upsamples a user's own low-resolution images.

The batch is split over the mesh's data axes (``partitioning.BATCH_AXES``); parameters use the
same logical-axis rules the trainer shards them with, so a cascade restored onto any mesh samples
without gathering weights on one device.

Reproducibility: the same prompts, seed, cascade and settings give bitwise the same images on the
same backend (all randomness comes from ``jax.random.fold_in(PRNGKey(seed), stage_index)``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from imagen_jax import partitioning
from imagen_jax.data.images import uint8_to_unit, unit_to_uint8
from imagen_jax.diffusion.predictions import PREDICTIONS

PyTree = Any

log = logging.getLogger(__name__)


class CascadeError(ValueError):
    """A cascade that cannot be assembled or run; the message names the problem and the fix."""


def validate_sampling(
    settings: dict[str, Any], *, where: str = "", names: dict[str, str] | None = None
) -> dict[str, Any]:
    """``imagen_jax.diffusion.check_sampling_settings`` (the one definition of valid sampler
    settings) raising ``CascadeError``: finite, in range, whole step counts; returns the
    normalised settings."""
    from imagen_jax.diffusion.settings import check_sampling_settings

    try:
        return check_sampling_settings(settings, where=where, names=names)
    except (TypeError, ValueError) as e:
        raise CascadeError(str(e)) from None


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How one stage samples.

    Defaults: ancestral (DDPM) sampling as in the paper (Section 2.1); dynamic thresholding at
    p = 99.5 (Section 2.3, Fig. A.10); guidance weight 1 (= no guidance, paper convention; the
    paper's COCO numbers use 1.35 for the base and 8.0 for SR, Appendix E/F); ``aug_level`` 0 for SR
    stages (Section 2.5: 0 gives the best FID, 0.1-0.3 the best-looking samples).

    Every field is validated here (``validate_sampling``): a NaN/Inf or out-of-range value, or a
    fractional ``num_steps``, raises ``CascadeError`` naming the field and its valid range; a
    whole float step count (3.0) is stored as the int 3.
    """

    sampler: str = "ddpm"
    num_steps: int = 256
    guidance_weight: float = 1.0
    thresholding: str = "dynamic"
    percentile: float = 99.5
    aug_level: float = 0.0

    def __post_init__(self):
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in validate_sampling(settings, where="SamplingConfig.").items():
            object.__setattr__(self, name, value)  # frozen: store the normalised value


@gin.configurable
def sampling_overrides(
    sampler: str | None = None,
    num_steps: int | None = None,
    guidance_weight: float | None = None,
    thresholding: str | None = None,
    percentile: float | None = None,
    aug_level: float | None = None,
) -> dict[str, Any]:
    """User overrides of the stages' saved sampler settings (unset fields keep the saved value).

    Bind unscoped (``sampling_overrides.num_steps = 25``) for every stage, or in the scope
    ``stage0``, ``stage1`` ... for one stage (``stage1/sampling_overrides.aug_level = 0.2``); the
    scoped binding wins. The set values are validated like ``SamplingConfig`` (``CascadeError``).
    """
    values = dict(
        sampler=sampler,
        num_steps=num_steps,
        guidance_weight=guidance_weight,
        thresholding=thresholding,
        percentile=percentile,
        aug_level=aug_level,
    )
    values = {k: v for k, v in values.items() if v is not None}
    return validate_sampling(values, where="sampling_overrides.")


def gin_sampling_overrides(num_stages: int) -> list[dict[str, Any]]:
    """Reads ``sampling_overrides`` once per stage, under the gin scope ``stage{i}``.

    Raises ``CascadeError`` (one line, naming the stage) for an invalid bound value.
    """
    out = []
    for i in range(num_stages):
        with gin.config_scope(f"stage{i}"):
            try:
                out.append(sampling_overrides())
            except CascadeError as e:
                # gin appends "In call to configurable ..." lines; the launchers print one line.
                raise CascadeError(f"stage {i}: {str(e).splitlines()[0]}") from None
    return out


@dataclasses.dataclass(frozen=True)
class CascadeStage:
    """Everything the sampler needs to know about one stage (architecture + diffusion settings).

    ``model`` follows the U-Net contract of DESIGN.md:
    ``model.apply(variables, x, t, text_embeds, text_mask, lowres=None, aug_level=None)``.
    ``lowres_resolution`` is None for the base stage. ``train_aug_max`` is the top of the
    noise-augmentation range an SR stage was trained with (levels ~ U(0, train_aug_max)); a
    ``sampling.aug_level`` above it draws a warning (the model never saw such noisy inputs).
    None (unknown) checks nothing.
    """

    model: nn.Module
    resolution: int
    schedule: Any
    prediction: str = "eps"
    lowres_resolution: int | None = None
    sampling: SamplingConfig = SamplingConfig()
    text_fingerprint: str | None = None
    text_embed_dim: int | None = None
    text_length: int | None = None
    aug_schedule: Any = None  # schedule of the noise augmentation; None = ``schedule``
    name: str = ""
    train_aug_max: float | None = None

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise CascadeError(
                f"stage {self.name!r}: prediction {self.prediction!r} unknown; choose one of "
                f"{PREDICTIONS}"
            )
        aug, trained = self.sampling.aug_level, self.train_aug_max
        if self.is_sr and trained is not None and aug > trained:
            # stacklevel 2 is the dataclass __init__: one fixed location, so Python's default
            # filter shows the warning once however often the stage is copied (replace, ...).
            warnings.warn(
                f"stage {self.name!r} is sampled at aug_level={aug:g}, above the range "
                f"[0, {trained:g}] it was trained with (Stage.train_aug_max): it never saw such "
                f"noisy low-res inputs; expect artefacts, or use aug_level <= {trained:g}",
                UserWarning,
                stacklevel=2,
            )

    @property
    def is_sr(self) -> bool:
        return self.lowres_resolution is not None

    @classmethod
    def from_train_stage(cls, stage: Any, name: str = "") -> CascadeStage:
        """The sampling view of a trainer ``imagen_jax.train.Stage`` (its sampler defaults)."""
        sampling = SamplingConfig(
            sampler=stage.sampler,
            num_steps=stage.num_sample_steps,
            guidance_weight=stage.guidance_weight,
            thresholding=stage.thresholding,
            percentile=stage.percentile,
            aug_level=stage.sample_aug_level,
        )
        return cls(
            model=stage.model,
            resolution=stage.resolution,
            schedule=stage.get_schedule(),
            prediction=stage.prediction,
            lowres_resolution=stage.lowres_resolution,
            sampling=sampling,
            text_fingerprint=stage.text_fingerprint,
            text_embed_dim=stage.text_embed_dim,
            text_length=stage.text_length,
            aug_schedule=stage.get_aug_schedule() if stage.is_super_res else None,
            name=name,
            train_aug_max=stage.train_aug_max if stage.is_super_res else None,
        )

    def replace(self, **changes: Any) -> CascadeStage:
        return dataclasses.replace(self, **changes)

    def with_sampling(self, **overrides: Any) -> CascadeStage:
        """A copy with some sampler settings changed (validated: ``CascadeError``)."""
        where = f"stage {self.name!r}: " if self.name else ""
        overrides = validate_sampling(overrides, where=where)  # also refuses unknown names
        return dataclasses.replace(self, sampling=dataclasses.replace(self.sampling, **overrides))


def check_chain(stages: Sequence[CascadeStage], text_fingerprint: str | None = None) -> None:
    """Raises ``CascadeError`` unless ``stages`` form a valid cascade (or a slice of one).

    Checks: only the first stage may be a base stage; every SR stage's low resolution equals the
    previous stage's resolution; all stages were trained with the same text encoder (and with
    ``text_fingerprint`` when given).
    """
    if not stages:
        raise CascadeError("the cascade has no stages; pass at least one stage")
    for i, stage in enumerate(stages):
        label = stage.name or f"stage {i}"
        if i > 0 and not stage.is_sr:
            raise CascadeError(
                f"{label} is a base (text-to-image) stage but sits at position {i} of the cascade; "
                "only the first stage may be a base stage (order the stages base, SR, SR)"
            )
        if stage.is_sr and stage.resolution <= stage.lowres_resolution:
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
    prints = {s.text_fingerprint for s in stages if s.text_fingerprint is not None}
    if text_fingerprint is not None:
        prints.add(text_fingerprint)
    if len(prints) > 1:
        detail = ", ".join(f"{s.name or i}={s.text_fingerprint}" for i, s in enumerate(stages))
        extra = f", encoder={text_fingerprint}" if text_fingerprint is not None else ""
        raise CascadeError(
            f"stages were trained with different text encoders ({detail}{extra}); every stage "
            "must use the T5 checkpoint and max_length it was trained with"
        )


# -------------------------------------------------------------------------------------------
# Pure sampling functions (traceable; the jitted program is built from these).
# -------------------------------------------------------------------------------------------


def _model_fn(
    stage: CascadeStage,
    params: PyTree,
    text_embeds: jax.Array,
    text_mask: jax.Array,
    lowres: jax.Array | None,
    aug_level: jax.Array | None,
    on_step: Callable[[jax.Array], None] | None,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``model_fn(x_t, t) -> prediction`` for the diffusion sampler, with classifier-free guidance.

    Guidance (Section 2.2; paper convention, weight 1 = none) runs the conditional and the
    unconditional halves in ONE model call on the doubled batch; the unconditional condition is
    zero embeddings with an all-False mask (DESIGN.md).
    """
    from imagen_jax.diffusion import guided_model_fn

    variables = {"params": params}
    w = float(stage.sampling.guidance_weight)

    def apply(x, t, embeds, mask, low, aug):
        if on_step is not None:
            on_step(t)
        return stage.model.apply(variables, x, t, embeds, mask, lowres=low, aug_level=aug)

    if w == 1.0:  # no guidance: skip the unconditional half entirely (half the FLOPs)
        return lambda x, t: apply(x, t, text_embeds, text_mask, lowres, aug_level)

    embeds_2b = jnp.concatenate([text_embeds, jnp.zeros_like(text_embeds)], axis=0)
    mask_2b = jnp.concatenate([text_mask, jnp.zeros_like(text_mask)], axis=0)
    low_2b = None if lowres is None else jnp.concatenate([lowres, lowres], axis=0)
    aug_2b = None if aug_level is None else jnp.concatenate([aug_level, aug_level], axis=0)

    def model_fn_2b(x2, t2):
        return apply(x2, t2, embeds_2b, mask_2b, low_2b, aug_2b)

    return guided_model_fn(model_fn_2b, w)


def sample_stage(
    stage: CascadeStage,
    params: PyTree,
    text_embeds: jax.Array,
    text_mask: jax.Array,
    rng: jax.Array,
    lowres: jax.Array | None = None,
    on_step: Callable[[jax.Array], None] | None = None,
    return_finite: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Samples one stage: float32 [B, R, R, 3] in [-1, 1].

    For an SR stage ``lowres`` float32 [B, r, r, 3] is the clean previous-stage output; it is
    noise-augmented here at ``stage.sampling.aug_level`` (Section 2.5) and the level is passed to
    the model, which resizes the low-res input itself (DESIGN.md).

    With ``return_finite`` also returns bool [B]: whether each image came out of the sampler
    finite (checked before the final clip, which would turn +-Inf into +-1). A False means the
    stage's parameters (or inputs) are broken; NaN images would otherwise become black PNGs.
    """
    from imagen_jax.diffusion import noise_augment, sample

    cfg = stage.sampling
    batch = text_embeds.shape[0]
    aug_level = None
    if stage.is_sr:
        if lowres is None:
            raise CascadeError(f"SR stage {stage.name!r} needs low-resolution input images")
        rng, aug_rng = jax.random.split(rng)
        aug_level = jnp.full((batch,), cfg.aug_level, jnp.float32)
        aug_schedule = stage.schedule if stage.aug_schedule is None else stage.aug_schedule
        lowres = noise_augment(lowres, aug_level, aug_rng, aug_schedule)
    model_fn = _model_fn(stage, params, text_embeds, text_mask, lowres, aug_level, on_step)
    shape = (batch, stage.resolution, stage.resolution, 3)
    images = sample(
        model_fn,
        shape,
        rng,
        schedule=stage.schedule,
        sampler=cfg.sampler,
        num_steps=int(cfg.num_steps),
        prediction=stage.prediction,
        thresholding=cfg.thresholding,
        percentile=float(cfg.percentile),
    )
    images = images.astype(jnp.float32)
    # The sampler's last x0 may overshoot slightly without thresholding; SR stages and PNGs
    # expect [-1, 1].
    clipped = jnp.clip(images, -1.0, 1.0)
    if return_finite:
        # A per-image reduction, local to each batch shard: no communication, no host trip.
        return clipped, jnp.all(jnp.isfinite(images), axis=(1, 2, 3))
    return clipped


def sample_cascade(
    stages: Sequence[CascadeStage],
    params: Sequence[PyTree],
    text_embeds: jax.Array,
    text_mask: jax.Array,
    rng: jax.Array,
    lowres: jax.Array | None = None,
    *,
    first_stage_index: int = 0,
    on_step: Callable[[int, jax.Array], None] | None = None,
    return_finite: bool = False,
) -> tuple[jax.Array, ...] | tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """Runs ``stages`` in order; returns every stage's images (float32 [B, R_i, R_i, 3]).

    Pure and traceable. ``lowres`` is required when ``stages[0]`` is an SR stage.
    ``first_stage_index`` is the position of ``stages[0]`` in the full cascade: stage i draws
    its randomness from ``fold_in(rng, i)`` whichever slice runs it. With ``return_finite``
    returns (images, finite) where finite[i] is stage i's bool [B] (see ``sample_stage``).
    """
    outputs, finite = [], []
    images = lowres
    for i, (stage, stage_params) in enumerate(zip(stages, params)):
        index = first_stage_index + i
        step_cb = None if on_step is None else (lambda t, index=index: on_step(index, t))
        images, ok = sample_stage(
            stage,
            stage_params,
            text_embeds,
            text_mask,
            jax.random.fold_in(rng, index),
            lowres=images if stage.is_sr else None,
            on_step=step_cb,
            return_finite=True,
        )
        outputs.append(images)
        finite.append(ok)
    if return_finite:
        return tuple(outputs), tuple(finite)
    return tuple(outputs)


def _non_finite_images(x: np.ndarray) -> list[int]:
    """Indices (leading axis) of the images in ``x`` holding a NaN or Inf."""
    if x.size == 0:
        return []
    flat = x.reshape(len(x), -1) if x.ndim > 1 else x.reshape(-1, 1)
    return [int(i) for i in np.flatnonzero(~np.isfinite(flat).all(axis=1))]


def to_uint8(images: np.ndarray | jax.Array) -> np.ndarray:
    """float [-1, 1] [N, ...] -> uint8 [0, 255] (round to nearest).

    Raises ``CascadeError`` if any value is NaN/Inf: numpy would cast NaN to 0, a black pixel.
    """
    x = np.asarray(images, np.float32)
    bad = _non_finite_images(x)
    if bad:
        raise CascadeError(
            f"images {bad[:8]} hold NaN/Inf values; refusing to turn them into black pixels"
        )
    return unit_to_uint8(x)


def from_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] (or float already in [-1, 1]) [N, r, r, 3] -> float32 [-1, 1].

    Raises ``CascadeError`` for float images outside [-1, 1] or holding NaN/Inf (naming the
    image's index): such inputs would make every output pixel NaN.
    """
    x = np.asarray(images)
    if x.dtype == np.uint8:
        return uint8_to_unit(x)
    x = x.astype(np.float32)
    bad = _non_finite_images(x)
    if bad:
        count = int((~np.isfinite(x[bad[0]])).sum())
        raise CascadeError(
            f"low-resolution image {bad[0]} (of {len(x)}) holds {count} NaN/Inf value(s)"
            + (f", and images {bad[1:8]} hold more" if len(bad) > 1 else "")
            + "; pass finite pixels (uint8 [0, 255] or float [-1, 1])"
        )
    if x.size and (x.min() < -1.001 or x.max() > 1.001):
        raise CascadeError(
            "float low-resolution images must lie in [-1, 1]; pass uint8 [0, 255] or rescale"
        )
    return x


# -------------------------------------------------------------------------------------------
# The Cascade object: stages + (sharded) parameters + text encoder + compiled programs.
# -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CascadeOutput:
    """Images of every stage that ran (uint8 [N, R, R, 3]; ``float_images``: float32 [-1, 1]),
    plus the prompt of each image, the seed and wall-clock timings."""

    images: list[np.ndarray]
    float_images: list[np.ndarray]
    prompts: list[str]
    seed: int
    timings: dict[str, float]

    @property
    def final(self) -> np.ndarray:
        return self.images[-1]


class _Progress:
    """Per-stage tqdm bars fed by a one-way host callback per sampling step.

    On a sharded batch the callback fires once per device shard per step; steps are counted by
    distinct ``t`` values so each bar advances once per step. Also records per-stage wall times.
    """

    def __init__(self, stages: Sequence[CascadeStage], first_index: int, enabled: bool):
        self.enabled = enabled
        self.first_index = first_index
        self.stages = stages
        self.bars: dict[int, Any] = {}
        self.seen: dict[int, set[float]] = {}
        self.t_first: dict[int, float] = {}
        self.t_last: dict[int, float] = {}

    def __call__(self, index: int, t: np.ndarray) -> None:
        now = time.perf_counter()
        self.t_first.setdefault(index, now)
        self.t_last[index] = now
        key = float(np.asarray(t).reshape(-1)[0])
        seen = self.seen.setdefault(index, set())
        if key in seen:
            return
        seen.add(key)
        if self.enabled:
            if index not in self.bars:
                from tqdm.auto import tqdm

                stage = self.stages[index - self.first_index]
                self.bars[index] = tqdm(
                    total=int(stage.sampling.num_steps),
                    desc=f"stage {index} {stage.name} {stage.resolution}px",
                    leave=True,
                )
            self.bars[index].update(1)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()

    def reset(self) -> None:
        self.bars, self.seen, self.t_first, self.t_last = {}, {}, {}, {}

    def stage_seconds(self) -> dict[str, float]:
        """Wall time from a stage's first to the next stage's first step (approximate)."""
        order = sorted(self.t_first)
        out = {}
        for j, index in enumerate(order):
            end = self.t_first[order[j + 1]] if j + 1 < len(order) else self.t_last[index]
            out[f"stage{index}_s"] = end - self.t_first[index]
        return out


class Cascade:
    """Stages with their parameters on a mesh, an optional text encoder, and compiled programs.

    Build with ``Cascade(stages, params, text_encoder=...)`` (random or in-memory parameters) or
    ``Cascade.from_checkpoints(stage_dirs, t5=...)``. ``sample(prompts, seed)`` returns uint8
    images of every stage that ran.
    """

    def __init__(
        self,
        stages: Sequence[CascadeStage],
        params: Sequence[PyTree],
        *,
        text_encoder: Any = None,
        mesh: Mesh | None = None,
        rules: partitioning.LogicalRules | None = None,
        embed_dim: int | None = None,
        max_batch: int | None = None,
    ):
        stages = list(stages)
        if len(params) != len(stages):
            raise CascadeError(f"got {len(stages)} stages but {len(params)} parameter trees")
        check_chain(stages, getattr(text_encoder, "fingerprint", None))
        self.stages = stages
        self.mesh = mesh if mesh is not None else partitioning.make_mesh()
        self.rules = tuple(rules if rules is not None else partitioning.logical_axis_rules())
        self.text_encoder = text_encoder
        self.embed_dim = (
            embed_dim
            or getattr(text_encoder, "embed_dim", None)
            or next((s.text_embed_dim for s in stages if s.text_embed_dim), None)
        )
        if text_encoder is not None and stages[0].text_embed_dim not in (None, self.embed_dim):
            raise CascadeError(
                f"the text encoder makes {self.embed_dim}-dim embeddings but the stages were "
                f"trained on {stages[0].text_embed_dim}-dim ones; load their T5"
            )
        self.params = [self._shard_params(s, p) for s, p in zip(stages, params)]
        self.max_batch = max_batch
        if max_batch is not None and max_batch % self.batch_multiple:
            raise CascadeError(
                f"max_batch {max_batch} must be a multiple of the {self.batch_multiple} batch "
                "shards of the mesh"
            )
        self._text_parts = _text_encoder_parts(text_encoder) if text_encoder is not None else None
        # T5 parameters enter the program as (replicated) arguments, never as constants.
        self._text_params = None
        if self._text_parts is not None:
            self._text_params = jax.tree_util.tree_map(
                lambda x: x if _on_mesh(x, self.mesh) else jax.device_put(
                    x, partitioning.replicated(self.mesh)),
                self._text_parts[1],
            )
        self._programs: dict[Any, Any] = {}
        self._compiled: dict[Any, Any] = {}
        self._progress: dict[Any, _Progress | None] = {}

    # -- parameters --------------------------------------------------------------------------

    def _param_shardings(self, stage: CascadeStage, params: PyTree) -> PyTree:
        """The trainer's shardings for ``stage``'s parameters on this cascade's mesh."""
        return param_shardings(stage, self.mesh, self.rules, params, self.embed_dim)

    def _shard_params(self, stage: CascadeStage, params: PyTree) -> PyTree:
        if isinstance(params, dict) and "params" in params and len(params) == 1:
            params = params["params"]
        params = nn.meta.unbox(params)
        return jax.device_put(params, self._param_shardings(stage, params))

    # -- the compiled program ----------------------------------------------------------------

    @property
    def batch_multiple(self) -> int:
        """Batch sizes are padded to a multiple of the number of batch shards."""
        return int(
            np.prod([self.mesh.shape[a] for a in partitioning.BATCH_AXES if a in self.mesh.shape])
        )

    def _slice(self, start: int, stop: int | None) -> tuple[int, int]:
        n = len(self.stages)
        stop = n if stop is None else stop
        if not (0 <= start < stop <= n):
            raise CascadeError(
                f"cascade slice [{start}:{stop}] is empty or out of range for {n} stages"
            )
        return start, stop

    def program(
        self, start: int = 0, stop: int | None = None, *, encode: bool, progress: bool = False
    ) -> Callable[..., tuple[jax.Array, ...]]:
        """The jitted cascade for ``stages[start:stop]``.

        Signature: ``fn(params, text_params, text, text_mask, rng, lowres)`` where ``text`` is
        int32 token ids [B, L] when ``encode`` (T5 runs inside the program) else float
        embeddings [B, L, D]; ``text_params`` is None without encoding; ``lowres`` is None unless
        ``stages[start]`` is an SR stage. Returns each stage's float images [B, R_i, R_i, 3],
        then each stage's bool [B] "this image came out finite" (``sample_stage``), all sharded
        over the batch: ``Cascade.sample`` checks the flags on the host.
        """
        start, stop = self._slice(start, stop)
        key = self._program_key(start, stop, encode, progress)
        if key in self._programs:
            return self._programs[key]
        stages = self.stages[start:stop]
        if encode and self._text_parts is None:
            raise CascadeError("this cascade has no text encoder; pass text embeddings instead")
        encode_fn = self._text_parts[0] if encode else None
        batch_spec = partitioning.batch_sharding
        mesh = self.mesh
        tracker = _Progress(stages, start, enabled=True) if progress else None
        self._progress[key] = tracker

        def on_step(index, t):
            jax.debug.callback(lambda tt: tracker(index, tt), t)

        def cascade_fn(params, text_params, text, text_mask, rng, lowres):
            if encode:
                embeds = encode_fn(text_params, text, text_mask)
            else:
                embeds = text
            embeds = jax.lax.with_sharding_constraint(
                embeds.astype(jnp.float32), batch_spec(mesh, 3)
            )
            if lowres is not None:
                lowres = jax.lax.with_sharding_constraint(lowres, batch_spec(mesh, 4))
            outs, finite = sample_cascade(
                stages,
                params,
                embeds,
                text_mask,
                rng,
                lowres,
                first_stage_index=start,
                on_step=on_step if progress else None,
                return_finite=True,
            )
            images = tuple(jax.lax.with_sharding_constraint(o, batch_spec(mesh, 4)) for o in outs)
            return images + tuple(finite)

        out_shardings = tuple(batch_spec(mesh, 4) for _ in stages) + tuple(
            batch_spec(mesh, 1) for _ in stages
        )
        fn = jax.jit(cascade_fn, out_shardings=out_shardings)
        self._programs[key] = fn
        return fn

    @staticmethod
    def _program_key(start: int, stop: int, encode: bool, progress: bool) -> tuple:
        return (start, stop, encode, progress)

    def _abstract_inputs(
        self, batch_size: int, start: int, encode: bool, text_length: int | None
    ) -> tuple[Any, Any, Any]:
        """ShapeDtypeStructs (with batch shardings) of (text, text_mask, lowres)."""
        if batch_size % self.batch_multiple:
            raise CascadeError(
                f"batch_size {batch_size} is not a multiple of the {self.batch_multiple} batch "
                "shards of the mesh"
            )
        length = text_length or getattr(self.text_encoder, "max_length", None) or 16
        shard = partitioning.batch_sharding
        b = batch_size
        if encode:
            text = jax.ShapeDtypeStruct((b, length), jnp.int32, sharding=shard(self.mesh, 2))
        else:
            if self.embed_dim is None:
                raise CascadeError("embed_dim unknown: pass embed_dim= or a text encoder")
            text = jax.ShapeDtypeStruct(
                (b, length, self.embed_dim), jnp.float32, sharding=shard(self.mesh, 3)
            )
        mask = jax.ShapeDtypeStruct((b, length), jnp.bool_, sharding=shard(self.mesh, 2))
        lowres = None
        if self.stages[start].is_sr:
            r = self.stages[start].lowres_resolution
            lowres = jax.ShapeDtypeStruct((b, r, r, 3), jnp.float32, sharding=shard(self.mesh, 4))
        return text, mask, lowres

    def lower(
        self,
        batch_size: int,
        *,
        start: int = 0,
        stop: int | None = None,
        encode: bool = False,
        progress: bool = False,
        text_length: int | None = None,
    ) -> jax.stages.Lowered:
        """Lowers the program for ``batch_size`` examples (HLO inspection, AOT compilation).

        ``batch_size`` must be a multiple of ``batch_multiple``; ``text_length`` defaults to the
        encoder's ``max_length``.
        """
        start, stop = self._slice(start, stop)
        fn = self.program(start, stop, encode=encode, progress=progress)
        text, mask, lowres = self._abstract_inputs(batch_size, start, encode, text_length)
        text_params = self._text_params if encode else None
        with _mesh_context(self.mesh), nn.logical_axis_rules(self.rules):
            return fn.lower(self.params[start:stop], text_params, text, mask, self._rng(0), lowres)

    def compile(self, batch_size: int, **kwargs: Any) -> jax.stages.Compiled:
        """The compiled program (cached per slice, batch size, text length and mode)."""
        key = (batch_size, tuple(sorted(kwargs.items())))
        if key not in self._compiled:
            self._compiled[key] = self.lower(batch_size, **kwargs).compile()
        return self._compiled[key]

    def _rng(self, seed: int) -> jax.Array:
        return jax.device_put(jax.random.PRNGKey(seed), partitioning.replicated(self.mesh))

    # -- user entry points -------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and mask for ``prompts`` (long prompts are truncated with a warning)."""
        if self.text_encoder is None:
            raise CascadeError("this cascade has no text encoder; pass text embeddings instead")
        # The tokenizer cuts prompts at max_length (keeping EOS) and warns about each one.
        ids, mask = self.text_encoder.tokenize(list(prompts))
        return np.asarray(ids, np.int32), np.asarray(mask, bool)

    def sample(
        self,
        prompts: Sequence[str] | str | None = None,
        seed: int = 0,
        *,
        num_per_prompt: int = 1,
        text_embeds: np.ndarray | None = None,
        text_mask: np.ndarray | None = None,
        lowres: np.ndarray | None = None,
        start: int = 0,
        stop: int | None = None,
        progress: bool = False,
    ) -> CascadeOutput:
        """Samples ``num_per_prompt`` images per prompt through ``stages[start:stop]``.

        Give ``prompts`` (T5 runs inside the compiled program) or ``text_embeds`` [N, L, D] +
        ``text_mask`` [N, L]. For a slice starting at an SR stage also give ``lowres``
        (uint8 or [-1, 1] float [N, r, r, 3], one per prompt). Images are ordered prompt-major
        (prompt 0's samples first). With ``max_batch`` set, the work runs in chunks of that size
        through one compiled program; chunk k draws its randomness from ``fold_in(seed, k)``.
        """
        start, stop = self._slice(start, stop)
        if num_per_prompt < 1:
            raise CascadeError(f"num_per_prompt must be >= 1, got {num_per_prompt}")
        if (prompts is None) == (text_embeds is None):
            raise CascadeError("pass exactly one of prompts= and text_embeds=")
        encode = prompts is not None
        if encode:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            if not prompts:
                raise CascadeError("no prompts given; pass at least one prompt")
            text, mask = self.tokenize(prompts)
            n = len(prompts)
        else:
            text = np.asarray(text_embeds, np.float32)
            if text.ndim != 3:
                raise CascadeError(f"text_embeds must be [N, L, D], got shape {text.shape}")
            mask = (
                np.ones(text.shape[:2], bool) if text_mask is None else np.asarray(text_mask, bool)
            )
            if mask.shape != text.shape[:2]:
                raise CascadeError(
                    f"text_mask shape {mask.shape} does not match text_embeds {text.shape[:2]}"
                )
            if self.embed_dim is not None and text.shape[-1] != self.embed_dim:
                raise CascadeError(
                    f"text_embeds have dimension {text.shape[-1]} but the stages expect "
                    f"{self.embed_dim}"
                )
            bad = _non_finite_images(text)
            if bad:
                raise CascadeError(
                    f"text_embeds of prompt {bad[0]} (of {len(text)}) hold NaN/Inf values; pass "
                    "finite embeddings"
                )
            n = text.shape[0]
            prompts = [f"<embedding {i}>" for i in range(n)]
        low = self._check_lowres(lowres, start, n)

        # Prompt-major repetition; chunks padded to a multiple of the batch shards.
        text = np.repeat(text, num_per_prompt, axis=0)
        mask = np.repeat(mask, num_per_prompt, axis=0)
        low = None if low is None else np.repeat(low, num_per_prompt, axis=0)
        total = n * num_per_prompt
        chunk = self.max_batch or -(-total // self.batch_multiple) * self.batch_multiple
        kwargs = dict(start=start, stop=stop, encode=encode, progress=progress,
                      text_length=text.shape[1])
        t0 = time.perf_counter()
        compiled = self.compile(chunk, **kwargs)
        timings = {"compile_s": time.perf_counter() - t0}
        text_params = self._text_params if encode else None
        shard = partitioning.batch_sharding
        outs: list[list[np.ndarray]] = []
        num_stages = stop - start
        tracker = self._progress.get(self._program_key(start, stop, encode, progress))
        t0 = time.perf_counter()
        for k, lo in enumerate(range(0, total, chunk)):
            hi = min(lo + chunk, total)
            args = [_pad(text[lo:hi], chunk), _pad(mask[lo:hi], chunk)]
            args = [jax.device_put(a, shard(self.mesh, a.ndim)) for a in args]
            chunk_low = None
            if low is not None:
                chunk_low = jax.device_put(_pad(low[lo:hi], chunk), shard(self.mesh, 4))
            rng = self._rng(seed) if lo == 0 else jax.device_put(
                jax.random.fold_in(jax.random.PRNGKey(seed), k),
                partitioning.replicated(self.mesh),
            )
            with _mesh_context(self.mesh), nn.logical_axis_rules(self.rules):
                result = compiled(self.params[start:stop], text_params, *args, rng, chunk_low)
            result = [np.asarray(o)[: hi - lo] for o in jax.block_until_ready(result)]
            try:
                self._check_finite(result[num_stages:], start, lo, seed)
            except CascadeError:
                if tracker is not None:
                    tracker.close()
                    tracker.reset()
                raise
            outs.append(result[:num_stages])
        timings["sample_s"] = time.perf_counter() - t0
        if tracker is not None:
            tracker.close()
            timings.update(tracker.stage_seconds())
            tracker.reset()
        float_images = [np.concatenate(parts, axis=0) for parts in zip(*outs)]
        return CascadeOutput(
            images=[to_uint8(x) for x in float_images],
            float_images=float_images,
            prompts=[p for p in prompts for _ in range(num_per_prompt)],
            seed=seed,
            timings=timings,
        )

    def _check_finite(self, finite: Sequence[np.ndarray], start: int, offset: int,
                      seed: int) -> None:
        """Raises ``CascadeError`` naming the first stage whose images came out NaN/Inf.

        ``finite[i]`` is stage ``start + i``'s bool [b] from the compiled program; ``offset`` is
        the index of the chunk's first image. Later stages inherit a NaN, so the first is named.
        """
        for i, ok in enumerate(finite):
            bad = np.flatnonzero(~np.asarray(ok, bool))
            if bad.size:
                stage = self.stages[start + i]
                raise CascadeError(
                    f"stage {start + i} ({stage.name or 'unnamed'}) produced NaN/Inf pixels in "
                    f"{bad.size} of {len(ok)} images (first: image {offset + int(bad[0])}, seed "
                    f"{seed}); its parameters have probably diverged or hold NaN: sample an "
                    "earlier checkpoint of that stage. No images were returned."
                )

    def _check_lowres(self, lowres: np.ndarray | None, start: int, n: int) -> np.ndarray | None:
        first = self.stages[start]
        if not first.is_sr:
            if lowres is not None:
                raise CascadeError(
                    "lowres images are only used when the slice starts at an SR stage"
                )
            return None
        if lowres is None:
            raise CascadeError(
                f"the slice starts at SR stage {start} ({first.name}): pass lowres images of "
                f"{first.lowres_resolution}px"
            )
        low = from_uint8(lowres)
        want = (n, first.lowres_resolution, first.lowres_resolution, 3)
        if low.shape != want:
            raise CascadeError(
                f"lowres images have shape {low.shape}; stage {start} ({first.name}) expects "
                f"{want} (one {first.lowres_resolution}px RGB image per prompt)"
            )
        return low

    def sample_fn(self, **kwargs: Any) -> Callable[[list[str], int], np.ndarray]:
        """``sample_fn(prompts, seed) -> uint8 [N, H, W, 3]`` (final stage) for the eval tools."""

        def fn(prompts: list[str], seed: int) -> np.ndarray:
            return self.sample(prompts, seed, **kwargs).final

        return fn


def _mesh_context(mesh: Mesh) -> Any:
    """Makes ``mesh`` current while tracing, so the U-Nets' logical activation constraints apply
    (``partitioning.mesh_context``: ``jax.set_mesh``; the legacy ``with mesh:`` drops them)."""
    return partitioning.mesh_context(mesh)


def _on_mesh(x: Any, mesh: Mesh) -> bool:
    sharding = getattr(x, "sharding", None)
    return isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh == mesh


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    """Pads the leading axis to ``size`` by repeating the last row (never seen by users)."""
    if x.shape[0] == size:
        return x
    reps = np.repeat(x[-1:], size - x.shape[0], axis=0)
    return np.concatenate([x, reps], axis=0)


def _text_encoder_parts(encoder: Any) -> tuple[Callable[..., jax.Array], PyTree]:
    """(pure ``encode(params, ids, mask) -> [B, L, D]``, params) of a ``TextEncoder``.

    The parameters are passed into the compiled cascade as arguments (not closed-over
    constants) so a large T5 is not baked into the program.
    """
    if hasattr(encoder, "encode_fn") and hasattr(encoder, "params"):
        return encoder.encode_fn, encoder.params
    module = getattr(encoder, "model", None) or getattr(encoder, "module", None)
    if isinstance(module, nn.Module) and hasattr(encoder, "params"):

        def encode(params, ids, mask):
            return module.apply({"params": params}, ids, mask)

        return encode, encoder.params
    raise CascadeError(
        f"text encoder {type(encoder).__name__} exposes neither (encode_fn, params) nor "
        "(model, params); use imagen_jax.text.load_t5"
    )


def param_shardings(
    stage: CascadeStage,
    mesh: Mesh,
    rules: partitioning.LogicalRules,
    params: PyTree | None = None,
    embed_dim: int | None = None,
) -> PyTree:
    """NamedShardings for ``stage``'s parameters from the model's logical axis annotations."""
    abstract = abstract_params(stage, stage.text_embed_dim or embed_dim or 8)
    specs = partitioning.logical_specs(abstract)
    shardings = partitioning.logical_to_shardings(specs, mesh, rules)
    if params is not None:
        ref = jax.tree_util.tree_structure(params)
        got = jax.tree_util.tree_structure(nn.meta.unbox(abstract))
        if ref != got:
            # embed_dim guessed wrong or a custom tree: fall back to replication (still correct).
            return jax.tree_util.tree_map(lambda _: partitioning.replicated(mesh), params)
    return shardings


def _init_fn(stage: CascadeStage, embed_dim: int, text_length: int) -> Callable:
    """``rng -> variables`` of the stage's model, on a batch-1 dummy input of the right shapes."""
    r = stage.resolution
    x = jnp.zeros((1, r, r, 3), jnp.float32)
    t = jnp.zeros((1,), jnp.float32)
    embeds = jnp.zeros((1, text_length, embed_dim), jnp.float32)
    mask = jnp.ones((1, text_length), bool)
    kwargs = {}
    if stage.is_sr:
        lr = stage.lowres_resolution
        kwargs = dict(lowres=jnp.zeros((1, lr, lr, 3), jnp.float32), aug_level=t)
    return lambda rng: stage.model.init(rng, x, t, embeds, mask, **kwargs)


def abstract_params(stage: CascadeStage, embed_dim: int, text_length: int = 8) -> PyTree:
    """``jax.eval_shape`` of the stage's init (boxed with logical names; nothing allocated)."""
    init = _init_fn(stage, embed_dim, text_length)
    return jax.eval_shape(lambda rng: init(rng)["params"], jax.random.PRNGKey(0))


def random_params(stage: CascadeStage, seed: int = 0, embed_dim: int | None = None) -> PyTree:
    """Cheap random parameters of the right tree and shapes, without compiling the model's init.

    Kernels ~ N(0, 1/fan_in), norm scales 1, biases 0 (LeCun-style; enough for an untrained
    cascade in tests, benchmarks and the notebook). Use ``init_params`` for flax's exact init.
    """
    abstract = nn.meta.unbox(abstract_params(stage, stage.text_embed_dim or embed_dim or 8))
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        if "scale" in name:
            return np.ones(x.shape, x.dtype)
        if "bias" in name or x.ndim <= 1:
            return np.zeros(x.shape, x.dtype)
        fan_in = int(np.prod(x.shape[:-1]))
        return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def init_params(
    stage: CascadeStage, rng: jax.Array, embed_dim: int, text_length: int = 8
) -> PyTree:
    """Random parameters for ``stage`` (tests, benchmarks, the notebook's untrained cascade)."""
    variables = jax.jit(_init_fn(stage, embed_dim, text_length))(rng)
    return nn.meta.unbox(variables["params"])


# -------------------------------------------------------------------------------------------
# Loading trained stages (the trainer's orbax checkpoints) onto any mesh.
# -------------------------------------------------------------------------------------------


def _build_train_stage(operative_config: str, workdir: str) -> tuple[Any, str | None]:
    """Parses a run's saved gin config in a clean gin state; returns (Stage, fingerprint)."""
    from imagen_jax import gin_utils
    from imagen_jax.train.stage import Stage

    gin_utils.register_all()
    gin.clear_config()
    try:
        # skip_unknown: the saved config may name launcher-only configurables.
        gin.parse_config(operative_config, skip_unknown=True)
        try:
            ref = gin.query_parameter("train.stage")
        except ValueError:
            ref = None
        if isinstance(ref, gin.config.ConfigurableReference):
            stage = ref.scoped_configurable_fn()
        else:
            stage = Stage()
        fingerprint = stage.text_fingerprint
        if fingerprint is None:
            # Stages trained from an embedding cache record the cache's encoder fingerprint.
            for name in ("pipeline_data.text_fingerprint", "LoaderSpec.text_fingerprint"):
                try:
                    fingerprint = gin.query_parameter(name) or None
                except ValueError:
                    continue
                if fingerprint:
                    break
    except Exception as e:  # gin raises many types; all mean "this config cannot be rebuilt"
        raise CascadeError(
            f"cannot rebuild the stage in {workdir} from its saved gin config: {e}"
        ) from e
    finally:
        gin.clear_config()
    return stage, fingerprint


def load_stage(
    workdir: str,
    *,
    mesh: Mesh,
    rules: partitioning.LogicalRules,
    step: int | None = None,
    name: str | None = None,
) -> tuple[CascadeStage, PyTree]:
    """(CascadeStage, EMA params sharded on ``mesh``) from a trainer workdir.

    The architecture and sampler defaults come from the run's saved operative gin config; the
    EMA parameters are restored straight into their shards (orbax), whatever mesh trained them.
    """
    from imagen_jax.train.checkpoint import Checkpointer

    if not os.path.isdir(workdir):
        raise CascadeError(
            f"stage directory {workdir!r} does not exist; pass the trainer's --workdir of each "
            "stage, base first"
        )
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        # The newest COMPLETE step (incomplete ones are skipped with a warning); without an
        # explicit step, restore_params falls back past one whose arrays cannot be read.
        requested, step = step, ckpt.latest_step() if step is None else step
        if step is None:
            raise CascadeError(
                f"stage directory {workdir!r} holds no complete checkpoint; train it first "
                "(python -m launch.train --workdir=...)"
            )
        meta = ckpt.read_meta(step)
        train_stage, fingerprint = _build_train_stage(meta["operative_config"], workdir)
        stage = CascadeStage.from_train_stage(
            train_stage, name=name or os.path.basename(os.path.normpath(workdir))
        ).replace(text_fingerprint=fingerprint)
        shardings = param_shardings(stage, mesh, rules)
        abstract = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            nn.meta.unbox(abstract_params(stage, stage.text_embed_dim or 8)),
            shardings,
        )
        try:
            params = ckpt.restore_params(abstract, requested)
        except ValueError as e:
            raise CascadeError(f"stage {workdir!r}: {e}") from e
    finally:
        ckpt.close()
    return stage, params


def load_cascade(
    stage_dirs: Sequence[str],
    t5: str | None = None,
    *,
    mesh: Mesh | None = None,
    rules: partitioning.LogicalRules | None = None,
    overrides: Sequence[dict[str, Any]] | None = None,
    max_batch: int | None = None,
    t5_dtype: str = "float32",
) -> Cascade:
    """A ``Cascade`` from trainer workdirs (base first) and a T5 checkpoint directory.

    ``overrides[i]`` changes stage i's saved sampler settings (see ``sampling_overrides``).
    Refuses stages whose resolutions do not chain or that were trained with another encoder.
    """
    from imagen_jax.text import load_t5

    if not stage_dirs:
        raise CascadeError("no stage directories given; pass --stages=DIR1[,DIR2,...]")
    missing = [d for d in stage_dirs if not os.path.isdir(d)]
    if missing:
        raise CascadeError(
            f"stage directory {missing[0]!r} does not exist; pass the trainer's --workdir of "
            "each stage, base first"
        )
    mesh = mesh if mesh is not None else partitioning.make_mesh()
    rules = tuple(rules if rules is not None else partitioning.logical_axis_rules())
    loaded = [load_stage(d, mesh=mesh, rules=rules) for d in stage_dirs]
    stages = [s for s, _ in loaded]
    for i, over in enumerate(overrides or ()):
        if over:
            stages[i] = stages[i].with_sampling(**over)
    check_chain(stages)  # before loading T5: cheap, clear errors first
    encoder = None
    if t5 is not None:
        if not os.path.isdir(t5):
            raise CascadeError(f"T5 directory {t5!r} does not exist; pass --t5=PATH")
        length = stages[0].text_length or 128
        encoder = load_t5(t5, dtype=t5_dtype, max_length=length, mesh=mesh)
    return Cascade(
        stages, [p for _, p in loaded], text_encoder=encoder, mesh=mesh, rules=rules,
        max_batch=max_batch,
    )
