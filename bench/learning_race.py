r"""Learning race: our `make demo` base stage against imagen-pytorch, on identical inputs.

    nice -n 5 python -m bench.learning_race --num_steps=1500 --eval_every=500 \
        [--ours=NAME:gin;gin ...] [--workdir=/tmp/learning_race]

Both sides train in ONE process, stepping alternately (the side with less accumulated training
time steps next), so both see the same machine load; each side's step time is measured on its
own. Both read the same batches: the demo's shapes scenes (`launch.demo`'s generator: rendered at
128 px, bicubic-resized to the base resolution by `imagen_jax.data.pipeline.process_image`) and
the same random-T5 caption embeddings (`text_embeds=` / `text_masks=` on their side).

* Ours: `gin_configs/demo/base.gin` (+ optional gin overrides per variant) through the product's
  training code: `init_train_state`, `make_optimizer(learning_rate_schedule())`,
  `make_train_step` / `jit_train_step`, and sampling through `cascade.sample_stage`.
  The data pipeline (grain, embedding cache) is bypassed: the race measures model + objective +
  optimizer, and the same arrays feed both sides.
* Theirs: imagen-pytorch 2.1.0 `Unet` + `Imagen` (its loss in `Imagen.forward`, its sampler in
  `Imagen.sample`), run on the same 2x2 pixel patches as ours (12 channels at half the side:
  `Imagen(channels=12)`), v-objective, min-SNR-5 (its default), Adam with our learning rate,
  warm-up, clipping and EMA rule; guidance 3 without its parallel-component removal; 32 ancestral
  steps; dynamic thresholding at the 99.5th percentile.

Every ``--eval_every`` steps each side reports the mean training loss, its unweighted v-MSE at
fixed log-SNR (-8, -5, 0, +2) on a fixed probe batch (same images, noise and text on both sides,
EMA parameters) and the shapes adherence scores (`imagen_jax.eval.shapes_score`) of EMA samples
of the first ``--num_eval`` heldout and training prompts. Results go to ``<workdir>/race.jsonl``
as they come (a cut-short run still reports), and at the end a summary with two views (equal
examples, equal wall time) and a PNG grid of samples next to ground truth.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import app, flags

from launch import shared_flags as sf

FLAGS = flags.FLAGS
sf.DEFINE_integer("num_steps", None, "Training steps of the slower side (default 1500; "
                     "the faster one runs on until the slower one's training time is spent).")
sf.DEFINE_integer("eval_every", 500, "Evaluate each side every this many of its steps.")
# Shared with launch.encode_text (None there): the race default is applied in main().
sf.DEFINE_integer("batch_size", None, "Batch size (both sides; default 32).")
sf.DEFINE_integer("num_train", 20000, "Training scenes (the demo's 20,000).")
sf.DEFINE_integer("num_eval", 64, "Heldout and training prompts scored per evaluation.")
sf.DEFINE_integer("num_probe", 64, "Training images of the fixed-log-SNR loss probe.")
sf.DEFINE_multi_string("ours", ["ours:"], "Our variants, NAME:gin binding;gin binding (on top "
                          "of gin_configs/demo/base.gin); 'ours:' is the demo as it is.")
sf.DEFINE_bool("theirs", True, "Race imagen-pytorch.")
sf.DEFINE_integer("their_dim", 48, "imagen-pytorch Unet dim (48 matches our parameters).")
sf.DEFINE_bool("their_min_snr", True, "imagen-pytorch min-SNR-5 loss weighting (its default).")
sf.DEFINE_float("max_seconds", 0.0, "Stop once the slower side trained this long (0: off).")
sf.DEFINE_integer("threads", 2, "torch.set_num_threads.")
sf.DEFINE_integer("seed", 0, "Seed of batches, probe noise and sampling.")
sf.DEFINE_string("workdir", None, "Data, T5 and results (default /tmp/learning_race).")
sf.DEFINE_string("grid_png", None, "PNG grid path (default <workdir>/grid.png).")
# Shared with launch.demo (its scenes; "single" there by default): the race applies it as well.
sf.DEFINE_enum("preset", "single", ["single", "full"], "Scenes: 'single' (one object, the "
               "default demo) or 'full' (one or two objects).")

RESOLUTION = 32  # the demo's base resolution (gin_configs/demo/base.gin)
RENDER_RESOLUTION = 128  # launch.demo renders the base stage's dataset at 128 px
TEXT_LENGTH = 48  # gin_configs/demo/common.gin TEXT_LENGTH
T5_VOCAB_SIZE = 512  # launch.demo.T5_VOCAB_SIZE
PROBE_LOGSNRS = (-8.0, -5.0, 0.0, 2.0)
SCORE_KEYS = ("exact_match", "colour", "shape", "size", "position", "relation", "background")


# ------------------------------------------------------------------------------------------
# Data: identical arrays for both sides.
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RaceData:
    """images uint8 [N, R, R, 3]; embeds float32 [N, L, D]; masks bool [N, L]; eval sets
    name -> (prompts, embeds, masks, ground truth uint8 [n, R, R, 3]); the loss probe's x0
    float32 [P, R, R, 3] in [-1, 1], eps [P, R, R, 3], embeds, masks."""

    images: np.ndarray
    embeds: np.ndarray
    masks: np.ndarray
    captions: list[str]
    evals: dict[str, tuple[list[str], np.ndarray, np.ndarray, np.ndarray]]
    probe: dict[str, np.ndarray]
    preset: str = "single"

    def batch(self, step: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
        """The step-th batch, the same for every side: image in [-1, 1], text_embeds, mask."""
        idx = np.random.default_rng([seed, step]).integers(0, len(self.images), batch_size)
        return {"image": self.images[idx].astype(np.float32) / 127.5 - 1.0,
                "text_embeds": self.embeds[idx], "text_mask": self.masks[idx]}


def render(split: str, indices: Sequence[int], resolution: int = RESOLUTION,
           preset: str = "single") -> np.ndarray:
    """The demo's base-stage images: rendered at 128 px, bicubic-resized like the pipeline."""
    from imagen_jax.data import pipeline, shapes

    scene = shapes.scene_spec(preset)
    spec = pipeline.StageSpec(resolution=resolution)
    out = [pipeline.process_image(shapes.example(split, i, RENDER_RESOLUTION, spec=scene)["image"],
                                  spec, None)["image"] for i in indices]
    return np.round((np.stack(out) + 1.0) * 127.5).astype(np.uint8)


