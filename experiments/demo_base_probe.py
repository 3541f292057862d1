r"""Probe a `make demo` base-stage variant: train for a wall-clock budget, score heldout prompts.

A development tool for choosing the demo's base settings, not part of the product: it skips the
trainer (no checkpoints, no sharding) and holds the whole training set in memory, so one variant
costs only its training time. Every few minutes it samples the first ``--num_eval`` heldout (and
optionally train) prompts with the EMA parameters and prints the shapes adherence scores.

    python -m experiments.demo_base_probe --resolution=32 --patch_size=2 --prediction=v \
        --seconds=600 --eval_every=200

The README table "Base-stage probes" (section `make demo`: measured) was made with it.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from imagen_jax import diffusion
from imagen_jax.data import shapes
from imagen_jax.eval import shapes_score
from imagen_jax.nn import BaseUNet
from imagen_jax.text import load_t5
from imagen_jax.text.testing import write_random_t5
from imagen_jax.train.step import StepConfig, ema_decay_at, ema_update


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--patch_size", type=int, default=1)
    p.add_argument("--channels", type=int, default=48)
    p.add_argument("--channel_mult", default="1,2,2")
    p.add_argument("--attn_resolutions", default="8,4")
    p.add_argument("--head_dim", type=int, default=16)
    p.add_argument("--text_cond_dim", type=int, default=64)
    p.add_argument("--prediction", default="v", choices=diffusion.PREDICTIONS)
    p.add_argument("--weighting", default="uniform", choices=diffusion.WEIGHTINGS)
    p.add_argument("--schedule", default="cosine", choices=sorted(diffusion.SCHEDULES))
    p.add_argument("--shift", type=float, default=1.0, help="shifted_cosine only")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--ema_decay", type=float, default=0.995)
    p.add_argument("--cond_drop_prob", type=float, default=0.1)
    p.add_argument("--num_train", type=int, default=20_000)
    p.add_argument("--text_length", type=int, default=48)
    p.add_argument("--seconds", type=float, default=600, help="training wall-clock budget")
    p.add_argument("--eval_every", type=float, default=200, help="seconds of training")
    p.add_argument("--num_eval", type=int, default=64)
    p.add_argument("--eval_train", action="store_true", help="also score train prompts")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--sampler", default="ddim", choices=diffusion.SAMPLERS)
    p.add_argument("--sample_steps", type=int, default=32)
    p.add_argument("--thresholding", default="dynamic", choices=diffusion.THRESHOLDINGS)
    p.add_argument("--workdir", default="/tmp/demo_base_probe")
    return p.parse_args()


def encode(encoder: Any, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    parts = [encoder(texts[i:i + 512]) for i in range(0, len(texts), 512)]
    return (np.concatenate([np.asarray(e) for e, _ in parts]),
            np.concatenate([np.asarray(m) for _, m in parts]))


def adam_with_ema(learning_rate: float, ema_decay: float) -> tuple[Any, Any]:
    """The probes' optimiser: (optax Adam with a 50-step warm-up and clipping, ``update``).

    ``update(grads, params, opt_state, ema, step) -> (params, opt_state, ema)`` applies Adam and
    the trainer's EMA with its warm-up (``ema_decay_at``).
    """
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adam(optax.linear_schedule(0.0, learning_rate, 50)))
    ema_config = StepConfig(ema_decay=ema_decay)

    def update(grads, params, opt_state, ema, step):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = ema_update(ema, params, ema_decay_at(step, ema_config))
        return params, opt_state, ema

    return optimizer, update


def main() -> None:
    a = parse_args()
    print(json.dumps(vars(a)), flush=True)
    os.makedirs(a.workdir, exist_ok=True)
    res = a.resolution
    images = np.stack([shapes.example("train", i, res)["image"] for i in range(a.num_train)])
    captions = [shapes.sample_scene("train", i).caption for i in range(a.num_train)]
    t5_dir = os.path.join(a.workdir, "t5")
    if not os.path.exists(os.path.join(t5_dir, "config.json")):
        write_random_t5(t5_dir, texts=captions[:4000], vocab_size=512)
    encoder = load_t5(t5_dir, max_length=a.text_length)
    embeds, masks = (jnp.asarray(v) for v in encode(encoder, captions))
    eval_sets = {"heldout": shapes.heldout_prompts(a.num_eval)}
    if a.eval_train:
        eval_sets["train"] = captions[:a.num_eval]
    eval_text = {k: encode(encoder, v) for k, v in eval_sets.items()}

    model = BaseUNet(channels=a.channels, channel_mult=_ints(a.channel_mult), num_res_blocks=1,
                     attn_resolutions=_ints(a.attn_resolutions), image_size=res,
                     patch_size=a.patch_size, head_dim=a.head_dim,
                     text_embed_dim=embeds.shape[-1], text_cond_dim=a.text_cond_dim,
                     num_groups=8)
    kwargs = {"shift": a.shift} if a.schedule == "shifted_cosine" else {}
    schedule = diffusion.get_schedule(a.schedule, **kwargs)
    x0_all = jnp.asarray(images, jnp.float32) / 127.5 - 1.0  # [N, R, R, 3]
    params = jax.jit(lambda k: nn.meta.unbox(model.init(
        k, x0_all[:2], jnp.zeros(2), embeds[:2], masks[:2]))["params"])(jax.random.key(0))
    optimizer, update = adam_with_ema(a.learning_rate, a.ema_decay)
    opt_state, ema = optimizer.init(params), params

    @jax.jit
    def train_step(params, opt_state, ema, key, step):
        k_idx, k_t, k_eps, k_drop = jax.random.split(key, 4)
        idx = jax.random.randint(k_idx, (a.batch_size,), 0, a.num_train)
        x0 = x0_all[idx]
        text, mask = diffusion.drop_text_condition(k_drop, embeds[idx], masks[idx],
                                                   a.cond_drop_prob)
        t = jax.random.uniform(k_t, (a.batch_size,))
        eps = jax.random.normal(k_eps, x0.shape)

        def loss_fn(p):
            pred = model.apply({"params": p}, diffusion.diffuse(x0, eps, t, schedule), t, text,
                               mask, train=True)
            return jnp.mean(diffusion.loss_per_example(pred, x0, eps, t, schedule, a.prediction,
                                                       a.weighting))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        return (*update(grads, params, opt_state, ema, step), loss)

    @jax.jit
    def sample(params, text, mask, key):
        text_2b, mask_2b = diffusion.with_null_condition(text, mask)
        model_fn = diffusion.guided_model_fn(
            lambda x, t: model.apply({"params": params}, x, t, text_2b, mask_2b), a.guidance)
        return diffusion.sample(model_fn, (text.shape[0], res, res, 3), key, schedule=schedule,
                                sampler=a.sampler, num_steps=a.sample_steps,
                                prediction=a.prediction, thresholding=a.thresholding)

    def evaluate() -> dict[str, dict[str, float]]:
        out = {}
        for name, (text, mask) in eval_text.items():
            x = np.asarray(sample(ema, jnp.asarray(text), jnp.asarray(mask), jax.random.key(7)))
            scores = shapes_score.score(x, eval_sets[name])
            out[name] = {k: round(float(scores[k]), 3) for k in (
                "exact_match", "colour", "shape", "size", "position", "relation", "background")}
        return out

    key, step, losses = jax.random.key(1), 0, []
    start, next_eval = time.time(), a.eval_every
    while True:
        key, sub = jax.random.split(key)
        params, opt_state, ema, loss = train_step(params, opt_state, ema, sub, jnp.int32(step))
        step += 1
        losses.append(loss)
        elapsed = time.time() - start
        if step % 100 == 0:
            print(f"step {step} train {elapsed:.0f}s loss "
                  f"{float(np.mean(jax.device_get(losses[-100:]))):.4f}", flush=True)
        if elapsed >= min(next_eval, a.seconds):
            t_eval = time.time()
            print(f"EVAL step {step} train {elapsed:.0f}s: {json.dumps(evaluate())}", flush=True)
            start += time.time() - t_eval  # evaluation time does not count as training
            next_eval += a.eval_every
            if elapsed >= a.seconds:
                break
    with open(os.path.join(a.workdir, "ema_params.pkl"), "wb") as f:
        pickle.dump(jax.device_get(ema), f)


if __name__ == "__main__":
    main()
