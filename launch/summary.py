r"""Model summary: parameter count, FLOPs per example and per-resolution layout of a stage.

    python -m launch.summary --gin_file=gin_configs/base64.gin [--gin.base_2b.channels=256]

The gin files must define the macros ``MODEL``, ``RESOLUTION``, ``TRAIN_RESOLUTION`` and
``LOWRES_RESOLUTION`` (gin_configs/models/*.gin do). Parameters are counted with
``jax.eval_shape`` (nothing is allocated); FLOPs come from XLA's cost analysis of the compiled
training step (forward + backward of the eps-MSE loss) and of one guided sampling step (one model
call on the cond + uncond batch), per generated example. ``--flops=lowered`` reads the
pre-optimisation HLO instead (seconds instead of minutes for the 2 B model on a CPU).
"""

from __future__ import annotations

import dataclasses
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
from imagen_jax.nn import BaseUNet, EfficientUNet
from launch import shared_flags as sf

FLAGS = flags.FLAGS
sf.DEFINE_multi_string("gin_file", [], "Gin files (the stage config), in order.")
sf.DEFINE_multi_string("gin_search_paths", [], "Extra directories to look up gin files in.")
sf.DEFINE_enum("flops", "compiled", ["compiled", "lowered", "none"],
                  "FLOPs from the compiled executable's cost analysis, from the lowered HLO "
                  "(fast, before XLA optimisations), or skip.")

# Bindings that route the stage macros into `summary_inputs`.
STAGE_BINDINGS = (
    "summary_inputs.model = %MODEL",
    "summary_inputs.resolution = %RESOLUTION",
    "summary_inputs.train_resolution = %TRAIN_RESOLUTION",
    "summary_inputs.lowres_resolution = %LOWRES_RESOLUTION",
)


@dataclasses.dataclass(frozen=True)
class SummaryInputs:
    """What the summary needs of a stage: the model and its input sizes."""

    model: nn.Module
    resolution: int
    train_resolution: int
    lowres_resolution: int | None
    text_length: int = 128  # T5 max length (PAPER_NOTES: not stated in the paper; our default)

    @property
    def is_sr(self) -> bool:
        return self.lowres_resolution is not None

    def lowres_for(self, resolution: int) -> int | None:
        """Low-resolution side matching an output side (crops keep the upsampling factor)."""
        if self.lowres_resolution is None:
            return None
        return resolution * self.lowres_resolution // self.resolution


@gin.configurable
def summary_inputs(model: nn.Module, resolution: int, train_resolution: int | None = None,
               lowres_resolution: int | None = None, text_length: int = 128) -> SummaryInputs:
    return SummaryInputs(model, resolution, train_resolution or resolution, lowres_resolution,
                     text_length)


def load_stage(gin_files: Sequence[str], bindings: Sequence[str] = (),
                    search_paths: Sequence[str] = ()) -> SummaryInputs:
    """Parses the stage's gin files (clearing any earlier config) and builds its SummaryInputs."""
    gin.clear_config()
    try:
        # Undefined macros surface either when gin finalises (validation) or at the call.
        gin_utils.parse(gin_files, [*bindings, *STAGE_BINDINGS], search_paths)
        return summary_inputs()
    except gin_utils.GinConfigError:
        raise
    except (ValueError, KeyError) as e:
        raise gin_utils.GinConfigError(
            f"{e}\nThe gin files must define the macros MODEL, RESOLUTION, TRAIN_RESOLUTION and "
            "LOWRES_RESOLUTION (include a gin_configs/models/*.gin file)") from e


def abstract_inputs(spec: SummaryInputs, batch: int, resolution: int) -> tuple[Any, ...]:
    """ShapeDtypeStructs of (x, t, text_embeds, text_mask[, lowres, aug_level])."""
    s = jax.ShapeDtypeStruct
    f32 = jnp.float32
    args = [s((batch, resolution, resolution, 3), f32), s((batch,), f32),
            s((batch, spec.text_length, spec.model.text_embed_dim), f32),
            s((batch, spec.text_length), jnp.bool_)]
    if spec.is_sr:
        lowres = spec.lowres_for(resolution)
        args += [s((batch, lowres, lowres, 3), f32), s((batch,), f32)]
    return tuple(args)