def _encode(encoder: Any, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    parts = [encoder(list(texts[i:i + 512])) for i in range(0, len(texts), 512)]
    return (np.concatenate([np.asarray(e, np.float32) for e, _ in parts]),
            np.concatenate([np.asarray(m, bool) for _, m in parts]))


def build_data(workdir: str, num_train: int, num_eval: int, num_probe: int,
               seed: int = 0, preset: str = "single") -> RaceData:
    """Renders the scenes, writes the demo's random T5 and encodes every caption (cached)."""
    from imagen_jax.data import shapes
    from imagen_jax.text import load_t5
    from imagen_jax.text.testing import write_random_t5

    os.makedirs(workdir, exist_ok=True)
    scene = shapes.scene_spec(preset)
    captions = [shapes.sample_scene("train", i, spec=scene).caption for i in range(num_train)]
    cache = os.path.join(workdir, f"images_{preset}_{num_train}.npy")
    if os.path.exists(cache):
        images = np.load(cache)
    else:
        images = render("train", range(num_train), preset=preset)
        np.save(cache, images)
    t5_dir = os.path.join(workdir, "t5")
    if not os.path.exists(os.path.join(t5_dir, "config.json")):
        write_random_t5(t5_dir, texts=captions[:4000], vocab_size=T5_VOCAB_SIZE)
    encoder = load_t5(t5_dir, max_length=TEXT_LENGTH)
    embeds, masks = _encode(encoder, captions)
    held = shapes.heldout_prompts(num_eval, preset)
    evals = {"heldout": (held, *_encode(encoder, held),
                         render("heldout", range(num_eval), preset=preset)),
             "train": (captions[:num_eval], embeds[:num_eval], masks[:num_eval],
                       images[:num_eval])}
    rng = np.random.default_rng([seed, 1 << 20])
    idx = rng.choice(num_train, size=min(num_probe, num_train), replace=False)
    probe = {"x0": images[idx].astype(np.float32) / 127.5 - 1.0,
             "eps": rng.standard_normal(images[idx].shape).astype(np.float32),
             "embeds": embeds[idx], "masks": masks[idx]}
    return RaceData(images, embeds, masks, captions, evals, probe, preset)


def space_to_depth(x: np.ndarray, patch: int) -> np.ndarray:
    """[B, H, W, C] -> [B, H/p, W/p, p*p*C] (the same folding as imagen_jax.nn.layers)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // patch, w // patch, patch * patch * c)


def depth_to_space(x: np.ndarray, patch: int) -> np.ndarray:
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, patch, patch, c // patch**2).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * patch, w * patch, c // patch**2)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8."""
    return np.round((np.clip(np.asarray(x, np.float32), -1, 1) + 1.0) * 127.5).astype(np.uint8)


# ------------------------------------------------------------------------------------------
# Contestants. Each has: name, num_params, step(batch) -> loss, sample(embeds, masks, seed) ->
# uint8 [B, R, R, 3], probe_loss(probe, logsnrs) -> {logsnr: v-MSE}.
# ------------------------------------------------------------------------------------------


class OurSide:
    """The demo's base stage (gin_configs/demo/base.gin + ``bindings``) in the product's code."""

    def __init__(self, name: str, bindings: Sequence[str], batch_size: int, embed_shape:
                 tuple[int, int], seed: int = 0):
        import gin
        import jax
        import jax.numpy as jnp

        from imagen_jax import cascade, gin_utils, partitioning
        from imagen_jax.diffusion import convert_prediction
        from imagen_jax.stage import Stage
        from imagen_jax.train.optim import learning_rate_schedule, make_optimizer
        from imagen_jax.train.state import count_params, init_train_state
        from imagen_jax.train.step import (
            StepConfig,
            batch_shardings,
            jit_train_step,
            make_train_step,
        )

        self.name = name
        gin.clear_config()
        gin_utils.parse(["demo/base.gin"], list(bindings), finalize=False)
        try:
            stage = Stage()
            if (stage.text_length, stage.text_embed_dim) != tuple(embed_shape):
                raise ValueError(f"{name}: the stage wants text [{stage.text_length}, "
                                 f"{stage.text_embed_dim}], the race's T5 gives {embed_shape}")
            mesh = partitioning.make_mesh()
            rules = partitioning.logical_axis_rules()
            lr = learning_rate_schedule()
            tx = make_optimizer(lr)
            step_config = StepConfig()
        finally:
            gin.clear_config()
        self.stage, self.mesh = stage, mesh
        self.state, shardings = init_train_state(stage.model, tx, stage, seed, mesh, rules)
        self.num_params = count_params(self.state.params)
        length, dim = embed_shape
        specs = {"image": jax.ShapeDtypeStruct((batch_size, stage.resolution, stage.resolution,
                                                3), jnp.float32),
                 "text_embeds": jax.ShapeDtypeStruct((batch_size, length, dim), jnp.float32),
                 "text_mask": jax.ShapeDtypeStruct((batch_size, length), jnp.bool_)}
        self._batch_shardings = batch_shardings(specs, mesh)
        step_fn = make_train_step(stage, tx, lr, step_config, mesh, rules)
        with partitioning.mesh_context(mesh):  # compiled here: compilation is not training
            self._step = jit_train_step(step_fn, shardings, self._batch_shardings, mesh).lower(
                self.state, specs).compile()
        self._cstage = stage.replace(name=name)
        self._sample = jax.jit(
            lambda params, e, m, rng: cascade.sample_stage(self._cstage, params, e, m, rng))
        schedule = stage.get_schedule()
        model = stage.model
        self._schedule = schedule

        @jax.jit
        def probe(params, x0, eps, embeds, masks, logsnr, t):
            tt = jnp.full((x0.shape[0],), t, jnp.float32)
            alpha, sigma = jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))
            x_t = alpha * x0 + sigma * eps
            pred = model.apply({"params": params}, x_t, tt, embeds, masks)
            v = convert_prediction(pred, x_t, tt, schedule, source=stage.prediction, target="v")
            return jnp.mean(jnp.square(v - (alpha * eps - sigma * x0)))

        self._probe = probe

    def step(self, batch: dict[str, np.ndarray]) -> float:
        import jax

        from imagen_jax import partitioning

        batch = {k: jax.device_put(v, self._batch_shardings[k]) for k, v in batch.items()}
        with partitioning.mesh_context(self.mesh):
            self.state, metrics = self._step(self.state, batch)
        return float(metrics["loss"])

    def sample(self, embeds: np.ndarray, masks: np.ndarray, seed: int) -> np.ndarray:
        import jax

        x = self._sample(self.state.ema_params, embeds, masks, jax.random.key(seed))
        return to_uint8(np.asarray(x))

    def t_of_logsnr(self, logsnr: float) -> float:
        """Our schedule's time at log-SNR ``logsnr`` (bisection; log-SNR decreases in t)."""
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if float(self._schedule.logsnr(np.float32(mid))) > logsnr:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    def probe_loss(self, probe: dict[str, np.ndarray], logsnrs: Sequence[float]) -> dict:
        return {str(s): float(self._probe(self.state.ema_params, probe["x0"], probe["eps"],
                                          probe["embeds"], probe["masks"], np.float32(s),
                                          np.float32(self.t_of_logsnr(s))))
                for s in logsnrs}


