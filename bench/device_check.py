"""One prepared accelerator check (issue 16): paper-size training MFU, cascade latency and
memory, T5-XXL encode speed, in one short run that writes one JSON and one Markdown table.

    python -m bench.device_check --out_dir=DIR          # on an accelerator, < 8 min wall
    python -m bench.device_check --dry_run              # tiny presets on CPU, ~2 min (2 cores)

Writes DIR/device_check.json (everything), DIR/device_check.md (the tables) and
DIR/device_check.log (all output). `--parts`, `--grid`, `--caps` and `--budget_s` narrow a
second run to what a first one did not reach.

Parts (each in its own child process, so each has its own peak-memory figure and a hard time
cap; the JSON and the table are rewritten after every part, so a run cut short still returns
what it measured):

  base64, sr256, sr1024  the paper stages' jitted train step (`imagen_jax.train.step`: Adafactor
                         or Adam + EMA + NaN guard) in bf16 compute with float32 master weights,
                         at the largest per-device batch that fits (compiled memory analysis vs
                         the device's free memory), for each point of the grid remat off / on x
                         attention `cudnn` / `xla`: images/s per device, model FLOPs per step
                         (XLA cost analysis of the no-remat, XLA-attention step lowered for the
                         CPU: `model_flops_per_step`), MFU against the chip's dense bf16 peak
                         (`PEAK_BF16_FLOPS`), HFU from the compiled program's own count.
  t5                     T5-XXL-shaped random encoder (`imagen_jax.text.TextEncoder`) in bf16:
                         tokens/s.
  cascade                the paper cascade 64 -> 256 -> 1024 (`imagen_jax.cascade.Cascade`,
                         random weights, the gin stages' guidance and dynamic thresholding) with
                         the T5-XXL-shaped encoder inside the program, sampling 1 and 8 images:
                         seconds per image at DPM-Solver++ 25/25/25 and at ancestral 256/128/64
                         (scaled down, and said so, when the time left is too short), compile
                         time apart.

Set-up on a bare machine (the check needs `pip install -e .[data]` plus the accelerator build of
jaxlib; setup.py's jax is 0.10.2, for which the registry offers the extras cuda12, cuda13, tpu):

    pip install -e ".[data]" "jax[cuda13]==0.10.2"    # H100 / H200 (driver >= 580; "jax[cuda12]"
                                                      # on older drivers; "jax[tpu]" on TPU VMs)

On this workplace's lent `nvidia-h200` (no registry there; its image already has jax 0.11.2 with
jax-cuda13-plugin, flax, optax, absl, sentencepiece; gin-config is the one package missing, and
grain / tensorflow-datasets, which the check does not need, are missing too): download the
gin-config wheel here once, into a git-excluded folder `.whl`,

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 -d .whl gin-config==0.5.0

and pass the device tool `carry=[".whl"]` with the command

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 \
        && python3 -m bench.device_check --out_dir=$OUT

The check prints (and stores in the JSON) the device kind and count, the driver (nvidia-smi), the
jax / jaxlib / plugin versions and the XLA flags it ran with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from absl import app, flags

from launch import shared_flags as sf

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("base64", "sr256", "sr1024", "t5", "cascade")
TRAIN_PARTS = ("base64", "sr256", "sr1024")
GiB = 1024**3

FLAGS = flags.FLAGS
sf.DEFINE_bool("dry_run", False, "Tiny presets on whatever JAX sees (CPU): exercises every "
                  "code path in well under 2 minutes.")
sf.DEFINE_string("out_dir", os.path.join(REPO_ROOT, "bench", "device_check_out"),
                    "Where device_check.json, device_check.md and device_check.log go.")
sf.DEFINE_list("parts", list(PARTS), f"Parts to run, in this order; any of {PARTS}.")
sf.DEFINE_float("budget_s", None, "Total wall-clock budget in seconds (default: the "
                   "preset's, 470 s real / 170 s dry run).")
sf.DEFINE_list("caps", [], "Per-part time caps, e.g. base64=150,cascade=200 (seconds); the "
                  "time a part leaves unused goes to the parts after it, and the last part "
                  "gets whatever is left of --budget_s.")
sf.DEFINE_list("grid", [], "Train grid points remat:attention, e.g. off:cudnn,on:xla "
                  "(default: the preset's).")
sf.DEFINE_float("peak_flops", None, "Peak dense bf16 FLOP/s per device for MFU (default: "
                   "looked up from the device kind in PEAK_BF16_FLOPS).")
sf.DEFINE_integer("seed", 0, "Seed of the random weights and data.")
sf.DEFINE_string("worker_config", None, "Internal: run one part in this process from this "
                    "JSON config (the parent starts one child per part).")


# ------------------------------------------------------------------------------------------
# Chips: dense (no sparsity) bf16 peak per device.
# ------------------------------------------------------------------------------------------

# (substring of jax's device_kind, lower case; first match wins, so specific names come first,
#  peak FLOP/s, source). NVIDIA datasheets quote bf16 tensor-core rates "with sparsity"; the
#  dense rate is half of that.
PEAK_BF16_FLOPS: tuple[tuple[str, float, str], ...] = (
    ("h100 pcie", 756e12, "NVIDIA H100 datasheet: PCIe BF16 1,513 TFLOPS with sparsity"),
    ("h100", 989e12, "NVIDIA H100 datasheet: SXM BF16 1,979 TFLOPS with sparsity"),
    ("h200", 989e12, "NVIDIA H200 datasheet: SXM BF16 1,979 TFLOPS with sparsity"),
    ("a100", 312e12, "NVIDIA A100 datasheet: BF16 312 TFLOPS dense (624 with sparsity)"),
    ("tpu v4", 275e12, "Google Cloud TPU v4 docs: 275 TFLOPS bf16 peak per chip"),
    ("tpu v5 lite", 197e12, "Google Cloud TPU v5e docs: 197 TFLOPS bf16 peak per chip"),
    ("tpu v5e", 197e12, "Google Cloud TPU v5e docs: 197 TFLOPS bf16 peak per chip"),
    ("tpu v5p", 459e12, "Google Cloud TPU v5p docs: 459 TFLOPS bf16 peak per chip"),
    ("tpu v5", 459e12, "Google Cloud TPU v5p docs: 459 TFLOPS bf16 peak per chip"),
    ("tpu v6 lite", 918e12, "Google Cloud TPU v6e (Trillium) docs: 918 TFLOPS bf16 per chip"),
    ("tpu v6e", 918e12, "Google Cloud TPU v6e (Trillium) docs: 918 TFLOPS bf16 per chip"),
)


def peak_bf16_flops(device_kind: str) -> tuple[float | None, str]:
    """(dense bf16 peak FLOP/s, source) of one device of kind ``device_kind`` (jax's
    ``Device.device_kind``, e.g. 'NVIDIA H200', 'TPU v5 lite'); (None, reason) if unknown."""
    kind = device_kind.lower()
    for key, flops, source in PEAK_BF16_FLOPS:
        if key in kind:
            return flops, source
    return None, f"no peak known for device kind {device_kind!r}: pass --peak_flops"


# ------------------------------------------------------------------------------------------
# Presets.
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainPreset:
    """One train part: gin file (+ bindings), per-device batch candidates (descending), grid
    of (remat, attention implementation), timed steps."""

    gin_file: str
    bindings: tuple[str, ...] = ()
    batches: tuple[int, ...] = (32, 16)
    remat_batches: tuple[int, ...] | None = None  # with remat on (default: ``batches``)
    # Without a device memory limit (CPU), pretend the free memory is this fraction of what the
    # part's first compile needs, so the dry run takes the "does not fit" path too.
    simulated_memory_fraction: float | None = None
    grid: tuple[tuple[bool, str], ...] = ((False, "cudnn"), (False, "xla"), (True, "cudnn"),
                                          (True, "xla"))
    steps: int = 5


@dataclasses.dataclass(frozen=True)
class Preset:
    """Everything a run measures; ``REAL`` and ``DRY`` below."""

    name: str
    dtype: str
    train: dict[str, TrainPreset]
    caps: dict[str, float]
    budget_s: float
    t5_size: str
    t5_vocab: int
    t5_batches: tuple[int, ...]
    t5_length: int
    t5_iters: int
    cascade_gin: tuple[tuple[str, tuple[str, ...]], ...]
    cascade_batches: tuple[int, ...]
    cascade_settings: tuple[tuple[str, tuple[int, ...]], ...]
    text_length: int
    # Seconds one sampling run may take at most (None: only the time left bounds it).
    cascade_max_run_s: float | None = None
    peak_flops: float | None = None  # None: look the device kind up
    first_compile_guess_s: float = 60.0  # before anything was compiled in a part
    min_part_s: float = 20.0  # a part is not started with less time than this
    kill_grace_s: float = 15.0
    child_xla_flags: tuple[str, ...] = ()  # set in the children's XLA_FLAGS (replacing)


REAL = Preset(
    name="real",
    dtype="bfloat16",
    train={
        # Per-device batches. First guesses from the activations JAX saves for the backward
        # pass of a bf16 step (jax.vjp residuals, measured on the CPU): without remat 3.4 GB
        # per 64 px image for the 2 B base, 1.7 GB per 256 px image for sr256, 1.4 GB per 256
        # px crop for sr1024; with remat 0.15 GB per base image. On a ~130 GB pool, after the
        # float32 weights, EMA and optimizer state, that is ~29 / ~65 / ~80 images without
        # remat. Where a guess does not fit, the check moves to the batch the compiled memory
        # analysis predicts.
        "base64": TrainPreset("base64.gin", batches=(24, 16, 8), remat_batches=(128, 64, 32)),
        "sr256": TrainPreset("sr256.gin", batches=(48, 32, 16), remat_batches=(128, 64, 32)),
        "sr1024": TrainPreset("sr1024.gin", batches=(64, 48, 32),
                              remat_batches=(128, 64, 32)),
    },
    caps={"base64": 140, "sr256": 60, "sr1024": 50, "t5": 55, "cascade": 150},
    budget_s=455.0,
    t5_size="xxl",
    t5_vocab=32128,
    t5_batches=(128, 32),
    t5_length=128,
    t5_iters=5,
    cascade_gin=(("base64.gin", ()), ("sr256.gin", ()), ("sr1024.gin", ())),
    cascade_batches=(1, 8),
    cascade_settings=(("dpmpp_2m", (25, 25, 25)), ("ddpm", (256, 128, 64))),
    text_length=128,
)

# Tiny stages from the CPU gin files (one-level U-Nets at 8-32 px): the same code paths, and
# few enough parameters that XLA:CPU compiles each step in seconds.
_TINY_BASE = ("BaseUNet.channels = 16", "BaseUNet.channel_mult = [1]",
              "BaseUNet.num_groups = 4", "BaseUNet.head_dim = 8", "RESOLUTION = 8",
              "TRAIN_RESOLUTION = 8", "TEXT_LENGTH = 16")
_TINY_SR = ("EfficientUNet.blocks = [[8, 1], [8, 1]]", "EfficientUNet.stem_channels = 8",
            "EfficientUNet.num_heads = 2", "EfficientUNet.embed_dim = 16",
            "EfficientUNet.sinusoid_dim = 16", "EfficientUNet.num_groups = 4", "TEXT_LENGTH = 16")
DRY = Preset(
    name="dry_run",
    # float32: XLA:CPU compiles the bf16 step of even a tiny U-Net for minutes.
    dtype="float32",
    train={
        # remat=off attention=cudnn fails at trace time on a CPU (recorded as unavailable);
        # remat=on starts at 4 per device, which the simulated memory limit refuses.
        "base64": TrainPreset("tiny/base.gin", _TINY_BASE, batches=(4, 2, 1),
                              grid=((False, "cudnn"), (True, "xla")), steps=2,
                              simulated_memory_fraction=0.9),
        "sr256": TrainPreset("tiny/sr.gin", _TINY_SR + ("RESOLUTION = 16", "TRAIN_RESOLUTION = 16",
                                                        "LOWRES_RESOLUTION = 8"),
                             batches=(2,), grid=((False, "xla"),), steps=2),
        "sr1024": TrainPreset("tiny/sr_crop.gin", _TINY_SR + ("RESOLUTION = 32",
                                                              "TRAIN_RESOLUTION = 16",
                                                              "LOWRES_RESOLUTION = 16"),
                              batches=(2,), grid=((False, "xla"),), steps=2),
    },
    # Generous: on a shared 2-core machine one XLA:CPU compile of a train step can take a
    # minute of wall time; the time-cap paths are tested on their own.
    caps={"base64": 240, "sr256": 120, "sr1024": 120, "t5": 60, "cascade": 180},
    budget_s=720.0,
    t5_size="tiny",
    t5_vocab=512,
    t5_batches=(4,),
    t5_length=16,
    t5_iters=2,
    cascade_gin=(
        ("tiny/base.gin", _TINY_BASE),
        ("tiny/sr.gin", _TINY_SR + ("RESOLUTION = 16", "TRAIN_RESOLUTION = 16",
                                    "LOWRES_RESOLUTION = 8")),
        ("tiny/sr_crop.gin", _TINY_SR + ("RESOLUTION = 32", "TRAIN_RESOLUTION = 16",
                                         "LOWRES_RESOLUTION = 16")),
    ),
    cascade_batches=(2,),
    cascade_settings=(("dpmpp_2m", (2, 2, 2)), ("ddpm", (64, 32, 16))),
    text_length=16,
    cascade_max_run_s=0.2,  # forces the "fewer ancestral steps than asked" path
    peak_flops=1e11,  # nominal 100 GFLOP/s: exercises the MFU arithmetic, not a chip figure
    first_compile_guess_s=5.0,
    min_part_s=3.0,
    kill_grace_s=30.0,
    # Two simulated CPU devices (per-device arithmetic with more than one device; the test
    # suite's 8 would only slow the steps down); no LLVM optimisation, which halves XLA:CPU's
    # compile time and does not matter for steps this small.
    child_xla_flags=("--xla_force_host_platform_device_count=2",
                     "--xla_backend_optimization_level=0"),
)


def parse_grid(items: Sequence[str]) -> tuple[tuple[bool, str], ...]:
    """['off:cudnn', 'on:xla'] -> ((False, 'cudnn'), (True, 'xla'))."""
    grid = []
    for item in items:
        remat, sep, attn = item.partition(":")
        if not sep or remat not in ("off", "on") or attn not in ("cudnn", "xla"):
            raise ValueError(f"--grid item {item!r}: write remat:attention with remat on|off "
                             "and attention cudnn|xla, e.g. off:cudnn")
        grid.append((remat == "on", attn))
    return tuple(grid)


def parse_caps(items: Sequence[str]) -> dict[str, float]:
    """['base64=150', ...] -> {'base64': 150.0, ...}."""
    caps = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in PARTS:
            raise ValueError(f"--caps item {item!r}: write PART=SECONDS with PART one of {PARTS}")
        try:
            caps[name] = float(value)
        except ValueError:
            raise ValueError(f"--caps item {item!r}: {value!r} is not a number of seconds"
                             ) from None
    return caps


# ------------------------------------------------------------------------------------------
# Shared helpers (child side).
# ------------------------------------------------------------------------------------------


def load_stage(gin_file: str, bindings: Sequence[str] = (), dtype: str = "bfloat16",
               full_registration: bool = False) -> dict[str, Any]:
    """Parses a stage gin file and builds what a train step needs, then clears gin.

    Returns {stage (model in ``dtype`` compute, float32 parameters), mesh, rules, tx, schedule,
    step_config, parse}. By default gin is parsed with ``skip_unknown=True`` after importing only
    the model, stage, step, optimizer and mesh configurables (``parse='minimal'``): the data
    configurables the stage files also bind import grain and tensorflow-datasets, which the
    lent H200's image lacks and the check does not use (and whose import alone takes seconds).
    ``full_registration=True`` parses through ``gin_utils.parse`` (every configurable
    registered); the test suite checks that both give the same stage.
    """
    import logging

    import gin

    from imagen_jax import gin_utils, partitioning

    gin.clear_config()
    # gin logs an error for every search path an `include` is not found in before it is found.
    logging.disable(logging.ERROR)
    try:
        if full_registration:
            gin_utils.parse([gin_file], bindings, finalize=False)
        else:
            import imagen_jax.nn  # noqa: F401 - registers BaseUNet, EfficientUNet
            from imagen_jax import stage  # noqa: F401 - registers Stage, SamplingConfig
            from imagen_jax.train import optim, step  # noqa: F401 - registers them too

            for path in (REPO_ROOT, gin_utils.GIN_CONFIG_DIR):
                if path not in getattr(gin.config, "_LOCATION_PREFIXES", ()):
                    gin.add_config_file_search_path(path)
            gin.parse_config_files_and_bindings([gin_file], list(bindings),
                                                finalize_config=False, skip_unknown=True)
    finally:
        logging.disable(logging.NOTSET)
    try:
        from imagen_jax.stage import Stage
        from imagen_jax.train import optim, step

        built = Stage()
        model = built.model.clone(dtype=dtype, param_dtype="float32")
        built = dataclasses.replace(built, model=model)
        schedule = optim.learning_rate_schedule()
        out = dict(stage=built, mesh=partitioning.make_mesh(),
                   rules=partitioning.logical_axis_rules(), tx=optim.make_optimizer(schedule),
                   schedule=schedule, step_config=step.StepConfig(),
                   parse="full" if full_registration else "minimal")
    finally:
        gin.clear_config()
    return out


def batch_specs(stage: Any, global_batch: int) -> dict[str, Any]:
    """ShapeDtypeStructs of a train batch (the trainer's layout: float32 images and T5
    embeddings, bool mask, SR stages also the clean low-res image)."""
    import jax
    import jax.numpy as jnp

    res = stage.train_resolution
    specs = {
        "image": jax.ShapeDtypeStruct((global_batch, res, res, 3), jnp.float32),
        "text_embeds": jax.ShapeDtypeStruct(
            (global_batch, stage.text_length, stage.text_embed_dim), jnp.float32),
        "text_mask": jax.ShapeDtypeStruct((global_batch, stage.text_length), jnp.bool_),
    }
    if stage.is_super_res:
        low = stage.train_lowres_resolution
        specs["lowres"] = jax.ShapeDtypeStruct((global_batch, low, low, 3), jnp.float32)
    return specs


def lower_train_step(stage: Any, tx: Any, schedule: Any, step_config: Any, mesh: Any,
                     rules: Any, state_or_abstract: Any, state_shardings: Any,
                     global_batch: int) -> Any:
    """`jax.stages.Lowered` of the project's jitted train step for ``global_batch`` examples."""
    from imagen_jax import partitioning
    from imagen_jax.train import step

    specs = batch_specs(stage, global_batch)
    bsh = step.batch_shardings(specs, mesh)
    fn = step.make_train_step(stage, tx, schedule, step_config, mesh, rules)
    with partitioning.mesh_context(mesh):
        return step.jit_train_step(fn, state_shardings, bsh, mesh).lower(state_or_abstract,
                                                                           specs)


