"""Base U-Net step speed, ours vs imagen-pytorch's ``Unet`` (issue 3, Must show 7).

Same small configuration on both sides (batch 8, 64x64, dim 64, multipliers [1, 2, 3, 4], 2
residual blocks per level, self + text attention at 32/16/8, 64 channels per head):

* training step: forward + backward + Adam update (ours: one jitted function with optax;
  theirs: ``Imagen(...)(images, text_embeds=...)``, ``loss.backward()``, ``torch.optim.Adam``);
* sampling: 50 ancestral steps with classifier-free guidance (ours: `imagen_jax.diffusion.sample`,
  one jitted scan with cond + uncond batched; theirs: ``Imagen.sample(timesteps=50)``).

    python -m bench.unet_step [--steps 3] [--sample_steps 50]

Compilation (ours) and one warm-up call (theirs) are excluded; the median of ``--steps`` timed
calls is reported. Prints seconds per call for each side and the ratios (theirs / ours).

It also prints a roofline: the FLOPs of each side's step (ours from XLA's cost analysis of the
compiled function, theirs from ``torch.utils.flop_counter``), the throughput each side reaches,
and the machine's float32 peak measured in the same run (a large jitted matmul). At that peak
our FLOPs cannot take less than ``flops / peak`` seconds, which bounds the speed-up this
machine allows whatever the implementation.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench.timing import median_time
from imagen_jax import diffusion
from imagen_jax.nn import BaseUNet

BATCH, SIZE, TEXT_LEN, TEXT_DIM = 8, 64, 16, 64
DIM, MULTS, BLOCKS, HEAD_DIM = 64, (1, 2, 3, 4), 2, 64
ATTN_RES = (32, 16, 8)
GUIDANCE = 3.0


def machine_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Float32 matmul throughput of this machine through XLA (GFLOP/s): the roofline's ceiling."""
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    seconds = median_time(lambda: jax.block_until_ready(matmul(a)), repeats)
    return 2 * size**3 / seconds / 1e9


def _xla_flops(jitted: Callable, *args: object) -> float:
    return float(jitted.lower(*args).compile().cost_analysis()["flops"])


def bench_ours(steps: int, sample_steps: int) -> dict[str, float]:
    model = BaseUNet(channels=DIM, channel_mult=MULTS, num_res_blocks=BLOCKS,
                     attn_resolutions=ATTN_RES, image_size=SIZE, head_dim=HEAD_DIM,
                     text_embed_dim=TEXT_DIM, text_cond_dim=DIM)
    schedule = diffusion.CosineSchedule()
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-1, 1, (BATCH, SIZE, SIZE, 3)), jnp.float32)
    embeds = jnp.asarray(rng.standard_normal((BATCH, TEXT_LEN, TEXT_DIM)), jnp.float32)
    mask = jnp.ones((BATCH, TEXT_LEN), bool)
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, images, jnp.zeros(BATCH), embeds,
                                                        mask))["params"])(jax.random.key(0))
    optimizer = optax.adam(1e-4)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, key):
        k_t, k_eps = jax.random.split(key)
        t = jax.random.uniform(k_t, (BATCH,))
        eps = jax.random.normal(k_eps, images.shape)

        def loss_fn(p):
            x_t = diffusion.diffuse(images, eps, t, schedule)
            eps_hat = model.apply({"params": p}, x_t, t, embeds, mask, train=True)
            return jnp.mean(diffusion.loss_per_example(eps_hat, images, eps, t, schedule))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def sample(params, key):
        embeds_2b = jnp.concatenate([embeds, jnp.zeros_like(embeds)])
        mask_2b = jnp.concatenate([mask, jnp.zeros_like(mask)])

        def model_fn_2b(x, t):
            return model.apply({"params": params}, x, t, embeds_2b, mask_2b)

        return diffusion.sample(diffusion.guided_model_fn(model_fn_2b, GUIDANCE),
                                (BATCH, SIZE, SIZE, 3), key, schedule=schedule, sampler="ddpm",
                                num_steps=sample_steps, thresholding="dynamic")

    start = time.perf_counter()
    state = train_step(params, opt_state, jax.random.key(1))
    jax.block_until_ready(state)
    train_compile = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(sample(params, jax.random.key(2)))
    sample_compile = time.perf_counter() - start

    def run_train():
        nonlocal state
        state = train_step(state[0], state[1], jax.random.key(3))
        jax.block_until_ready(state)

    train = median_time(run_train, steps, warmup=False)
    sample_time = median_time(lambda: jax.block_until_ready(sample(params, jax.random.key(4))), 1,
                              warmup=False)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    # FLOPs: the train step as compiled; a guided sampling step is one model call on 2B rows
    # (XLA's cost analysis counts a scan body once, so the sampler is costed per step).
    x_2b = jnp.concatenate([images, images])
    embeds_2b = jnp.concatenate([embeds, embeds])
    mask_2b = jnp.concatenate([mask, mask])
    forward_2b = jax.jit(lambda p: model.apply({"params": p}, x_2b, jnp.zeros(2 * BATCH),
                                                 embeds_2b, mask_2b))
    return dict(train=train, sample=sample_time, train_compile=train_compile,
                sample_compile=sample_compile, params=n_params,
                train_flops=_xla_flops(train_step, params, opt_state, jax.random.key(1)),
                sample_flops=sample_steps * _xla_flops(forward_2b, params))


