"""Evaluate a cascade: DrawBench, FID, guidance sweep (Imagen, Section 4).

    python -m launch.evaluate drawbench --stages=base,sr256 --t5=T5_DIR --out=DIR \
        [--num_per_prompt=8] [--categories=Colors,Counting] [--clip_weights=CLIP_DIR]
    python -m launch.evaluate drawbench --compare=RUN_A,RUN_B --out=DIR     # side-by-side page
    python -m launch.evaluate fid --stages=... --t5=... \
        --reference=tfds:coco_captions/2017:val|DIR \
        --inception_weights=pt_inception-2015-12-05-6726825d.pth --num_samples=30000 --out=DIR
    python -m launch.evaluate sweep --stages=... --t5=... --guidance=1,1.25,1.5,2,3,5 --out=DIR ...

The sampler is the cascade built from ``--stages``/``--t5`` (``imagen_jax.cascade``), or any
``--sample_fn=MODULE:FACTORY`` where ``FACTORY(guidance=None) -> sample_fn(prompts, seed)``.
Metrics: CLIP score with ``--clip_weights``, FID with ``--inception_weights`` + ``--reference``;
without weights the default metric is shapes adherence (``imagen_jax.eval.shapes_score``), which
needs none. Every run is resumable: rerun the same command after a preemption.
Sampler settings: ``--num_steps``/``--sampler`` override every stage; anything else through
``--gin.stage1/SamplingConfig.aug_level=0.2`` style bindings. Settings are validated before
anything is loaded; bad input (an invalid or NaN/Inf setting, a reference image holding NaN/Inf,
a stage that samples NaN) ends the run with one line on stderr and exit status 1.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging

from imagen_jax import cascade as cascade_lib
from imagen_jax import gin_utils
from imagen_jax.cascade import CascadeError
from imagen_jax.data import shapes
from imagen_jax.diffusion import check_sampling_settings
from imagen_jax.errors import ConfigError, ImagenError
from imagen_jax.eval import clip, drawbench, fid, inception, report, sweep
from launch import shared_flags as sf

FLAGS = flags.FLAGS
SUBCOMMANDS = ("drawbench", "fid", "sweep")

# Sampler.
sf.DEFINE_list("stages", [], "Stage checkpoint directories, base first.")
sf.DEFINE_string("t5", None, "T5 encoder checkpoint directory (HF or T5X).")
sf.DEFINE_string("sample_fn", None, "Custom sampler MODULE:FACTORY (instead of --stages).")
sf.DEFINE_integer("num_steps", None, "Override every stage's sampling step count.")
sf.DEFINE_string("sampler", None, "Override every stage's sampler (ddpm, ddim, dpmpp_2m).")
sf.DEFINE_integer("guidance_stage", 0, "Stage whose guidance weight --guidance sets.")
sf.DEFINE_list("guidance", [], "Guidance weight(s); sweep: the list to sweep.")
sf.DEFINE_multi_string("gin_file", [], "Extra gin files (SamplingConfig overrides).")
sf.DEFINE_integer("seed", 0, "Sampling seed.")
sf.DEFINE_integer("batch_size", None, "Prompts per sampler call / samples per chunk (8).")
sf.DEFINE_string("out", None, "Output directory.")
# DrawBench.
sf.DEFINE_integer("num_per_prompt", None, "Samples per DrawBench prompt (Section 4.2: 8).")
sf.DEFINE_list("categories", [], "DrawBench categories to run (default: all 11).")
sf.DEFINE_list("compare", [], "Two DrawBench run dirs: write the side-by-side rating page.")
sf.DEFINE_bool("embed_images", False, "Embed images in the HTML (one self-contained file).")
sf.DEFINE_string("label", "", "Run label shown in reports.")
# Metrics.
sf.DEFINE_string("clip_weights", None, "CLIP weights (file or HF dir) for the CLIP score.")
sf.DEFINE_string(
    "clip_tokenizer", None, "Dir with vocab.json+merges.txt (default: weights dir)."
)
sf.DEFINE_string("clip_config", None, "CLIP config name (ViT-B/32, ViT-L/14); default inferred.")
sf.DEFINE_string("inception_weights", None, "FID Inception weights (pt_inception-*.pth/.npz).")
sf.DEFINE_integer("metric_batch_size", 64, "Batch size of the feature extractors.")
# FID / sweep.
sf.DEFINE_string("reference", None, "FID reference: tfds:NAME[/CONFIG][:SPLIT] or an image dir.")
sf.DEFINE_string("tfds_data_dir", None, "TFDS data_dir holding the prepared reference.")
sf.DEFINE_string(
    "stats_cache", None, "Where reference statistics are cached (default OUT/stats)."
)
sf.DEFINE_integer("reference_resolution", 256, "Reference images: centre crop + resize to this.")
sf.DEFINE_integer("num_samples", 30000, "Samples for FID (Section 4.1: FID-30K).")
sf.DEFINE_string(
    "prompts",
    None,
    "Prompt file (one per line); default: reference captions, else shapes captions.",
)


# ----------------------------------------------------------------------------- samplers


def load_factory(spec: str) -> Callable[..., Callable]:
    module, _, name = spec.partition(":")
    if not name:
        raise app.UsageError(f"--sample_fn must be MODULE:FACTORY, got {spec!r}")
    return getattr(importlib.import_module(module), name)


def build_cascade(stage_dirs: Sequence[str], t5: str | None):
    """The cascade of ``imagen_jax.cascade`` from checkpoint directories (EMA params), with the
    ``--gin`` ``SamplingConfig`` bindings applied."""

    overrides = cascade_lib.gin_sampling_overrides(len(stage_dirs))
    return cascade_lib.load_cascade(list(stage_dirs), t5=t5, overrides=overrides)


def guidance_flags() -> list[float]:
    """``--guidance`` as floats, after checking every sampler flag (``--num_steps``,
    ``--sampler``, ``--guidance``) with the cascade's one validation, before anything loads.

    Raises ``ConfigError`` naming the flag and its valid range (NaN/Inf, 2.7 steps, ...).
    """

    flags_set = {"num_steps": FLAGS.num_steps, "sampler": FLAGS.sampler}
    check_sampling_settings(
        {k: v for k, v in flags_set.items() if v is not None},
        names={"num_steps": "--num_steps", "sampler": "--sampler"},
    )
    weights = []
    for value in FLAGS.guidance:
        try:
            w = float(value)
        except ValueError:
            raise ConfigError(
                f"--guidance={value!r} is not a number; valid: a finite number >= 0"
            ) from None
        weights.append(
            check_sampling_settings({"guidance_weight": w},
                                    names={"guidance_weight": "--guidance"})[
                "guidance_weight"
            ]
        )
    if FLAGS.guidance_stage < 0:
        raise ConfigError(f"--guidance_stage={FLAGS.guidance_stage} must be >= 0")
    return weights


def with_sampling(cascade, stage_index: int | None = None, **overrides):
    """A cascade sharing ``cascade``'s parameters with some stages' sampler settings changed."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if not overrides:
        return cascade
    stages = [
        s.with_sampling(**overrides) if stage_index in (None, i) else s
        for i, s in enumerate(cascade.stages)
    ]
    return type(cascade)(
        stages,
        cascade.params,
        text_encoder=cascade.text_encoder,
        mesh=cascade.mesh,
        rules=cascade.rules,
        embed_dim=cascade.embed_dim,
        max_batch=cascade.max_batch,
    )