def cost_flops(stage_obj: Any) -> float | None:
    """'flops' of XLA's cost analysis of a ``Lowered`` or ``Compiled`` (None if absent)."""
    from imagen_jax.train.metrics import compiled_flops  # any object with cost_analysis()

    return compiled_flops(stage_obj)


def cpu_device() -> Any:
    """The first CPU device (JAX starts its CPU backend beside a GPU or TPU one)."""
    import jax

    return jax.devices("cpu")[0]


def cpu_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float | None:
    """FLOPs of XLA's cost analysis of ``fn`` lowered (not compiled) for one CPU device, on the
    shapes and dtypes of ``args`` / ``kwargs`` (arrays or ShapeDtypeStructs).

    Lowered on the CPU because ``Lowered.cost_analysis`` is not implemented for PJRT C-API
    plugins, which is how JAX reaches GPUs and TPUs (it returns None there); the unoptimised
    HLO, and so its FLOP count, does not depend on the backend.
    """
    import jax
    import numpy as np

    sharding = jax.sharding.SingleDeviceSharding(cpu_device())

    def on_cpu(x):
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    args, kwargs = jax.tree.map(on_cpu, (args, kwargs))
    return cost_flops(jax.jit(fn).lower(*args, **kwargs))


def model_flops_per_step(stage: Any, tx: Any, schedule: Any, step_config: Any, rules: Any,
                         abstract_state: Any, global_batch: int) -> float | None:
    """Model FLOPs of one train step of ``global_batch`` examples (all devices together).

    XLA's cost analysis of the step *lowered* (unoptimised, for one CPU device: see
    `cpu_flops`) with remat off and the XLA attention path: the forward, the backward (the
    input and weight gradients of every conv, dense layer and attention matmul), the loss and
    the optimizer update, each counted once, elementwise work included. Remat's recomputation
    is left out (MFU, not hardware utilisation), and so is nothing a fused kernel would hide:
    cuDNN's attention custom call reports no FLOPs to a compiled program's cost analysis.
    XLA counts a convolution's in-bounds taps only (no multiplies by the 'SAME' zero padding):
    (3r - 2)^2 instead of 9 r^2 per 3 x 3 conv on an r x r map, 2% less at 64 x 64, 16% less at
    8 x 8, so this MFU is a few percent below one that counts the padding.
    ``abstract_state`` gives the state's shapes (its shardings are ignored). Divide by the
    device count for the per-device figure. Checked against an analytic count in
    tests/test_device_check.py.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from imagen_jax import partitioning

    mesh = partitioning.make_mesh(data=1, fsdp=1, tensor=1, devices=[cpu_device()])
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                            abstract_state)
    shardings = jax.tree.map(lambda _: replicated, abstract_state)
    ref = dataclasses.replace(stage, model=stage.model.clone(remat=False, attention_impl="xla"))
    lowered = lower_train_step(ref, tx, schedule, step_config, mesh, rules, abstract, shardings,
                               global_batch)
    return cost_flops(lowered)


def memory_need_bytes(compiled: Any) -> int | None:
    """Bytes a compiled program allocates per device beyond its (resident) arguments: temps +
    outputs not aliased to donated inputs + code. None where the backend gives no analysis."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if ma is None:
        return None
    return int(ma.temp_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
               + ma.generated_code_size_in_bytes)


