"""Loading trained stages (the trainer's orbax checkpoints and their stage records) and
DeepFloyd IF's published U-Nets (diffusers ``unet/`` directories) onto any mesh, and the
per-stage sampler overrides bound in gin."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from imagen_jax import partitioning
from imagen_jax.cascade.export import is_exported_stage, load_exported_stage
from imagen_jax.cascade.params import sharded_abstract_params
from imagen_jax.cascade.program import check_chain
from imagen_jax.cascade.runtime import Cascade
from imagen_jax.diffusion import (
    DISCRETE_SCHEDULE,
    IF_STAGE_I_SAMPLING,
    IF_STAGE_II_SAMPLING,
    SamplingConfig,
    check_sampling_settings,
)
from imagen_jax.errors import CascadeError, CheckpointError, ConfigError
from imagen_jax.nn import IFUNet, IFUNetConfig, load_if_unet
from imagen_jax.nn.if_config import IF_PREFIX, IF_UNET_DIR, if_unet_dir
from imagen_jax.nn.if_weights import DiffusersUNetDir
from imagen_jax.stage import Stage
from imagen_jax.text import load_t5
from imagen_jax.train.checkpoint import Checkpointer

log = logging.getLogger(__name__)

PyTree = Any


# What a user may override per stage at sampling time: the fields of the stage's SamplingConfig.
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingConfig))
IF_TEXT_LENGTH = 77  # IF's prompts: 77 T5-XXL tokens (its pipelines' max_length)
IF_UPSCALE = 4  # IF-II's default low resolution: its sample_size / 4 (64 -> 256)
IF_DTYPES = ("float32", "bfloat16")


def gin_sampling_overrides(num_stages: int) -> list[dict[str, Any]]:
    """The sampler settings bound in gin, per stage: ``SamplingConfig.<field>`` applies to every
    stage, ``stage<i>/SamplingConfig.<field>`` to stage i only (and wins). Unbound fields keep
    the value the stage was trained with (its checkpoint's record).

    Raises ConfigError (one line, naming the stage and the setting) for an invalid value, and
    for a binding in a scope other than ``stage0`` ... ``stage<num_stages-1>`` (it would be
    silently ignored).
    """
    valid = {f"stage{i}" for i in range(num_stages)}
    for scope in sorted(set(re.findall(r"^([\w./-]+)/SamplingConfig\.", gin.config_str(), re.M))):
        if scope not in valid:
            raise ConfigError(
                f"SamplingConfig bound in scope {scope!r}, which names no stage of this "
                f"{num_stages}-stage cascade; use stage0/ ... stage{num_stages - 1}/, or no scope "
                "for every stage")
    out = []
    for i in range(num_stages):
        values = {}
        for field in SAMPLING_FIELDS:
            for key in (f"SamplingConfig.{field}", f"stage{i}/SamplingConfig.{field}"):
                try:
                    values[field] = gin.query_parameter(key)
                except ValueError:  # not bound
                    continue
        out.append(check_sampling_settings(values, where=f"stage {i}: SamplingConfig."))
    return out


def load_stage(
    workdir: str,
    *,
    mesh: Mesh,
    rules: partitioning.LogicalRules,
    step: int | None = None,
    name: str | None = None,
) -> tuple[Stage, PyTree]:
    """(Stage, EMA params sharded on ``mesh``) from a trainer workdir.

    The stage comes from the record the trainer stores with every checkpoint (`Stage.to_dict`;
    no gin involved), named after the directory unless ``name`` is given. The EMA parameters are
    restored straight into their shards (orbax), whatever mesh trained them.

    Raises CascadeError (missing directory, no complete checkpoint, unreadable parameters) or
    CheckpointError (a checkpoint without a stage record, or one of another format).
    """
    if not os.path.isdir(workdir):
        raise CascadeError(
            f"stage directory {workdir!r} does not exist; pass the trainer's --workdir of each "
            "stage, base first"
        )
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        # The newest COMPLETE step (incomplete ones are skipped with a warning); without an
        # explicit step, restore_params falls back past one whose arrays cannot be read.
        requested, step = step, ckpt.latest_step() if step is None else step
        if step is None:
            raise CascadeError(
                f"stage directory {workdir!r} holds no complete checkpoint; train it first "
                "(python -m launch.train --workdir=...)"
            )
        meta = ckpt.read_meta(step)
        where = f"checkpoint {step} of {workdir!r}"
        if meta.get("stage") is None:
            raise CheckpointError(
                f"{where} holds no stage record (written by imagen-jax before 2026-12-01, which "
                "kept only the gin config); retrain the stage with this version")
        stage = Stage.from_dict(meta["stage"], where=where).replace(
            name=name or os.path.basename(os.path.normpath(workdir)))
        try:
            params = ckpt.restore_params(sharded_abstract_params(stage, mesh, rules), requested)
        except ValueError as e:
            raise CascadeError(f"stage {workdir!r}: {e}") from e
    finally:
        ckpt.close()
    return stage, params


def if_stage_name(unet_dir: str) -> str:
    """The directory's name; the model's (IF-I-XL-v1.0) for a ``unet/`` one."""
    head, tail = os.path.split(os.path.abspath(unet_dir))
    return os.path.basename(head) if tail == IF_UNET_DIR else tail


def if_stage(config: IFUNetConfig, *, lowres_resolution: int | None = None, name: str = "",
             dtype: str = "float32") -> Stage:
    """The discrete `Stage` of an IF U-Net config (no weights involved): stage I (no noise-level
    embedding) a base stage at ``sample_size`` sampled with `IF_STAGE_I_SAMPLING`; stage II an
    SR stage from ``lowres_resolution`` (default ``sample_size / IF_UPSCALE``) with
    `IF_STAGE_II_SAMPLING`; both reading ``IF_TEXT_LENGTH`` x ``text_dim`` T5 embeddings; the
    U-Net in ``dtype`` (storage and compute; ConfigError unless one of `IF_DTYPES`)."""
    if dtype not in IF_DTYPES:
        raise ConfigError(f"load_if_stage.dtype={dtype!r}; use one of {IF_DTYPES}")
    super_res = config.noise_level_embed
    return Stage(
        model=IFUNet(config, dtype=dtype, param_dtype=dtype),
        resolution=config.sample_size,
        lowres_resolution=(lowres_resolution or config.sample_size // IF_UPSCALE) if super_res
        else None,
        text_length=IF_TEXT_LENGTH,
        text_embed_dim=config.text_dim,
        schedule=DISCRETE_SCHEDULE,
        sampling=SamplingConfig(**(IF_STAGE_II_SAMPLING if super_res else IF_STAGE_I_SAMPLING)),
        name=name,
    )


@gin.configurable(denylist=["path", "mesh", "rules", "lowres_resolution", "name"])
def load_if_stage(path: str, *, mesh: Mesh, rules: partitioning.LogicalRules,
                  lowres_resolution: int | None = None,
                  name: str | None = None, dtype: str = "float32") -> tuple[Stage, PyTree]:
    """(discrete Stage, params sharded on ``mesh``) of a DeepFloyd IF U-Net.

    ``path`` is a diffusers ``unet/`` directory (config.json + safetensors) or the model
    directory holding one; the stage is `if_stage` of its config, named after the directory.
    Both stages read ``IF_TEXT_LENGTH`` tokens of ``config.text_dim``-wide T5 embeddings with
    padded positions kept (T5 v1.1 XXL: pass it with ``--t5``; `load_cascade` loads it so) and
    carry no text fingerprint (the cascade checks the encoder's shape instead:
    `check_text_encoder`).
    Each tensor goes straight into its shard (`load_if_unet`), cast to ``dtype`` ("float32" or
    "bfloat16", the U-Net's storage and compute dtype; gin: ``load_if_stage.dtype``): bfloat16
    halves the memory (IF-I-XL: about 8.6 GB instead of 17).

    Raises ConfigError for a config this port does not implement or an unknown ``dtype``,
    CheckpointError for missing, unknown or mis-shaped tensors (each named).
    """
    path = if_unet_dir(path)
    source = DiffusersUNetDir(path)
    stage = if_stage(source.config, lowres_resolution=lowres_resolution,
                     name=if_stage_name(path) if name is None else name, dtype=dtype)
    abstract = sharded_abstract_params(stage, mesh, rules)
    _, params = load_if_unet(source, param_dtype=jnp.dtype(dtype),
                             shardings=jax.tree.map(lambda x: x.sharding, abstract))
    return stage, params


def _load_any_stage(entry: str, previous: Stage | None, mesh: Mesh,
                    rules: partitioning.LogicalRules) -> tuple[Stage, PyTree]:
    """A `load_cascade` entry: ``if:PATH`` (`load_if_stage`, chained to ``previous``), an
    exported stage (`load_exported_stage`) or a trainer workdir (`load_stage`)."""
    if entry.startswith(IF_PREFIX):
        low = previous.resolution if previous is not None else None
        return load_if_stage(entry[len(IF_PREFIX):], mesh=mesh, rules=rules,
                             lowres_resolution=low)
    if is_exported_stage(entry):
        return load_exported_stage(entry, mesh=mesh, rules=rules)
    return load_stage(entry, mesh=mesh, rules=rules)


def load_cascade(
    stage_dirs: Sequence[str],
    t5: str | None = None,
    *,
    mesh: Mesh | None = None,
    rules: partitioning.LogicalRules | None = None,
    overrides: Sequence[dict[str, Any]] | None = None,
    max_batch: int | None = None,
    t5_dtype: str | None = None,
) -> Cascade:
    """A ``Cascade`` from trainer workdirs or exported stages (base first) and a T5 directory.

    An entry ``if:PATH`` is a DeepFloyd IF U-Net (`load_if_stage`): ``if:IF_I,if:IF_II`` is IF's
    cascade, and a trained SR stage of ours may follow it.

    ``overrides[i]`` changes stage i's saved sampler settings (``SamplingConfig`` field names;
    see ``gin_sampling_overrides``). ``t5_dtype`` None: the gin binding ``load_t5.dtype``
    (default float32); ``load_t5.vocab`` likewise names a vocabulary kept apart from the weights
    (IF's: ``IF-I-XL-v1.0/tokenizer/spiece.model``).
    Refuses stages whose resolutions do not chain or that were trained with another encoder.
    """
    if not stage_dirs:
        raise CascadeError("no stage directories given; pass --stages=DIR1[,DIR2,...]")
    missing = [d for d in stage_dirs if not os.path.isdir(d.removeprefix(IF_PREFIX))]
    if missing:
        raise CascadeError(
            f"stage directory {missing[0]!r} does not exist; pass the trainer's --workdir of "
            "each stage, base first"
        )
    mesh = mesh if mesh is not None else partitioning.make_mesh()
    rules = tuple(rules if rules is not None else partitioning.logical_axis_rules())
    loaded: list[tuple[Stage, PyTree]] = []
    for entry in stage_dirs:
        loaded.append(_load_any_stage(entry, loaded[-1][0] if loaded else None, mesh, rules))
    stages = [s for s, _ in loaded]
    for i, over in enumerate(overrides or ()):
        if not stages[i].is_super_res and over.get("aug_level"):
            # An unscoped `SamplingConfig.aug_level` is meant for the SR stages; a base stage
            # has no low-res input (the Stage refuses a level it would ignore).
            log.info("%s is a base stage: aug_level=%g applies to super-resolution stages "
                         "only", stages[i].name or f"stage {i}", over["aug_level"])
            over = {k: v for k, v in over.items() if k != "aug_level"}
        if over:
            stages[i] = stages[i].with_sampling(**over)
    check_chain(stages)  # before loading T5: cheap, clear errors first
    encoder = None
    if t5 is not None:
        if not os.path.isdir(t5):
            raise CascadeError(f"T5 directory {t5!r} does not exist; pass --t5=PATH")
        length = stages[0].text_length or 128
        # DeepFloyd IF's U-Nets read T5's outputs at padded positions too; ours zeroed ones
        # (a mixed cascade zeroes them for our stages in the program).
        keep = any(s.is_discrete for s in stages)
        dtype = {} if t5_dtype is None else {"dtype": t5_dtype}
        encoder = load_t5(t5, max_length=length, mesh=mesh, zero_padding=not keep, **dtype)
    return Cascade(
        stages, [p for _, p in loaded], text_encoder=encoder, mesh=mesh, rules=rules,
        max_batch=max_batch,
    )
