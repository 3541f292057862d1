r"""Probe a `make demo` super-resolution variant: train on crops for a wall-clock budget, then
upsample the ground-truth low-res heldout images and score the result.

A development tool like ``experiments.demo_base_probe``: no trainer, the training set in
memory. Because
the input is the ground truth, the score says only whether the stage keeps the content it is
given (a bicubic resize of the same inputs scores 100% exact). The sr128/sr512 settings of
``gin_configs/demo`` were chosen with it:

    python -m experiments.demo_sr_probe --resolution=128 --prediction=x0 --train_aug_max=0.15 \
        --seconds=150 --evals=0.05:4,0.0:8
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from experiments.demo_base_probe import adam_with_ema, encode
from imagen_jax import diffusion
from imagen_jax.data import shapes
from imagen_jax.eval import shapes_score
from imagen_jax.text import load_t5
from imagen_jax.text.testing import write_random_t5
from imagen_jax.train.step import random_aligned_crop
from imagen_jax.train.testing import tiny_sr

SCORES = ("exact_match", "colour", "shape", "size", "position", "relation", "count")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, default=128, help="output side; input is 1/4")
    p.add_argument("--crop", type=int, default=64, help="training crop side")
    p.add_argument("--num_train", type=int, default=4000)
    p.add_argument("--prediction", default="x0", choices=diffusion.PREDICTIONS)
    p.add_argument("--blocks", default="16,1;32,2", help="channels,res_blocks per level")
    p.add_argument("--stem_channels", type=int, default=16)
    p.add_argument("--cross_attention", default="0,1")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--ema_decay", type=float, default=0.995)
    p.add_argument("--train_aug_max", type=float, default=0.15)
    p.add_argument("--seconds", type=float, default=150, help="training wall-clock budget")
    p.add_argument("--evals", default="0.05:4", help="aug_level:num_steps,... to score")
    p.add_argument("--num_eval", type=int, default=64)
    p.add_argument("--text_length", type=int, default=48)
    p.add_argument("--workdir", default="/tmp/demo_sr_probe")
    return p.parse_args()


def main() -> None:
    a = parse_args()
    print(json.dumps(vars(a)), flush=True)
    os.makedirs(a.workdir, exist_ok=True)
    res, low_res = a.resolution, a.resolution // 4
    # uint8 on the device (a 512 px set would not fit as float32); batches convert.
    hi = np.stack([shapes.example("train", i, res)["image"] for i in range(a.num_train)])
    lo = np.stack([np.asarray(Image.fromarray(x).resize((low_res, low_res), Image.BICUBIC))
                   for x in hi])  # the pipeline's bicubic low-res copy
    captions = [shapes.sample_scene("train", i).caption for i in range(a.num_train)]
    t5_dir = os.path.join(a.workdir, "t5")
    if not os.path.exists(os.path.join(t5_dir, "config.json")):
        write_random_t5(t5_dir, texts=captions, vocab_size=512)
    encoder = load_t5(t5_dir, max_length=a.text_length)
    embeds, masks = (jnp.asarray(v) for v in encode(encoder, captions))
    prompts = shapes.heldout_prompts(a.num_eval)
    eval_embeds, eval_masks = (jnp.asarray(v) for v in encode(encoder, prompts))
    truth = jnp.asarray(shapes.heldout_images(a.num_eval, low_res), jnp.float32) / 127.5 - 1.0
    hi_u8, lo_u8 = jnp.asarray(hi), jnp.asarray(lo)

    def to_float(u8: jax.Array) -> jax.Array:
        return u8.astype(jnp.float32) / 127.5 - 1.0

    blocks = [tuple(int(v) for v in b.split(",")) for b in a.blocks.split(";")]
    cross = [bool(int(v)) for v in a.cross_attention.split(",")]
    model = tiny_sr(blocks=blocks, stem_channels=a.stem_channels, self_attention=[False] * len(
        blocks), cross_attention=cross, text_embed_dim=embeds.shape[-1])
    schedule = diffusion.get_schedule("cosine")
    c, lc = a.crop, a.crop // 4
    params = jax.jit(lambda k: nn.meta.unbox(model.init(
        k, to_float(hi_u8[:2, :c, :c]), jnp.zeros(2), embeds[:2], masks[:2],
        lowres=to_float(lo_u8[:2, :lc, :lc]), aug_level=jnp.zeros(2)))["params"])(
        jax.random.key(0))
    optimizer, update = adam_with_ema(a.learning_rate, a.ema_decay)
    opt_state, ema = optimizer.init(params), params

    @jax.jit
    def train_step(params, opt_state, ema, key, step):
        k_idx, k_crop, k_t, k_eps, k_drop, k_aug, k_aug_noise = jax.random.split(key, 7)
        idx = jax.random.randint(k_idx, (a.batch_size,), 0, a.num_train)
        x0, low = random_aligned_crop(k_crop, to_float(hi_u8[idx]), to_float(lo_u8[idx]), c)
        text, mask = diffusion.drop_text_condition(k_drop, embeds[idx], masks[idx], 0.1)
        aug = jax.random.uniform(k_aug, (a.batch_size,), jnp.float32, 0.0, a.train_aug_max)
        low = diffusion.noise_augment(low, aug, k_aug_noise, schedule)
        t = jax.random.uniform(k_t, (a.batch_size,))
        eps = jax.random.normal(k_eps, x0.shape)

        def loss_fn(p):
            pred = model.apply({"params": p}, diffusion.diffuse(x0, eps, t, schedule), t, text,
                               mask, lowres=low, aug_level=aug, train=True)
            return jnp.mean(diffusion.loss_per_example(pred, x0, eps, t, schedule,
                                                       a.prediction))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        return (*update(grads, params, opt_state, ema, step), loss)

    @functools.partial(jax.jit, static_argnums=(2, 3))
    def upsample(params, key, aug_level, num_steps):
        k_aug, k_sample = jax.random.split(key)
        aug = jnp.full((a.num_eval,), aug_level)
        low = diffusion.noise_augment(truth, aug, k_aug, schedule)

        def model_fn(x, t):
            return model.apply({"params": params}, x, t, eval_embeds, eval_masks, lowres=low,
                               aug_level=aug)

        out = diffusion.sample(model_fn, (a.num_eval, res, res, 3), k_sample, schedule=schedule,
                               sampler="ddim", num_steps=num_steps, prediction=a.prediction,
                               thresholding="static")
        return jnp.clip(out, -1.0, 1.0)

    key, step, losses, start = jax.random.key(1), 0, [], time.time()
    while time.time() - start < a.seconds:
        key, sub = jax.random.split(key)
        params, opt_state, ema, loss = train_step(params, opt_state, ema, sub, jnp.int32(step))
        step += 1
        losses.append(loss)
        if step % 100 == 0:
            print(f"step {step} train {time.time() - start:.0f}s loss "
                  f"{float(np.mean(jax.device_get(losses[-100:]))):.4f}", flush=True)
    for spec in a.evals.split(","):
        aug_level, num_steps = float(spec.split(":")[0]), int(spec.split(":")[1])
        images = np.asarray(upsample(ema, jax.random.key(7), aug_level, num_steps))
        scores = shapes_score.score(images, prompts)
        print(f"EVAL aug {aug_level} steps {num_steps} after {step} train steps: "
              f"{json.dumps({k: round(float(scores[k]), 3) for k in SCORES})}", flush=True)


if __name__ == "__main__":
    main()