def import_imagen_pytorch() -> Any:
    """imagen_pytorch, imported without network (it reads a T5 config from the Hub at import)."""
    import transformers

    # Patched only while imagen_pytorch imports, then restored: the test suite loads real
    # (tiny) T5 checkpoints through transformers in the same process.
    own = transformers.T5Config.__dict__.get("from_pretrained")  # None: inherited
    transformers.T5Config.from_pretrained = classmethod(
        lambda cls, *a, **k: transformers.T5Config(d_model=512))
    try:
        import imagen_pytorch
    finally:
        if own is None:
            del transformers.T5Config.from_pretrained
        else:
            transformers.T5Config.from_pretrained = own

    return imagen_pytorch


class TheirSide:
    """imagen-pytorch's Unet + Imagen objective and sampler on 2x2 pixel patches."""

    def __init__(self, name: str, embed_shape: tuple[int, int], *, dim: int = 48,
                 min_snr: bool = True, patch: int = 2, learning_rate: float = 2e-3,
                 warmup_steps: int = 50, ema_decay: float = 0.995, guidance: float = 3.0,
                 sample_steps: int = 32, seed: int = 0):
        import torch

        ip = import_imagen_pytorch()
        torch.manual_seed(seed)
        length, text_dim = embed_shape
        self.name, self.patch, self.guidance = name, patch, guidance
        self.ema_decay = ema_decay
        side = RESOLUTION // patch
        channels = 3 * patch * patch
        # Ours at 16x16 after patching: levels 16 / 8 / 4, attention at 8 and 4 and the middle,
        # heads of 16 channels (head_dim 16 at 96 channels = 6 heads).
        def make() -> Any:
            unet = ip.Unet(dim=dim, dim_mults=(1, 2, 2), num_resnet_blocks=1, channels=channels,
                           text_embed_dim=text_dim, max_text_len=length,
                           layer_attns=(False, True, True), layer_cross_attns=(False, True, True),
                           attn_heads=6, attn_dim_head=16)
            return ip.Imagen(unets=(unet,), image_sizes=(side,), channels=channels,
                             text_embed_dim=text_dim, timesteps=sample_steps,
                             cond_drop_prob=0.1, pred_objectives="v",
                             min_snr_loss_weight=min_snr, min_snr_gamma=5,
                             dynamic_thresholding=True, dynamic_thresholding_percentile=0.995)

        self.imagen = make().train()
        self.ema = make().eval()  # (deepcopy fails on imagen-pytorch's TorchScript functions)
        self.ema.load_state_dict(self.imagen.state_dict())
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.params = [p for p in self.imagen.unets[0].parameters()]
        self.num_params = sum(p.numel() for p in self.params)
        self.opt = torch.optim.Adam(self.params, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda n: min(1.0, n / max(warmup_steps, 1)))
        self.updates = 0

    def _nchw(self, x: np.ndarray) -> Any:
        import torch

        return torch.from_numpy(np.ascontiguousarray(
            space_to_depth(x, self.patch).transpose(0, 3, 1, 2)))

    def step(self, batch: dict[str, np.ndarray]) -> float:
        import torch

        images01 = self._nchw((batch["image"] + 1.0) / 2.0)  # Imagen normalises [0, 1] itself
        loss = self.imagen(images01, text_embeds=torch.from_numpy(batch["text_embeds"]),
                           text_masks=torch.from_numpy(batch["text_mask"]), unet_number=1)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        # Our EMA rule (imagen_jax.train.step.ema_decay_at): min(decay, (1 + n) / (10 + n)).
        n = self.updates
        decay = min(self.ema_decay, (1.0 + n) / (10.0 + n))
        with torch.no_grad():
            for e, p in zip(self.ema.unets[0].parameters(), self.params):
                e.mul_(decay).add_(p.detach(), alpha=1.0 - decay)
        self.updates += 1
        return float(loss.detach())

    def sample(self, embeds: np.ndarray, masks: np.ndarray, seed: int) -> np.ndarray:
        import torch

        torch.manual_seed(seed)
        with torch.no_grad():
            x = self.ema.sample(text_embeds=torch.from_numpy(embeds),
                                text_masks=torch.from_numpy(masks), cond_scale=self.guidance,
                                cfg_remove_parallel_component=False, use_tqdm=False)
        x = x.float().numpy().transpose(0, 2, 3, 1) * 2.0 - 1.0
        return to_uint8(depth_to_space(x, self.patch))

    def probe_loss(self, probe: dict[str, np.ndarray], logsnrs: Sequence[float]) -> dict:
        import torch

        out = {}
        x0, eps = probe["x0"], probe["eps"]
        unet = self.ema.unets[0]
        for s in logsnrs:
            alpha, sigma = math.sqrt(1 / (1 + math.exp(-s))), math.sqrt(1 / (1 + math.exp(s)))
            with torch.no_grad():
                pred = unet.forward(self._nchw(alpha * x0 + sigma * eps),
                                    torch.full((len(x0),), float(s)),
                                    text_embeds=torch.from_numpy(probe["embeds"]),
                                    text_mask=torch.from_numpy(probe["masks"]),
                                    cond_drop_prob=0.0)
            pred = depth_to_space(pred.float().numpy().transpose(0, 2, 3, 1), self.patch)
            out[str(s)] = float(np.mean(np.square(pred - (alpha * eps - sigma * x0))))
        return out


