"""`Stage`: everything that defines one stage of the cascade (base 64, SR 256, SR 1024).

A stage is the model plus the diffusion process it is trained on and the sampler defaults it is
meant to be sampled with. The trainer and the cascade both build it from gin; it is a plain frozen
dataclass afterwards, so several stages can live in one process.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import flax.linen as nn
import gin

# The one definition of each list.
from imagen_jax.diffusion.losses import WEIGHTINGS as LOSS_WEIGHTINGS
from imagen_jax.diffusion.predictions import PREDICTIONS


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Stage:
    """One cascade stage.

    Attributes:
      model: the U-Net (a flax module instance from `imagen_jax.nn.presets`).
      resolution: side of the images this stage generates (64, 256, 1024).
      lowres_resolution: side of the conditioning image for super-resolution stages; None for the
        base stage.
      train_crop: SR 256->1024 trains on `train_crop`-pixel crops of the high-res image (and the
        aligned crop of the low-res one) and is sampled at full size (paper App. F.3: 256 crops).
      text_length, text_embed_dim: shape of the T5 embeddings the stage is conditioned on.
      schedule, schedule_kwargs: the noise schedule (`imagen_jax.diffusion.get_schedule`); the paper
        uses the continuous-time cosine schedule in log-SNR (App. A).
      prediction: network output parameterisation ('eps' in the paper, App. A).
      loss_weighting, min_snr_gamma: per-example loss weighting ('uniform' = plain MSE, paper).
      cond_drop_prob: probability of zeroing the text condition in training, for classifier-free
        guidance (paper Sec. 2.2: 10%).
      aug_schedule, train_aug_max: noise-conditioning augmentation of the low-res input: training
        draws aug_level ~ U(0, train_aug_max) (paper Sec. 2.5 / App. B.1).
      sampler, num_sample_steps, guidance_weight, thresholding, percentile, sample_aug_level:
        sampling defaults for this stage (guidance in the paper's convention, 1 = none; COCO FID
        used 1.35 base / 8.0 SR, dynamic thresholding p = 99.5, App. E/Fig. A.10).
      text_fingerprint: `TextEncoder.fingerprint` of the encoder the stage was trained with; the
        cascade refuses to sample it with another encoder.

    Raises ValueError (one line, naming the field and its valid range) for a NaN/Inf or
    out-of-range setting or a fractional step count: the sampler settings go through
    `imagen_jax.diffusion.check_sampling_settings`, the one definition the cascade uses too.
    (A ``sample_aug_level`` above ``train_aug_max`` is warned about when the stage is sampled:
    ``imagen_jax.cascade.CascadeStage``.)
    """

    model: nn.Module = gin.REQUIRED
    resolution: int = 64
    lowres_resolution: int | None = None
    train_crop: int | None = None
    text_length: int = 128
    text_embed_dim: int = 4096
    schedule: str = "cosine"
    schedule_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    prediction: str = "eps"
    loss_weighting: str = "uniform"
    min_snr_gamma: float = 5.0
    cond_drop_prob: float = 0.1
    aug_schedule: str = "cosine"
    train_aug_max: float = 1.0
    sampler: str = "ddpm"
    num_sample_steps: int = 256
    guidance_weight: float = 1.35
    thresholding: str = "dynamic"
    percentile: float = 99.5
    sample_aug_level: float = 0.0
    text_fingerprint: str | None = None

    def __post_init__(self):
        if self.model is gin.REQUIRED or self.model is None:
            raise ValueError("Stage.model is required: bind `Stage.model = @<preset>()` in gin")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"Stage.prediction={self.prediction!r}; expected one of {PREDICTIONS}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(
                f"Stage.loss_weighting={self.loss_weighting!r}; expected one of {LOSS_WEIGHTINGS}"
            )
        from imagen_jax.diffusion.settings import check_sampling_settings

        sampling = {
            "sampler": self.sampler,
            "num_steps": self.num_sample_steps,
            "guidance_weight": self.guidance_weight,
            "thresholding": self.thresholding,
            "percentile": self.percentile,
            "aug_level": self.sample_aug_level,
        }
        aliases = {"num_steps": "num_sample_steps", "aug_level": "sample_aug_level"}
        checked = check_sampling_settings(sampling, where="Stage.", names=aliases)
        for name, value in checked.items():
            object.__setattr__(self, aliases.get(name, name), value)  # frozen: normalised value
        # Both are probabilities / diffusion times in [0, 1] (a chained comparison is False for
        # NaN, so NaN is refused too).
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ValueError(f"Stage.cond_drop_prob={self.cond_drop_prob} must lie in [0, 1]")
        if not 0.0 <= self.train_aug_max <= 1.0:
            raise ValueError(f"Stage.train_aug_max={self.train_aug_max} must lie in [0, 1]")
        gamma = self.min_snr_gamma
        if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not (
            math.isfinite(gamma) and gamma > 0
        ):
            raise ValueError(
                f"Stage.min_snr_gamma={self.min_snr_gamma!r} must be a finite number > 0 (the "
                "Min-SNR paper uses 5)"
            )
        if self.lowres_resolution is not None and self.resolution % self.lowres_resolution:
            raise ValueError(
                f"Stage.resolution={self.resolution} is not a multiple of "
                f"lowres_resolution={self.lowres_resolution}"
            )
        if self.train_crop is not None:
            if self.lowres_resolution is None:
                raise ValueError("Stage.train_crop only applies to super-resolution stages")
            if self.train_crop > self.resolution or self.train_crop % self.upscale:
                raise ValueError(
                    f"Stage.train_crop={self.train_crop} must be <= resolution={self.resolution} "
                    f"and a multiple of the upscale factor {self.upscale}"
                )

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
        from imagen_jax.diffusion import get_schedule

        return get_schedule(self.schedule, **dict(self.schedule_kwargs))

    def get_aug_schedule(self) -> Any:
        from imagen_jax.diffusion import get_schedule

        return get_schedule(self.aug_schedule)
