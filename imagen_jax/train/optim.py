"""Optimizers and learning-rate schedules (optax), configured from gin.

Paper (App. F): Adafactor for the base model, Adam (beta1 0.9, beta2 0.999, eps 1e-8) for the
super-resolution models (Adafactor hurt their quality); learning rate 1e-4 with 10,000 linear
warm-up steps then cosine decay over the 2.5 M training steps; no weight decay.
"""

from __future__ import annotations

import gin
import optax

OPTIMIZERS = ("adam", "adamw", "adafactor", "sgd")


@gin.configurable
def learning_rate_schedule(
    peak_value: float = 1e-4,
    warmup_steps: int = 10_000,
    decay_steps: int = 2_500_000,
    end_value: float = 0.0,
    kind: str = "warmup_cosine",
) -> optax.Schedule:
    """Linear warm-up from 0 to `peak_value`, then cosine decay (or constant) until `decay_steps`.

    `decay_steps` counts from step 0 (warm-up included), as optax does.
    """
    if kind == "warmup_cosine":
        if decay_steps <= warmup_steps:
            raise ValueError(
                f"learning_rate_schedule: decay_steps={decay_steps} must exceed "
                f"warmup_steps={warmup_steps}"
            )
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=peak_value,
            warmup_steps=warmup_steps,
            decay_steps=decay_steps,
            end_value=end_value,
        )
    if kind == "warmup_constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak_value, max(warmup_steps, 1)),
             optax.constant_schedule(peak_value)],
            [warmup_steps],
        )
    if kind == "constant":
        return optax.constant_schedule(peak_value)
    raise ValueError(
        f"learning_rate_schedule.kind={kind!r}; expected warmup_cosine, warmup_constant or constant"
    )


@gin.configurable
def make_optimizer(
    learning_rate: optax.ScalarOrSchedule,
    name: str = "adam",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    clip_grad_norm: float | None = 1.0,
    adafactor_decay_rate: float = 0.8,
    adafactor_multiply_by_parameter_scale: bool = False,
    adafactor_momentum: float | None = None,
) -> optax.GradientTransformation:
    """The stage optimizer, preceded by clipping of the global gradient norm.

    Adafactor's `multiply_by_parameter_scale` defaults to False so that `learning_rate` is an
    absolute step size comparable to Adam's (the paper gives one learning rate for both).
    """
    if name == "adam":
        opt = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
    elif name == "adamw":
        opt = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    elif name == "adafactor":
        opt = optax.adafactor(
            learning_rate,
            decay_rate=adafactor_decay_rate,
            multiply_by_parameter_scale=adafactor_multiply_by_parameter_scale,
            momentum=adafactor_momentum,
            weight_decay_rate=weight_decay or None,
        )
    elif name == "sgd":
        opt = optax.sgd(learning_rate)
    else:
        raise ValueError(f"make_optimizer.name={name!r}; expected one of {OPTIMIZERS}")
    if clip_grad_norm is None:
        return opt
    if clip_grad_norm <= 0:
        raise ValueError(f"make_optimizer.clip_grad_norm={clip_grad_norm} must be > 0 or None")
    return optax.chain(optax.clip_by_global_norm(clip_grad_norm), opt)