def device_memory() -> dict[str, int] | None:
    """{'limit', 'in_use', 'peak'} bytes over the local devices (smallest limit, largest use),
    or None where the backend keeps no statistics (CPU)."""
    import jax

    stats = [d.memory_stats() for d in jax.local_devices()]
    if not stats or any(not s for s in stats):
        return None
    return {"limit": min(int(s.get("bytes_limit", 0)) for s in stats),
            "in_use": max(int(s.get("bytes_in_use", 0)) for s in stats),
            "peak": max(int(s.get("peak_bytes_in_use", 0)) for s in stats)}


def tree_bytes_per_device(tree: Any) -> int:
    """Bytes of a pytree of jax arrays held by the most loaded device."""
    import jax

    per_device: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in getattr(leaf, "addressable_shards", ()):
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values(), default=0)


def random_params(abstract: Any, shardings: Any, seed: int, copies: int = 1) -> Any:
    """Random parameters of ``abstract``'s tree, shapes and dtypes, placed with ``shardings``.

    The rule of ``cascade.random_params`` (norm scales 1, biases and 1-D leaves 0, kernels
    N(0, 1/fan_in), fan_in the product of all but the last axis), but every kernel is cut from
    one 4 M-entry block of normal draws (repeated, at a different offset per leaf): writing
    billions of fresh draws on the host takes tens of seconds, and a jitted initialiser, one
    random program per parameter, takes as long to compile. The values only have to be
    finite and of a realistic scale for timing. ``copies`` > 1 returns that many independent
    device copies (a train state needs params and EMA params in separate buffers).
    """
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)
    block = rng.standard_normal(1 << 22, dtype=np.float32)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    flat_shardings = treedef.flatten_up_to(shardings)
    outs: list[list[Any]] = [[] for _ in range(copies)]
    for i, ((path, x), sharding) in enumerate(zip(paths_leaves, flat_shardings)):
        name = str(getattr(path[-1], "key", path[-1]))
        if "scale" in name:
            host = np.ones(x.shape, np.float32)
        elif "bias" in name or len(x.shape) <= 1:
            host = np.zeros(x.shape, np.float32)
        else:
            start = (i * 7919) % block.size
            host = np.resize(np.roll(block, -start), math.prod(x.shape)).reshape(x.shape)
            host *= np.float32(1.0 / math.sqrt(math.prod(x.shape[:-1])))
        for out in outs:
            arr = jax.device_put(host, sharding)
            # Cast on the device: numpy's bfloat16 conversion is slow for billions of values.
            outs_arr = arr if x.dtype == np.float32 else arr.astype(x.dtype)
            out.append(outs_arr)
    trees = [jax.tree_util.tree_unflatten(treedef, out) for out in outs]
    return trees[0] if copies == 1 else trees