def make_sample_fn_factory() -> Callable[[float | None], Callable]:
    """``factory(guidance or None) -> sample_fn`` from --sample_fn or --stages/--t5."""
    if FLAGS.sample_fn:
        factory = load_factory(FLAGS.sample_fn)
        return lambda guidance=None: factory(guidance=guidance)
    if not FLAGS.stages:
        raise app.UsageError("give --stages (and --t5) or --sample_fn")
    cascade = build_cascade(FLAGS.stages, FLAGS.t5)
    if FLAGS.guidance and FLAGS.guidance_stage >= len(cascade.stages):

        raise CascadeError(
            f"--guidance_stage={FLAGS.guidance_stage} but the cascade has "
            f"{len(cascade.stages)} stages; valid: 0 to {len(cascade.stages) - 1}"
        )
    cascade = with_sampling(cascade, None, num_steps=FLAGS.num_steps, sampler=FLAGS.sampler)

    def factory(guidance=None):
        c = with_sampling(cascade, FLAGS.guidance_stage, guidance_weight=guidance)
        return c.sample_fn()

    return factory


# ----------------------------------------------------------------------------- metrics


def make_scorers() -> dict[str, Callable]:
    """CLIP score when CLIP weights are given, else shapes adherence (needs no weights)."""

    if FLAGS.clip_weights:

        return {
            "clip_score": clip.make_clip_scorer(
                weights_path=FLAGS.clip_weights,
                tokenizer_path=FLAGS.clip_tokenizer,
                config=FLAGS.clip_config,
                batch_size=FLAGS.metric_batch_size,
            )
        }
    logging.info("no --clip_weights: scoring shapes adherence (the weight-free default)")
    return {"shapes_adherence": drawbench.shapes_adherence_scorer}


