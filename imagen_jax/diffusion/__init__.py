"""imagen_jax.diffusion: continuous-time Gaussian diffusion in log-SNR (knows nothing of U-Nets).

Schedules, the eps / v / x0 parameterisations, losses, classifier-free guidance, thresholding,
noise conditioning augmentation and compiled samplers (Imagen, Saharia et al. 2022, Sec. 2 and
App. A); and the discrete learned-variance sampler of DeepFloyd IF (`discrete`, `respacing`).
See docs/DESIGN.md for the contracts.
"""

from imagen_jax.diffusion.analytic import GaussianMixture1D
from imagen_jax.diffusion.discrete import (
    BETA_SCHEDULES,
    DISCRETE_SCHEDULE,
    IF_STAGE_I_SAMPLING,
    IF_STAGE_II_SAMPLING,
    DiscreteSchedule,
    add_discrete_noise,
    discrete_betas,
    guided_learned_range_model_fn,
    learned_range_step,
    noise_augment_upsampled,
    noise_level_from_aug,
    resize_bilinear_align_corners,
    sample_learned_range,
)
from imagen_jax.diffusion.discrete_losses import (
    HYBRID_VLB_WEIGHT,
    discrete_logsnr,
    hybrid_loss_per_example,
)
from imagen_jax.diffusion.guidance import (
    DEFAULT_COND_DROP_PROB,
    drop_text_condition,
    guided_model_fn,
    with_null_condition,
)
from imagen_jax.diffusion.losses import (
    WEIGHTINGS,
    loss_per_example,
    min_snr_plus_one_weight,
    min_snr_weight,
)
from imagen_jax.diffusion.noise_aug import noise_augment, random_aug_level
from imagen_jax.diffusion.predictions import (
    PREDICTIONS,
    convert_prediction,
    diffuse,
    prediction_target,
    to_x0_eps,
)
from imagen_jax.diffusion.respacing import IF_RESPACINGS, TIMESTEP_SPACINGS, respaced_timesteps
from imagen_jax.diffusion.samplers import (
    DEFAULT_NUM_STEPS,
    SAMPLERS,
    SamplingConfig,
    ddim_step,
    ddpm_step,
    dpmpp_2m_step,
    sample,
)
from imagen_jax.diffusion.schedules import (
    SCHEDULES,
    CosineSchedule,
    LinearBetaSchedule,
    Schedule,
    ShiftedCosineSchedule,
    alpha_sigma_from_logsnr,
    get_schedule,
)
from imagen_jax.diffusion.settings import DISCRETE_SAMPLERS, check_sampling_settings
from imagen_jax.diffusion.thresholding import (
    DEFAULT_PERCENTILE,
    THRESHOLDINGS,
    apply_thresholding,
    dynamic_threshold,
    static_threshold,
)

__all__ = [
    "BETA_SCHEDULES",
    "DISCRETE_SAMPLERS",
    "DISCRETE_SCHEDULE",
    "IF_RESPACINGS",
    "IF_STAGE_I_SAMPLING",
    "IF_STAGE_II_SAMPLING",
    "TIMESTEP_SPACINGS",
    "DiscreteSchedule",
    "add_discrete_noise",
    "discrete_betas",
    "guided_learned_range_model_fn",
    "learned_range_step",
    "noise_augment_upsampled",
    "noise_level_from_aug",
    "resize_bilinear_align_corners",
    "respaced_timesteps",
    "sample_learned_range",
    "HYBRID_VLB_WEIGHT",
    "discrete_logsnr",
    "hybrid_loss_per_example",
    "DEFAULT_COND_DROP_PROB",
    "DEFAULT_NUM_STEPS",
    "DEFAULT_PERCENTILE",
    "PREDICTIONS",
    "SAMPLERS",
    "SCHEDULES",
    "THRESHOLDINGS",
    "WEIGHTINGS",
    "min_snr_plus_one_weight",
    "CosineSchedule",
    "GaussianMixture1D",
    "LinearBetaSchedule",
    "SamplingConfig",
    "Schedule",
    "ShiftedCosineSchedule",
    "alpha_sigma_from_logsnr",
    "apply_thresholding",
    "check_sampling_settings",
    "convert_prediction",
    "ddim_step",
    "ddpm_step",
    "diffuse",
    "dpmpp_2m_step",
    "drop_text_condition",
    "dynamic_threshold",
    "get_schedule",
    "guided_model_fn",
    "loss_per_example",
    "min_snr_weight",
    "noise_augment",
    "prediction_target",
    "random_aug_level",
    "sample",
    "static_threshold",
    "to_x0_eps",
    "with_null_condition",
]
