"""The training loop of one cascade stage (reads top to bottom, like big_vision's train.py).

    mesh + rules -> optimizer -> data -> abstract state -> restore or sharded init -> compile
    -> loop { batch -> step -> guard -> metrics -> samples -> checkpoint -> preemption }

Everything is configured from gin (`train.*`, `TrainConfig.*`, `StepConfig.*`,
`CheckpointConfig.*`, `make_mesh.*`, `logical_axis_rules.rules`, `make_optimizer.*`,
`learning_rate_schedule.*`, `Stage.*`); `launch/train.py` is the command-line entry point.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from PIL import Image
from tqdm import tqdm

from imagen_jax import gin_utils, partitioning
from imagen_jax.data import pipeline
from imagen_jax.data.embed_cache import masked_encode_fn
from imagen_jax.errors import ConfigError, TrainingError
from imagen_jax.nn import IFUNet, load_if_unet
from imagen_jax.nn.if_config import IF_PREFIX, if_unet_dir
from imagen_jax.nn.if_weights import DiffusersUNetDir
from imagen_jax.stage import Stage, sample_stage
from imagen_jax.train import metrics as metrics_lib
from imagen_jax.train.checkpoint import CheckpointConfig, Checkpointer
from imagen_jax.train.optim import learning_rate_schedule, make_optimizer
from imagen_jax.train.state import (
    TrainState,
    abstract_train_state,
    count_params,
    init_train_state,
    param_shapes,
)
from imagen_jax.train.step import (
    StepConfig,
    batch_shardings,
    check_trainable,
    jit_train_step,
    make_train_step,
)

log = logging.getLogger(__name__)

DataFn = Callable[..., Iterator[Mapping[str, np.ndarray]]]
EncodeFn = Callable[[Any, Any], Any]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Run-level settings.

    Attributes:
      batch_size: global batch (all hosts, all micro-batches); paper App. F: 2048.
      num_steps: total train steps (paper: 2.5 M).
      seed: seeds parameter init and the per-step diffusion noise.
      log_every: write metrics every N steps.
      sample_every: write a sample grid (EMA params) every N steps; 0 disables.
      num_samples: examples in the sample grid (the first ones of the data's first batch).
      sample_steps: sampler steps for those grids (a cheap preview, not the stage default).
      max_bad_steps: stop after this many consecutive non-finite steps.
      peak_flops_per_device: for MFU in the metrics (e.g. 989e12 for an H100 in bf16); None: no MFU.
      progress_bar: show a tqdm bar on process 0.
      max_seconds: wall-clock budget of one `train` call, in seconds from its start (set-up,
        restore and compilation included): once it is spent the loop stops after the current
        step and saves a checkpoint there, as on SIGTERM, so a later call resumes (with its own
        budget). At least one step is always trained. Multi-host: process 0's clock decides, at
        every ``log_every``-th step, so all hosts stop at the same step. None: no limit. Used by
        `make demo` to fit its fresh cascade into a fixed wall time.
      init_from: where a new run's parameters (and EMA) start instead of a random init:
        ``"if:PATH"``, a DeepFloyd IF U-Net in diffusers' layout (PATH: its ``unet/`` directory
        or the model directory holding one), whose config.json must describe ``Stage.model``
        (an `IFUNet`). None: random. A run resuming from its own checkpoint ignores it.
    """

    batch_size: int = 2048
    num_steps: int = 2_500_000
    seed: int = 0
    log_every: int = 100
    sample_every: int = 0
    num_samples: int = 4
    sample_steps: int = 32
    max_bad_steps: int = 20
    peak_flops_per_device: float | None = None
    progress_bar: bool = True
    init_from: str | None = None
    max_seconds: float | None = None

    def __post_init__(self):
        for name in ("batch_size", "num_steps", "log_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name}={getattr(self, name)} must be >= 1")
        if self.max_seconds is not None and not self.max_seconds >= 0:
            raise ConfigError(f"TrainConfig.max_seconds={self.max_seconds} must be >= 0 seconds "
                              "(or None for no time limit)")
        if self.init_from is not None and not self.init_from.startswith(IF_PREFIX):
            raise ConfigError(f"TrainConfig.init_from={self.init_from!r}: expected "
                              f"'{IF_PREFIX}PATH' (a diffusers DeepFloyd IF U-Net) or None")


