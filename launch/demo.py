r"""`make demo`: train a tiny three-stage cascade on the shapes dataset, sample, score, show.

    python -m launch.demo [--out=demo_out] [--preset=single|full] [--num_prompts=64]
        [--steps=1700,500,500] [--gin.NAME=VALUE ...]   # gin applies to every stage
        [--pretrained=launch/demo_cascade|''] [--export_to=DIR] [--budget_s=SECONDS]

0. samples and scores the pretrained demo cascade shipped in `launch/demo_cascade/` (made by this
   trainer in a longer run, see its PROVENANCE.json) into `<out>/pretrained/`: a few minutes;
1. renders the shapes dataset into a local tfds directory: `imagen_shapes/demo_<preset>_<N>` at
   128 px (base and first SR stage) and the smaller `imagen_shapes/demo512_<preset>_<M>` at
   512 px (last stage). `--preset=single` (default): one object per scene, drawn large enough to
   be legible at 32 px; `--preset=full`: half the scenes hold two objects and a relation (the
   harder tier, for longer runs; default output directory `demo_out_full`);
2. writes a small RANDOM T5 encoder (`imagen_jax.text.testing.write_random_t5`; no weights can
   be downloaded here) and caches the train captions' embeddings of both datasets;
3. trains 32 px base -> 128 px SR -> 512 px SR (4x factors; both SR stages on 64 px crops, as the
   paper trains its 1024 stage on 256 crops) through the real trainer (`gin_configs/demo/*.gin`);
4. samples the `heldout` prompts (colour-shape pairs never seen in training) with the compiled
   cascade, scores every stage's images with the shapes adherence scorer, and writes
   `grid.png`, `index.html` (prompt, images and score side by side) and `results.json`;
5. runs the two SR stages alone on the ground-truth 32 px images of the same prompts and scores
   them too: the SR stages should keep the content of whatever they are given.

A second run finds the finished checkpoints and only samples (pass --retrain to start over).

`--budget_s` caps the run's wall time (`make demo` passes 20 minutes less its set-up): the stages
of step 3 train for their share of what is left once the datasets are ready and the time
sampling and scoring will take is set aside (`training_seconds`), each stopping at its step count
or its deadline (`TrainConfig.max_seconds`), whichever comes first. How far they got depends on
the machine: `results.json` and the page record each stage's steps. A rerun resumes them with a
new budget.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import gin
import jax
from absl import app, flags

from imagen_jax import cascade as cascade_lib
from imagen_jax import gin_utils, partitioning
from imagen_jax.data import embed_cache, pipeline, shapes, shapes_tfds
from imagen_jax.errors import CascadeError
from imagen_jax.eval import shapes_score
from imagen_jax.eval.samples import Page, image_data_uri, write_samples
from imagen_jax.text import load_t5
from imagen_jax.text.testing import write_random_t5
from imagen_jax.train.checkpoint import Checkpointer
from imagen_jax.train.metrics import image_grid
from imagen_jax.train.trainer import TrainConfig, train
from launch import shared_flags as sf

FLAGS = flags.FLAGS
sf.DEFINE_string("out", None, "Output directory (data, T5, checkpoints, results; demo_out).")
sf.DEFINE_integer("num_prompts", 64, "Heldout prompts to sample and score.")
sf.DEFINE_integer("num_train", 20000, "Training scenes to render at 128 px (base, first SR).")
sf.DEFINE_integer("num_train_512", 2000, "Training scenes to render at 512 px (last SR stage).")
sf.DEFINE_list("steps", None, "Train steps per stage (base,sr128,sr512); default: gin files.")
sf.DEFINE_integer("seed", 0, "Sampling seed.")
sf.DEFINE_bool("retrain", False, "Delete existing checkpoints and train again.")
sf.DEFINE_enum("preset", "single", ["single", "full"], "Scenes: 'single' (default) one object "
               "per scene; 'full' also two-object relational scenes (the harder tier).")

sf.DEFINE_string("pretrained", None, "Pretrained demo cascade to sample and score first "
                 "(default launch/demo_cascade; '' skips it).")
sf.DEFINE_float("budget_s", None, "Wall-clock budget of this run in seconds; the fresh stages "
                "train until their share of it is spent (see above). None: the steps decide.")
sf.DEFINE_string("export_to", None, "After the run, export its cascade here as a pretrained "
                 "demo cascade (float16 EMA parameters + the random T5).")

STAGES = ("base", "sr128", "sr512")
# The pretrained demo cascade shipped with the repository (`export_cascade`; how it was made:
# its PROVENANCE.json) and the scenes it was trained on.
PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_cascade")
PRETRAINED_PRESET = "single"
FRESH = "trained from nothing by launch.demo (the stages/ next to this page)"
PRETRAINED_ORIGIN = ("pretrained by this trainer in a longer run (see "
                     "launch/demo_cascade/PROVENANCE.json)")


# Two prepared datasets: the base and first SR stage need many scenes at <= 128 px, the last
# stage a few at 512 px (rendering and decoding 512 px images for the base would cost minutes).
# One tfds config per (dataset, training-set size).
DATASETS = {"main": ("demo_{preset}_{num_train}", 128),
            "hires": ("demo512_{preset}_{num_train}", 512)}
STAGE_DATASET = {"base": "main", "sr128": "main", "sr512": "hires"}
NUM_HELDOUT = {"main": 256, "hires": 16}
T5_VOCAB_SIZE = 512
THUMB_PX = 128  # every stage's image is shown at this size in index.html (nearest neighbour)
# Under --budget_s, each stage's share of the training time: the default steps' split of a
# quiet 2-core run (base 556 s, SR 146 s and 165 s: bench/RESULTS.md "make demo", 2026-11-30).
# A stage done early leaves its time to the next ones.
BUDGET_SHARES = {"base": 0.64, "sr128": 0.17, "sr512": 0.19}
# Set aside for sampling and scoring the fresh cascade: a multiple of what the pretrained
# cascade (the same stage shapes, prompts and sampler) took in this run; 2: its SR stages run a
# second time on the ground truth. Without a pretrained cascade to time, a fraction of the budget.
EVAL_RESERVE_FACTOR = 2.0
EVAL_RESERVE_FRACTION = 0.25


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def dataset_name(dataset: str, num_train: int, preset: str = "single") -> str:
    return f"imagen_shapes/{DATASETS[dataset][0].format(preset=preset, num_train=num_train)}"


def prepare_dataset(data_dir: str, dataset: str, num_train: int, preset: str = "single") -> Any:
    """Renders a demo config of `imagen_shapes` into ``data_dir`` (idempotent).

    The config is registered on the builder class at run time: it exists only for the demo.
    """
    import tensorflow_datasets as tfds  # heavy (TensorFlow): tfds only


    template, resolution = DATASETS[dataset]
    name = template.format(preset=preset, num_train=num_train)
    spec = shapes.scene_spec(preset)
    shapes_tfds.register_config(shapes_tfds.ShapesConfig(
        name=name, description=f"make demo ({preset}): {resolution} px, {num_train} train",
        resolution=resolution, num_train=num_train, num_heldout=NUM_HELDOUT[dataset],
        spec=None if spec == shapes.DEFAULT_SPEC else spec,
    ))
    builder = tfds.builder(f"imagen_shapes/{name}", data_dir=data_dir)
    builder.download_and_prepare()
    return builder


def prepare_text(out: str, data_dir: str, num_train: dict[str, int],
                 preset: str = "single") -> tuple[str, dict[str, str], str]:
    """Random T5 (spm on train captions) + an embedding cache per dataset:
    (t5 dir, {dataset: cache dir}, fingerprint)."""

    t5_dir = os.path.join(out, "t5")
    encoder, cache_dirs = None, {}
    for dataset in DATASETS:
        name = dataset_name(dataset, num_train[dataset], preset)
        source = pipeline.SourceSpec(name=name, split="train", data_dir=data_dir)
        captions = pipeline.CaptionTable(source)
        if encoder is None:
            if not os.path.exists(os.path.join(t5_dir, "config.json")):
                texts = [captions[i][1] for i in range(min(len(captions), 4000))]
                write_random_t5(t5_dir, texts=texts, vocab_size=T5_VOCAB_SIZE)
            encoder = load_t5(t5_dir, max_length=_text_length())
        cache_dirs[dataset] = os.path.join(out, "embeddings", name.split("/")[-1])
        embed_cache.build_cache(cache_dirs[dataset], encoder, captions, shard_size=4096,
                                encode_batch_size=256,
                                dataset_info=pipeline.source_info(source))
    return t5_dir, cache_dirs, encoder.fingerprint


def _text_length() -> int:
    """TEXT_LENGTH of gin_configs/demo/common.gin (one source of truth)."""


    gin.clear_config()
    gin_utils.parse(["demo/common.gin"], finalize=False)
    length = gin.query_parameter("%TEXT_LENGTH")
    gin.clear_config()
    return int(length)


def stage_bindings(stage: str, out: str, cache_dirs: dict[str, str], t5_dir: str,
                   fingerprint: str, num_train: dict[str, int],
                   preset: str = "single") -> list[str]:
    dataset = STAGE_DATASET[stage]
    return [
        f"SourceSpec.name = '{dataset_name(dataset, num_train[dataset], preset)}'",
        f"DATA_DIR = '{os.path.join(out, 'tfds')}'",
        f"CACHE_DIR = '{cache_dirs[dataset]}'",
        f"T5_PATH = '{t5_dir}'",
        f"TEXT_FINGERPRINT = '{fingerprint}'",
    ]


def training_seconds(name: str, seconds_left: float, done: Sequence[str] = ()) -> float:
    """Stage ``name``'s share of ``seconds_left`` (the training time still available under
    --budget_s), among the stages not in ``done``; >= 0."""
    remaining = [n for n in STAGES if n not in done]
    share = BUDGET_SHARES[name] / sum(BUDGET_SHARES[n] for n in remaining)
    return max(0.0, seconds_left * share)


def stage_step(stage_dir: str) -> int | None:
    """The training step of a trainer workdir's newest checkpoint or of an exported stage."""
    if cascade_lib.is_exported_stage(stage_dir):
        return cascade_lib.read_export_record(stage_dir)["step"]
    ckpt = Checkpointer(stage_dir, read_only=True)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def train_stage(name: str, workdir: str, bindings: Sequence[str], steps: int | None,
                max_seconds: float | None = None) -> float:
    """Trains one stage unless its final checkpoint exists, for at most ``max_seconds``
    (`TrainConfig.max_seconds`); returns seconds spent."""


    gin.clear_config()
    extra = [f"TrainConfig.num_steps = {steps}"] if steps else []
    if max_seconds is not None:
        extra.append(f"TrainConfig.max_seconds = {max_seconds:.1f}")
    gin_utils.parse([f"demo/{name}.gin"], [*bindings, *extra], finalize=False)
    num_steps = TrainConfig().num_steps
    if os.path.isdir(workdir):
        done = stage_step(workdir)
        if done is not None and done >= num_steps:
            _log(f"stage {name}: checkpoint at step {done} found in {workdir}, not retraining")
            gin.clear_config()
            return 0.0
    limit = "" if max_seconds is None else f" or {max_seconds:.0f} s, whichever comes first"
    _log(f"stage {name}: training {num_steps} steps{limit} in {workdir}")
    t0 = time.perf_counter()
    train(workdir)
    seconds = time.perf_counter() - t0
    gin.clear_config()
    _log(f"stage {name}: trained in {seconds:.0f}s")
    return seconds


