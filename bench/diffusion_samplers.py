"""Sampling-loop speed: our compiled samplers vs diffusers' schedulers driven from Python.

Both run the same exact (analytic) denoiser -- the Bayes-optimal eps prediction for a
two-component Gaussian mixture, written in JAX for ours and in PyTorch for diffusers -- so the
timing isolates what a sampler costs around the network: the update arithmetic, dynamic
thresholding (p = 99.5, per sample) and, for diffusers, the Python loop and per-step dispatch.
Trajectories are checked to agree before timing. Prints the ratio per sampler.

    .venv/bin/python -m bench.diffusion_samplers [--batch_size=8] [--resolution=64]
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402

from bench.timing import median_time  # noqa: E402

flags.DEFINE_integer("batch_size", 8, "images per batch")
flags.DEFINE_integer("resolution", 64, "image side (RGB)")
flags.DEFINE_integer("iters", 3, "timed runs per implementation (median reported)")
F = flags.FLAGS

# (sampler, steps, diffusers scheduler)
CASES = (("ddim", 50, "DDIMScheduler"), ("dpmpp_2m", 25, "DPMSolverMultistepScheduler"))


def main(argv):
    del argv
    import diffusers
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from imagen_jax import diffusion as D

    schedule = D.CosineSchedule()
    mix = D.GaussianMixture1D(weights=(0.25, 0.75), means=(-0.5, 0.7), stds=(0.2, 0.3))
    shape = (F.batch_size, F.resolution, F.resolution, 3)
    init = np.asarray(jax.random.normal(jax.random.PRNGKey(0), shape))
    init_t = torch.from_numpy(init.transpose(0, 3, 1, 2).copy())  # NCHW for diffusers

    def torch_eps(x, t):
        """The same analytic eps prediction in PyTorch (float32)."""
        logsnr = torch.tensor(float(schedule.logsnr(t)))
        a, s = torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()
        logr, eps_k = [], []
        for w, mu, sd in zip(mix.weights, mix.means, mix.stds):
            var = a * a * sd * sd + s * s
            resid = x - a * mu
            logr.append(np.log(w) - 0.5 * (torch.log(var) + resid * resid / var))
            eps_k.append(s * resid / var)
        r = torch.softmax(torch.stack(logr), dim=0)
        return (r * torch.stack(eps_k)).sum(0)

    print(f"Sampling loop, analytic eps model, dynamic thresholding p=99.5, float32, batch "
          f"{shape}, {jax.devices()[0].platform} ({os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}), diffusers {diffusers.__version__}")
    for sampler, steps, sched_name in CASES:
        abar = np.asarray(schedule.alpha_sigma((np.arange(steps) + 1) / steps)[0], np.float64) ** 2
        common = dict(num_train_timesteps=steps, timestep_spacing="trailing", thresholding=True,
                      dynamic_thresholding_ratio=0.995, sample_max_value=1e30)
        if sampler == "ddim":
            sched = diffusers.DDIMScheduler(set_alpha_to_one=True, clip_sample=False, **common)
        else:
            sched = diffusers.DPMSolverMultistepScheduler(final_sigmas_type="zero", **common)
        sched.alphas_cumprod = torch.tensor(abar, dtype=torch.float32)

        def theirs(sched=sched, steps=steps, sampler=sampler):
            sched.set_timesteps(steps)
            x = init_t.clone()
            with torch.inference_mode():
                for step in sched.timesteps:
                    eps = torch_eps(x, (int(step) + 1) / steps)
                    kw = {"use_clipped_model_output": True} if sampler == "ddim" else {}
                    x = sched.step(eps, int(step), x, **kw).prev_sample
            return x

        model_fn = mix.model_fn(schedule, "eps")

        def ours(sampler=sampler, steps=steps, model_fn=model_fn):
            return D.sample(model_fn, shape, jax.random.PRNGKey(0), schedule=schedule,
                            sampler=sampler, num_steps=steps, thresholding="dynamic",
                            init_noise=jnp.asarray(init)).block_until_ready()

        t0 = time.perf_counter()
        out = np.asarray(ours())
        compile_s = time.perf_counter() - t0
        ref = theirs().numpy().transpose(0, 2, 3, 1)
        err = np.abs(out - ref).max()
        t_ours = median_time(ours, F.iters)
        t_ref = median_time(theirs, F.iters)
        print(f"  {sampler} x {steps} steps (vs diffusers {sched_name}); max |diff| {err:.1e}")
        print(f"    imagen_jax (one jitted scan): {t_ours * 1e3:9.1f} ms   (first call incl. "
              f"compile {compile_s:.1f} s)")
        print(f"    diffusers  (Python loop)    : {t_ref * 1e3:9.1f} ms")
        print(f"    ratio: {t_ref / t_ours:.2f}x")


if __name__ == "__main__":
    app.run(main)