def init_train_state(stage: Any, tx: Any, mesh: Any, rules: Any, seed: int) -> tuple[Any, Any]:
    """(train state, state shardings) in the project's `TrainState` layout and shardings
    (`state.abstract_train_state`), with `random_params` weights (float32 master copy and EMA)
    and the optimizer's own initial state: what `state.init_train_state` makes, without
    compiling flax's initialiser (minutes on a CPU, a minute for the 2 B U-Net on a GPU)."""
    import jax
    import jax.numpy as jnp

    from imagen_jax.train import state as state_lib

    abstract, shardings = state_lib.abstract_train_state(stage.model, tx, stage, mesh, rules)
    params, ema = random_params(abstract.params, shardings.params, seed, copies=2)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)

    def scalar(value, dtype):
        return jax.device_put(jnp.asarray(value, dtype), shardings.step)

    st = state_lib.TrainState(
        step=scalar(0, jnp.int32), params=params, ema_params=ema, opt_state=opt_state,
        rng=jax.device_put(jax.random.fold_in(jax.random.PRNGKey(seed), 2), shardings.rng),
        bad_steps=scalar(0, jnp.int32), skipped_steps=scalar(0, jnp.int32))
    return st, shardings


def random_t5(size: str, vocab_size: int, dtype: str, max_length: int, mesh: Any, rules: Any,
              seed: int, workdir: str) -> Any:
    """A `TextEncoder` of T5 v1.1 shape ``size`` (``xxl``: 4096 wide, 24 layers, 4.8 B
    parameters) with random ``dtype`` weights created on the devices and a small sentencepiece
    vocabulary trained on the DrawBench prompts (ids stay below ``vocab_size``)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from imagen_jax import partitioning
    from imagen_jax.text.checkpoints import abstract_params
    from imagen_jax.text.encoder import TextEncoder
    from imagen_jax.text.testing import drawbench_prompts, random_config, train_sentencepiece
    from imagen_jax.text.tokenizer import Tokenizer

    cfg = random_config(size, "v1_1", vocab_size)
    boxed = abstract_params(cfg, jnp.dtype(dtype))
    shardings = partitioning.logical_to_shardings(partitioning.logical_specs(boxed), mesh, rules)
    params = random_params(nn.meta.unbox(boxed), shardings, seed)
    spm = os.path.join(workdir, "spiece.model")
    train_sentencepiece(drawbench_prompts(), min(vocab_size, 512), spm)
    return TextEncoder(cfg, params, Tokenizer(spm, max_length), dtype=dtype,
                       weights_digest=f"random-{size}-{seed}", mesh=mesh, rules=rules,
                       param_shardings=shardings)


def is_oom(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}"
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def short_error(err: BaseException, limit: int = 300) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class PartContext:
    """A child's view of its part: deadline, results file (rewritten after every record)."""

    def __init__(self, part: str, deadline: float, result_file: str):
        self.part, self.deadline, self.result_file = part, deadline, result_file
        self.data: dict[str, Any] = {"part": part, "runs": [], "lines": [], "status": "running"}
        self.t0 = time.time()

    def left(self) -> float:
        return self.deadline - time.time()

    def line(self, text: str) -> None:
        print(f"[{self.part}] {text}", flush=True)
        self.data["lines"].append(text)
        self.flush()

    def add_run(self, run: dict[str, Any]) -> None:
        self.data["runs"].append(run)
        self.flush()

    def flush(self) -> None:
        mem = device_memory()
        if mem is not None:
            self.data["peak_bytes"] = mem["peak"]
            self.data["memory_limit_bytes"] = mem["limit"]
        self.data["elapsed_s"] = round(time.time() - self.t0, 2)
        tmp = self.result_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.result_file)


def device_info() -> dict[str, Any]:
    import jax

    devices = jax.devices()
    info = {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
            "device_count": len(devices), "process_count": jax.process_count()}
    try:
        from jax.extend import backend

        info["platform_version"] = backend.get_backend().platform_version
    except Exception:  # noqa: BLE001 - informational only
        pass
    mem = device_memory()
    if mem is not None:
        info["memory_limit_bytes"] = mem["limit"]
    return info


# ------------------------------------------------------------------------------------------
# Part: training step.
# ------------------------------------------------------------------------------------------


def _round_batch(b: float) -> int:
    b = int(b)
    return b - b % 8 if b >= 16 else max(b, 0)


