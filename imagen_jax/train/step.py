"""The jitted train step: micro-batch gradient accumulation, EMA with warm-up, NaN/Inf guard.

`make_train_step` returns a pure function `(state, batch) -> (state, metrics)`; the trainer jits
it with explicit in/out shardings and donates the state.

A discrete stage (DeepFloyd IF, ``Stage.schedule="discrete"``) trains as IF's U-Nets were
trained: integer t ~ U{0..T-1}, x_t from the `DiscreteSchedule` table, the model called with
IF's contract (`imagen_jax.stage.model_conditions`, as sampling calls it), dropped texts replaced
by the encoded empty prompt (``batch["null_embeds"]``), and the hybrid loss that also trains the
learned-range variance (`imagen_jax.diffusion.hybrid_loss_per_example`). `check_trainable` says
which stage options the trainer does not implement for it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from imagen_jax import diffusion, partitioning
from imagen_jax.errors import ConfigError
from imagen_jax.stage import Stage, model_conditions, model_inputs
from imagen_jax.train.state import TrainState

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Hyperparameters of one optimisation step.

    Attributes:
      num_micro_batches: the global batch is split into this many micro-batches whose gradients
        are summed in a `lax.scan`, so a 2048 batch (paper App. F) fits any number of chips.
      ema_decay: EMA decay (not in the paper; 0.9999 is common practice).
      ema_warmup: use decay min(ema_decay, (1 + n) / (10 + n)) after n updates, so early EMA
        weights are not dominated by the random initialisation.
      logsnr_bucket_edges: the loss is also reported per log-SNR bucket (edges in nats).
      vlb_weight: lambda of the hybrid loss ``L_simple + lambda L_vlb`` of discrete
        (learned-variance) stages (Improved DDPM Sec. 3.1 and IF: 0.001); unused otherwise.
    """

    num_micro_batches: int = 1
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    logsnr_bucket_edges: Sequence[float] = (-10.0, -5.0, 0.0, 5.0, 10.0)
    vlb_weight: float = diffusion.HYBRID_VLB_WEIGHT

    def __post_init__(self):
        if self.num_micro_batches < 1:
            raise ValueError(f"StepConfig.num_micro_batches={self.num_micro_batches} must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"StepConfig.ema_decay={self.ema_decay} must lie in [0, 1)")
        if not 0.0 <= self.vlb_weight < float("inf"):
            raise ValueError(f"StepConfig.vlb_weight={self.vlb_weight} must be finite and >= 0 "
                             "(Improved DDPM: 0.001)")


def ema_decay_at(num_updates: jax.Array, config: StepConfig) -> jax.Array:
    """EMA decay after `num_updates` applied updates (TF ExponentialMovingAverage warm-up)."""
    decay = jnp.asarray(config.ema_decay, jnp.float32)
    if not config.ema_warmup:
        return decay
    n = num_updates.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def ema_update(ema_params: Any, params: Any, decay: jax.Array) -> Any:
    """One EMA step over a parameter pytree: ``decay * ema + (1 - decay) * params``."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def random_aligned_crop(
    rng: jax.Array, image: jax.Array, lowres: jax.Array, crop: int
) -> tuple[jax.Array, jax.Array]:
    """Per-example random crop of `image` [B, H, W, C] to `crop` and the aligned `lowres` crop.

    The high-res offset is a multiple of the upscale factor so both crops cover the same area.
    """
    batch, height, width, _ = image.shape
    factor = height // lowres.shape[1]
    low_crop = crop // factor
    ky, kx = jax.random.split(rng)
    oy = jax.random.randint(ky, (batch,), 0, (height - crop) // factor + 1)  # lowres pixels
    ox = jax.random.randint(kx, (batch,), 0, (width - crop) // factor + 1)

    def one(img, low, y, x):
        hi = jax.lax.dynamic_slice(img, (y * factor, x * factor, 0), (crop, crop, img.shape[-1]))
        lo = jax.lax.dynamic_slice(low, (y, x, 0), (low_crop, low_crop, low.shape[-1]))
        return hi, lo

    return jax.vmap(one)(image, lowres, oy, ox)


def _bucket_index(logsnr: jax.Array, edges: Sequence[float]) -> jax.Array:
    return jnp.searchsorted(jnp.asarray(edges, jnp.float32), logsnr.astype(jnp.float32))


def _micro_batches(batch: Batch, num_micro: int, mesh: Mesh | None) -> Batch:
    """[B, ...] -> [num_micro, B / num_micro, ...], micro-batch m = rows m, m + M, m + 2M, ...

    Strided (not contiguous) micro-batches keep every micro-batch spread over all data shards, so
    no device idles while another holds a whole micro-batch.
    """

    def split(x):
        x = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:])
        x = jnp.swapaxes(x, 0, 1)
        if mesh is not None:
            axes = tuple(a for a in partitioning.BATCH_AXES if a in mesh.axis_names)
            spec = PartitionSpec(None, axes, *([None] * (x.ndim - 2)))
            x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
        return x

    return {k: split(v) for k, v in batch.items()}


def make_prepare_fn(stage: Stage) -> Callable[[Batch, jax.Array], Batch]:
    """`prepare(batch, rng) -> model inputs and targets` for the whole global batch.

    All randomness of a step (crop offsets, t, eps, condition dropping, augmentation) is drawn
    here for the full batch, before micro-batching: the result is the same for any number of
    micro-batches and any mesh (jax's partitionable threefry).
    """
    if stage.is_discrete:
        return _make_discrete_prepare_fn(stage)
    schedule = stage.get_schedule()
    aug_schedule = stage.get_aug_schedule() if stage.is_super_res else None

    def prepare(batch, rng):
        rng_crop, rng_t, rng_eps, rng_drop, rng_aug, rng_aug_noise = jax.random.split(rng, 6)
        x0 = batch["image"].astype(jnp.float32)  # [B, H, W, 3] in [-1, 1]
        lowres = batch.get("lowres")
        if stage.train_crop is not None and x0.shape[1] != stage.train_crop:
            x0, lowres = random_aligned_crop(rng_crop, x0, lowres, stage.train_crop)
        b = x0.shape[0]
        t = jax.random.uniform(rng_t, (b,), jnp.float32)  # continuous time (App. A)
        eps = jax.random.normal(rng_eps, x0.shape, jnp.float32)
        embeds, mask = diffusion.drop_text_condition(
            rng_drop, batch["text_embeds"], batch["text_mask"], stage.cond_drop_prob
        )  # Sec. 2.2: classifier-free guidance training
        out = {"x0": x0, "eps": eps, "t": t, "x_t": diffusion.diffuse(x0, eps, t, schedule),
               "text_embeds": embeds, "text_mask": mask}
        if stage.is_super_res:
            # Sec. 2.5: noise conditioning augmentation, level ~ U(0, train_aug_max).
            aug_level = jax.random.uniform(rng_aug, (b,), jnp.float32, 0.0, stage.train_aug_max)
            out["lowres"] = diffusion.noise_augment(lowres, aug_level, rng_aug_noise,
                                                    aug_schedule)
            out["aug_level"] = aug_level
        return out

    return prepare


def _make_discrete_prepare_fn(stage: Stage) -> Callable[[Batch, jax.Array], Batch]:
    """`make_prepare_fn` of a discrete stage: integer t, IF's text dropping and low-res input.

    Reads ``batch["null_embeds"]`` float [L, D], the encoded empty prompt (the trainer's). The
    prepared ``text_embeds`` and, for SR, ``lowres`` (at the training resolution) and
    ``noise_level`` int32 are the model's conditions (`model_conditions`).
    """
    schedule = stage.get_schedule()
    num_steps = schedule.num_train_timesteps
    # IF's training code is not public: our choice, like the continuous stages' U(0, max), is an
    # integer level uniform on [0, train_aug_max * T] (capped at the last timestep, T - 1).
    max_level = min(math.floor(stage.train_aug_max * num_steps), num_steps - 1)

    def prepare(batch, rng):
        rng_t, rng_eps, rng_drop, rng_aug, rng_aug_noise = jax.random.split(rng, 5)
        if "null_embeds" not in batch:
            raise ConfigError(f"discrete stage {stage.name!r}: the train batch lacks "
                              "'null_embeds' (the encoded empty prompt, float [L, D])")
        x0 = batch["image"].astype(jnp.float32)  # [B, H, W, 3] in [-1, 1]
        b = x0.shape[0]
        t = jax.random.randint(rng_t, (b,), 0, num_steps, jnp.int32)
        eps = jax.random.normal(rng_eps, x0.shape, jnp.float32)
        lowres = level = None
        if stage.is_super_res:
            level = jax.random.randint(rng_aug, (b,), 0, max_level + 1, jnp.int32)
            lowres, level = diffusion.noise_augment_upsampled(
                batch["lowres"].astype(jnp.float32), x0.shape[1], level, rng_aug_noise, schedule)
        cond, uncond = model_conditions(stage, batch["text_embeds"].astype(jnp.float32), None,
                                        batch["null_embeds"], lowres, level)
        # IF's model card: 10% of the texts dropped to the empty prompt (cond_drop_prob).
        keep = jax.random.bernoulli(rng_drop, 1.0 - stage.cond_drop_prob, (b,))
        (embeds,), kwargs = jax.tree.map(
            lambda c, u: jnp.where(keep.reshape((b,) + (1,) * (c.ndim - 1)), c, u), cond, uncond)
        out = {"x0": x0, "eps": eps, "t": t, "text_embeds": embeds,
               "x_t": diffusion.add_discrete_noise(x0, eps, t, schedule)}
        if stage.is_super_res:
            out["lowres"], out["noise_level"] = kwargs["lowres"], kwargs["noise_level"]
        return out

    return prepare


def _make_discrete_loss_fn(
    stage: Stage, config: StepConfig
) -> Callable[..., tuple[jax.Array, Metrics]]:
    """`make_loss_fn` of a discrete stage: the hybrid loss (eps-MSE + lambda T L_t, which trains
    the variance channels), the model called as `sample_stage` calls it."""
    schedule = stage.get_schedule()
    num_buckets = len(config.logsnr_bucket_edges) + 1

    def loss_fn(params, mb, rng):
        (args, kwargs), _ = model_conditions(stage, mb["text_embeds"], None, None,
                                             mb.get("lowres"), mb.get("noise_level"))
        out = stage.model.apply({"params": params}, mb["x_t"], mb["t"], *args, train=True,
                                rngs={"dropout": rng}, **kwargs).astype(jnp.float32)
        loss_ex, _, _ = diffusion.hybrid_loss_per_example(
            out, mb["x0"], mb["x_t"], mb["eps"], mb["t"], schedule, config.vlb_weight)
        bucket = _bucket_index(diffusion.discrete_logsnr(mb["t"], schedule),
                               config.logsnr_bucket_edges)
        onehot = jax.nn.one_hot(bucket, num_buckets, dtype=jnp.float32)
        return loss_ex.mean(), {"bucket_loss_sum": onehot.T @ loss_ex,
                                "bucket_count": onehot.sum(0)}

    return loss_fn


def check_trainable(stage: Stage) -> None:
    """Raises `ConfigError` (one line: the option and the fix) for a stage option the train step
    does not implement. Continuous stages: everything. Discrete (IF) stages: eps prediction,
    uniform weighting, no train_crop, a model predicting eps and v (2 x 3 channels)."""
    if not stage.is_discrete:
        return
    where = f"discrete stage {stage.name!r}"
    if stage.prediction != "eps":
        raise ConfigError(f"{where}: Stage.prediction={stage.prediction!r} cannot be trained; "
                          "the learned-range models (IF) predict eps: set Stage.prediction='eps'")
    if stage.loss_weighting != "uniform":
        raise ConfigError(f"{where}: Stage.loss_weighting={stage.loss_weighting!r} is not "
                          "implemented for the hybrid loss; set Stage.loss_weighting='uniform'")
    if stage.train_crop is not None:
        raise ConfigError(f"{where}: Stage.train_crop is not implemented (IF upsamples the whole "
                          "low-res image, align-corners); set Stage.train_crop=None")
    inputs = model_inputs(stage)
    out = jax.eval_shape(lambda: stage.model.init_with_output(jax.random.PRNGKey(0), **inputs)[0])
    want = (*inputs["x"].shape[:-1], 2 * inputs["x"].shape[-1])
    if tuple(out.shape) != want:
        raise ConfigError(f"{where}: the model outputs {tuple(out.shape)}, the hybrid loss needs "
                          f"eps and the variance value, {want}; use a learned-variance model "
                          "(IFUNet with out_channels=6)")


def make_loss_fn(stage: Stage, config: StepConfig) -> Callable[..., tuple[jax.Array, Metrics]]:
    """`loss_fn(params, prepared micro-batch, rng) -> (mean loss, aux)`."""
    if stage.is_discrete:
        return _make_discrete_loss_fn(stage, config)
    model = stage.model
    schedule = stage.get_schedule()
    num_buckets = len(config.logsnr_bucket_edges) + 1

    def loss_fn(params, mb, rng):
        kwargs = {}
        if stage.is_super_res:
            kwargs = {"lowres": mb["lowres"], "aug_level": mb["aug_level"]}
        # Mixed precision is the model's business (`BaseUNet.dtype = "bfloat16"` in gin): params
        # arrive float32 and the model casts them for compute; the loss is taken in float32.
        pred = model.apply(
            {"params": params}, mb["x_t"], mb["t"], mb["text_embeds"], mb["text_mask"],
            train=True, rngs={"dropout": rng}, **kwargs,
        ).astype(jnp.float32)
        loss_ex = diffusion.loss_per_example(
            pred, mb["x0"], mb["eps"], mb["t"], schedule, prediction=stage.prediction,
            weighting=stage.loss_weighting, min_snr_gamma=stage.min_snr_gamma,
            min_snr_offset=stage.min_snr_offset,
        )  # [b]
        bucket = _bucket_index(schedule.logsnr(mb["t"]), config.logsnr_bucket_edges)  # [b]
        onehot = jax.nn.one_hot(bucket, num_buckets, dtype=jnp.float32)  # [b, K]
        aux = {
            "bucket_loss_sum": onehot.T @ loss_ex,  # [K]
            "bucket_count": onehot.sum(0),  # [K]
        }
        return loss_ex.mean(), aux

    return loss_fn


def make_train_step(
    stage: Stage,
    tx: optax.GradientTransformation,
    learning_rate: optax.Schedule,
    config: StepConfig,
    mesh: Mesh | None = None,
    rules: partitioning.LogicalRules = (),
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Builds `train_step(state, batch) -> (state, metrics)` (not yet jitted).

    `batch` holds the global batch: `image` [B, H, W, 3], `text_embeds` [B, L, D], `text_mask`
    [B, L] and, for SR stages, `lowres` [B, h, w, 3] (clean; noise augmentation happens here);
    for a discrete stage also `null_embeds` [L, D] (replicated), the encoded empty prompt.
    A step whose loss or gradient norm is not finite leaves params, EMA and optimizer state
    untouched and increments `bad_steps` (consecutive) and `skipped_steps` (total).
    """
    check_trainable(stage)
    prepare = make_prepare_fn(stage)
    loss_fn = make_loss_fn(stage, config)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    num_micro = config.num_micro_batches

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        with nn.logical_axis_rules(tuple(rules)):
            step_rng = jax.random.fold_in(state.rng, state.step)
            rng_prepare, rng_model = jax.random.split(step_rng)
            batch = prepare(batch, rng_prepare)
            if num_micro == 1:
                (loss, aux), grads = grad_fn(state.params, batch, rng_model)
            else:
                micro = _micro_batches(batch, num_micro, mesh)
                zeros = jax.tree.map(jnp.zeros_like, state.params)

                def accumulate(carry, xs):
                    grad_sum, loss_sum, aux_sum = carry
                    index, mb = xs
                    micro_rng = jax.random.fold_in(rng_model, index)
                    (micro_loss, a), g = grad_fn(state.params, mb, micro_rng)
                    carry = (
                        jax.tree.map(jnp.add, grad_sum, g),
                        loss_sum + micro_loss,
                        jax.tree.map(jnp.add, aux_sum, a),
                    )
                    return carry, None

                num_buckets = len(config.logsnr_bucket_edges) + 1
                aux0 = {"bucket_loss_sum": jnp.zeros((num_buckets,)),
                        "bucket_count": jnp.zeros((num_buckets,))}
                (grads, loss, aux), _ = jax.lax.scan(
                    accumulate, (zeros, jnp.zeros(()), aux0), (jnp.arange(num_micro), micro)
                )
                grads = jax.tree.map(lambda g: g / num_micro, grads)
                loss = loss / num_micro

        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # Non-finite gradients must not reach the optimizer moments: zero them, then discard.
        safe_grads = jax.tree.map(lambda g: jnp.where(ok, g, 0.0), grads)
        updates, new_opt_state = tx.update(safe_grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        num_updates = state.step - state.skipped_steps  # updates applied before this one
        decay = ema_decay_at(num_updates, config)
        new_ema = ema_update(state.ema_params, new_params, decay)

        def pick(new, old):
            return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

        new_state = state.replace(
            step=state.step + 1,
            params=pick(new_params, state.params),
            ema_params=pick(new_ema, state.ema_params),
            opt_state=pick(new_opt_state, state.opt_state),
            bad_steps=jnp.where(ok, 0, state.bad_steps + 1).astype(jnp.int32),
            skipped_steps=(state.skipped_steps + (~ok).astype(jnp.int32)),
        )
        counts = aux["bucket_count"]
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": learning_rate(num_updates),
            "ema_decay": decay,
            "step_ok": ok,
            "bad_steps": new_state.bad_steps,
            "skipped_steps": new_state.skipped_steps,
            # Mean loss per log-SNR bucket (NaN where no example fell in the bucket this step).
            "bucket_loss": jnp.where(counts > 0, aux["bucket_loss_sum"] / jnp.maximum(counts, 1),
                                     jnp.nan),
        }
        return new_state, metrics

    return train_step


def jit_train_step(
    train_step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]],
    state_shardings: TrainState,
    batch_shardings: Mapping[str, NamedSharding],
    mesh: Mesh,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Jits with explicit shardings; the input state is donated (updated in place)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, dict(batch_shardings)),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )


# Batch entries that are one array for the whole batch (no batch axis): replicated.
UNBATCHED_KEYS = ("null_embeds",)


def batch_shardings(batch_shapes: Mapping[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
    """Leading-axis (batch) shardings for every array of a batch; `UNBATCHED_KEYS` replicated."""
    return {k: NamedSharding(mesh, PartitionSpec()) if k in UNBATCHED_KEYS
            else partitioning.batch_sharding(mesh, len(v.shape)) for k, v in batch_shapes.items()}