def bench_imagen_pytorch(steps: int, sample_steps: int) -> dict[str, float]:
    import torch
    import transformers
    from torch.utils.flop_counter import FlopCounterMode

    # imagen-pytorch asks the Hub for the T5 config at construction: answer locally.
    transformers.T5Config.from_pretrained = classmethod(
        lambda cls, *a, **k: transformers.T5Config(d_model=TEXT_DIM))
    from imagen_pytorch import Imagen, Unet

    torch.manual_seed(0)
    unet = Unet(dim=DIM, dim_mults=MULTS, num_resnet_blocks=BLOCKS, text_embed_dim=TEXT_DIM,
                attn_dim_head=HEAD_DIM, attn_heads=DIM * MULTS[1] // HEAD_DIM,
                layer_attns=(False, True, True, True),
                layer_cross_attns=(False, True, True, True), max_text_len=TEXT_LEN)
    imagen = Imagen(unets=unet, image_sizes=SIZE, text_embed_dim=TEXT_DIM,
                    timesteps=sample_steps, pred_objectives="noise", min_snr_loss_weight=False,
                    auto_normalize_img=False, dynamic_thresholding=True)
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-4)
    rng = np.random.default_rng(0)
    images = torch.tensor(rng.uniform(-1, 1, (BATCH, 3, SIZE, SIZE)), dtype=torch.float32)
    embeds = torch.tensor(rng.standard_normal((BATCH, TEXT_LEN, TEXT_DIM)), dtype=torch.float32)
    mask = torch.ones(BATCH, TEXT_LEN, dtype=torch.bool)

    def train_step():
        loss = imagen(images, text_embeds=embeds, text_masks=mask, unet_number=1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def forward_2b():  # one guided sampling step: the conditional and the null-text pass
        with torch.no_grad():
            for cond_drop_prob in (0.0, 1.0):
                unet(images, torch.zeros(BATCH), text_embeds=embeds, text_mask=mask,
                     cond_drop_prob=cond_drop_prob)

    def sample():
        with torch.no_grad():
            imagen.sample(text_embeds=embeds, text_masks=mask, cond_scale=GUIDANCE,
                          use_tqdm=False)

    imagen.train()
    train = median_time(train_step, steps)
    with FlopCounterMode(display=False) as counter:
        train_step()
    train_flops = counter.get_total_flops()
    imagen.eval()
    sample_time = median_time(sample, 1, warmup=False)
    with FlopCounterMode(display=False) as counter:
        forward_2b()
    n_params = sum(p.numel() for p in unet.parameters())
    return dict(train=train, sample=sample_time, params=n_params,
                threads=torch.get_num_threads(), train_flops=train_flops,
                sample_flops=sample_steps * counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (median)")
    parser.add_argument("--sample_steps", type=int, default=50, help="sampling steps")
    args = parser.parse_args()
    peak = machine_peak_gflops()
    ours = bench_ours(args.steps, args.sample_steps)
    theirs = bench_imagen_pytorch(args.steps, args.sample_steps)
    print(f"device: {jax.devices()[0].device_kind}; batch {BATCH}, {SIZE}x{SIZE}, dim {DIM}, "
          f"mults {list(MULTS)}, {BLOCKS} res blocks, attention at {list(ATTN_RES)}")
    print(f"parameters: ours {ours['params'] / 1e6:.1f} M, imagen-pytorch "
          f"{theirs['params'] / 1e6:.1f} M")
    print(f"compile (ours, excluded): train {ours['train_compile']:.1f} s, "
          f"sample {ours['sample_compile']:.1f} s; torch threads: {theirs['threads']}")
    for name, label in (("train", "training step (fwd+bwd+adam)"),
                        ("sample", f"{args.sample_steps}-step guided sample")):
        print(f"{label}: ours {ours[name]:.3f} s, imagen-pytorch {theirs[name]:.3f} s, "
              f"speed-up x{theirs[name] / ours[name]:.2f}")
    print(f"roofline: float32 matmul peak {peak:.0f} GFLOP/s (XLA, this machine, this run)")
    for name, label in (("train", "training step"), ("sample", "guided sample")):
        floor = ours[f"{name}_flops"] / (peak * 1e9)
        print(f"  {label}: ours {ours[f'{name}_flops'] / 1e9:.0f} GFLOP at "
              f"{ours[f'{name}_flops'] / ours[name] / 1e9:.0f} GFLOP/s, imagen-pytorch "
              f"{theirs[f'{name}_flops'] / 1e9:.0f} GFLOP at "
              f"{theirs[f'{name}_flops'] / theirs[name] / 1e9:.0f} GFLOP/s; ours at peak would "
              f"take {floor:.2f} s: speed-up at most x{theirs[name] / floor:.2f}")


if __name__ == "__main__":
    main()