def run_train_part(ctx: PartContext, preset: Preset, tp: TrainPreset, seed: int,
                   peak: float | None) -> None:
    """Times the train step over the grid; see the module docstring."""
    import jax
    import numpy as np

    from imagen_jax.train import state as state_lib
    from imagen_jax.train import testing

    t0 = time.time()
    cfg = load_stage(tp.gin_file, tp.bindings, preset.dtype)
    stage, mesh, rules = cfg["stage"], cfg["mesh"], cfg["rules"]
    tx, schedule, step_config = cfg["tx"], cfg["schedule"], cfg["step_config"]
    n_dev = mesh.size
    st, shardings = init_train_state(stage, tx, mesh, rules, seed)
    jax.block_until_ready(st)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            st)
    n_params = state_lib.count_params(st.params)
    param_bytes = tree_bytes_per_device(st.params)
    ctx.data.update(gin_file=tp.gin_file, gin_parse=cfg["parse"], params=n_params,
                    resolution=stage.train_resolution, devices=n_dev, dtype=preset.dtype,
                    init_s=round(time.time() - t0, 2), peak_flops=peak)
    ctx.line(f"{n_params / 1e9:.3f} B parameters, {stage.train_resolution} px, {n_dev} devices, "
             f"state initialised in {time.time() - t0:.1f} s (gin parse: {cfg['parse']})")

    batches: dict[int, Any] = {}

    def get_batch(per_device: int) -> tuple[dict[str, Any], int]:
        from imagen_jax import partitioning

        g = per_device * n_dev
        if g not in batches:
            batches.clear()  # one batch resident at a time
            host = next(testing.synthetic_data(
                batch_size=g, resolution=stage.train_resolution,
                lowres_resolution=stage.train_lowres_resolution, text_length=stage.text_length,
                text_embed_dim=stage.text_embed_dim, seed=seed))
            batches[g] = {k: jax.device_put(np.asarray(host[k]),
                                            partitioning.batch_sharding(mesh, host[k].ndim))
                          for k in batch_specs(stage, g)}
        return batches[g], g

    ref_flops: dict[int, float | None] = {}  # global batch -> model FLOPs per step
    predicted_max: dict[bool, int] = {}  # remat -> predicted largest per-device batch
    simulated_limit: list[int] = []  # CPU: the simulated memory limit, once fixed
    compile_times: list[float] = []

    for remat, attn in tp.grid:
        label = f"remat={'on' if remat else 'off'} attention={attn}"
        # Recorded at once (status "running"): a child cut at its cap still shows what it was
        # compiling or running.
        run: dict[str, Any] = {"remat": remat, "attention": attn, "attempts": [],
                               "status": "running"}
        ctx.add_run(run)
        model = stage.model.clone(remat=remat, attention_impl=attn)
        vstage = dataclasses.replace(stage, model=model)
        tried: set[int] = set()
        while True:
            limit = predicted_max.get(remat)
            candidates = (tp.remat_batches or tp.batches) if remat else tp.batches
            options = sorted(set(candidates) | ({_round_batch(limit)} if limit else set()),
                             reverse=True)
            options = [b for b in options if b > 0 and b not in tried
                       and (limit is None or b <= limit)]
            if not options or len(tried) >= 3:
                run["status"] = "no batch fits" if not options else "gave up after 3 compiles"
                ctx.line(f"{label}: {run['status']} (tried per-device batches {sorted(tried)})")
                break
            per_dev = options[0]
            tried.add(per_dev)
            estimate = (max(compile_times) if compile_times else preset.first_compile_guess_s)
            if ctx.left() < 0.8 * estimate:
                run["status"] = "skipped: time cap"
                ctx.line(f"{label}: skipped, {ctx.left():.0f} s left in the part's cap < "
                         f"~{estimate:.0f} s for a compile")
                break
            attempt: dict[str, Any] = {"batch_per_device": per_dev}
            run["attempts"].append(attempt)
            ctx.flush()
            print(f"[{ctx.part}] {label}: compiling for {per_dev}/device", flush=True)
            try:
                batch, g = get_batch(per_dev)
                t1 = time.time()
                lowered = lower_train_step(vstage, tx, schedule, step_config, mesh, rules, st,
                                           shardings, g)
                attempt["lower_s"] = round(time.time() - t1, 2)
                t1 = time.time()
                compiled = lowered.compile()
                attempt["compile_s"] = round(time.time() - t1, 2)
                compile_times.append(attempt["lower_s"] + attempt["compile_s"])
            except Exception as e:  # noqa: BLE001 - e.g. cuDNN refuses a shape: record it
                attempt["error"] = short_error(e)
                run["status"] = "unavailable" if not is_oom(e) else "out of memory (compile)"
                ctx.line(f"{label}: {run['status']}: {attempt['error']}")
                if is_oom(e):
                    continue
                break

            need = memory_need_bytes(compiled)
            mem = device_memory()
            resident = tree_bytes_per_device((st, batch))
            if mem is not None:
                free, simulated = mem["limit"] - mem["in_use"], False
            elif tp.simulated_memory_fraction and need is not None:
                if not simulated_limit:
                    simulated_limit.append(int(tp.simulated_memory_fraction * need))
                free, simulated = simulated_limit[0], True
            else:
                free, simulated = None, False
            attempt.update(memory_need_bytes=need, free_bytes=free, simulated_limit=simulated,
                           resident_bytes=resident)
            if need is not None and free is not None:
                # need(b) ~ fixed + b * per_example; fixed ~ float32 gradients + bf16 weight
                # copies (1.5 x the float32 parameters).
                fixed = int(1.5 * param_bytes)
                per_ex = max(need - fixed, need // 2) / per_dev
                pred = int((0.92 * free - fixed) // per_ex) if per_ex > 0 else per_dev
                attempt["predicted_max_batch_per_device"] = pred
                if need > 0.92 * free:
                    predicted_max[remat] = min(pred, per_dev - 1)
                    ctx.line(f"{label}: batch {per_dev}/device needs {need / GiB:.2f} GiB > "
                             f"{0.92 * free / GiB:.2f} GiB free"
                             f"{' (simulated limit)' if simulated else ''}; predicted largest "
                             f"fitting batch {pred}")
                    attempt["fits"] = False
                    del compiled
                    continue
                predicted_max.setdefault(remat, pred)
            attempt["fits"] = True
            try:
                t1 = time.time()
                st, metrics = compiled(st, batch)
                jax.block_until_ready(st)
                attempt["first_step_s"] = round(time.time() - t1, 3)
                t1 = time.time()
                for _ in range(tp.steps):
                    st, metrics = compiled(st, batch)
                jax.block_until_ready(st)
                step_s = (time.time() - t1) / tp.steps
            except Exception as e:  # noqa: BLE001
                attempt["error"] = short_error(e)
                ctx.line(f"{label}: batch {per_dev}/device failed at run time: {attempt['error']}")
                if any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(st)):
                    st, shardings = init_train_state(stage, tx, mesh, rules, seed)
                if is_oom(e):
                    predicted_max[remat] = per_dev - 1
                    continue
                run["status"] = "failed"
                break

            hw_flops = cost_flops(compiled)
            if g not in ref_flops:
                t1 = time.time()
                # This point is the reference program: its own lowering's cost analysis, where
                # the backend has one (not through a PJRT plugin); else lowered on the CPU.
                is_ref = not remat and attn == "xla"
                ref_flops[g] = cost_flops(lowered) if is_ref else None
                if ref_flops[g] is None:
                    try:
                        ref_flops[g] = model_flops_per_step(stage, tx, schedule, step_config,
                                                            rules, abstract, g)
                    except Exception as e:  # noqa: BLE001
                        ctx.line(f"model FLOPs at batch {g} unavailable: {short_error(e)}")
                if ref_flops[g] is None and is_ref and hw_flops:
                    ref_flops[g] = hw_flops * n_dev  # the reference program, compiled
                attempt["model_flops_s"] = round(time.time() - t1, 2)
            model_flops = None if ref_flops[g] is None else ref_flops[g] / n_dev
            loss = float(np.asarray(metrics["loss"]))
            run.update(
                status="ok", batch_per_device=per_dev, global_batch=g, step_s=step_s,
                images_per_s_per_device=per_dev / step_s,
                model_flops_per_step_per_device=model_flops,
                compiled_flops_per_step_per_device=hw_flops,
                mfu=None if (model_flops is None or not peak) else model_flops / step_s / peak,
                hfu=None if (hw_flops is None or not peak) else hw_flops / step_s / peak,
                compile_s=attempt["compile_s"], lower_s=attempt["lower_s"], loss=loss,
                loss_finite=bool(np.isfinite(loss)), timed_steps=tp.steps,
            )
            mfu = f", MFU {run['mfu']:.1%}" if run["mfu"] is not None else ""
            ctx.line(f"{label}: batch {per_dev}/device, {step_s * 1e3:.1f} ms/step, "
                     f"{run['images_per_s_per_device']:.1f} img/s/device{mfu} (compile "
                     f"{attempt['lower_s'] + attempt['compile_s']:.1f} s)")
            break
        ctx.flush()


# ------------------------------------------------------------------------------------------
# Part: T5 encoder.
# ------------------------------------------------------------------------------------------


def run_t5_part(ctx: PartContext, preset: Preset, seed: int, peak: float | None) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from imagen_jax import partitioning
    from imagen_jax.text.testing import drawbench_prompts

    mesh = partitioning.make_mesh(data=1, fsdp=-1)
    rules = partitioning.FSDP_RULES
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        enc = random_t5(preset.t5_size, preset.t5_vocab, preset.dtype, preset.t5_length, mesh,
                        rules, seed, tmp)
    jax.block_until_ready(enc.params)
    n_params = sum(x.size for x in jax.tree.leaves(enc.params))
    ctx.data.update(size=preset.t5_size, params=n_params, dtype=preset.dtype,
                    length=preset.t5_length, devices=mesh.size, init_s=round(time.time() - t0, 2),
                    peak_flops=peak)
    ctx.line(f"T5 v1.1 {preset.t5_size}: {n_params / 1e9:.3f} B parameters, {preset.dtype}, "
             f"created in {time.time() - t0:.1f} s")
    prompts = drawbench_prompts()
    for per_dev in preset.t5_batches:
        g = per_dev * mesh.size
        run: dict[str, Any] = {"batch_per_device": per_dev, "global_batch": g,
                               "length": preset.t5_length}
        if ctx.left() < 5:
            run["status"] = "skipped: time cap"
            ctx.line(f"batch {per_dev}/device: skipped, time cap")
            ctx.add_run(run)
            continue
        texts = [prompts[i % len(prompts)] for i in range(g)]
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # long prompts are cut to the length on purpose
            ids, mask = enc.tokenize(texts)
        try:
            t1 = time.time()
            enc.encode(ids, mask).block_until_ready()
            run["compile_s"] = round(time.time() - t1, 2)  # compile + first run
            times = []
            for _ in range(preset.t5_iters):
                t1 = time.time()
                enc.encode(ids, mask).block_until_ready()
                times.append(time.time() - t1)
            sec = float(np.median(times))
        except Exception as e:  # noqa: BLE001
            run["status"] = "out of memory" if is_oom(e) else "failed"
            run["error"] = short_error(e)
            ctx.line(f"batch {per_dev}/device: {run['status']}: {run['error']}")
            ctx.add_run(run)
            continue
        flops = None
        try:
            flops = cpu_flops(lambda p, i, m: enc.model.apply({"params": p}, i, m), enc.params,
                              jnp.asarray(ids), jnp.asarray(mask))
        except Exception as e:  # noqa: BLE001
            ctx.line(f"T5 FLOPs unavailable: {short_error(e)}")
        tokens = g * preset.t5_length
        per_dev_flops = None if flops is None else flops / mesh.size
        run.update(status="ok", seconds=sec, tokens_per_s=tokens / sec,
                   tokens_per_s_per_device=tokens / sec / mesh.size,
                   model_flops_per_device=per_dev_flops,
                   mfu=None if (per_dev_flops is None or not peak) else per_dev_flops / sec / peak)
        mfu = f", MFU {run['mfu']:.1%}" if run["mfu"] is not None else ""
        ctx.line(f"batch {per_dev}/device x {preset.t5_length} tokens: "
                 f"{run['tokens_per_s_per_device']:.0f} tokens/s/device{mfu} "
                 f"(compile + first run {run['compile_s']:.1f} s)")
        ctx.add_run(run)


# ------------------------------------------------------------------------------------------
# Part: cascade sampling.
# ------------------------------------------------------------------------------------------


def run_cascade_part(ctx: PartContext, preset: Preset, seed: int) -> None:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from imagen_jax import cascade, partitioning
    from imagen_jax.text.testing import drawbench_prompts

    t0 = time.time()
    mesh = partitioning.make_mesh(data=1, fsdp=-1)
    rules = partitioning.FSDP_RULES
    stages = []
    for i, (gin_file, bindings) in enumerate(preset.cascade_gin):
        train_stage = load_stage(gin_file, bindings, preset.dtype)["stage"]
        stages.append(train_stage.replace(name=f"stage{i}"))
    params = []
    for i, s in enumerate(stages):
        shardings = cascade.param_shardings(s, mesh, rules)
        abstract = nn.meta.unbox(cascade.abstract_params(s))
        params.append(random_params(abstract, shardings, seed + i))
    with tempfile.TemporaryDirectory() as tmp:
        enc = random_t5(preset.t5_size, preset.t5_vocab, preset.dtype, preset.text_length,
                        mesh, rules, seed, tmp)
    jax.block_until_ready((params, enc.params))
    n_params = [sum(x.size for x in jax.tree.leaves(p)) for p in params]
    ctx.data.update(
        resolutions=[s.resolution for s in stages], params=n_params, devices=mesh.size,
        t5=preset.t5_size, dtype=preset.dtype, init_s=round(time.time() - t0, 2),
        guidance=[s.sampling.guidance_weight for s in stages],
        thresholding=[s.sampling.thresholding for s in stages])
    ctx.line(f"stages {[s.resolution for s in stages]} px, "
             f"{[round(n / 1e9, 3) for n in n_params]} B parameters + T5 {preset.t5_size}, "
             f"guidance {ctx.data['guidance']}, built in {time.time() - t0:.1f} s")

    # FLOPs of one model call per image (batch 1, the sampling resolution), to scale a measured
    # run to other step counts. Doubled per step when guidance != 1 (cond + uncond batch).
    stage_flops: list[float] | None = None

    def per_stage_flops() -> list[float] | None:
        out = []
        for s in stages:
            r, f32 = s.resolution, jnp.float32
            inputs = [jax.ShapeDtypeStruct((1, r, r, 3), f32), jax.ShapeDtypeStruct((1,), f32),
                      jax.ShapeDtypeStruct((1, preset.text_length, s.text_embed_dim), f32),
                      jax.ShapeDtypeStruct((1, preset.text_length), jnp.bool_)]
            kwargs = {}
            if s.is_super_res:
                lr = s.lowres_resolution
                kwargs = dict(lowres=jax.ShapeDtypeStruct((1, lr, lr, 3), f32),
                              aug_level=jax.ShapeDtypeStruct((1,), f32))
            abstract = {"params": nn.meta.unbox(cascade.abstract_params(s))}
            f = cpu_flops(lambda v, *a, s=s, **k: s.model.apply(v, *a, **k), abstract, *inputs,
                          **kwargs)
            if f is None:
                return None
            out.append(f * (2.0 if s.sampling.guidance_weight != 1.0 else 1.0))
        return out

    prompts = drawbench_prompts()
    measured: list[dict[str, Any]] = []
    compile_times: list[float] = []
    for sampler, steps in preset.cascade_settings:
        for batch in preset.cascade_batches:
            label = f"{sampler} {'/'.join(map(str, steps))} batch {batch}"
            run: dict[str, Any] = {"sampler": sampler, "steps_asked": list(steps), "batch": batch,
                                   "status": "running"}
            ctx.add_run(run)
            est_compile = max(compile_times) if compile_times else preset.first_compile_guess_s
            used = list(steps)
            same = [m for m in measured if m["batch"] == batch] or measured
            if same:  # scale the step counts down if the run would not fit the time left
                ref = same[0]
                if stage_flops is None and ctx.left() > est_compile + 30:
                    t1 = time.time()
                    try:
                        stage_flops = per_stage_flops()
                    except Exception as e:  # noqa: BLE001 - fall back to equal step costs
                        ctx.line(f"per-stage FLOPs unavailable: {short_error(e)}")
                    stage_flops = stage_flops or []  # [] = tried, unavailable
                    ctx.line(f"per-stage model FLOPs per image per step: "
                             f"{[f'{f / 1e12:.3f} T' for f in stage_flops or []]} "
                             f"({time.time() - t1:.1f} s)")
                weights = stage_flops or [1.0] * len(stages)
                per_img = ref["seconds"] / ref["batch"] / sum(
                    n * w for n, w in zip(ref["steps"], weights))
                est_run = per_img * batch * sum(n * w for n, w in zip(steps, weights))
                room = ctx.left() - 1.2 * est_compile - 10
                if preset.cascade_max_run_s is not None:
                    room = min(room, preset.cascade_max_run_s)
                if est_run > room:
                    factor = max(room, 0.0) / est_run
                    used = [max(1, int(n * factor)) for n in steps]
                    run["estimated_full_seconds"] = est_run
                    run["estimate_basis"] = ("per-stage FLOPs" if stage_flops
                                             else "equal cost per step")
            if ctx.left() < 0.8 * est_compile + 5:
                run["status"] = "skipped: time cap"
                ctx.line(f"{label}: skipped, {ctx.left():.0f} s left < ~{est_compile:.0f} s "
                         "for a compile")
                ctx.flush()
                continue
            run["steps"] = used
            if used != list(steps):
                ctx.line(f"{label}: running {'/'.join(map(str, used))} steps instead (full run "
                         f"estimated at {run['estimated_full_seconds']:.1f} s, more than the "
                         "time left)")
            staged = [s.with_sampling(sampler=sampler, num_steps=n) for s, n in zip(stages, used)]
            ctx.flush()
            print(f"[{ctx.part}] {label}: compiling and sampling", flush=True)
            try:
                c = cascade.Cascade(staged, params, text_encoder=enc, mesh=mesh, rules=rules)
                texts = prompts[:batch]
                out = c.sample(texts, seed=seed)
                first = out.timings
                run.update(compile_s=round(first["compile_s"], 2),
                           first_run_s=round(first["sample_s"], 3))
                compile_times.append(first["compile_s"])
                seconds = first["sample_s"]
                if ctx.left() > 1.2 * seconds + 5:
                    seconds = c.sample(texts, seed=seed + 1).timings["sample_s"]
                    run["timed"] = "second run"
                else:
                    run["timed"] = "first run (no time for a second)"
            except Exception as e:  # noqa: BLE001
                run["status"] = "out of memory" if is_oom(e) else "failed"
                run["error"] = short_error(e)
                ctx.line(f"{label}: {run['status']}: {run['error']}")
                ctx.flush()
                continue
            shape = list(out.final.shape)
            run.update(status="ok", seconds=seconds, seconds_per_image=seconds / batch,
                       images_per_s=batch / seconds, final_shape=shape)
            if stage_flops:
                total = batch * sum(n * f for n, f in zip(used, stage_flops))
                run["model_flops"] = total
                run["flops_per_s_per_device"] = total / seconds / mesh.size
            if used != list(steps):  # labelled as an extrapolation, never as a measurement
                w = stage_flops or [1.0] * len(stages)
                run["seconds_per_image_extrapolated_to_asked"] = seconds / batch * sum(
                    n * x for n, x in zip(steps, w)) / sum(n * x for n, x in zip(used, w))
            measured.append(run)
            ctx.line(f"{label}: {seconds / batch:.3f} s/image at steps {'/'.join(map(str, used))} "
                     f"({batch / seconds:.2f} images/s, compile {run['compile_s']:.1f} s, "
                     f"output {shape})")
            ctx.flush()


# ------------------------------------------------------------------------------------------
# Child entry point.
# ------------------------------------------------------------------------------------------


def run_worker(config_path: str) -> None:
    """Runs one part from the parent's JSON config; results go to its ``result_file``."""
    with open(config_path) as f:
        cfg = json.load(f)
    preset = DRY if cfg["dry_run"] else REAL
    part = cfg["part"]
    ctx = PartContext(part, cfg["deadline"], cfg["result_file"])
    try:
        info = device_info()
        ctx.data["device"] = info
        peak, source = (cfg["peak_flops"], "--peak_flops") if cfg["peak_flops"] else (
            (preset.peak_flops, "nominal dry-run figure, not a chip's")
            if preset.peak_flops else peak_bf16_flops(info["device_kind"]))
        ctx.data["peak_flops_source"] = source
        ctx.line(f"{info['device_count']} x {info['device_kind']} ({info['platform']}), "
                 f"peak bf16 {peak / 1e12 if peak else float('nan'):.4g} TFLOP/s ({source}), "
                 f"{ctx.left():.0f} s for this part")
        if part in TRAIN_PARTS:
            tp = preset.train[part]
            if cfg.get("grid"):
                tp = dataclasses.replace(tp, grid=tuple(tuple(g) for g in cfg["grid"]))
            run_train_part(ctx, preset, tp, cfg["seed"], peak)
        elif part == "t5":
            run_t5_part(ctx, preset, cfg["seed"], peak)
        elif part == "cascade":
            run_cascade_part(ctx, preset, cfg["seed"])
        else:
            raise ValueError(f"unknown part {part!r}; choose from {PARTS}")
        ctx.data["status"] = "done"
    except Exception as e:  # noqa: BLE001 - the parent reports it; keep what was measured
        ctx.data["status"] = "failed"
        ctx.data["error"] = short_error(e, 2000)
        ctx.data["traceback"] = traceback.format_exc()[-4000:]
        print(traceback.format_exc(), flush=True)
    finally:
        ctx.flush()


# ------------------------------------------------------------------------------------------
# Parent: environment, one child per part, JSON + Markdown.
# ------------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """What the run used, read without starting any accelerator backend in this process."""
    versions = {}
    for name in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin",
                 "jax-cuda13-pjrt", "libtpu", "flax", "optax", "gin-config", "numpy"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    env = {k: os.environ.get(k) for k in ("XLA_FLAGS", "LIBTPU_INIT_ARGS", "JAX_PLATFORMS",
                                          "XLA_PYTHON_CLIENT_MEM_FRACTION",
                                          "XLA_PYTHON_CLIENT_PREALLOCATE")}
    out: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "versions": versions, "env": env,
    }
    if shutil.which("nvidia-smi"):
        try:
            q = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            out["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        except (OSError, subprocess.SubprocessError) as e:
            out["nvidia_smi"] = f"failed: {e}"
    return out


def run_child(cmd: Sequence[str], timeout_s: float, env: dict[str, str], log: Callable[[str], None]
              ) -> tuple[str, int | None, list[str]]:
    """Runs ``cmd``, echoing its output through ``log``; kills it after ``timeout_s``.

    Returns (status 'exited' | 'killed', return code, last 40 output lines).
    """
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, cwd=REPO_ROOT, text=True, errors="replace")
    tail: list[str] = []

    def pump():
        for raw in proc.stdout:
            text = raw.rstrip("\n")
            tail.append(text)
            del tail[:-40]
            log(text)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=max(timeout_s, 0.0))
        status = "exited"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        status = "killed"
    reader.join(timeout=10)
    return status, proc.returncode, tail


