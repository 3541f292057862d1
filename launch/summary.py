r"""Model summary: parameter count, FLOPs per example and per-resolution layout of a stage.

    python -m launch.summary --gin_file=gin_configs/base64.gin [--gin.BaseUNet.channels=256]
    python -m launch.summary --if_config=IF-I-XL-v1.0/unet/config.json   # DeepFloyd IF

The gin files are a stage's, as `launch.train` reads them: the summary describes the very
`imagen_jax.stage.Stage` the trainer builds from them (every stage file under gin_configs/ binds
``Stage.*``). Parameters are counted with ``jax.eval_shape`` (nothing is allocated); FLOPs come
from XLA's cost analysis of the compiled training step (forward + backward of the eps-MSE loss)
and of one guided sampling step (one model call on the cond + uncond batch), per generated
example. ``--flops=lowered`` reads the pre-optimisation HLO instead (seconds instead of minutes
for the 2 B model on a CPU).

``--if_config`` describes a DeepFloyd IF U-Net from its diffusers config.json alone (the file, its
``unet/`` directory, the model directory, or ``if:PATH`` as ``launch.sample --stages`` takes it;
no weights needed): the stage `imagen_jax.cascade.loading.if_stage` builds, as sampled.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from imagen_jax import gin_utils
from imagen_jax.cascade.loading import if_stage, if_stage_name
from imagen_jax.nn import BaseUNet, EfficientUNet, IFUNet, read_if_config
from imagen_jax.nn.if_config import if_unet_dir
from imagen_jax.stage import Stage, abstract_params, model_inputs
from launch import shared_flags as sf

FLAGS = flags.FLAGS
sf.DEFINE_multi_string("gin_file", [], "Gin files (the stage config), in order.")
sf.DEFINE_multi_string("gin_search_paths", [], "Extra directories to look up gin files in.")
sf.DEFINE_string("if_config", None, "A DeepFloyd IF U-Net's diffusers config.json (or its unet/ "
                 "or model directory, or if:PATH) instead of gin files.")
sf.DEFINE_enum("flops", "compiled", ["compiled", "lowered", "none"],
                  "FLOPs from the compiled executable's cost analysis, from the lowered HLO "
                  "(fast, before XLA optimisations), or skip.")

STAGE_FILES_HINT = ("pass a stage's gin file, as launch.train reads it (base64.gin, sr256.gin, "
                    "sr1024.gin, tiny/base.gin, ...): it binds Stage.model and the rest of the "
                    "stage record")


def load_stage(gin_files: Sequence[str], bindings: Sequence[str] = (),
               search_paths: Sequence[str] = ()) -> Stage:
    """Parses a stage's gin files (clearing any earlier config) and builds its `Stage`: the record
    `imagen_jax.train.train` receives from the same files (``train.stage = @Stage()``).

    Raises GinConfigError (naming the fix) for files that bind no stage or leave a macro undefined.
    """
    gin.clear_config()
    try:
        # Undefined macros surface either when gin finalises (validation) or at the call.
        gin_utils.parse(gin_files, bindings, search_paths)
        return Stage()
    except gin_utils.GinConfigError:
        raise
    # ConfigError: a bad Stage setting; gin's RuntimeError: a required Stage field left unbound.
    except (ValueError, KeyError, RuntimeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise gin_utils.GinConfigError(f"{first}\n{STAGE_FILES_HINT}") from e


def load_if_config_stage(path: str) -> Stage:
    """The stage of a DeepFloyd IF U-Net described by its diffusers config.json alone (``path``:
    the file, a ``unet/`` or model directory, optionally ``if:``-prefixed). ConfigError for a
    missing or unsupported config."""
    path = if_unet_dir(path)
    name = if_stage_name(os.path.dirname(path) if os.path.isfile(path) else path)
    return if_stage(read_if_config(path), name=name)


def abstract_inputs(stage: Stage, batch: int, full_size: bool = False) -> dict[str, Any]:
    """ShapeDtypeStructs of the model's inputs (`imagen_jax.stage.model_inputs`, batch ``batch``):
    at the training size, or with ``full_size`` at the sampling size (``resolution`` and the
    whole low-res image: a crop-trained stage is sampled uncropped, App. F.3)."""
    if full_size:
        stage = stage.replace(train_crop=None)
    return jax.eval_shape(lambda: model_inputs(stage, batch))


def count_params(tree: Any) -> int:
    """Number of parameters in a tree of arrays or ShapeDtypeStructs (boxed or not)."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _flops(fn: Any, args: Sequence[Any], mode: str) -> float:
    lowered = jax.jit(fn).lower(*args)
    analysis = lowered.compile().cost_analysis() if mode == "compiled" else \
        lowered.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0]
    return float(analysis["flops"])


def train_step_flops(stage: Stage, params: Any, mode: str = "compiled") -> float:
    """FLOPs per example of forward + backward of the eps-MSE loss at the training size."""
    batch = 1
    inputs = abstract_inputs(stage, batch)

    def loss(p, inputs):
        eps_hat = stage.model.apply({"params": p}, **inputs, train=True)
        if eps_hat.shape != inputs["x"].shape:  # IF: eps and the variance interpolation
            eps_hat = eps_hat[..., :inputs["x"].shape[-1]]
        return jnp.mean(jnp.square(eps_hat - inputs["x"]))

    return _flops(jax.grad(loss), (params, inputs), mode) / batch


