"""`Stage`: the one record of a cascade stage, and `sample_stage`, the one way to sample it.

A stage (base 64, SR 256, SR 1024) is its U-Net, the diffusion process it is trained on and the
`SamplingConfig` it is sampled with. The trainer, the data pipeline, the cascade and the launchers
all read this record; gin builds it at the edges (``train.stage = @Stage()``), and every
checkpoint stores it as JSON (`Stage.to_dict`), so a checkpoint is loaded back without gin
(`Stage.from_dict`).

Layer: above `imagen_jax.diffusion` and `imagen_jax.nn`, below `imagen_jax.train` and
`imagen_jax.cascade` (docs/DESIGN.md). `sample_stage` knows no particular network: it calls
``stage.model.apply`` through the U-Net contract of DESIGN.md.
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
    PREDICTIONS,
    WEIGHTINGS,
    SamplingConfig,
    get_schedule,
    guided_model_fn,
    noise_augment,
    sample,
)
from imagen_jax.errors import CascadeError, CheckpointError, ConfigError

PyTree = Any
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
        uses the continuous-time cosine schedule in log-SNR (App. A).
      prediction: network output parameterisation ('eps' in the paper, App. A).
      loss_weighting, min_snr_gamma: per-example loss weighting ('uniform' = plain MSE, paper).
      cond_drop_prob: probability in [0, 1] of zeroing the text condition in training, for
        classifier-free guidance (paper Sec. 2.2: 10%).
      aug_schedule, train_aug_max: noise-conditioning augmentation of the low-res input: training
        draws aug_level ~ U(0, train_aug_max) (paper Sec. 2.5 / App. B.1).
      sampling: how the stage is sampled (`SamplingConfig`; bind ``SamplingConfig.*`` in gin).
      text_fingerprint: `TextEncoder.fingerprint` of the encoder the stage was trained with; the
        cascade refuses to sample it with another encoder.
      name: label in messages and progress bars (the loader uses the run directory's name).

    Raises ConfigError (one line, naming the field and its valid range) for a missing model, an
    unknown prediction / weighting, or an out-of-range setting. Sampling an SR stage at an
    ``aug_level`` above ``train_aug_max`` draws a warning (the model never saw such inputs).
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

    # -- derived values -----------------------------------------------------------------------

    @property
    def is_super_res(self) -> bool:
        return self.lowres_resolution is not None

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


def _module_to_dict(module: nn.Module) -> dict[str, Any]:
    """The U-Net as {"class", "fields"}: its `imagen_jax.nn` name (``"BaseUNet"``), or
    ``"module:QualName"`` for a model defined elsewhere (importable when loaded)."""
    cls = type(module)
    if getattr(unets, cls.__name__, None) is cls:
        name = cls.__name__
    else:
        name = f"{cls.__module__}:{cls.__qualname__}"
    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
              if f.init and f.name not in ("parent", "name")}
    return {"class": name,
            "fields": {k: _jsonable(v, f"{name}.{k}") for k, v in fields.items()}}


def _jsonable(x: Any, label: str) -> Any:
    """Module field values as JSON: numbers, strings, None, (nested) sequences, dtypes."""
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, (list, tuple)):
        return [_jsonable(v, label) for v in x]
    try:
        return str(jnp.dtype(x))  # dtypes given as numpy / jax types
    except TypeError:
        raise ConfigError(f"model field {label}={x!r} cannot be stored in a stage record (not a "
                          "number, string, sequence or dtype)") from None


def _module_from_dict(data: Mapping[str, Any], where: str) -> nn.Module:
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
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise CheckpointError(f"{where}: model class {name!r} cannot be imported; make its module "
                              "importable (a model defined in a script's __main__ cannot be)")
    return cls(**{k: _tuples(v) for k, v in data["fields"].items()})


def _tuples(x: Any) -> Any:
    """JSON lists back to the (hashable) tuples flax module fields hold."""
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


# -------------------------------------------------------------------------------------------
# The model's inputs and parameter shapes (the trainer's init and the cascade's loader share them).
# -------------------------------------------------------------------------------------------


def model_inputs(stage: Stage, batch_size: int = 1) -> dict[str, jax.Array]:
    """Zero inputs with the training shapes of ``stage``, for ``model.init`` / ``eval_shape``:
    ``x`` float32 [B, R, R, 3] (R = ``train_resolution``), ``t`` [B], ``text_embeds`` [B, L, D],
    ``text_mask`` bool [B, L] and, for SR stages, ``lowres`` [B, r, r, 3] and ``aug_level`` [B]."""
    res, lowres = stage.train_resolution, stage.train_lowres_resolution
    inputs = {
        "x": jnp.zeros((batch_size, res, res, 3), jnp.float32),
        "t": jnp.zeros((batch_size,), jnp.float32),
        "text_embeds": jnp.zeros((batch_size, stage.text_length, stage.text_embed_dim)),
        "text_mask": jnp.ones((batch_size, stage.text_length), bool),
    }
    if lowres is not None:
        inputs["lowres"] = jnp.zeros((batch_size, lowres, lowres, 3), jnp.float32)
        inputs["aug_level"] = jnp.zeros((batch_size,), jnp.float32)
    return inputs


def abstract_params(stage: Stage) -> PyTree:
    """``jax.eval_shape`` of the stage's parameter init: ShapeDtypeStructs boxed with their
    logical axis names (nothing allocated, nothing compiled)."""
    return jax.eval_shape(lambda rng: stage.model.init(rng, **model_inputs(stage))["params"],
                          jax.random.PRNGKey(0))


# -------------------------------------------------------------------------------------------
# Sampling one stage (pure, traceable; the cascade's program and the trainer's preview grids).
# -------------------------------------------------------------------------------------------


def _model_fn(
    stage: Stage,
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
    stage: Stage,
    params: PyTree,
    text_embeds: jax.Array,
    text_mask: jax.Array,
    rng: jax.Array,
    lowres: jax.Array | None = None,
    on_step: Callable[[jax.Array], None] | None = None,
    return_finite: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Samples one stage with its `SamplingConfig`: float32 [B, R, R, 3] in [-1, 1].

    ``text_embeds`` float [B, L, D] and ``text_mask`` bool [B, L] condition it. For an SR stage
    ``lowres`` float32 [B, r, r, 3] is the clean previous-stage output; it is noise-augmented
    here at ``stage.sampling.aug_level`` (Section 2.5) and the level is passed to the model, which
    resizes the low-res input itself (DESIGN.md). ``on_step(t)`` is called (traced) at each
    model call.

    With ``return_finite`` also returns bool [B]: whether each image came out of the sampler
    finite (checked before the final clip, which would turn +-Inf into +-1). A False means the
    stage's parameters (or inputs) are broken; NaN images would otherwise become black PNGs.

    Raises CascadeError for an SR stage without ``lowres``.
    """
    cfg = stage.sampling
    batch = text_embeds.shape[0]
    aug_level = None
    if stage.is_super_res:
        if lowres is None:
            raise CascadeError(f"SR stage {stage.name!r} needs low-resolution input images")
        rng, aug_rng = jax.random.split(rng)
        aug_level = jnp.full((batch,), cfg.aug_level, jnp.float32)
        lowres = noise_augment(lowres, aug_level, aug_rng, stage.get_aug_schedule())
    model_fn = _model_fn(stage, params, text_embeds, text_mask, lowres, aug_level, on_step)
    shape = (batch, stage.resolution, stage.resolution, 3)
    images = sample(
        model_fn,
        shape,
        rng,
        schedule=stage.get_schedule(),
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