def schedule_caps(parts: Sequence[str], caps: dict[str, float], start: float, budget_s: float,
                  now: float) -> float:
    """Seconds the next part (``parts[0]``) may use: its cap plus whatever the parts before left
    unused, never past the total budget, keeping the caps of the parts after it."""
    left = start + budget_s - now
    later = sum(caps.get(p, 0.0) for p in parts[1:])
    return max(0.0, min(left, max(caps.get(parts[0], 0.0), left - later)))


def fmt(x: Any, spec: str = ".1f", scale: float = 1.0) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x * scale, spec)


def markdown_table(title: str, columns: Sequence[str], align: str,
                   rows: Iterable[Sequence[Any]]) -> list[str]:
    """Lines of one report section: a ``## title`` heading, a Markdown table with one column per
    name in ``columns`` (``align``: one letter per column, ``l`` left or ``r`` right for
    numbers) and one row per cell sequence of ``rows`` (cells written with ``str``), then a
    blank line."""
    rule = {"l": "---", "r": "---:"}
    return [f"## {title}", "", "| " + " | ".join(columns) + " |",
            "|" + "|".join(rule[a] for a in align) + "|",
            *("| " + " | ".join(map(str, row)) + " |" for row in rows), ""]


def markdown(results: dict[str, Any]) -> str:
    """The Markdown report of a results dict (what ``device_check.json`` holds)."""
    env = results["environment"]
    parts = results["parts"]
    dev = next((p["device"] for p in parts.values() if p.get("device")), {})
    lines = [f"# Device check ({results['preset']})", ""]
    lines.append(f"- Date (UTC): {env['date_utc']}; total wall {fmt(results.get('wall_s'))} s "
                 f"of a {fmt(results['budget_s'], '.0f')} s budget")
    lines.append(f"- Device: {dev.get('device_count', '?')} x {dev.get('device_kind', '?')} "
                 f"({dev.get('platform', '?')}; {dev.get('platform_version', '')}); memory limit "
                 f"{fmt(dev.get('memory_limit_bytes'), '.1f', 1 / GiB)} GiB per device")
    if env.get("nvidia_smi"):
        lines.append(f"- nvidia-smi: {env['nvidia_smi']}")
    lines.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    lines.append("- Env: " + ", ".join(f"{k}={v}" for k, v in env["env"].items() if v))
    peak_src = next((p.get("peak_flops_source") for p in parts.values()
                     if p.get("peak_flops_source")), None)
    if peak_src:
        lines.append(f"- Peak bf16 FLOP/s for MFU: {peak_src}")
    lines.append("")

    train = [p for p in TRAIN_PARTS if p in parts]
    if train:
        dtype = parts[train[0]].get("dtype", "?")
        lines += markdown_table(
            f"Training step ({dtype} compute, float32 master weights)",
            ["stage", "params", "remat", "attention", "batch/device", "ms/step", "img/s/device",
             "model TFLOP/step/device", "MFU", "HFU", "compile s", "status"], "lrllrrrrrrrl",
            [(name, f"{fmt(part.get('params'), '.2f', 1e-9)} B",
              "on" if run.get("remat") else "off", run.get("attention", "-"),
              run.get("batch_per_device", "-"), fmt(run.get("step_s"), ".1f", 1e3),
              fmt(run.get("images_per_s_per_device")),
              fmt(run.get("model_flops_per_step_per_device"), ".2f", 1e-12),
              fmt(run.get("mfu"), ".1%"), fmt(run.get("hfu"), ".1%"), fmt(run.get("compile_s")),
              run.get("status", "-"))
             for name in train for part in [parts[name]] for run in part.get("runs", [])])
    if "t5" in parts:
        part = parts["t5"]
        lines += markdown_table(
            f"T5 encoder ({part.get('size', '?')}, {part.get('dtype', '?')}, "
            f"{fmt(part.get('params'), '.2f', 1e-9)} B parameters)",
            ["batch/device", "tokens", "tokens/s/device", "ms/batch", "MFU", "compile s",
             "status"], "rrrrrrl",
            [(run.get("batch_per_device"), run.get("length"),
              fmt(run.get("tokens_per_s_per_device"), ".0f"),
              fmt(run.get("seconds"), ".1f", 1e3), fmt(run.get("mfu"), ".1%"),
              fmt(run.get("compile_s")), run.get("status", "-"))
             for run in part.get("runs", [])])
    if "cascade" in parts:
        part = parts["cascade"]
        lines += markdown_table(
            f"Cascade sampling ({' -> '.join(map(str, part.get('resolutions', [])))} px, "
            f"guidance {part.get('guidance', '?')}, T5 {part.get('t5', '?')} inside)",
            ["sampler", "steps asked", "steps run", "images", "s/image", "images/s",
             "s/image at steps asked (extrapolated)", "compile s", "timed", "status"],
            "lllrrrrrll",
            [(run.get("sampler"), "/".join(map(str, run.get("steps_asked", []))),
              "/".join(map(str, run.get("steps", []))) or "-", run.get("batch"),
              fmt(run.get("seconds_per_image"), ".3f"), fmt(run.get("images_per_s"), ".2f"),
              fmt(run.get("seconds_per_image_extrapolated_to_asked"), ".3f"),
              fmt(run.get("compile_s")), run.get("timed", "-"), run.get("status", "-"))
             for run in part.get("runs", [])])
    lines += markdown_table(
        "Peak device memory per part", ["part", "status", "wall s", "peak GiB", "limit GiB"],
        "llrrr",
        [(name, part.get("status", "-"), fmt(part.get("wall_s")),
          fmt(part.get("peak_bytes"), ".2f", 1 / GiB),
          fmt(part.get("memory_limit_bytes"), ".2f", 1 / GiB))
         for name, part in parts.items()])
    lines += ["## Lines", ""]
    lines += [f"- {text}" for text in results["lines"]]
    return "\n".join(lines) + "\n"