def score_stages(images: Sequence[Any], prompts: Sequence[str],
                 preset: str = "single") -> tuple[list[dict], list[list]]:
    """Adherence of every stage's images: (summary per stage, per-image results per stage)."""

    cfg = shapes_score.scorer_config(preset)
    per_image = [[shapes_score.score_image(im, p, cfg) for im, p in zip(stage_images, prompts)]
                 for stage_images in images]
    return [shapes_score.summarize(results) for results in per_image], per_image


def report_page(result: Any, names: Sequence[str], summaries: list[dict],
                per_image: list[list], timings: dict[str, float], sr_from_truth: list[dict],
                truth_resolution: int, preset: str, origin: str,
                steps: Sequence[int | None]) -> Page:
    """``index.html``: per prompt every stage's image (embedded) and its verdict per stage
    (exact match, else the attributes it got wrong); the score summaries above."""
    rows = []
    for i, prompt in enumerate(result.prompts):
        verdicts = [(r.exact, [a for a, v in r.checks.items() if v and not all(v)])
                    for r in (per_image[s][i] for s in range(len(names)))]
        rows.append({
            "prompt": prompt,
            "cells": [{"src": image_data_uri(stage[i], THUMB_PX), "title": names[s]}
                      for s, stage in enumerate(result.images)],
            "verdicts": verdicts,
        })
    return Page("demo.html.j2", {
        "title": "imagen-jax demo",
        "thumb": THUMB_PX,
        "preset": preset,
        "origin": origin,
        "names": list(names),
        "summaries": list(zip(names, summaries, steps)),
        "sr_from_truth": list(zip(names[1:], sr_from_truth)),
        "truth_resolution": truth_resolution,
        "timings": json.dumps({k: round(v, 1) for k, v in timings.items()}),
        "rows": rows,
    })