# ------------------------------------------------------------------------------------------
# The race.
# ------------------------------------------------------------------------------------------


def evaluate(side: Any, data: RaceData, seed: int) -> tuple[dict, dict[str, np.ndarray]]:
    """({'probe': v-MSE per log-SNR, <eval set>: scores}, samples per eval set)."""
    from imagen_jax.eval import shapes_score

    out: dict[str, Any] = {"probe": side.probe_loss(data.probe, PROBE_LOGSNRS)}
    samples = {}
    for name, (prompts, embeds, masks, _) in data.evals.items():
        samples[name] = side.sample(embeds, masks, seed)
        scores = shapes_score.score(samples[name], prompts,
                                     shapes_score.scorer_config(data.preset))
        out[name] = {k: round(float(scores[k]), 4) for k in SCORE_KEYS}
    return out, samples


def run_race(sides: Sequence[Any], data: RaceData, *, steps: int, eval_every: int,
             batch_size: int, seed: int = 0, max_seconds: float = 0.0,
             log: Callable[[dict], None] = print,
             on_eval: Callable[[dict], None] | None = None) -> tuple[list[dict], dict]:
    """Steps the side with the least training time until every side has trained as long as the
    slowest needs for ``steps`` steps; evaluates each side every ``eval_every`` of its steps.

    ``on_eval(last samples per side)`` runs after every evaluation (e.g. to refresh the grid,
    so a run cut short still leaves one). Returns (evaluation records, last samples per side).
    Each record: side, step, examples, train_s (that side's summed step seconds, evaluation
    excluded), loss (mean since the last record), probe, heldout, train.
    """
    state = {s.name: {"step": 0, "train_s": 0.0, "losses": []} for s in sides}
    records, last_samples = [], {}
    done_at: float | None = None  # training time of the slowest side when it reached `steps`

    def finished(name: str) -> bool:
        st = state[name]
        if done_at is not None:
            return st["train_s"] >= done_at
        return bool(max_seconds) and st["train_s"] >= max_seconds

    def record(side: Any) -> None:
        st = state[side.name]
        result, samples = evaluate(side, data, seed)
        rec = {"side": side.name, "step": st["step"], "examples": st["step"] * batch_size,
               "train_s": round(st["train_s"], 1),
               "loss": round(float(np.mean(st["losses"])), 5), **result}
        st["losses"], st["evaluated"] = [], st["step"]
        records.append(rec)
        last_samples[side.name] = samples
        log(rec)
        if on_eval is not None:
            on_eval(last_samples)

    while True:
        active = [s for s in sides if not finished(s.name)]
        if not active:
            break
        side = min(active, key=lambda s: state[s.name]["train_s"])
        st = state[side.name]
        batch = data.batch(st["step"], batch_size, seed)
        t0 = time.perf_counter()
        st["losses"].append(side.step(batch))
        st["train_s"] += time.perf_counter() - t0
        st["step"] += 1
        if st["step"] % eval_every == 0:
            record(side)
        # Every side has reached `steps`: the others run on to the slowest one's training time.
        if done_at is None and all(state[s.name]["step"] >= steps for s in sides):
            done_at = max(state[s.name]["train_s"] for s in sides)
        if done_at is None and max_seconds and all(finished(s.name) for s in sides):
            break
    for side in sides:  # every side ends with an evaluation of its final parameters
        if state[side.name].get("evaluated") != state[side.name]["step"]:
            record(side)
    return records, last_samples


