"""Respacing a discrete diffusion: which of the T training timesteps a sampler visits.

A discrete model (DeepFloyd IF: T = 1,000) is trained on integer timesteps 0 .. T-1 and sampled
on a descending subset of them; each respaced step goes from its timestep to the next one in the
list (the last to "clean", timestep -1). Two ways to pick the subset:

* ``"even"``: ``num_steps`` steps ``i * (T // num_steps)``, i = num_steps-1 .. 0, diffusers'
  ``timestep_spacing="leading"`` (the default of the IF pipelines, and of `DDPMScheduler`).
* IF's named lists (``"fast27"``, ``"smart27"``, ..., `IF_RESPACINGS`): the timesteps are split
  into equal sections and each section gets its own number of evenly spaced steps, Nichol &
  Dhariwal's (2021, improved DDPM, Sec. 4) "section counts" respacing as DeepFloyd IF's code
  names them. diffusers ships the resulting lists (``pipelines/deepfloyd_if/timesteps.py``);
  tests/test_diffusion_discrete.py checks that ours equal them.

Pure numpy: the lists are static (they size the compiled sampling loop). No dependency on the
rest of the package, so `settings` can validate step counts against the named lists.
"""

from __future__ import annotations

import numpy as np

# IF's named respacings as section counts over T = 1,000 training steps (DeepFloyd IF,
# `IFBaseModule.respacing_modes`): e.g. fast27 = 10, 10, 3, 2, 2 steps in the five sections of
# 200 timesteps, low noise first. "super*" were tuned for IF's x4 upscaler (stage III).
IF_RESPACINGS: dict[str, tuple[int, ...]] = {
    "fast27": (10, 10, 3, 2, 2),
    "smart27": (7, 4, 2, 1, 2, 4, 7),
    "smart50": (10, 6, 4, 3, 2, 2, 3, 4, 6, 10),
    "smart100": (1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 4, 4, 5, 5, 6, 7, 7, 8, 9, 10, 13),
    "smart185": (1, 1, 2, 2, 2, 3, 3, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 18, 20),
    "super27": (1, 1, 1, 1, 1, 1, 1, 2, 5, 13),
    "super40": (2, 2, 2, 2, 2, 2, 3, 4, 6, 15),
    "super100": (4, 4, 6, 6, 8, 8, 10, 10, 14, 30),
}
EVEN_SPACING = "even"
TIMESTEP_SPACINGS = (EVEN_SPACING, *IF_RESPACINGS)  # the values of SamplingConfig.timesteps


def respacing_length(spacing: str) -> int | None:
    """How many steps the named list ``spacing`` has (27 for 'smart27'); None for 'even', whose
    length is the caller's ``num_steps``. Raises ValueError for an unknown name."""
    if spacing == EVEN_SPACING:
        return None
    if spacing not in IF_RESPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {TIMESTEP_SPACINGS}")
    return sum(IF_RESPACINGS[spacing])


def section_timesteps(num_train_timesteps: int, section_counts: tuple[int, ...]) -> np.ndarray:
    """Timesteps from section counts (improved DDPM's respacing), int64 [sum(counts)], descending.

    The T timesteps are cut into ``len(section_counts)`` consecutive sections (the first
    ``T % len`` one longer); section i gets ``section_counts[i]`` steps evenly spaced from its
    first to its last timestep, rounded half to even (Python's `round`). The positions are a
    running sum of the stride, not ``k * stride``: at ties (949.5 in 'super40') the two differ in
    the last bit, and the running sum is what IF's lists were made with.

    Raises ValueError if a count is < 1 or exceeds its section's length.
    """
    num_sections = len(section_counts)
    if num_sections == 0 or num_sections > num_train_timesteps:
        raise ValueError(
            f"{num_sections} sections for {num_train_timesteps} timesteps; need 1 .. T sections"
        )
    size_per, extra = divmod(num_train_timesteps, num_sections)
    steps: list[int] = []
    start = 0
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(
                f"section {i} has {size} timesteps and cannot hold {count} steps (need 1 .. {size})"
            )
        stride = (size - 1) / (count - 1) if count > 1 else 0.0
        position = 0.0
        for _ in range(count):
            steps.append(start + round(position))
            position += stride
        start += size
    return np.array(sorted(steps, reverse=True), np.int64)


def leading_timesteps(num_steps: int, num_train_timesteps: int) -> np.ndarray:
    """diffusers' "leading" spacing: ``i * (T // num_steps)``, i = num_steps-1 .. 0, int64 [N].

    Raises ValueError unless 1 <= num_steps <= T.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(
            f"num_steps={num_steps} must lie in [1, {num_train_timesteps}] (the number of "
            "training timesteps)"
        )
    step_ratio = num_train_timesteps // num_steps
    return np.arange(num_steps, dtype=np.int64)[::-1] * step_ratio


def respaced_timesteps(spacing: str, num_steps: int, num_train_timesteps: int) -> np.ndarray:
    """The descending integer timesteps a sampler visits, int64 [num_steps].

    Args:
      spacing: 'even' (`leading_timesteps`) or a name in `IF_RESPACINGS`.
      num_steps: the number of steps; must equal the named list's length.
      num_train_timesteps: T; IF's named lists are defined for T = 1,000 (sections of other T are
        cut the same way).

    Raises:
      ValueError: unknown spacing, or ``num_steps`` not the named list's length.
    """
    length = respacing_length(spacing)
    if length is None:
        return leading_timesteps(num_steps, num_train_timesteps)
    if num_steps != length:
        raise ValueError(
            f"timesteps {spacing!r} has {length} steps, not num_steps={num_steps}; set "
            f"num_steps={length}"
        )
    return section_timesteps(num_train_timesteps, IF_RESPACINGS[spacing])