def sample_step_flops(stage: Stage, params: Any, mode: str = "compiled") -> float:
    """FLOPs per generated example of one guided sampling step at full resolution: one model
    call on the concatenated (cond, uncond) batch of 2."""
    inputs = abstract_inputs(stage, 2, full_size=True)

    def step(p, inputs):
        return stage.model.apply({"params": p}, **inputs)

    return _flops(step, (params, inputs), mode)


def layout_rows(stage: Stage, params: Any) -> list[tuple[str, ...]]:
    """One row per U-Net level: resolution, channels, residual blocks, attention, parameters."""
    model = stage.model
    per_level: dict[int, int] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        match = re.match(r"(down|up)_(\d+)_", str(getattr(path[0], "key", "")))
        if match:
            level = int(match.group(2))
            per_level[level] = per_level.get(level, 0) + int(np.prod(leaf.shape))
    rows = []
    if isinstance(model, BaseUNet):
        n_levels = len(model.channel_mult)
        blocks = (model.num_res_blocks if isinstance(model.num_res_blocks, (list, tuple))
                  else [model.num_res_blocks] * n_levels)
        for level, mult in enumerate(model.channel_mult):
            res = stage.resolution // model.patch_size // 2**level
            attn = "self+text" if res in model.attn_resolutions else "-"
            rows.append((f"{res}x{res}", str(model.channels * mult),
                         f"{blocks[level]}/{blocks[level] + 1}", attn,
                         f"{per_level.get(level, 0) / 1e6:.1f}"))
    elif isinstance(model, EfficientUNet):
        n_levels = len(model.blocks)
        self_attn = (model.self_attention if isinstance(model.self_attention, (list, tuple))
                     else [model.self_attention] * n_levels)
        cross_attn = (model.cross_attention if isinstance(model.cross_attention, (list, tuple))
                      else [model.cross_attention] * n_levels)
        for level, (ch, n) in enumerate(model.blocks):
            res = stage.resolution // 2 ** (level + 1)
            kinds = [k for k, on in (("self", self_attn[level]), ("text", cross_attn[level])) if on]
            attn = "+".join(kinds) or "-"
            if kinds:
                attn += " every block" if model.attn_every_res_block else " once"
            rows.append((f"{res}x{res}", str(ch), f"{n}/{n}", attn,
                         f"{per_level.get(level, 0) / 1e6:.1f}"))
    elif isinstance(model, IFUNet):
        cfg = model.config
        for level, ch in enumerate(cfg.block_out_channels):
            res = stage.resolution // 2**level
            n = cfg.layers_per_block[level]
            attn = ("text" if cfg.only_cross_attention[level] else "self+text") if (
                cfg.down_attention[level] or cfg.up_attention[level]) else "-"
            rows.append((f"{res}x{res}", str(ch), f"{n}/{n + 1}", attn,
                         f"{per_level.get(level, 0) / 1e6:.1f}"))
    return rows


def format_summary(stage: Stage, n_params: int, rows: list[tuple[str, ...]],
                   flops: dict[str, float]) -> str:
    lines = [f"model: {type(stage.model).__name__}  parameters: {n_params:,} "
             f"({n_params / 1e9:.3f} B)",
             f"resolution: {stage.resolution} (training {stage.train_resolution}), low-res input: "
             f"{stage.lowres_resolution}, text: {stage.text_length} x {stage.text_embed_dim}"]
    for name, value in flops.items():
        lines.append(f"{name}: {value / 1e9:,.1f} GFLOPs per example")
    header = ("level res", "channels", "res blocks down/up", "attention", "params (M)")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str], bindings: Sequence[str] = ()) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if FLAGS.if_config and (FLAGS.gin_file or bindings):
        raise app.UsageError("--if_config describes an IF U-Net from its config.json alone; "
                             "drop --gin_file / --gin. bindings")
    if FLAGS.if_config:
        stage = load_if_config_stage(FLAGS.if_config)
    elif not FLAGS.gin_file:
        raise app.UsageError("pass --gin_file=gin_configs/base64.gin (or sr256.gin, sr1024.gin), "
                             "or --if_config=IF_MODEL/unet/config.json")
    else:
        stage = load_stage(FLAGS.gin_file, bindings, FLAGS.gin_search_paths)
    params = nn.meta.unbox(abstract_params(stage))
    flops = {}
    if FLAGS.flops != "none":
        for name, fn in (("training step (fwd+bwd)", train_step_flops),
                         ("sampling step (guided, cond+uncond)", sample_step_flops)):
            start = time.perf_counter()
            flops[name] = fn(stage, params, FLAGS.flops)
            print(f"[{name}: {FLAGS.flops} cost analysis took "
                  f"{time.perf_counter() - start:.1f} s]")
    print(format_summary(stage, count_params(params), layout_rows(stage, params), flops))


def run() -> None:
    # `--gin.NAME=VALUE` flags are not absl flags: split them out before absl parses argv.
    argv, bindings = gin_utils.rewrite_flag_bindings(sys.argv)
    app.run(lambda args: main(args, bindings), argv=argv)


if __name__ == "__main__":
    run()