def abstract_params(spec: SummaryInputs) -> Any:
    """The parameter tree as ShapeDtypeStructs (unboxed), via eval_shape: nothing allocated."""
    inputs = abstract_inputs(spec, 1, spec.train_resolution)
    variables = jax.eval_shape(lambda *a: spec.model.init(jax.random.key(0), *a), *inputs)
    return nn.meta.unbox(variables)["params"]


def count_params(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _flops(fn: Any, args: Sequence[Any], mode: str) -> float:
    lowered = jax.jit(fn).lower(*args)
    analysis = lowered.compile().cost_analysis() if mode == "compiled" else \
        lowered.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0]
    return float(analysis["flops"])


def train_step_flops(spec: SummaryInputs, params: Any, mode: str = "compiled") -> float:
    """FLOPs per example of forward + backward of the eps-MSE loss at the training size."""
    batch = 1
    inputs = abstract_inputs(spec, batch, spec.train_resolution)

    def loss(p, x, *cond):
        eps_hat = spec.model.apply({"params": p}, x, *cond, train=True)
        return jnp.mean(jnp.square(eps_hat - x))

    return _flops(jax.grad(loss), (params, *inputs), mode) / batch


def sample_step_flops(spec: SummaryInputs, params: Any, mode: str = "compiled") -> float:
    """FLOPs per generated example of one guided sampling step at full resolution: one model
    call on the concatenated (cond, uncond) batch of 2."""
    inputs = abstract_inputs(spec, 2, spec.resolution)

    def step(p, *a):
        return spec.model.apply({"params": p}, *a)

    return _flops(step, (params, *inputs), mode)


def layout_rows(spec: SummaryInputs, params: Any) -> list[tuple[str, ...]]:
    """One row per U-Net level: resolution, channels, residual blocks, attention, parameters."""
    model = spec.model
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
            res = spec.resolution // model.patch_size // 2**level
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
            res = spec.resolution // 2 ** (level + 1)
            kinds = [k for k, on in (("self", self_attn[level]), ("text", cross_attn[level])) if on]
            attn = "+".join(kinds) or "-"
            if kinds:
                attn += " every block" if model.attn_every_res_block else " once"
            rows.append((f"{res}x{res}", str(ch), f"{n}/{n}", attn,
                         f"{per_level.get(level, 0) / 1e6:.1f}"))
    return rows


def format_summary(spec: SummaryInputs, n_params: int, rows: list[tuple[str, ...]],
                   flops: dict[str, float]) -> str:
    lines = [f"model: {type(spec.model).__name__}  parameters: {n_params:,} "
             f"({n_params / 1e9:.3f} B)",
             f"resolution: {spec.resolution} (training {spec.train_resolution}), low-res input: "
             f"{spec.lowres_resolution}, text: {spec.text_length} x {spec.model.text_embed_dim}"]
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
    if not FLAGS.gin_file:
        raise app.UsageError("pass --gin_file=gin_configs/base64.gin (or sr256.gin, sr1024.gin)")
    spec = load_stage(FLAGS.gin_file, bindings, FLAGS.gin_search_paths)
    params = abstract_params(spec)
    flops = {}
    if FLAGS.flops != "none":
        for name, fn in (("training step (fwd+bwd)", train_step_flops),
                         ("sampling step (guided, cond+uncond)", sample_step_flops)):
            start = time.perf_counter()
            flops[name] = fn(spec, params, FLAGS.flops)
            print(f"[{name}: {FLAGS.flops} cost analysis took "
                  f"{time.perf_counter() - start:.1f} s]")
    print(format_summary(spec, count_params(params), layout_rows(spec, params), flops))


def run() -> None:
    # `--gin.NAME=VALUE` flags are not absl flags: split them out before absl parses argv.
    argv, bindings = gin_utils.rewrite_flag_bindings(sys.argv)
    app.run(lambda args: main(args, bindings), argv=argv)


if __name__ == "__main__":
    run()