def imported_if_params(init_from: str, stage: Stage, shardings: Any) -> Any:
    """The float32 parameters of ``TrainConfig.init_from = "if:PATH"``, each tensor read
    straight into its shard (`load_if_unet`; ``shardings``: the state's params shardings).

    Raises ConfigError (one line) unless ``stage.model`` is an `IFUNet` whose config equals the
    directory's config.json, CheckpointError for a missing directory or bad tensors.
    """
    path = if_unet_dir(init_from)
    if not isinstance(stage.model, IFUNet):
        raise ConfigError(f"TrainConfig.init_from={init_from!r} imports an IF U-Net, but "
                          f"Stage.model is a {type(stage.model).__name__}; bind "
                          "Stage.model = @IFUNet() (gin_configs/if/)")
    source = DiffusersUNetDir(path)
    ours, theirs = dataclasses.asdict(stage.model.config), dataclasses.asdict(source.config)
    differ = [k for k in ours if _as_tuples(ours[k]) != _as_tuples(theirs[k])]
    if differ:
        k = differ[0]
        raise ConfigError(f"TrainConfig.init_from={init_from!r}: IFUNetConfig.{k}={ours[k]!r} "
                          f"in gin, {theirs[k]!r} in its config.json ({len(differ)} fields "
                          "differ); bind the directory's config in gin")
    return load_if_unet(source, shardings=shardings)[1]


def _as_tuples(x: Any) -> Any:
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def null_embeds_for(stage: Stage, data_iter: Any, text_encoder: Any | None,
                    encode_fn: EncodeFn | None) -> np.ndarray | None:
    """The encoded empty prompt float32 [L, D] a discrete stage's dropped texts become (None for
    a continuous stage, whose null condition is zeros).

    With a text encoder it is ``encode_fn`` of the encoder's tokens of ``""``, the same path as
    the training texts; with precomputed embeddings the data iterator provides it as its
    ``null_embeds`` attribute (the data layer owns the text encoding; DESIGN.md). Raises
    ConfigError when neither can, or for a shape other than the stage's [L, D].
    """
    if not stage.is_discrete:
        return None
    if text_encoder is not None and encode_fn is not None:
        ids, mask = text_encoder.tokenize([""])
        null = np.asarray(jax.device_get(encode_fn(np.asarray(ids), np.asarray(mask))))[0]
    else:
        null = getattr(data_iter, "null_embeds", None)
    if null is None:
        raise ConfigError(
            f"discrete stage {stage.name!r} trains its unconditional branch on the encoded empty "
            "prompt: pass train.text_encoder (on-the-fly encoding) or a data_fn whose iterator "
            "has null_embeds (the embedding of '' as its data was encoded)")
    null = np.asarray(null, np.float32)
    if null.shape != (stage.text_length, stage.text_embed_dim):
        raise ConfigError(f"the encoded empty prompt has shape {null.shape}; the stage reads "
                          f"[{stage.text_length}, {stage.text_embed_dim}] text embeddings")
    return null


@gin.configurable
def pipeline_data(
    *,
    batch_size: int,
    process_index: int,
    process_count: int,
    stage: Stage,
    tokenizer: Any | None = None,
    text_fingerprint: str | None = None,
    text_max_length: int | None = None,
) -> Iterator[Mapping[str, np.ndarray]]:
    """`train.data_fn` for the tfds/grain pipeline (`imagen_jax.data.pipeline.make_iterator`).

    The trainer fixes the per-host batch size, the host and the stage. The image geometry comes
    from the stage record alone: images of `stage.train_resolution` (random crops of
    `stage.resolution` images for a crop-trained SR stage) and, for SR stages, their copies at
    `stage.train_lowres_resolution`. Everything else (source, crop kind, resizing, text mode)
    comes from gin. Raises ConfigError when gin also binds the geometry.
    """
    for name in ("resolution", "lowres_resolution", "source_resolution"):
        try:
            gin.query_parameter(f"StageSpec.{name}")
        except ValueError:
            continue
        raise ConfigError(
            f"StageSpec.{name} is bound in gin, but the pipeline takes it from the Stage record "
            "(Stage.resolution / lowres_resolution / train_crop); remove the binding")
    loader = dataclasses.replace(
        pipeline.LoaderSpec(),
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    spec = dataclasses.replace(
        pipeline.StageSpec(),
        resolution=stage.train_resolution,
        lowres_resolution=stage.train_lowres_resolution,
        source_resolution=stage.resolution if stage.train_crop else None,
    )
    # SourceSpec and TextSpec are gin-configured dataclasses (in the stage's gin file); built
    # here so a config needs no `make_iterator.*` plumbing bindings.
    return pipeline.make_iterator(
        source=pipeline.SourceSpec(),
        stage=spec,
        loader=loader,
        text=pipeline.TextSpec(),
        tokenizer=tokenizer,
        text_fingerprint=text_fingerprint,
        text_max_length=text_max_length,
    )


class _Preemption:
    """Turns SIGTERM into a flag the loop polls, so it can save before exiting."""

    def __init__(self):
        self.requested = False
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. some notebook runners): no handler
            self._previous = None

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            # All hosts must agree on the step to stop at, or the collective save deadlocks.

            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # preemption service unavailable: fall back to the local flag
                pass
        return self.requested

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class _Deadline:
    """`TrainConfig.max_seconds` as a flag the loop polls (see there)."""

    def __init__(self, max_seconds: float | None, every: int):
        self.start, self.max_seconds, self.every = time.perf_counter(), max_seconds, every

    def reached(self, step: int) -> bool:
        if self.max_seconds is None:
            return False
        over = time.perf_counter() - self.start >= self.max_seconds
        if jax.process_count() > 1:
            # Clocks differ between hosts: process 0's verdict, at steps every host checks.
            if step % self.every:
                return False
            return bool(multihost_utils.broadcast_one_to_all(np.int32(over)))
        return over