def write_report(out: str, result: Any, names: Sequence[str], summaries: list[dict],
                 per_image: list[list], timings: dict[str, float],
                 sr_from_truth: list[dict], truth_resolution: int,
                 preset: str = "single", origin: str = FRESH,
                 steps: Sequence[int | None] | None = None) -> dict[str, str]:
    """grid.png (final images), index.html (prompt | stage images | score), results.json;
    ``steps``: each stage's training steps. Returns {file name: path}."""
    steps = list(steps) if steps is not None else [None] * len(names)
    results = {"preset": preset, "origin": origin, "stages": list(names), "steps": steps,
               "scores": summaries,
               "timings": timings,
               "sr_from_ground_truth": sr_from_truth, "prompts": result.prompts,
               "exact": [[r.exact for r in stage] for stage in per_image]}
    page = report_page(result, names, summaries, per_image, timings, sr_from_truth,
                       truth_resolution, preset, origin, steps)
    return write_samples(out, {"grid.png": image_grid(result.final)}, manifest=results,
                         manifest_file="results.json", pages={"index.html": page})


def evaluate_cascade(out: str, stage_dirs: Sequence[str], t5_dir: str, *, num_prompts: int,
                     seed: int, preset: str, progress: bool, timings: dict[str, float],
                     with_truth: bool = True, origin: str = FRESH) -> dict[str, Any]:
    """Samples the heldout prompts through the cascade of ``stage_dirs`` (trainer workdirs or
    exported stages) and, if ``with_truth``, its SR stages alone on the ground-truth
    base-resolution images; scores them and writes grid.png, index.html and results.json to
    ``out``. ``timings`` (seconds so far) is completed and reported. Returns `run`'s dict."""
    t0 = time.perf_counter()
    cascade = cascade_lib.load_cascade(stage_dirs, t5_dir, mesh=partitioning.make_mesh())
    prompts = shapes.heldout_prompts(num_prompts, preset)
    result = cascade.sample(prompts, seed, progress=progress)
    timings["sample_s"] = time.perf_counter() - t0
    timings.update({f"cascade_{k}": v for k, v in result.timings.items()})

    # The SR stages on the ground truth at the base resolution: whether they keep the content,
    # apart from how well the base follows the prompt.
    t0 = time.perf_counter()
    base_resolution = cascade.stages[0].resolution
    sr_from_truth: list[dict] = []
    if with_truth:
        truth = shapes.heldout_images(len(prompts), base_resolution, preset)
        from_truth = cascade.sample(prompts, seed, lowres=truth, start=1, progress=progress)
        sr_from_truth, _ = score_stages(from_truth.images, prompts, preset)
        timings["sample_sr_from_truth_s"] = time.perf_counter() - t0

    summaries, per_image = score_stages(result.images, result.prompts, preset)
    names = [f"{s.name} {s.resolution}px" for s in cascade.stages]
    steps = [stage_step(d) for d in stage_dirs]
    write_report(out, result, names, summaries, per_image, timings, sr_from_truth,
                 base_resolution, preset, origin, steps)
    _log("prompt adherence on heldout prompts (exact match = every attribute right):")
    for name, s, n in zip(names, summaries, steps):
        _log(f"  {name:>12} ({n} steps): exact {s['exact_match']:.1%}  colour {s['colour']:.1%}  "
             f"shape {s['shape']:.1%}  size {s['size']:.1%}  position {s['position']:.1%}  "
             f"relation {s['relation']:.1%}")
    if sr_from_truth:
        _log(f"super-resolution stages on the ground-truth {base_resolution}px images:")
    for name, s in zip(names[1:], sr_from_truth):
        _log(f"  {name:>12}: exact {s['exact_match']:.1%}  colour {s['colour']:.1%}  "
             f"shape {s['shape']:.1%}  size {s['size']:.1%}")
    return {"scores": summaries, "sr_from_ground_truth": sr_from_truth, "timings": timings,
            "result": result}