def _row(rec: dict) -> str:
    h, t, p = rec["heldout"], rec["train"], rec["probe"]
    return (f"| {rec['side']} | {rec['step']} | {rec['examples']} | {rec['train_s']:.0f} | "
            f"{rec['loss']:.4f} | " + " / ".join(f"{p[str(s)]:.3f}" for s in PROBE_LOGSNRS)
            + f" | {h['exact_match']:.1%} | {h['colour']:.0%} / {h['shape']:.0%} / "
            f"{h['size']:.0%} / {h['position']:.0%} / {h['relation']:.0%} / "
            f"{h['background']:.0%} | {t['exact_match']:.1%} | {t['colour']:.0%} / "
            f"{t['shape']:.0%} / {t['position']:.0%} |")


HEADER = ("| side | step | examples | train s | loss | v-MSE at log-SNR -8 / -5 / 0 / +2 | "
          "heldout exact | heldout colour / shape / size / position / relation / background | "
          "train exact | train colour / shape / position |\n|" + "---|" * 10)


def views(records: Sequence[dict]) -> str:
    """Markdown: the equal-examples view (same step on every side) and the equal-wall-time view
    (each side's last evaluation within the training seconds of the slowest side's)."""
    by_side: dict[str, list[dict]] = {}
    for r in records:
        by_side.setdefault(r["side"], []).append(r)
    common = sorted(set.intersection(*[{r["step"] for r in rs} for rs in by_side.values()]))
    lines = ["Equal examples:", "", HEADER]
    for step in common:
        lines += [_row(r) for r in records if r["step"] == step]
    per_step = {n: rs[-1]["train_s"] / rs[-1]["step"] for n, rs in by_side.items()}
    slowest = max(per_step, key=per_step.get)
    lines += ["", "Seconds per step: " + ", ".join(
        f"{n} {v:.3f}" for n, v in per_step.items()), "",
        f"Equal wall time (at each evaluation of the slowest side, {slowest}, every side's last "
        "evaluation within as many training seconds):", "", HEADER]
    for ref in by_side[slowest]:
        for rs in by_side.values():
            within = [r for r in rs if r["train_s"] <= ref["train_s"] * 1.02]
            if within:
                lines.append(_row(within[-1]))
    return "\n".join(lines)


