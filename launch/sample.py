r"""Samples a trained cascade: prompts in, PNGs + per-prompt grids + samples.json out.

  python -m launch.sample --stages=DIR1,DIR2,DIR3 --t5=PATH --prompts="a red circle" \
      --out=DIR --seed=0 [--num_per_prompt=4] [--start=0 --stop=3] [--lowres=IMG,...] \
      [--gin.SamplingConfig.num_steps=25] [--gin.stage1/SamplingConfig.aug_level=0.2]

``--prompts`` is a prompt or a text file with one prompt per line. Stage directories are the
trainer's workdirs (base first); each stage's architecture and sampler settings come from the
stage record saved with its checkpoint, ``--gin.`` bindings of ``SamplingConfig`` change them
(unscoped for every stage, ``stage<i>/`` for stage i).
``--start=1`` with ``--lowres=a.png,b.png`` super-resolves your own images (one per prompt).

DeepFloyd IF: ``--stages=if:PATH_I,if:PATH_II --t5=PATH_T5_XXL`` samples IF's stages I and II
(diffusers model directories, or their unet/ directories, downloaded by the user) with IF's
sampler settings; a trained SR stage of ours may follow them. ``--gin.load_if_stage.dtype`` and
``--gin.load_t5.dtype`` ('bfloat16' halves the memory) and ``--gin.load_t5.vocab`` (IF keeps
spiece.model in tokenizer/) complete the README's command ("Sample DeepFloyd IF weights").

Bad input (an invalid or NaN/Inf sampler setting, a low-res image holding NaN/Inf, a stage whose
samples come out NaN) ends the run with one line on stderr and exit status 1; no image is written.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
from absl import app, flags

from imagen_jax import cascade as cascade_lib
from imagen_jax import gin_utils, partitioning
from imagen_jax.cascade import CascadeError
from imagen_jax.data.images import NonFiniteImageError, read_rgb
from imagen_jax.errors import ImagenError
from imagen_jax.eval.samples import write_samples
from imagen_jax.train.metrics import image_grid
from launch import shared_flags as sf

FLAGS = flags.FLAGS
sf.DEFINE_list("stages", [], "Stage workdirs, comma-separated, base first; if:PATH for a "
               "DeepFloyd IF U-Net (diffusers directory).")
sf.DEFINE_string("t5", None, "T5 checkpoint directory (Hugging Face or T5X).")
sf.DEFINE_string("prompts", None, "A prompt, or a text file with one prompt per line.")
sf.DEFINE_string("out", None, "Output directory.")
sf.DEFINE_integer("seed", 0, "Random seed.")
sf.DEFINE_integer("num_per_prompt", None, "Images per prompt (1).")
sf.DEFINE_integer("start", 0, "First stage to run (1: super-resolve --lowres images).")
sf.DEFINE_integer("stop", None, "One past the last stage to run (default: all).")
sf.DEFINE_list("lowres", None, "Low-resolution input images when --start > 0.")
sf.DEFINE_integer("max_batch", None, "Run in chunks of this many images (memory bound).")
sf.DEFINE_multi_string("gin_file", [], "Extra gin files (SamplingConfig overrides, mesh).")
sf.DEFINE_bool("progress", True, "Progress bar per stage (adds one host callback per step).")


def read_prompts(value: str) -> list[str]:
    """A prompt, or the non-empty lines of a file. An empty string is one (empty) prompt."""
    if value and os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
        if not prompts:
            raise SystemExit(f"--prompts file {value!r} has no prompts")
        return prompts
    return [value]


def read_lowres(paths: list[str]) -> np.ndarray:
    """The ``--lowres`` images as uint8 [N, h, w, 3].

    Raises ``CascadeError`` (one line, naming the file) for a missing or undecodable file,
    images of different sizes, or a float image holding NaN/Inf (PIL would make those black).
    """

    images = []
    for path in paths:
        try:
            images.append(read_rgb(path, f"--lowres image {path!r}"))
        except NonFiniteImageError as e:
            raise CascadeError(str(e)) from None
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three on bad files
            raise CascadeError(f"--lowres image {path!r} cannot be read: {e}") from None
    sizes = sorted({im.shape for im in images})
    if len(sizes) > 1:
        raise CascadeError(f"--lowres images have different sizes {sizes}; pass one size")
    return np.stack(images)


def sample_outputs(result, *, settings: list[dict],
                   num_per_prompt: int) -> tuple[dict[str, np.ndarray], dict]:
    """What ``launch.sample`` writes: ({file name: uint8 image}, the samples.json record).

    A PNG per image (``promptNNN_sampleK.png``), a grid per prompt (``promptNNN_grid.png``) and
    a record of the seed, every stage's settings, the timings and which file holds what.
    """
    final = result.final
    images, records, grids = {}, [], []
    for i, (prompt, image) in enumerate(zip(result.prompts, final)):
        p, k = divmod(i, num_per_prompt)
        path = f"prompt{p:03d}_sample{k}.png"
        images[path] = image
        records.append({"prompt": prompt, "prompt_index": p, "sample": k, "file": path})
    for p in range(len(final) // num_per_prompt):
        path = f"prompt{p:03d}_grid.png"
        images[path] = image_grid(final[p * num_per_prompt:(p + 1) * num_per_prompt])
        grids.append({"prompt": result.prompts[p * num_per_prompt], "file": path})
    record = {
        "seed": result.seed,
        "num_per_prompt": num_per_prompt,
        "stages": settings,
        "timings": result.timings,
        "images": records,
        "grids": grids,
    }
    return images, record


def stage_settings(cascade, start: int, stop: int | None, stage_dirs: list[str]) -> list[dict]:

    stop = len(cascade.stages) if stop is None else stop
    return [
        {
            "dir": stage_dirs[i],
            "name": s.name,
            "resolution": s.resolution,
            "lowres_resolution": s.lowres_resolution,
            "prediction": s.prediction,
            "text_fingerprint": s.text_fingerprint,
            **dataclasses.asdict(s.sampling),
        }
        for i, s in enumerate(cascade.stages) if start <= i < stop
    ]


def run(argv_bindings: list[str]) -> dict:

    for name in ("stages", "prompts", "out"):
        if getattr(FLAGS, name) is None:
            raise SystemExit(f"--{name} is required (see python -m launch.sample --help)")
    stage_dirs = [d for d in FLAGS.stages if d]
    t0 = time.perf_counter()
    try:
        # User bindings: the mesh and the per-stage SamplingConfig overrides (checked here).
        gin_utils.parse(FLAGS.gin_file, argv_bindings, finalize=False)
        overrides = cascade_lib.gin_sampling_overrides(len(stage_dirs))  # validated here
        # Cheap input checks before the (slow) checkpoint and T5 loading.
        lowres = read_lowres(FLAGS.lowres) if FLAGS.lowres else None

        mesh = partitioning.make_mesh()
        rules = partitioning.logical_axis_rules()
        cascade = cascade_lib.load_cascade(
            stage_dirs, FLAGS.t5, mesh=mesh, rules=rules, overrides=overrides,
            max_batch=FLAGS.max_batch,
        )
        load_s = time.perf_counter() - t0
        prompts = read_prompts(FLAGS.prompts)
        # Refuses NaN/Inf inputs and stops, naming the stage, if a stage samples NaN/Inf.
        result = cascade.sample(
            prompts, FLAGS.seed, num_per_prompt=FLAGS.num_per_prompt or 1, lowres=lowres,
            start=FLAGS.start, stop=FLAGS.stop, progress=FLAGS.progress,
        )
    except ImagenError as e:
        raise sf.one_line_exit("launch.sample", e) from None
    result.timings["load_s"] = load_s
    settings = stage_settings(cascade, FLAGS.start, FLAGS.stop, stage_dirs)
    images, record = sample_outputs(result, settings=settings,
                                    num_per_prompt=FLAGS.num_per_prompt or 1)
    write_samples(FLAGS.out, images, manifest=record)
    print(f"wrote {len(result.final)} images to {FLAGS.out} "
          f"({result.timings['sample_s']:.1f}s sampling, {result.timings['compile_s']:.1f}s "
          "compile)")
    return record


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; gin bindings are --gin.NAME=VALUE")
    run(sf.GIN_BINDINGS)


if __name__ == "__main__":
    app.run(main, flags_parser=sf.parse_flags)
