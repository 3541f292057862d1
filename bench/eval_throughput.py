"""FID Inception throughput: our Flax extractor vs pytorch-fid's InceptionV3 (same run, weights).

    .venv/bin/python -m bench.eval_throughput [--batch_size=32] [--iters=3] [--resolution=256]

Both networks get identical random weights (no download) and the same uint8 batch at
``--resolution`` (resized to 299 inside, as in a real FID run); each is warmed up once (JAX:
compilation) and then timed over ``--iters`` batches. Prints images/s for both and the ratio.
"""

from __future__ import annotations

import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import app, flags  # noqa: E402

from imagen_jax.eval import inception  # noqa: E402

flags.DEFINE_integer("batch_size", 32, "Images per batch.")
flags.DEFINE_integer("iters", 3, "Timed batches per implementation.")
flags.DEFINE_integer("resolution", 256, "Input resolution (resized to 299 by both).")
FLAGS = flags.FLAGS


def build_torch_reference():
    """pytorch-fid's FID InceptionV3 with random weights, built without downloading."""
    from unittest import mock

    import torchvision
    from pytorch_fid import inception as pfi

    captured = []
    with (
        mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(
            torchvision.models.inception.Inception3,
            "load_state_dict",
            lambda self, *a, **k: captured.append(self),
        ),
    ):
        model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    return model, captured[0].state_dict()


def images_per_second(fn, batch: np.ndarray, iters: int) -> float:
    fn(batch)  # warm-up (JAX: compile)
    start = time.perf_counter()
    for _ in range(iters):
        fn(batch)
    return iters * len(batch) / (time.perf_counter() - start)


def main(argv):
    del argv
    model, state_dict = build_torch_reference()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "inception.pth")
        torch.save(state_dict, path)
        extractor = inception.make_inception_extractor(
            weights_path=path, batch_size=FLAGS.batch_size
        )
    rng = np.random.default_rng(0)
    r = FLAGS.resolution
    batch = rng.integers(0, 256, (FLAGS.batch_size, r, r, 3), dtype=np.uint8)

    def torch_features(images):
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        with torch.no_grad():
            return model(x)[0][:, :, 0, 0].numpy()

    ours = images_per_second(extractor, batch, FLAGS.iters)
    ref = images_per_second(torch_features, batch, FLAGS.iters)
    expected = torch_features(batch[:4])
    rel_diff = np.abs(extractor(batch[:4]) - expected).max() / np.abs(expected).max()
    print(
        f"devices: {jax.device_count()} x {jax.devices()[0].platform}; torch threads: "
        f"{torch.get_num_threads()}; batch {FLAGS.batch_size} at {r}x{r} -> 299"
    )
    print(f"imagen_jax InceptionV3FID: {ours:8.2f} images/s")
    print(f"pytorch-fid InceptionV3:   {ref:8.2f} images/s")
    print(
        f"ratio (ours / pytorch-fid): {ours / ref:.2f}x   "
        f"(max feature diff / max |feature|: {rel_diff:.1e})"
    )


if __name__ == "__main__":
    app.run(main)
