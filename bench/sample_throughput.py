"""Images/s of the tiny three-stage cascade (16 -> 64 -> 256, the `make demo` sizes) against
imagen-pytorch's `Imagen.sample` with same-sized U-Nets, the same ancestral steps per stage and
plain classifier-free guidance (`cfg_remove_parallel_component=False`), same machine, one run.

    python -m bench.sample_throughput [--batch=4] [--steps=16,8,8] [--guidance=3.0]

Both sides get text embeddings directly (no T5), random weights, float32 on CPU. Ours is timed
after compilation (compile time printed separately); imagen-pytorch has nothing to compile.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

EMBED_DIM = 32
TEXT_LEN = 32
RES = (16, 64, 256)


def ours(batch: int, steps: tuple[int, ...], guidance: float) -> tuple[float, float, int]:
    """(images/s, compile seconds, parameters) of the compiled JAX cascade."""
    import jax

    from imagen_jax import cascade, partitioning
    from imagen_jax.diffusion import SamplingConfig
    from imagen_jax.stage import Stage
    from imagen_jax.train.testing import tiny_base, tiny_sr

    # The gin_configs/demo/*.gin architectures.
    base = tiny_base(channels=48, channel_mult=(1, 2, 2), attn_resolutions=(8, 4),
                     text_embed_dim=EMBED_DIM, image_size=RES[0])
    sr64 = tiny_sr(text_embed_dim=EMBED_DIM)
    sr256 = tiny_sr(text_embed_dim=EMBED_DIM, self_attention=(False, False))
    stages = []
    for i, (model, res) in enumerate(zip((base, sr64, sr256), RES)):
        stages.append(Stage(
            model=model, resolution=res,
            lowres_resolution=None if i == 0 else RES[i - 1], text_embed_dim=EMBED_DIM,
            sampling=SamplingConfig(sampler="ddpm", num_steps=steps[i],
                                    guidance_weight=guidance, aug_level=0.0),
            name=f"stage{i}"))
    params = [cascade.random_params(s, seed=i) for i, s in enumerate(stages)]
    n_params = sum(x.size for p in params for x in jax.tree.leaves(p))
    mesh = partitioning.make_mesh()
    c = cascade.Cascade(stages, params, mesh=mesh, embed_dim=EMBED_DIM)
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((batch, TEXT_LEN, EMBED_DIM)).astype(np.float32)
    mask = np.ones((batch, TEXT_LEN), bool)
    first = c.sample(text_embeds=embeds, text_mask=mask, seed=0)
    compile_s = first.timings["compile_s"]
    t0 = time.perf_counter()
    out = c.sample(text_embeds=embeds, text_mask=mask, seed=1)
    seconds = time.perf_counter() - t0
    assert out.final.shape == (batch, RES[-1], RES[-1], 3)
    return batch / seconds, compile_s, n_params


def imagen_pytorch(batch: int, steps: tuple[int, ...], guidance: float) -> tuple[float, int]:
    """(images/s, parameters) of imagen-pytorch 2.1.0's cascade of comparable size."""
    import torch
    import transformers

    # imagen-pytorch reads a T5 config from the Hub at import; nothing may be downloaded here.
    transformers.T5Config.from_pretrained = classmethod(
        lambda cls, *a, **k: transformers.T5Config(d_model=EMBED_DIM))
    from imagen_pytorch import Imagen, Unet

    base = Unet(dim=48, dim_mults=(1, 2, 2), num_resnet_blocks=1, text_embed_dim=EMBED_DIM,
                layer_attns=(False, True, True), layer_cross_attns=(False, True, True),
                attn_heads=3, attn_dim_head=16, max_text_len=TEXT_LEN)
    # Like ours: self-attention only in the 64 px stage's low-resolution block; the 256 px stage
    # has none (no middle attention either: 128x128 tokens would not fit in CPU memory).
    sr = [Unet(dim=16, dim_mults=(1, 2), num_resnet_blocks=(1, 2), text_embed_dim=EMBED_DIM,
               layer_attns=(False, attn), layer_cross_attns=(False, True), attn_heads=4,
               attn_dim_head=8, lowres_cond=True, max_text_len=TEXT_LEN,
               attend_at_middle=attn, use_global_context_attn=False)
          for attn in (True, False)]
    imagen = Imagen(unets=(base, *sr), image_sizes=RES, text_embed_dim=EMBED_DIM,
                    timesteps=steps, cond_drop_prob=0.1)
    imagen.eval()
    n_params = sum(p.numel() for p in imagen.parameters())
    embeds = torch.randn(batch, TEXT_LEN, EMBED_DIM)
    masks = torch.ones(batch, TEXT_LEN, dtype=torch.bool)
    t0 = time.perf_counter()
    with torch.no_grad():
        images = imagen.sample(text_embeds=embeds, text_masks=masks, cond_scale=guidance,
                               cfg_remove_parallel_component=False, use_tqdm=False)
    seconds = time.perf_counter() - t0
    assert images.shape[-1] == RES[-1]
    return batch / seconds, n_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", default="16,8,8")
    parser.add_argument("--guidance", type=float, default=3.0)
    args = parser.parse_args()
    steps = tuple(int(s) for s in args.steps.split(","))
    ours_ips, compile_s, ours_params = ours(args.batch, steps, args.guidance)
    print(f"imagen-jax cascade   : {ours_ips:.3f} images/s ({ours_params / 1e6:.2f} M params, "
          f"compile {compile_s:.1f}s)", flush=True)
    ref_ips, ref_params = imagen_pytorch(args.batch, steps, args.guidance)
    print(f"imagen-pytorch 2.1.0 : {ref_ips:.3f} images/s ({ref_params / 1e6:.2f} M params)")
    print(f"ratio (ours / imagen-pytorch): {ours_ips / ref_ips:.2f}x  "
          f"[batch {args.batch}, steps {steps}, guidance {args.guidance}, {RES} px]")


if __name__ == "__main__":
    main()