def check_batch_divides_mesh(batch_size: int, num_micro: int, mesh: Mesh) -> None:
    data_shards = math.prod(
        mesh.shape[a] for a in partitioning.BATCH_AXES if a in mesh.axis_names
    )
    if batch_size % (num_micro * data_shards) or batch_size % jax.process_count():
        raise ConfigError(
            f"global batch {batch_size} does not divide into {num_micro} micro-batches x "
            f"{data_shards} data shards (mesh {dict(mesh.shape)}) over {jax.process_count()} "
            "processes; change TrainConfig.batch_size, StepConfig.num_micro_batches or the mesh"
        )


def check_batch(batch: Mapping[str, np.ndarray], stage: Stage, local_batch: int,
                encode: bool) -> None:
    """Raises `ConfigError` if the data pipeline's batch does not fit the stage.

    A stage with `train_crop` accepts full-size images (cropped in the train step) or crops
    already taken by the pipeline.
    """
    image_shape = tuple(np.shape(batch.get("image", ())))
    res = stage.resolution
    if stage.train_crop and image_shape[1:2] == (stage.train_crop,):
        res = stage.train_crop
    expected = {"image": (local_batch, res, res, 3), "text_mask": (local_batch, stage.text_length)}
    if stage.is_super_res:
        low = res // stage.upscale
        expected["lowres"] = (local_batch, low, low, 3)
    if encode:
        expected["text_ids"] = (local_batch, stage.text_length)
    else:
        expected["text_embeds"] = (local_batch, stage.text_length, stage.text_embed_dim)
    for key, shape in expected.items():
        if key not in batch:
            hint = (" (on-the-fly text needs TextSpec.mode='tokens')" if key == "text_ids" else
                    " (pass train.text_encoder for token batches)" if key == "text_embeds" else "")
            raise ConfigError(f"data batch lacks {key!r} (has {sorted(batch)}){hint}")
        if tuple(np.shape(batch[key])) != shape:
            raise ConfigError(
                f"data batch {key!r} has shape {tuple(np.shape(batch[key]))}, the stage expects "
                f"{shape} (per-host batch {local_batch}); align the data gin config (resolution, "
                "text length, batch size) with the Stage"
            )