def pretrained_stage_dirs(pretrained: str) -> list[str]:
    """The exported stages of a pretrained demo cascade directory, base first.

    Raises CascadeError (one line) if one is missing."""
    dirs = [os.path.join(pretrained, n) for n in STAGES]
    for d in [*dirs, os.path.join(pretrained, "t5")]:
        if not os.path.isdir(d):
            raise CascadeError(
                f"pretrained demo cascade {pretrained!r} lacks {os.path.basename(d)}/; pass "
                "--pretrained='' to skip it, or export one with --export_to")
    return dirs


def export_cascade(out: str, dest: str, command: str = "") -> int:
    """Writes the demo in ``out`` (its trained stages and random T5) to ``dest`` as a pretrained
    demo cascade: each stage's EMA parameters in float16 (`export_stage`), the T5 directory
    copied, and ``PROVENANCE.json`` (``command``, the steps, the machine, and ``out``'s
    results.json: scores and timings). Returns the bytes written."""
    mesh = partitioning.make_mesh()
    rules = tuple(partitioning.logical_axis_rules())
    total, steps = 0, {}
    for name in STAGES:
        workdir = os.path.join(out, "stages", name)
        # The step is read once and loaded explicitly, so the record names what was exported.
        steps[name] = stage_step(workdir)
        stage, params = cascade_lib.load_stage(workdir, mesh=mesh, rules=rules, step=steps[name])
        total += cascade_lib.export_stage(stage, params, os.path.join(dest, name),
                                          step=steps[name])
    shutil.copytree(os.path.join(out, "t5"), os.path.join(dest, "t5"), dirs_exist_ok=True)
    total += sum(os.path.getsize(os.path.join(dest, "t5", f))
                 for f in os.listdir(os.path.join(dest, "t5")))
    results_file = os.path.join(out, "results.json")
    results = None
    if os.path.exists(results_file):
        with open(results_file) as f:
            results = json.load(f)
    provenance = {
        "command": command, "steps": steps,
        "exported": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                   f"{jax.default_backend()} backend",
        "results": results,
    }
    with open(os.path.join(dest, "PROVENANCE.json"), "w") as f:
        json.dump(provenance, f, indent=1)
    _log(f"exported the cascade of {out} to {dest} ({total / 2**20:.1f} MiB)")
    return total


