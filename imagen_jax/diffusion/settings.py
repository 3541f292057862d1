"""Sampler settings validated once, where a config is built (not when an image comes out black).

Sampler settings live in one record, `imagen_jax.diffusion.SamplingConfig` (embedded in every
``Stage``); it, its overrides (gin bindings per stage, launcher flags) and `sample` itself call
`check_sampling_settings`. A NaN guidance weight (a ``w < 0`` check is False for NaN, and every
pixel then comes out NaN, i.e. a black PNG), a fractional step count or a quantile given as a
percentile is refused with a one-line ``ConfigError`` that names the setting and its valid
range. Settings that only one kind of sampler reads (``timesteps``, ``threshold_max``: the
discrete learned-range sampler, `imagen_jax.diffusion.discrete`) are refused with the others
when they would change nothing, rather than silently ignored.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

from imagen_jax.diffusion.respacing import EVEN_SPACING, TIMESTEP_SPACINGS, respacing_length
from imagen_jax.diffusion.thresholding import THRESHOLDINGS, check_percentile
from imagen_jax.errors import ConfigError

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")  # samplers.py implements these (and imports this)
# Discrete-time samplers (discrete.py): integer timesteps, a model predicting eps and a
# learned-range variance (DeepFloyd IF). `SamplingConfig.sample` dispatches on this.
DISCRETE_SAMPLERS = ("learned_range",)
# threshold_max meaning "s is not capped" (Imagen's dynamic thresholding). Zero rather than inf:
# stage records and sample manifests are JSON, which has no infinity.
NO_THRESHOLD_CAP = 0.0

# The valid range of each setting, as the error messages state it.
VALID = {
    "sampler": f"one of {SAMPLERS + DISCRETE_SAMPLERS}",
    "num_steps": "a whole number >= 1 (a step count, e.g. 50)",
    "guidance_weight": "a finite number >= 0 (1 = no guidance; the paper uses 1.35-8)",
    "thresholding": f"one of {THRESHOLDINGS}",
    "percentile": "a number in [1, 100] (percent; the paper uses 99.5)",
    "aug_level": "a finite number in [0, 1] (0 = clean low-res input; 0.1-0.3 look best)",
    "timesteps": f"one of {TIMESTEP_SPACINGS} ('even' = num_steps evenly spaced steps; the "
    "named lists are DeepFloyd IF's, for sampler 'learned_range' only)",
    "threshold_max": f"{NO_THRESHOLD_CAP} (no cap) or a finite number >= 1 (the cap on the "
    "dynamic threshold s; sampler 'learned_range' only; IF: 1.5 stage I, 1.0 stage II)",
}


def _real(label: str, value: Any, setting: str) -> float:
    """``value`` as a float; non-numbers (str, bool, None, arrays) are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"{label}={value!r} is not a number ({type(value).__name__}); valid: {VALID[setting]}"
        )
    return float(value)


def check_num_steps(value: Any, label: str = "num_steps") -> int:
    """A step count: an int >= 1. A float is accepted only if it is whole (3.0 -> 3); 2.7 is
    refused rather than silently truncated."""
    x = _real(label, value, "num_steps")
    if not math.isfinite(x) or x != math.floor(x) or x < 1:
        raise ValueError(f"{label}={value!r} is not allowed; valid: {VALID['num_steps']}")
    return int(x)


def check_guidance_weight(value: Any, label: str = "guidance_weight") -> float:
    """Classifier-free guidance weight (paper convention, 1 = none): finite and >= 0."""
    x = _real(label, value, "guidance_weight")
    if not math.isfinite(x) or x < 0.0:
        raise ValueError(f"{label}={value!r} is not allowed; valid: {VALID['guidance_weight']}")
    return x


def check_aug_level(value: Any, label: str = "aug_level") -> float:
    """Noise-augmentation level (a diffusion time): finite and in [0, 1]."""
    x = _real(label, value, "aug_level")
    if not 0.0 <= x <= 1.0:  # False for NaN as well
        raise ValueError(f"{label}={value!r} is not allowed; valid: {VALID['aug_level']}")
    return x


def check_threshold_max(value: Any, label: str = "threshold_max") -> float:
    """The cap on the dynamic threshold s: a finite number >= 1, or `NO_THRESHOLD_CAP` (0)."""
    x = _real(label, value, "threshold_max")
    if not (x == NO_THRESHOLD_CAP or 1.0 <= x < math.inf):  # False for NaN as well
        raise ValueError(f"{label}={value!r} is not allowed; valid: {VALID['threshold_max']}")
    return x