def global_batch_specs(host_batch: Mapping[str, np.ndarray], stage: Stage,
                       global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Global shapes of the arrays the train step consumes, from one (checked) host batch."""
    specs = {}
    for key in ("image", "lowres", "text_mask"):
        if key in host_batch:
            v = host_batch[key]
            dtype = jnp.bool_ if key == "text_mask" else jnp.float32
            specs[key] = jax.ShapeDtypeStruct((global_batch,) + tuple(np.shape(v)[1:]), dtype)
    specs["text_embeds"] = jax.ShapeDtypeStruct(
        (global_batch, stage.text_length, stage.text_embed_dim), jnp.float32)
    return specs


def _to_global(batch: Mapping[str, np.ndarray], shardings: Mapping[str, Any],
               global_batch: int) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global jax arrays sharded over the data axes."""
    return {
        k: jax.make_array_from_process_local_data(
            shardings[k], np.asarray(v), (global_batch,) + tuple(np.shape(v)[1:])
        )
        for k, v in batch.items()
    }


@gin.configurable(denylist=["workdir", "mesh"])
def train(
    workdir: str,
    stage: Stage = gin.REQUIRED,
    data_fn: DataFn = gin.REQUIRED,
    config: TrainConfig | None = None,
    step_config: StepConfig | None = None,
    checkpoint_config: CheckpointConfig | None = None,
    text_encoder: Any | None = None,
    encode_fn: EncodeFn | None = None,
    mesh: Mesh | None = None,
    step_callback: Callable[[int, TrainState, dict[str, Any]], None] | None = None,
) -> TrainState:
    """Trains `stage` in `workdir` (resuming from its latest checkpoint); returns the final state.

    Args:
      data_fn: `data_fn(batch_size=, process_index=, process_count=, stage=[, tokenizer=])` ->
        iterator of host-local batches (DESIGN.md batch dicts) for `stage`; its iterator state
        is checkpointed.
      text_encoder: for token batches: tokenizes in the pipeline and encodes in the trainer
        (`imagen_jax.data.embed_cache.masked_encode_fn`); or pass `encode_fn(ids, mask)`.
      mesh: defaults to gin's `make_mesh()`.
      step_callback: called after every step with (step, state, metrics) (tests, profiling).
    """
    config = config or TrainConfig()
    deadline = _Deadline(config.max_seconds, config.log_every)
    step_config = step_config or StepConfig()
    checkpoint_config = checkpoint_config or CheckpointConfig()
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)

    # ---- Mesh, rules, optimizer: everything checked before any compute.
    try:
        mesh = mesh if mesh is not None else partitioning.make_mesh()
        rules = partitioning.logical_axis_rules()
    except ValueError as e:
        raise ConfigError(str(e)) from e
    check_batch_divides_mesh(config.batch_size, step_config.num_micro_batches, mesh)
    check_trainable(stage)
    lr_schedule = learning_rate_schedule()
    tx = make_optimizer(lr_schedule)
    if text_encoder is not None and encode_fn is None:
        # IF stages read T5's outputs at padded positions (its pipelines do not zero them), so
        # they are fine-tuned on what they are sampled with (`cascade.check_text_encoder`).
        if stage.is_discrete and getattr(text_encoder, "zero_padding", True):
            raise ConfigError(
                f"stage {stage.name or 'discrete'!r} (DeepFloyd IF) reads T5 outputs at padded "
                "positions but train.text_encoder zeroes them; bind load_t5.zero_padding = False "
                "(gin_configs/if/common.gin does)")
        encode_fn = masked_encode_fn(text_encoder)
        if stage.text_fingerprint and text_encoder.fingerprint != stage.text_fingerprint:
            raise ConfigError(
                f"text encoder fingerprint {text_encoder.fingerprint!r} differs from "
                f"Stage.text_fingerprint {stage.text_fingerprint!r}; load the encoder the stage "
                "is trained with"
            )

    # ---- Data (host-local batches).
    local_batch = config.batch_size // jax.process_count()
    data_kwargs = dict(batch_size=local_batch, process_index=jax.process_index(),
                       process_count=jax.process_count(), stage=stage)
    if text_encoder is not None:
        data_kwargs["tokenizer"] = text_encoder
    data_iter = data_fn(**data_kwargs)

    # ---- State: restore the latest complete checkpoint or initialise directly into shards.
    # (Opening the Checkpointer sets incomplete steps aside with a warning naming each; restore
    # falls back past a step whose files cannot be read.)
    abstract_state, state_shardings = abstract_train_state(stage.model, tx, stage, mesh, rules)
    ckpt = Checkpointer(workdir, checkpoint_config)
    if ckpt.latest_step() is not None:
        state = ckpt.restore(abstract_state, data_iter)
        log.info("resuming from %s step %d", ckpt.directory, ckpt.restored_step)
    else:
        imported = None
        if config.init_from is not None:
            imported = imported_if_params(config.init_from, stage, state_shardings.params)
            log.info("parameters and EMA start from %s", config.init_from)
        state, _ = init_train_state(stage.model, tx, stage, config.seed, mesh, rules, imported)
    start_step = int(jax.device_get(state.step))
    num_params = count_params(abstract_state.params)
    log.info("stage with %.1fM parameters, start step %d", num_params / 1e6, start_step)

    # ---- Compile the step (explicit shardings, donated state) for the data's shapes.
    first_batch = next(data_iter)
    check_batch(first_batch, stage, local_batch, encode=encode_fn is not None)
    batch_specs = global_batch_specs(first_batch, stage, config.batch_size)
    null_embeds = null_embeds_for(stage, data_iter, text_encoder, encode_fn)
    if null_embeds is not None:  # one replicated array of every step's batch
        batch_specs["null_embeds"] = jax.ShapeDtypeStruct(null_embeds.shape, jnp.float32)
    shardings = batch_shardings(batch_specs, mesh)
    if null_embeds is not None:
        null_embeds = jax.device_put(null_embeds, shardings["null_embeds"])
    ids_sharding = partitioning.batch_sharding(mesh, 2)
    step_fn = make_train_step(stage, tx, lr_schedule, step_config, mesh, rules)
    with partitioning.mesh_context(mesh):
        train_step = jit_train_step(step_fn, state_shardings, shardings, mesh).lower(
            abstract_state, batch_specs).compile()
    # cost_analysis describes one device's SPMD program.
    flops_per_step = metrics_lib.compiled_flops(train_step)
    if flops_per_step is not None:
        flops_per_step *= mesh.size

    # ---- Outputs.
    writer = metrics_lib.MetricWriter(workdir)
    sampler = _SampleGrid(stage, config, mesh, null_embeds) if config.sample_every else None
    if is_main:
        with open(os.path.join(workdir, "config.gin"), "w") as f:
            f.write(gin_utils.operative_config())
    preemption = _Preemption()
    progress = _progress_bar(config, start_step, is_main)

    # The record every checkpoint stores (the cascade loads it without gin), with the encoder
    # the stage was actually trained with.
    fingerprint = (stage.text_fingerprint or getattr(text_encoder, "fingerprint", None)
                   or getattr(data_iter, "text_fingerprint", None))
    try:
        stage_record = stage.replace(text_fingerprint=fingerprint).to_dict()
    except ConfigError as e:  # a custom model whose fields JSON cannot hold: train anyway
        log.warning("checkpoints get no stage record, so the cascade cannot load them: %s", e)
        stage_record = None

    def meta():
        return {"operative_config": gin_utils.operative_config(), "stage": stage_record,
                "param_shapes": param_shapes(abstract_state.params),
                "process_count": jax.process_count(), "num_params": num_params}

    # ---- Loop.
    pending: dict[str, jax.Array] | None = None  # previous step's metrics (read one step late)
    window_start, window_steps = time.perf_counter(), 0
    step = start_step
    try:
        while step < config.num_steps:
            host_batch = first_batch if step == start_step else next(data_iter)
            if encode_fn is not None:
                ids = _to_global({"text_ids": host_batch["text_ids"],
                                  "text_mask": host_batch["text_mask"]},
                                 {"text_ids": ids_sharding, "text_mask": ids_sharding},
                                 config.batch_size)
                embeds = encode_fn(ids["text_ids"], ids["text_mask"])
            host_batch = {k: v for k, v in host_batch.items() if k in batch_specs}
            batch = _to_global(host_batch, shardings, config.batch_size)
            if null_embeds is not None:
                batch["null_embeds"] = null_embeds
            if encode_fn is not None:
                batch["text_embeds"] = jax.device_put(
                    jnp.asarray(embeds, jnp.float32), shardings["text_embeds"])
            if sampler is not None and sampler.batch is None:
                sampler.set_batch(batch)

            with partitioning.mesh_context(mesh):
                state, step_metrics = train_step(state, batch)
            step += 1
            window_steps += 1
            # The guard reads the previous step's counter so the host never waits on the
            # device step it just dispatched.
            if pending is not None:
                _check_bad_steps(pending, config.max_bad_steps, step - 1, ckpt)
            pending = step_metrics
            if step_callback is not None:
                step_callback(step, state, step_metrics)

            if step % config.log_every == 0 or step == config.num_steps:
                host = jax.device_get(step_metrics)
                elapsed = time.perf_counter() - window_start
                scalars = metrics_lib.flatten_metrics(host, step_config.logsnr_bucket_edges)
                scalars["step_time_s"] = elapsed / window_steps
                scalars["examples_per_s"] = config.batch_size * window_steps / elapsed
                if flops_per_step is not None:
                    scalars["flops_per_s"] = flops_per_step * window_steps / elapsed
                    if config.peak_flops_per_device:
                        scalars["mfu"] = scalars["flops_per_s"] / (
                            config.peak_flops_per_device * mesh.size)
                writer.write_scalars(step, scalars)
                progress.set_postfix(loss=f"{scalars['loss']:.4f}", refresh=False)
                window_start, window_steps = time.perf_counter(), 0
            if sampler is not None and step % config.sample_every == 0:
                sampler.write(step, state.ema_params, writer, workdir)
            progress.update(1)

            ckpt.save(step, state, data_iter, meta())
            if preemption.reached(step):
                log.warning("SIGTERM: saving step %d and exiting", step)
                if ckpt.latest_step() != step:
                    ckpt.save(step, state, data_iter, meta(), force=True)
                break
            if step < config.num_steps and deadline.reached(step):
                log.warning("TrainConfig.max_seconds=%s spent: stopping at step %d of %d",
                            config.max_seconds, step, config.num_steps)
                break
        if pending is not None:
            _check_bad_steps(pending, config.max_bad_steps, step, ckpt)
        if not preemption.requested and step > start_step and ckpt.latest_step() != step:
            ckpt.save(step, state, data_iter, meta(), force=True)
    finally:
        ckpt.close()
        writer.close()
        progress.close()
        preemption.close()
    return state