def run(out: str, *, num_prompts: int = 64, num_train: int = 20000, num_train_512: int = 2000,
        steps: Sequence[int] | None = None, bindings: Sequence[str] = (), seed: int = 0,
        retrain: bool = False, progress: bool = True, preset: str = "single",
        pretrained: str | None = None, budget_s: float | None = None) -> dict[str, Any]:
    """The whole demo; returns {'scores': per-stage summaries, 'sr_from_ground_truth': summaries
    of the SR stages fed the ground truth, 'timings': seconds, 'result': the CascadeOutput,
    'pretrained': the same dict for the pretrained cascade (None if not sampled)}.

    ``pretrained``: a pretrained demo cascade (`export_cascade`'s layout) sampled and scored
    first, into ``<out>/pretrained/``; the single preset only (it was trained on those scenes).
    ``budget_s``: the run's wall-clock budget in seconds (module docstring); None: no limit.
    """

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    stage_dirs = [os.path.join(out, "stages", n) for n in STAGES]
    if retrain:
        shutil.rmtree(os.path.join(out, "stages"), ignore_errors=True)
    # One preset per output directory: the checkpoints found there are reused as they are.
    preset_file = os.path.join(out, "preset")
    if os.path.isdir(os.path.join(out, "stages")) and os.path.exists(preset_file):
        with open(preset_file) as f:
            previous = f.read().strip()
        if previous != preset:
            raise ValueError(f"{out} holds a demo trained with --preset={previous}, not {preset}: "
                             "pass another --out (or --retrain to replace it)")
    with open(preset_file, "w") as f:
        f.write(preset + "\n")

    from_pretrained = None
    if pretrained and preset != PRETRAINED_PRESET:
        _log(f"the pretrained demo cascade was trained on --preset={PRETRAINED_PRESET} scenes: "
             "not sampled")
    elif pretrained:
        _log(f"pretrained demo cascade ({pretrained}, trained by this trainer in a longer run; "
             "see its PROVENANCE.json):")
        pre_timings: dict[str, float] = {}
        from_pretrained = evaluate_cascade(
            os.path.join(out, "pretrained"), pretrained_stage_dirs(pretrained),
            os.path.join(pretrained, "t5"), num_prompts=num_prompts, seed=seed, preset=preset,
            progress=progress, timings=pre_timings, with_truth=False, origin=PRETRAINED_ORIGIN)
        timings["pretrained_s"] = time.perf_counter() - t_start
        _log(f"wrote {out}/pretrained/{{grid.png,index.html,results.json}}; now training a fresh "
             "cascade from nothing")

    sizes = {"main": num_train, "hires": num_train_512}
    t0 = time.perf_counter()
    for dataset, n in sizes.items():
        prepare_dataset(os.path.join(out, "tfds"), dataset, n, preset)
    timings["dataset_s"] = time.perf_counter() - t0
    _log(f"datasets ready ({timings['dataset_s']:.0f}s)")

    t0 = time.perf_counter()
    t5_dir, cache_dirs, fingerprint = prepare_text(out, os.path.join(out, "tfds"), sizes, preset)
    timings["text_s"] = time.perf_counter() - t0
    _log(f"random T5 + embedding caches ready ({timings['text_s']:.0f}s)")

    reserve = 0.0

    def seconds_left() -> float:  # training time still available under the budget
        return budget_s - (time.perf_counter() - t_start) - reserve

    if budget_s is not None:
        reserve = (EVAL_RESERVE_FACTOR * timings["pretrained_s"] if "pretrained_s" in timings
                   else EVAL_RESERVE_FRACTION * budget_s)
        _log(f"budget {budget_s:.0f}s: {seconds_left():.0f}s left to train, {reserve:.0f}s kept "
             "for sampling and scoring")
    for i, (name, workdir) in enumerate(zip(STAGES, stage_dirs)):
        stage_gin = [*stage_bindings(name, out, cache_dirs, t5_dir, fingerprint, sizes, preset),
                     *bindings]
        max_seconds = None
        if budget_s is not None:
            max_seconds = training_seconds(name, seconds_left(), STAGES[:i])
        timings[f"train_{name}_s"] = train_stage(
            name, workdir, stage_gin, None if steps is None else int(steps[i]), max_seconds)

    _log(f"the cascade trained in {out}/stages:")
    done = evaluate_cascade(out, stage_dirs, t5_dir, num_prompts=num_prompts, seed=seed,
                            preset=preset, progress=progress, timings=timings)
    timings["total_s"] = time.perf_counter() - t_start
    _log(f"wrote {out}/grid.png, {out}/index.html, {out}/results.json; "
         f"total {timings['total_s']:.0f}s")
    return {**done, "pretrained": from_pretrained}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if FLAGS.steps is not None and len(FLAGS.steps) != len(STAGES):
        raise app.UsageError(f"--steps needs {len(STAGES)} values ({','.join(STAGES)})")
    out = FLAGS.out or ("demo_out" if FLAGS.preset == "single" else f"demo_out_{FLAGS.preset}")
    pretrained = FLAGS.pretrained
    if pretrained is None:  # the shipped one, where this checkout has it
        pretrained = PRETRAINED_DIR if os.path.isdir(PRETRAINED_DIR) else ""
    run(out, num_prompts=FLAGS.num_prompts, num_train=FLAGS.num_train,
        num_train_512=FLAGS.num_train_512, steps=FLAGS.steps,
        bindings=sf.GIN_BINDINGS, seed=FLAGS.seed, retrain=FLAGS.retrain, preset=FLAGS.preset,
        pretrained=pretrained or None, budget_s=FLAGS.budget_s)
    if FLAGS.export_to:
        command = " ".join(["python -m launch.demo", *sys.argv[1:]])
        export_cascade(out, FLAGS.export_to, command=command)


if __name__ == "__main__":
    app.run(main, flags_parser=sf.parse_flags)