def write_results(out_dir: str, results: dict[str, Any]) -> None:
    os.makedirs(out_dir, exist_ok=True)
    for name, text in (("device_check.json", json.dumps(results, indent=1, default=str)),
                       ("device_check.md", markdown(results))):
        tmp = os.path.join(out_dir, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out_dir, name))


def run_parent(parts: Sequence[str], preset: Preset, out_dir: str, budget_s: float,
               caps: dict[str, float], grid: Sequence[tuple[bool, str]] | None,
               peak_flops: float | None, seed: int,
               child_cmd: Callable[[str], list[str]] | None = None) -> dict[str, Any]:
    """Runs each part in a child process within its cap; returns (and writes) the results."""
    start = time.time()
    os.makedirs(out_dir, exist_ok=True)
    log_file = open(os.path.join(out_dir, "device_check.log"), "w")  # noqa: SIM115

    def log(text: str) -> None:
        print(text, flush=True)
        log_file.write(text + "\n")
        log_file.flush()

    results: dict[str, Any] = {"preset": preset.name, "budget_s": budget_s, "caps": caps,
                               "environment": environment(), "parts": {}, "lines": []}

    def line(text: str) -> None:
        results["lines"].append(text)
        log(text)

    env_info = results["environment"]
    line(f"environment: python {env_info['python']}, "
         + ", ".join(f"{k} {v}" for k, v in env_info["versions"].items())
         + f"; XLA_FLAGS={env_info['env'].get('XLA_FLAGS')!r}"
         + (f"; nvidia-smi: {env_info['nvidia_smi']}" if env_info.get("nvidia_smi") else ""))
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    # The check runs alone on the device: let JAX's pool take most of it (default 75%).
    child_env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    child_env.setdefault("TQDM_DISABLE", "1")
    if preset.child_xla_flags:
        names = {f.split("=")[0] for f in preset.child_xla_flags}
        kept = [f for f in child_env.get("XLA_FLAGS", "").split() if f.split("=")[0] not in names]
        child_env["XLA_FLAGS"] = " ".join(kept + list(preset.child_xla_flags))
    if child_cmd is None:
        def child_cmd(config_path: str) -> list[str]:
            return [sys.executable, "-m", "bench.device_check", f"--worker_config={config_path}"]

    with tempfile.TemporaryDirectory() as tmp:
        for i, part in enumerate(parts):
            now = time.time()
            allowed = schedule_caps(parts[i:], caps, start, budget_s, now)
            if allowed < preset.min_part_s:
                results["parts"][part] = {"status": "skipped", "lines": []}
                line(f"{part}: skipped, {allowed:.0f} s left for it (< {preset.min_part_s:.0f} "
                     "s needed to start a part)")
                write_results(out_dir, results)
                continue
            result_file = os.path.join(tmp, f"{part}.json")
            config = {"part": part, "dry_run": preset.name == DRY.name, "seed": seed,
                      "deadline": now + allowed, "result_file": result_file,
                      "peak_flops": peak_flops, "grid": [list(g) for g in grid] if grid else None}
            config_path = os.path.join(tmp, f"{part}.config.json")
            with open(config_path, "w") as f:
                json.dump(config, f)
            line(f"{part}: starting, {allowed:.0f} s allowed")
            status, code, tail = run_child(child_cmd(config_path), allowed + preset.kill_grace_s,
                                           child_env, log)
            data: dict[str, Any] = {"lines": []}
            if os.path.exists(result_file):
                with open(result_file) as f:
                    data = json.load(f)
            data["wall_s"] = round(time.time() - now, 2)
            results["lines"] += [f"{part}: {t}" for t in data.get("lines", [])]
            if status == "killed":
                data["status"] = "cut at time cap"
                line(f"{part}: killed at its hard cap ({allowed + preset.kill_grace_s:.0f} s); "
                     f"kept the {len(data.get('runs', []))} results it had written")
            elif code != 0 or data.get("status") not in ("done",):
                data["status"] = data.get("status") if data.get("status") == "failed" else (
                    f"crashed (exit code {code})")
                data.setdefault("output_tail", tail[-20:])
                line(f"{part}: {data['status']}: {data.get('error') or (tail[-1] if tail else '')}")
            else:
                line(f"{part}: done in {data['wall_s']:.0f} s")
            results["parts"][part] = data
            results["wall_s"] = round(time.time() - start, 2)
            write_results(out_dir, results)
    results["wall_s"] = round(time.time() - start, 2)
    write_results(out_dir, results)
    log("\n" + markdown(results))
    log_file.close()
    return results


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; see --help")
    if FLAGS.worker_config:
        run_worker(FLAGS.worker_config)
        return
    preset = DRY if FLAGS.dry_run else REAL
    unknown = [p for p in FLAGS.parts if p not in PARTS]
    if unknown:
        raise app.UsageError(f"--parts: unknown part(s) {unknown}; choose from {PARTS}")
    try:
        caps = {**preset.caps, **parse_caps(FLAGS.caps)}
        grid = parse_grid(FLAGS.grid) if FLAGS.grid else None
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    budget = FLAGS.budget_s if FLAGS.budget_s is not None else preset.budget_s
    run_parent(FLAGS.parts, preset, FLAGS.out_dir, budget, caps, grid, FLAGS.peak_flops,
               FLAGS.seed)


if __name__ == "__main__":
    app.run(main)
