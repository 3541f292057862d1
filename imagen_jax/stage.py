"""`Stage`: the one record of a cascade stage, and `sample_stage`, the one way to sample it.

A stage (base 64, SR 256, SR 1024) is its U-Net, the diffusion process it is trained on and the
`SamplingConfig` it is sampled with. The trainer, the data pipeline, the cascade and the launchers
all read this record; gin builds it at the edges (``train.stage = @Stage()``), and every
checkpoint stores it as JSON (`Stage.to_dict`), so a checkpoint is loaded back without gin
(`Stage.from_dict`).

Layer: above `imagen_jax.diffusion` and `imagen_jax.nn`, below `imagen_jax.train` and
`imagen_jax.cascade` (docs/DESIGN.md). `sample_stage` knows no particular network: it calls
``stage.model.apply`` through the U-Net contract of DESIGN.md, our continuous one or, for a
discrete stage (``schedule="discrete"``, DeepFloyd IF's `IFUNet`), IF's: integer timesteps, no
text mask, the encoded empty prompt as the unconditional condition, and the low-res input
upsampled and noised at an integer level before the model sees it.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from imagen_jax import nn as unets
from imagen_jax.diffusion import (
    DISCRETE_SAMPLERS,
    DISCRETE_SCHEDULE,
    PREDICTIONS,
    WEIGHTINGS,
    DiscreteSchedule,
    SamplingConfig,
    get_schedule,
    noise_augment,
    noise_augment_upsampled,
    noise_level_from_aug,
)
from imagen_jax.errors import CascadeError, CheckpointError, ConfigError

PyTree = Any
# A model's inputs after (x, t): positional arguments and keyword arguments (`sample_stage`).
Condition = tuple[tuple[jax.Array, ...], dict[str, jax.Array | None]]
# Version of the JSON layout `Stage.to_dict` writes (checkpoint metadata); bump on change.
RECORD_FORMAT = 1


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Stage:
    """One cascade stage.

    Attributes:
      model: the U-Net, a flax module of `imagen_jax.nn` (gin: gin_configs/models/*.gin).
      resolution: side of the images this stage generates (64, 256, 1024), pixels.
      lowres_resolution: side of the conditioning image of a super-resolution stage; None for the
        base stage.
      train_crop: SR 256->1024 trains on `train_crop`-pixel crops of the high-res image (and the
        aligned crop of the low-res one) and is sampled at full size (paper App. F.3: 256 crops).
      text_length, text_embed_dim: shape [L, D] of the T5 embeddings the stage is conditioned on.
      schedule, schedule_kwargs: the noise schedule (`imagen_jax.diffusion.get_schedule`); the paper
        uses the continuous-time cosine schedule in log-SNR (App. A). ``"discrete"``
        (`DISCRETE_SCHEDULE`) makes a discrete stage (DeepFloyd IF): a `DiscreteSchedule` with
        ``schedule_kwargs`` as its fields (none: IF's 1,000 squaredcos_cap_v2 steps), sampled by
        a discrete sampler (``sampling.sampler="learned_range"``; `IF_STAGE_I_SAMPLING`), its
        model called with IF's contract (see `sample_stage`; `IFUNet`).
      prediction: network output parameterisation ('eps' in the paper, App. A).
      loss_weighting, min_snr_gamma: per-example loss weighting ('uniform' = plain MSE, paper).
      min_snr_offset: 'min_snr_plus_one' only: its x0-space weight is ``min(snr, gamma) +
        min_snr_offset`` (>= 0; 1 by default; `min_snr_plus_one_weight`).
      cond_drop_prob: probability in [0, 1] of zeroing the text condition in training, for
        classifier-free guidance (paper Sec. 2.2: 10%).
      aug_schedule, train_aug_max: noise-conditioning augmentation of the low-res input: training
        draws aug_level ~ U(0, train_aug_max) (paper Sec. 2.5 / App. B.1). A discrete stage
        noises it with its own schedule at level ``aug_level * T`` (`noise_level_from_aug`).
      sampling: how the stage is sampled (`SamplingConfig`; bind ``SamplingConfig.*`` in gin).
      text_fingerprint: `TextEncoder.fingerprint` of the encoder the stage was trained with; the
        cascade refuses to sample it with another encoder.
      name: label in messages and progress bars (the loader uses the run directory's name).

    Raises ConfigError (one line, naming the field and its valid range) for a missing model, an
    unknown prediction / weighting, an out-of-range setting, a discrete sampler on a continuous
    schedule or the reverse, a discrete SR stage's aug_level that is no whole noise level, or
    text embeddings narrower or wider than an IF U-Net's ``encoder_hid_dim``. Sampling an SR
    stage at an ``aug_level`` above ``train_aug_max`` draws a warning (the model never saw such
    inputs).
    """

    model: nn.Module = gin.REQUIRED
    resolution: int = 64
    lowres_resolution: int | None = None
    train_crop: int | None = None
    text_length: int = 128
    text_embed_dim: int = 4096
    schedule: str = "cosine"
    schedule_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    prediction: str = "eps"
    loss_weighting: str = "uniform"
    min_snr_gamma: float = 5.0
    min_snr_offset: float = 1.0
    cond_drop_prob: float = 0.1
    aug_schedule: str = "cosine"
    train_aug_max: float = 1.0
    # A factory, so gin's ``SamplingConfig.*`` bindings apply when the Stage is built.
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    text_fingerprint: str | None = None
    name: str = ""

    def __post_init__(self):
        if self.model is gin.REQUIRED or self.model is None:
            raise ConfigError("Stage.model is required: bind `Stage.model = @BaseUNet()` or "
                              "`@EfficientUNet()` in gin")
        if self.prediction not in PREDICTIONS:
            raise ConfigError(
                f"Stage.prediction={self.prediction!r}; expected one of {PREDICTIONS}")
        if self.loss_weighting not in WEIGHTINGS:
            raise ConfigError(
                f"Stage.loss_weighting={self.loss_weighting!r}; expected one of {WEIGHTINGS}")
        if not isinstance(self.sampling, SamplingConfig):
            raise ConfigError(
                f"Stage.sampling={self.sampling!r} is not a SamplingConfig; bind "
                "`Stage.sampling = @SamplingConfig()` or leave it unbound")
        # Probabilities / diffusion times in [0, 1] (a chained comparison is False for NaN).
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ConfigError(f"Stage.cond_drop_prob={self.cond_drop_prob} must lie in [0, 1]")
        if not 0.0 <= self.train_aug_max <= 1.0:
            raise ConfigError(f"Stage.train_aug_max={self.train_aug_max} must lie in [0, 1]")
        gamma = self.min_snr_gamma
        if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not (
            math.isfinite(gamma) and gamma > 0
        ):
            raise ConfigError(
                f"Stage.min_snr_gamma={self.min_snr_gamma!r} must be a finite number > 0 (the "
                "Min-SNR paper uses 5)")
        offset = self.min_snr_offset
        if isinstance(offset, bool) or not isinstance(offset, numbers.Real) or not (
            math.isfinite(offset) and offset >= 0
        ):
            raise ConfigError(
                f"Stage.min_snr_offset={offset!r} must be a finite number >= 0 (1: the clipped "
                "SNR+1 weight; 0: min-SNR)")
        if self.lowres_resolution is not None and self.resolution % self.lowres_resolution:
            raise ConfigError(
                f"Stage.resolution={self.resolution} is not a multiple of "
                f"lowres_resolution={self.lowres_resolution}")
        if self.train_crop is not None:
            if self.lowres_resolution is None:
                raise ConfigError("Stage.train_crop only applies to super-resolution stages")
            if self.train_crop > self.resolution or self.train_crop % self.upscale:
                raise ConfigError(
                    f"Stage.train_crop={self.train_crop} must be <= resolution={self.resolution} "
                    f"and a multiple of the upscale factor {self.upscale}")
        aug = self.sampling.aug_level
        if not self.is_super_res and aug != 0:
            # A base stage has no low-res input to noise: the level would be stored in its
            # record and shown in samples.json, yet change nothing.
            raise ConfigError(
                f"stage {self.name!r}: SamplingConfig.aug_level={aug:g} on a base stage, which "
                "has no low-res input to noise; set it on super-resolution stages only (in a "
                "cascade: --gin.stage1/SamplingConfig.aug_level=...) or leave it 0")
        if self.is_super_res and aug > self.train_aug_max:
            # stacklevel 2 is the dataclass __init__: one fixed location, so Python's default
            # filter shows the warning once however often the stage is copied (replace, ...).
            warnings.warn(
                f"stage {self.name!r} is sampled at aug_level={aug:g}, above the range "
                f"[0, {self.train_aug_max:g}] it was trained with (Stage.train_aug_max): it never "
                f"saw such noisy low-res inputs; expect artefacts, or use aug_level <= "
                f"{self.train_aug_max:g}", UserWarning, stacklevel=2)
        self._check_discrete()

    def _check_discrete(self) -> None:
        """A discrete schedule goes with a discrete sampler (each reads what only the other
        provides: integer timesteps, a learned variance), valid ``schedule_kwargs`` and, on an SR
        stage, an aug_level that is a whole noise level of the table."""
        sampler = self.sampling.sampler
        if self.is_discrete != (sampler in DISCRETE_SAMPLERS):
            raise ConfigError(
                f"stage {self.name!r}: sampler {sampler!r} with Stage.schedule="
                f"{self.schedule!r}; discrete samplers {DISCRETE_SAMPLERS} sample exactly the "
                f"stages with schedule={DISCRETE_SCHEDULE!r} (DeepFloyd IF's)")
        if not self.is_discrete:
            return
        try:
            schedule = self.get_schedule()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"stage {self.name!r}: Stage.schedule_kwargs="
                              f"{dict(self.schedule_kwargs)!r}: {e}") from None
        if self.is_super_res:
            noise_level_from_aug(self.sampling.aug_level, schedule)
        # An IF U-Net projects text of its config's width (encoder_hid_dim: 4096, T5-XXL).
        width = getattr(getattr(self.model, "config", None), "encoder_hid_dim", None)
        if width is not None and width != self.text_embed_dim:
            raise ConfigError(
                f"stage {self.name!r}: Stage.text_embed_dim={self.text_embed_dim} but the IF "
                f"U-Net reads {width}-wide text (its encoder_hid_dim); set TEXT_EMBED_DIM = "
                f"{width} and use the T5 it was trained with")

    # -- derived values -----------------------------------------------------------------------

    @property
    def is_super_res(self) -> bool:
        return self.lowres_resolution is not None

    @property
    def is_discrete(self) -> bool:
        """Whether the stage is discrete-time (DeepFloyd IF's conventions, `sample_stage`)."""
        return self.schedule == DISCRETE_SCHEDULE

    @property
    def upscale(self) -> int:
        return 1 if self.lowres_resolution is None else self.resolution // self.lowres_resolution

    @property
    def train_resolution(self) -> int:
        """Side of the (possibly cropped) high-res images the model sees in training."""
        return self.train_crop or self.resolution

    @property
    def train_lowres_resolution(self) -> int | None:
        if self.lowres_resolution is None:
            return None
        return self.train_resolution // self.upscale

    def get_schedule(self) -> Any:
        """The continuous `Schedule` named ``schedule`` or, for a discrete stage, its
        `DiscreteSchedule`, built with ``schedule_kwargs``."""
        if self.is_discrete:
            return DiscreteSchedule(**dict(self.schedule_kwargs))
        return get_schedule(self.schedule, **dict(self.schedule_kwargs))

    def get_aug_schedule(self) -> Any:
        return get_schedule(self.aug_schedule)

    # -- copies -------------------------------------------------------------------------------

    def replace(self, **changes: Any) -> Stage:
        return dataclasses.replace(self, **changes)

    def with_sampling(self, **overrides: Any) -> Stage:
        """A copy with some sampler settings changed (checked: ``ConfigError`` names the stage
        and the setting)."""
        where = f"stage {self.name!r}: " if self.name else ""
        return self.replace(sampling=self.sampling.replace(where=where, **overrides))

    # -- the record as JSON (checkpoint metadata) ---------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready data: every field, the model as its `imagen_jax.nn` class
        name and constructor fields, and ``format`` (`RECORD_FORMAT`)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["model"] = _module_to_dict(self.model)
        fields["sampling"] = dataclasses.asdict(self.sampling)
        fields["schedule_kwargs"] = dict(self.schedule_kwargs)
        return {"format": RECORD_FORMAT, **fields}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any], where: str = "stage record") -> Stage:
        """Rebuilds a stage written by `to_dict` (no gin involved).

        Raises CheckpointError (one line, naming ``where``) for a record of another format or
        with unknown fields or model class.
        """
        record = dict(record)
        version = record.pop("format", None)
        if version != RECORD_FORMAT:
            raise CheckpointError(
                f"{where}: stage record format {version!r}, this imagen-jax reads format "
                f"{RECORD_FORMAT}; load it with the version that wrote it")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - known)
        if unknown:
            raise CheckpointError(f"{where}: unknown stage fields {unknown}; written by a newer "
                                  "imagen-jax?")
        try:
            record["model"] = _module_from_dict(record["model"], where)
            sampling = dict(record.get("sampling", {}))
            if record.get("lowres_resolution") is None:
                # Records written before base stages refused an aug_level could hold one that
                # was never applied: load them as what they sampled with.
                sampling["aug_level"] = 0.0
            record["sampling"] = SamplingConfig(**sampling)
            return cls(**record)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as e:  # a damaged or hand-edited record
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{where}: unusable stage record: {first}") from None


def _class_name(cls: type) -> str:
    """A class as a record names it: its `imagen_jax.nn` name (``"BaseUNet"``), or
    ``"module:QualName"`` for one defined elsewhere (importable when loaded)."""
    if getattr(unets, cls.__name__, None) is cls:
        return cls.__name__
    return f"{cls.__module__}:{cls.__qualname__}"


def _module_to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass -- the U-Net, or a config one of its fields holds (`IFUNetConfig`) -- as
    {"class", "fields"}: `_class_name` and its constructor fields (a flax module's parent and
    name left out)."""
    name = _class_name(type(obj))
    fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
              if f.init and f.name not in ("parent", "name")}
    return {"class": name,
            "fields": {k: _jsonable(v, f"{name}.{k}") for k, v in fields.items()}}


def _jsonable(x: Any, label: str) -> Any:
    """Module field values as JSON: numbers, strings, None, (nested) sequences, dtypes and
    dataclass instances (`_module_to_dict`)."""
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, (list, tuple)):
        return [_jsonable(v, label) for v in x]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _module_to_dict(x)
    try:
        return str(jnp.dtype(x))  # dtypes given as numpy / jax types
    except TypeError:
        raise ConfigError(f"model field {label}={x!r} cannot be stored in a stage record (not a "
                          "number, string, sequence, dtype or dataclass)") from None


def _module_from_dict(data: Mapping[str, Any], where: str, base: type = nn.Module) -> Any:
    """Rebuilds what `_module_to_dict` wrote: a dataclass subclassing ``base`` (the model: a
    flax module; a nested field: any dataclass)."""
    name = str(data.get("class"))
    cls = getattr(unets, name, None)
    if ":" in name:
        module, _, qualname = name.partition(":")
        try:
            cls = importlib.import_module(module)
            for part in qualname.split("."):
                cls = getattr(cls, part)
        except (ImportError, AttributeError):
            cls = None
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls) and issubclass(cls, base)):
        raise CheckpointError(f"{where}: model class {name!r} cannot be imported; make its module "
                              "importable (a model defined in a script's __main__ cannot be)")
    return cls(**{k: _from_json(v, where) for k, v in data["fields"].items()})


def _from_json(x: Any, where: str) -> Any:
    """JSON lists back to the (hashable) tuples flax module fields hold; nested dataclass
    records back to their instances."""
    if isinstance(x, list):
        return tuple(_from_json(v, where) for v in x)
    if isinstance(x, dict):
        return _module_from_dict(x, where, base=object)
    return x


# -------------------------------------------------------------------------------------------
# The model's inputs and parameter shapes (the trainer's init and the cascade's loader share them).
# -------------------------------------------------------------------------------------------


def model_inputs(stage: Stage, batch_size: int = 1) -> dict[str, jax.Array]:
    """Zero inputs with the training shapes of ``stage``, for ``model.init`` / ``eval_shape``:
    ``x`` float32 [B, R, R, 3] (R = ``train_resolution``), ``t`` [B], ``text_embeds`` [B, L, D],
    ``text_mask`` bool [B, L] and, for SR stages, ``lowres`` [B, r, r, 3] and ``aug_level`` [B].
    A discrete stage's model (IF's contract) takes ``t`` int32, no ``text_mask`` and, for SR,
    ``lowres`` [B, R, R, 3] (already upsampled) and ``noise_level`` int32 [B]."""
    res, lowres = stage.train_resolution, stage.train_lowres_resolution
    time_dtype = jnp.int32 if stage.is_discrete else jnp.float32
    inputs = {
        "x": jnp.zeros((batch_size, res, res, 3), jnp.float32),
        "t": jnp.zeros((batch_size,), time_dtype),
        "text_embeds": jnp.zeros((batch_size, stage.text_length, stage.text_embed_dim)),
    }
    if not stage.is_discrete:
        inputs["text_mask"] = jnp.ones((batch_size, stage.text_length), bool)
    if lowres is not None:
        side = res if stage.is_discrete else lowres
        inputs["lowres"] = jnp.zeros((batch_size, side, side, 3), jnp.float32)
        level = "noise_level" if stage.is_discrete else "aug_level"
        inputs[level] = jnp.zeros((batch_size,), time_dtype)
    return inputs


def abstract_params(stage: Stage) -> PyTree:
    """``jax.eval_shape`` of the stage's parameter init: ShapeDtypeStructs boxed with their
    logical axis names (nothing allocated, nothing compiled)."""
    return jax.eval_shape(lambda rng: stage.model.init(rng, **model_inputs(stage))["params"],
                          jax.random.PRNGKey(0))


# -------------------------------------------------------------------------------------------
# Sampling one stage (pure, traceable; the cascade's program and the trainer's preview grids).
# -------------------------------------------------------------------------------------------


def model_conditions(
    stage: Stage,
    text_embeds: jax.Array,
    text_mask: jax.Array,
    null_embeds: jax.Array | None,
    lowres: jax.Array | None,
    level: jax.Array | None,
) -> tuple[Condition, Condition | None]:
    """The model's inputs after (x, t), conditional and unconditional, as (args, kwargs).

    Continuous stages (DESIGN.md): ``(text_embeds, text_mask)``, ``lowres``, ``aug_level``; the
    unconditional condition is zero embeddings with an all-False mask. Discrete stages (IF):
    ``(text_embeds,)`` unmasked, ``lowres``, ``noise_level``; the unconditional condition is
    ``null_embeds`` (the encoded empty prompt; None when not given).
    """
    if stage.is_discrete:
        kwargs = {"lowres": lowres, "noise_level": level}
        null = None if null_embeds is None else jnp.broadcast_to(
            null_embeds.astype(text_embeds.dtype), text_embeds.shape)
        return ((text_embeds,), kwargs), None if null is None else ((null,), kwargs)
    kwargs = {"lowres": lowres, "aug_level": level}
    return ((text_embeds, text_mask), kwargs), (
        (jnp.zeros_like(text_embeds), jnp.zeros_like(text_mask)), kwargs)


def _augment_lowres(
    stage: Stage, lowres: jax.Array, rng: jax.Array, schedule: Any
) -> tuple[jax.Array, jax.Array]:
    """(noised low-res input, its level [B]) at ``stage.sampling.aug_level``: our continuous
    augmentation (Section 2.5; the model resizes) or, for a discrete stage, IF's upsampling and
    noising at the integer level ``aug_level * T``."""
    aug = stage.sampling.aug_level
    if stage.is_discrete:
        return noise_augment_upsampled(lowres, stage.resolution,
                                       noise_level_from_aug(aug, schedule), rng, schedule)
    aug_level = jnp.full((lowres.shape[0],), aug, jnp.float32)
    return noise_augment(lowres, aug_level, rng, stage.get_aug_schedule()), aug_level


def sample_stage(
    stage: Stage,
    params: PyTree,
    text_embeds: jax.Array,
    text_mask: jax.Array,
    rng: jax.Array,
    lowres: jax.Array | None = None,
    on_step: Callable[[jax.Array], None] | None = None,
    return_finite: bool = False,
    null_embeds: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Samples one stage with its `SamplingConfig`: float32 [B, R, R, 3] in [-1, 1].

    ``text_embeds`` float [B, L, D] and ``text_mask`` bool [B, L] condition it. For an SR stage
    ``lowres`` float32 [B, r, r, 3] is the clean previous-stage output; it is noise-augmented
    here at ``stage.sampling.aug_level`` (Section 2.5) and the level is passed to the model, which
    resizes the low-res input itself (DESIGN.md). ``on_step(t)`` is called (traced) at each
    model call.

    Classifier-free guidance (Section 2.2; paper convention, weight 1 = none, which skips the
    unconditional half) runs the conditional and the unconditional halves in ONE model call on
    the doubled batch (`SamplingConfig.sample_guided`).

    A discrete stage (DeepFloyd IF) is sampled by its discrete sampler with IF's conventions:
    the text is unmasked (``text_mask`` is not read), the unconditional condition is
    ``null_embeds`` float [L, D] or [1 or B, L, D], the encoded EMPTY prompt (needed only with
    guidance), and an SR stage's ``lowres`` is upsampled to R and noised at the integer level
    ``aug_level * T`` before the model sees it (`noise_augment_upsampled`).

    With ``return_finite`` also returns bool [B]: whether each image came out of the sampler
    finite (checked before the final clip, which would turn +-Inf into +-1). A False means the
    stage's parameters (or inputs) are broken; NaN images would otherwise become black PNGs.

    Raises CascadeError for an SR stage without ``lowres``, and for a guided discrete stage
    without ``null_embeds``.
    """
    cfg = stage.sampling
    schedule = stage.get_schedule()
    level = None
    if stage.is_super_res:
        if lowres is None:
            raise CascadeError(f"SR stage {stage.name!r} needs low-resolution input images")
        rng, aug_rng = jax.random.split(rng)
        lowres, level = _augment_lowres(stage, lowres, aug_rng, schedule)
    cond, uncond = model_conditions(stage, text_embeds, text_mask, null_embeds, lowres, level)
    variables = {"params": params}

    def apply(x, t, condition):
        if on_step is not None:
            on_step(t)
        args, kwargs = condition
        return stage.model.apply(variables, x, t, *args, **kwargs)

    shape = (text_embeds.shape[0], stage.resolution, stage.resolution, 3)
    kwargs = dict(schedule=schedule, prediction=stage.prediction)
    if cfg.guidance_weight == 1.0:  # no guidance: skip the unconditional half (half the FLOPs)
        images = cfg.sample(lambda x, t: apply(x, t, cond), shape, rng, **kwargs)
    else:
        if uncond is None:
            raise CascadeError(
                f"stage {stage.name!r} is guided (guidance_weight={cfg.guidance_weight:g}) and "
                "discrete: its unconditional condition is the encoded empty prompt; pass "
                "null_embeds (a cascade with a text encoder computes it)")
        both = jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)
        images = cfg.sample_guided(lambda x2, t2: apply(x2, t2, both), shape, rng, **kwargs)
    images = images.astype(jnp.float32)
    # The sampler's last x0 may overshoot slightly without thresholding; SR stages and PNGs
    # expect [-1, 1].
    clipped = jnp.clip(images, -1.0, 1.0)
    if return_finite:
        # A per-image reduction, local to each batch shard: no communication, no host trip.
        return clipped, jnp.all(jnp.isfinite(images), axis=(1, 2, 3))
    return clipped