def save_grid(path: str, data: RaceData, last_samples: dict[str, dict[str, np.ndarray]],
              num: int = 16, scale: int = 3) -> None:
    """Rows: ground truth, then each side; left half heldout, right half train prompts."""
    from PIL import Image

    rows = []
    names = ["truth", *last_samples]
    for name in names:
        cells = []
        for split in ("heldout", "train"):
            imgs = (data.evals[split][3] if name == "truth" else last_samples[name][split])[:num]
            cells.append(np.concatenate(list(imgs), axis=1))
        rows.append(np.concatenate([cells[0], np.full((RESOLUTION, 4, 3), 255, np.uint8),
                                    cells[1]], axis=1))
    grid = np.concatenate(rows, axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                 Image.NEAREST).save(path, optimize=True)
    with open(path + ".txt", "w") as f:
        f.write("rows: " + ", ".join(names) + f"; left {num} heldout, right {num} train prompts\n")


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'NAME:binding;binding' -> (NAME, bindings)."""
    if ":" not in text:
        raise ValueError(f"--ours={text!r}: expected NAME:gin binding;gin binding (e.g. "
                         "'minsnr:Stage.loss_weighting=\"min_snr\"')")
    name, rest = text.split(":", 1)
    return name, [b.strip() for b in rest.split(";") if b.strip()]


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    import torch

    torch.set_num_threads(FLAGS.threads)
    t0 = time.time()
    workdir = FLAGS.workdir or "/tmp/learning_race"
    data = build_data(workdir, FLAGS.num_train, FLAGS.num_eval, FLAGS.num_probe,
                      FLAGS.seed, FLAGS.preset)
    print(f"data ready in {time.time() - t0:.0f}s", flush=True)
    embed_shape = data.embeds.shape[1:]
    sides: list[Any] = [OurSide(n, b, (FLAGS.batch_size or 32), embed_shape, FLAGS.seed)
                        for n, b in map(parse_variant, FLAGS.ours)]
    if FLAGS.theirs:
        sides.append(TheirSide("imagen-pytorch", embed_shape, dim=FLAGS.their_dim,
                               min_snr=FLAGS.their_min_snr, seed=FLAGS.seed))
    for s in sides:
        print(f"{s.name}: {s.num_params / 1e6:.2f} M parameters", flush=True)
    log_path = os.path.join(workdir, "race.jsonl")
    with open(log_path, "w") as f:
        f.write(json.dumps({"flags": {k: getattr(FLAGS, k) for k in (
            "num_steps", "eval_every", "batch_size", "num_train", "num_eval", "ours", "theirs",
            "their_dim", "their_min_snr", "seed", "preset")},
            "params": {s.name: s.num_params for s in sides}}) + "\n")

    def log(rec: dict) -> None:
        print(json.dumps(rec), flush=True)
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    grid = FLAGS.grid_png or os.path.join(workdir, "grid.png")
    records, last = run_race(sides, data, steps=FLAGS.num_steps or 1500,
                             eval_every=FLAGS.eval_every,
                             batch_size=(FLAGS.batch_size or 32), seed=FLAGS.seed,
                             max_seconds=FLAGS.max_seconds, log=log,
                             on_eval=lambda last: save_grid(grid, data, last))
    summary = views(records)
    with open(os.path.join(workdir, "summary.md"), "w") as f:
        f.write(summary + "\n")
    print(summary)
    print(f"grid: {grid}; log: {log_path}")


if __name__ == "__main__":
    app.run(main)
