"""Train-step throughput (images/s) of a stage vs an imagen-pytorch `ImagenTrainer` step.

    python -m bench.train_throughput                       # tiny base + tiny SR on CPU
    python -m bench.train_throughput --stage=base64 --batch_size=64 --dtype=bfloat16 \
        --peak_flops=989e12                                # 2 B base on one H100 (MFU)

The JAX side times the jitted, sharded train step of `imagen_jax.train` (Adam/Adafactor + EMA +
NaN guard) on all local devices; the peer is `imagen_pytorch.ImagenTrainer` (Adam + EMA) with a
U-Net of about the same parameter count, same batch and resolution, in the same process.
"""

from __future__ import annotations

import dataclasses
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("stage", "tiny", "'tiny' (tiny base + tiny SR) or a gin stage: base64, sr256")
flags.DEFINE_integer("batch_size", 8, "Global batch.")
flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up steps).")
flags.DEFINE_string("dtype", "float32", "Model compute dtype.")
flags.DEFINE_float("peak_flops", 0.0, "Peak FLOP/s per device for MFU (0: no MFU).")
flags.DEFINE_bool("torch_peer", True, "Also time the imagen-pytorch peer.")


def time_jax_stage(gin_file: str, batch_size: int, steps: int, dtype: str) -> dict:
    import gin
    import jax
    import numpy as np

    from imagen_jax import gin_utils, partitioning
    from imagen_jax.train import metrics, optim, state, step, testing, trainer

    gin.clear_config()
    gin_utils.parse([gin_file], finalize=False)
    stage = gin.get_configurable("Stage")()
    if dtype != "float32":
        stage = dataclasses.replace(stage, model=stage.model.clone(dtype=dtype))
    mesh = partitioning.make_mesh()
    rules = partitioning.logical_axis_rules()
    schedule = optim.learning_rate_schedule()
    tx = optim.make_optimizer(schedule)
    st, shardings = state.init_train_state(stage.model, tx, stage, 0, mesh, rules)
    res = stage.train_resolution
    data = testing.synthetic_data(batch_size=batch_size, resolution=res,
                                  lowres_resolution=stage.train_lowres_resolution,
                                  text_length=stage.text_length,
                                  text_embed_dim=stage.text_embed_dim)
    host = next(data)
    specs = trainer.global_batch_specs(host, stage, batch_size)
    bsh = step.batch_shardings(specs, mesh)
    batch = {k: jax.device_put(host[k], bsh[k]) for k in specs}
    fn = step.make_train_step(stage, tx, schedule, step.StepConfig(), mesh, rules)
    with partitioning.mesh_context(mesh):
        compiled = step.jit_train_step(fn, shardings, bsh, mesh).lower(st, specs).compile()
        for _ in range(2):
            st, m = compiled(st, batch)
        jax.block_until_ready(st)
        t0 = time.perf_counter()
        for _ in range(steps):
            st, m = compiled(st, batch)
        jax.block_until_ready(st)
        elapsed = time.perf_counter() - t0
    flops = metrics.compiled_flops(compiled)
    gin.clear_config()
    out = {"images_per_s": batch_size * steps / elapsed, "step_s": elapsed / steps,
           "params": state.count_params(st.params), "devices": mesh.size,
           "loss": float(np.asarray(m["loss"]))}
    if flops:
        out["flops_per_s_per_device"] = flops / (elapsed / steps)
    return out


def time_torch_peer(kind: str, num_params: int, batch_size: int, steps: int) -> dict:
    import torch
    import transformers

    # imagen-pytorch reads a T5 config at import; give it a local one (no network).
    transformers.T5Config.from_pretrained = classmethod(
        lambda cls, *a, **k: transformers.T5Config(d_model=32))
    from imagen_pytorch import Imagen, ImagenTrainer, Unet

    torch.manual_seed(0)
    if kind == "base":
        unet = Unet(dim=32, dim_mults=(1, 2), num_resnet_blocks=1, layer_attns=(False, True),
                    layer_cross_attns=(False, True), text_embed_dim=32, cond_dim=32,
                    attn_dim_head=16, memory_efficient=False)
        imagen = Imagen(unets=unet, image_sizes=16, text_embed_dim=32, timesteps=1000,
                        condition_on_text=True)
        images = torch.rand(batch_size, 3, 16, 16)
        kwargs = {}
    else:
        unet1 = Unet(dim=8, dim_mults=(1,), text_embed_dim=32, cond_dim=32)
        unet = Unet(dim=16, dim_mults=(1, 2), num_resnet_blocks=(1, 2),
                    layer_attns=(False, True), layer_cross_attns=(False, True),
                    text_embed_dim=32, cond_dim=32, memory_efficient=True)
        imagen = Imagen(unets=(unet1, unet), image_sizes=(16, 64), text_embed_dim=32,
                        timesteps=1000, condition_on_text=True)
        images = torch.rand(batch_size, 3, 64, 64)
        kwargs = {}  # ImagenTrainer downsamples the low-res condition itself
    trainer = ImagenTrainer(imagen, lr=1e-4, use_ema=True, verbose=False)
    unet_number = 1 if kind == "base" else 2
    peer_params = sum(p.numel() for p in unet.parameters())
    embeds = torch.randn(batch_size, 16, 32)
    masks = torch.ones(batch_size, 16, dtype=torch.bool)

    def one_step():
        trainer(images, text_embeds=embeds, text_masks=masks, unet_number=unet_number,
                **kwargs)
        trainer.update(unet_number=unet_number)

    for _ in range(2):
        one_step()
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    elapsed = time.perf_counter() - t0
    return {"images_per_s": batch_size * steps / elapsed, "step_s": elapsed / steps,
            "params": peer_params, "torch_threads": torch.get_num_threads()}


def main(argv):
    del argv
    if FLAGS.stage == "tiny":
        runs = [("tiny base", "gin_configs/tiny/base.gin", "base"),
                ("tiny sr", "gin_configs/tiny/sr.gin", "sr")]
    else:
        runs = [(FLAGS.stage, f"gin_configs/{FLAGS.stage}.gin", None)]
    for name, gin_file, peer in runs:
        ours = time_jax_stage(gin_file, FLAGS.batch_size, FLAGS.steps, FLAGS.dtype)
        line = (f"{name}: imagen-jax {ours['images_per_s']:.1f} img/s "
                f"({ours['params'] / 1e6:.2f} M params, {ours['devices']} devices, "
                f"{ours['step_s'] * 1e3:.1f} ms/step)")
        if FLAGS.peak_flops and "flops_per_s_per_device" in ours:
            line += f", MFU {ours['flops_per_s_per_device'] / FLAGS.peak_flops:.1%}"
        print(line, flush=True)
        if peer and FLAGS.torch_peer:
            theirs = time_torch_peer(peer, ours["params"], FLAGS.batch_size, FLAGS.steps)
            print(f"{name}: imagen-pytorch ImagenTrainer {theirs['images_per_s']:.1f} img/s "
                  f"({theirs['params'] / 1e6:.2f} M params, {theirs['step_s'] * 1e3:.1f} ms/step)"
                  f"; ratio jax/torch = {ours['images_per_s'] / theirs['images_per_s']:.2f}x",
                  flush=True)


if __name__ == "__main__":
    app.run(main)