def _check_combination(settings: Mapping[str, Any], where: str, names: Mapping[str, str]) -> None:
    """Refuses settings that contradict each other (checked when both are given; a whole
    `SamplingConfig` gives them all)."""

    def label(setting: str) -> str:
        return f"{where}{names.get(setting, setting)}"

    sampler = settings.get("sampler")
    if sampler in SAMPLERS:
        # The continuous samplers run on their own time grid, t_i = 1 - i / N, uncapped.
        if settings.get("timesteps", EVEN_SPACING) != EVEN_SPACING:
            raise ValueError(
                f"{label('timesteps')}={settings['timesteps']!r} names a list of discrete "
                f"timesteps, which sampler {sampler!r} does not use; use sampler "
                f"{DISCRETE_SAMPLERS[0]!r} or timesteps={EVEN_SPACING!r}"
            )
        if settings.get("threshold_max", NO_THRESHOLD_CAP) != NO_THRESHOLD_CAP:
            raise ValueError(
                f"{label('threshold_max')}={settings['threshold_max']!r} caps the dynamic "
                f"threshold of sampler {DISCRETE_SAMPLERS[0]!r} only, not of {sampler!r}; leave "
                f"it {NO_THRESHOLD_CAP}"
            )
    length = respacing_length(settings.get("timesteps", EVEN_SPACING))
    if length is not None and settings.get("num_steps", length) != length:
        raise ValueError(
            f"{label('timesteps')}={settings['timesteps']!r} has {length} steps but "
            f"{label('num_steps')}={settings['num_steps']}; set num_steps={length}"
        )


def _check_choice(value: Any, label: str, setting: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{label} {value!r} unknown (unknown {setting}); choose one of {choices}")
    return value


def check_sampling_settings(
    settings: Mapping[str, Any], *, where: str = "", names: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Validates and normalises sampler settings; returns them as a new dict.

    Args:
      settings: any subset of ``sampler`` (str), ``num_steps`` (int >= 1; a whole float such as
        3.0 becomes 3), ``guidance_weight`` (finite float >= 0), ``thresholding`` (str),
        ``percentile`` (float in [1, 100]), ``aug_level`` (finite float in [0, 1]) and, for the
        discrete sampler 'learned_range', ``timesteps`` (str) and ``threshold_max`` (float
        >= 1). A value of None is refused: callers drop the settings they leave unset.
      where: prefix of the setting's name in messages (``"SamplingConfig."``, ``"stage 1: "``).
      names: how the caller spells a setting (``{"num_steps": "num_sample_steps"}``, or a
        command-line flag such as ``{"guidance_weight": "--guidance"}``).

    Returns:
      ``{setting: value}`` with numbers as Python int / float.

    Raises:
      ConfigError: one line naming the first bad setting (as the caller spells it), its value
        and its valid range; also for a setting name that is not one of `VALID`, and for
        settings that contradict each other (a named timestep list with another sampler or
        another num_steps).
    """
    try:
        return _check_settings(settings, where, dict(names or {}))
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None


def _check_settings(
    settings: Mapping[str, Any], where: str, names: Mapping[str, str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for setting, value in settings.items():
        label = f"{where}{names.get(setting, setting)}"
        if setting == "sampler":
            out[setting] = _check_choice(value, label, "sampler", SAMPLERS + DISCRETE_SAMPLERS)
        elif setting == "timesteps":
            out[setting] = _check_choice(value, label, "timesteps", TIMESTEP_SPACINGS)
        elif setting == "threshold_max":
            out[setting] = check_threshold_max(value, label)
        elif setting == "thresholding":
            out[setting] = _check_choice(value, label, "thresholding", THRESHOLDINGS)
        elif setting == "num_steps":
            out[setting] = check_num_steps(value, label)
        elif setting == "guidance_weight":
            out[setting] = check_guidance_weight(value, label)
        elif setting == "aug_level":
            out[setting] = check_aug_level(value, label)
        elif setting == "percentile":
            _real(label, value, "percentile")
            out[setting] = check_percentile(value, label)
        else:
            raise ValueError(f"{label} is not a sampler setting; valid: {tuple(VALID)}")
    _check_combination(out, where, names)
    return out