def make_inception():

    return inception.make_inception_extractor(
        weights_path=FLAGS.inception_weights, batch_size=FLAGS.metric_batch_size
    )


def reference_stats(extractor):

    if not FLAGS.reference:
        raise app.UsageError("FID needs --reference=tfds:NAME[:SPLIT] or an image directory")
    return fid.reference_stats(
        FLAGS.reference,
        extractor,
        extractor_id=extractor.fingerprint,
        cache_dir=FLAGS.stats_cache or os.path.join(FLAGS.out, "stats"),
        resolution=FLAGS.reference_resolution,
        batch_size=FLAGS.metric_batch_size,
        data_dir=FLAGS.tfds_data_dir,
    )


def load_eval_prompts(n: int) -> list[str]:
    """--prompts file, else the reference's captions (TFDS), else shapes-grammar captions."""
    if FLAGS.prompts:
        with open(FLAGS.prompts, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            raise app.UsageError(f"--prompts file {FLAGS.prompts!r} is empty")
        return prompts
    if FLAGS.reference and FLAGS.reference.startswith("tfds:"):

        caps = [
            c
            for _, c in fid.iter_reference(
                FLAGS.reference, resolution=8, max_images=n, data_dir=FLAGS.tfds_data_dir
            )
            if c
        ]
        if caps:
            return caps

    return [shapes.sample_scene("train", i, seed=FLAGS.seed).caption for i in range(min(n, 4096))]


# Why a metric's mean is None in a summary: it applied to none of the run's prompts.
NOT_APPLICABLE = {
    "shapes_adherence": "n/a (not a shapes prompt set: shapes adherence scores only captions of "
                        "the shapes dataset; pass --clip_weights=DIR for the CLIP score)",
}
NOT_APPLICABLE_DEFAULT = "n/a (applies to none of these prompts)"


def readable_scores(scores: Mapping[str, Any], metrics: Iterable[str]) -> dict[str, Any]:
    """``scores`` for the printed summary: a metric whose value is None (it applied to no
    prompt, e.g. shapes adherence on DrawBench) says so instead of printing ``null``."""
    metrics = set(metrics)
    return {k: NOT_APPLICABLE.get(k, NOT_APPLICABLE_DEFAULT) if k in metrics and v is None else v
            for k, v in scores.items()}


# ----------------------------------------------------------------------------- subcommands


def run_drawbench_cmd() -> None:

    if FLAGS.compare:
        if len(FLAGS.compare) != 2:
            raise app.UsageError("--compare takes exactly two DrawBench run directories")
        path = report.write_side_by_side(
            *FLAGS.compare, FLAGS.out, seed=FLAGS.seed, embed=FLAGS.embed_images
        )
        print(f"side-by-side rating page: {path}")
        return
    factory = make_sample_fn_factory()
    guidance = guidance_flags()[0] if FLAGS.guidance else None
    settings = {
        "stages": FLAGS.stages,
        "t5": FLAGS.t5,
        "sample_fn": FLAGS.sample_fn,
        "num_steps": FLAGS.num_steps,
        "sampler": FLAGS.sampler,
        "guidance": guidance,
        "guidance_stage": FLAGS.guidance_stage,
    }
    run = drawbench.run_drawbench(
        factory(guidance),
        FLAGS.out,
        num_per_prompt=FLAGS.num_per_prompt or 8,
        categories=FLAGS.categories or None,
        seed=FLAGS.seed,
        prompts_per_batch=FLAGS.batch_size or 8,
        scorers=make_scorers(),
        label=FLAGS.label,
        settings=settings,
        progress=lambda done, total: logging.info("drawbench: %d / %d prompts", done, total),
    )
    path = report.write_report(FLAGS.out, embed=FLAGS.embed_images)
    print(json.dumps(readable_scores(run["category_means"].get("all", {}), run["metrics"])))
    print(f"report: {path}")


def run_fid_cmd() -> None:

    factory = make_sample_fn_factory()
    guidance = guidance_flags()[0] if FLAGS.guidance else None
    extractor = ref = None
    if FLAGS.inception_weights:
        # Reference statistics first (cached): a bad reference image fails before hours of
        # sampling, not after.
        extractor = make_inception()
        ref = reference_stats(extractor)
    prompts = load_eval_prompts(FLAGS.num_samples)
    store = fid.SampleStore(
        os.path.join(FLAGS.out, "samples"),
        chunk_size=FLAGS.batch_size or 8,
        seed=FLAGS.seed,
        settings={
            "stages": FLAGS.stages,
            "sample_fn": FLAGS.sample_fn,
            "guidance": guidance,
            "num_steps": FLAGS.num_steps,
            "num_prompts": len(prompts),
        },
    )
    store.fill(
        factory(guidance),
        prompts,
        FLAGS.num_samples,
        progress=lambda d, t: logging.info("fid: %d / %d samples", d, t),
    )
    result: dict = {"num_samples": FLAGS.num_samples, "guidance": guidance}
    if extractor is not None:
        samples = store.stats(extractor, extractor=extractor.fingerprint)
        samples.save(os.path.join(FLAGS.out, "sample_stats.npz"))
        result["fid"] = fid.fid_from_stats(samples, ref)
        result["reference"] = FLAGS.reference
    scorers = make_scorers()
    for name, scorer in scorers.items():
        vals = np.concatenate([scorer(im, p) for im, p in store.iter_chunks()])
        result[name] = float(np.nanmean(vals)) if np.isfinite(vals).any() else None
    with open(os.path.join(FLAGS.out, "fid.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(readable_scores(result, scorers)))


def run_sweep_cmd() -> None:

    guidances = guidance_flags() or list(sweep.PAPER_BASE_GUIDANCE)
    factory = make_sample_fn_factory()
    prompts = load_eval_prompts(FLAGS.num_samples)
    extractor = make_inception() if FLAGS.inception_weights else None
    ref = reference_stats(extractor) if extractor is not None else None
    points = sweep.run_guidance_sweep(
        factory,
        guidances,
        prompts,
        FLAGS.out,
        num_samples=FLAGS.num_samples,
        chunk_size=FLAGS.batch_size or 8,
        seed=FLAGS.seed,
        feature_fn=extractor,
        reference=ref,
        extractor_id=getattr(extractor, "fingerprint", ""),
        scorers=make_scorers(),
        settings={
            "stages": FLAGS.stages,
            "sample_fn": FLAGS.sample_fn,
            "guidance_stage": FLAGS.guidance_stage,
            "num_steps": FLAGS.num_steps,
        },
    )
    png = sweep.plot_sweep(points, os.path.join(FLAGS.out, "sweep.png"))
    print(json.dumps(points))
    print(f"plot: {png}")


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing after splitting out ``--gin.NAME=VALUE`` bindings (t5x style)."""

    try:
        rest = sf.parse_flags(argv)
        if sf.GIN_BINDINGS or FLAGS.gin_file:
            gin_utils.parse(FLAGS.gin_file, sf.GIN_BINDINGS)
    except gin_utils.GinConfigError as e:
        raise sf.one_line_exit("launch.evaluate", e) from None
    return rest


def main(argv: Sequence[str]) -> None:
    if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
        raise app.UsageError(
            f"usage: python -m launch.evaluate {{{'|'.join(SUBCOMMANDS)}}} --out=DIR ..."
        )
    if not FLAGS.out:
        raise app.UsageError("--out=DIR is required")

    try:
        guidance_flags()  # every sampler flag checked before anything is loaded or written
        os.makedirs(FLAGS.out, exist_ok=True)
        {"drawbench": run_drawbench_cmd, "fid": run_fid_cmd, "sweep": run_sweep_cmd}[argv[1]]()
    except ImagenError as e:
        raise sf.one_line_exit("launch.evaluate", e) from None


if __name__ == "__main__":
    app.run(main, argv=sys.argv, flags_parser=parse_flags)
