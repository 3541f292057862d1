"""Sampler settings validated once, where a config is built (not when an image comes out black).

Sampler settings live in one record, `imagen_jax.diffusion.SamplingConfig` (embedded in every
``Stage``); it, its overrides (gin bindings per stage, launcher flags) and `sample` itself call
`check_sampling_settings`. A NaN guidance weight (a ``w < 0`` check is False for NaN, and every
pixel then comes out NaN, i.e. a black PNG), a fractional step count or a quantile given as a
percentile is refused with a one-line ``ConfigError`` that names the setting and its valid
range.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

from imagen_jax.diffusion.thresholding import THRESHOLDINGS, check_percentile
from imagen_jax.errors import ConfigError

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")  # samplers.py implements these (and imports this)

# The valid range of each setting, as the error messages state it.
VALID = {
    "sampler": f"one of {SAMPLERS}",
    "num_steps": "a whole number >= 1 (a step count, e.g. 50)",
    "guidance_weight": "a finite number >= 0 (1 = no guidance; the paper uses 1.35-8)",
    "thresholding": f"one of {THRESHOLDINGS}",
    "percentile": "a number in [1, 100] (percent; the paper uses 99.5)",
    "aug_level": "a finite number in [0, 1] (0 = clean low-res input; 0.1-0.3 look best)",
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
        ``percentile`` (float in [1, 100]) and ``aug_level`` (finite float in [0, 1]). A value of
        None is refused: callers drop the settings they leave unset.
      where: prefix of the setting's name in messages (``"SamplingConfig."``, ``"stage 1: "``).
      names: how the caller spells a setting (``{"num_steps": "num_sample_steps"}``, or a
        command-line flag such as ``{"guidance_weight": "--guidance"}``).

    Returns:
      ``{setting: value}`` with numbers as Python int / float.

    Raises:
      ConfigError: one line naming the first bad setting (as the caller spells it), its value
        and its valid range; also for a setting name that is not one of the six.
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
            out[setting] = _check_choice(value, label, "sampler", SAMPLERS)
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
    return out