def _check_bad_steps(step_metrics: Mapping[str, jax.Array], max_bad: int, step: int,
                     ckpt: Checkpointer) -> None:
    bad = int(jax.device_get(step_metrics["bad_steps"]))
    if bad >= max_bad:
        ckpt.wait()
        raise TrainingError(
            f"{bad} consecutive steps up to step {step} had a non-finite loss or gradient "
            f"(limit TrainConfig.max_bad_steps={max_bad}); no update was applied for them and the "
            f"last checkpoint (step {ckpt.latest_step()}) is intact. Check the data (NaN/Inf "
            "pixels or embeddings), lower the learning rate, or use float32."
        )


def _progress_bar(config: TrainConfig, start: int, enabled: bool) -> Any:

    return tqdm(total=config.num_steps, initial=start, disable=not (enabled and
                config.progress_bar), dynamic_ncols=True, desc="train")


class _SampleGrid:
    """Periodic sample grids from the EMA params on fixed examples (the first data batch)."""

    def __init__(self, stage: Stage, config: TrainConfig, mesh: Mesh,
                 null_embeds: jax.Array | None = None):
        # Sampled at the stage's own settings except for the step count (a cheap preview).
        self.stage = stage.replace(name="train").with_sampling(num_steps=config.sample_steps)
        self.num_samples, self.mesh, self.null_embeds = config.num_samples, mesh, null_embeds
        self.batch: dict[str, np.ndarray] | None = None
        self._fn = None

    def set_batch(self, batch: Mapping[str, jax.Array]) -> None:

        keys = ("text_embeds", "text_mask", "lowres")
        gathered = multihost_utils.process_allgather({k: batch[k] for k in keys if k in batch},
                                                     tiled=True)
        self.batch = {k: np.asarray(v)[: self.num_samples] for k, v in gathered.items()}
        low = self.batch.get("lowres")
        if low is not None and low.shape[1] != self.stage.lowres_resolution:
            # Crop-trained SR stage: preview at the training crop size (fully convolutional).
            self.stage = self.stage.replace(lowres_resolution=low.shape[1],
                                            resolution=low.shape[1] * self.stage.upscale,
                                            train_crop=None)

    def write(self, step: int, ema_params: Any, writer: metrics_lib.MetricWriter,
              workdir: str) -> None:
        if self._fn is None:
            self._fn = jax.jit(lambda params, embeds, mask, lowres, null: sample_stage(
                self.stage, params, embeds, mask, jax.random.PRNGKey(0), lowres=lowres,
                null_embeds=null))
        b = self.batch
        with partitioning.mesh_context(self.mesh):
            images = self._fn(ema_params, b["text_embeds"], b["text_mask"], b.get("lowres"),
                              self.null_embeds)
        grid = metrics_lib.image_grid(np.asarray(jax.device_get(images)))
        writer.write_image(step, "samples", grid)
        if jax.process_index() == 0:

            os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
            Image.fromarray(grid).save(os.path.join(workdir, "samples", f"{step:08d}.png"))
