"""Input pipeline throughput (images/s) vs a torch DataLoader peer, next to a tiny train step.

    .venv/bin/python -m bench.input_pipeline [--num_train=512] [--batch_size=32] [--workers=0,2]

For the 64 px base stage and the 256 px SR stage (64 px ``lowres``) it prepares an
``imagen_shapes`` tfds dataset (array_record, reused from ``--data_dir`` when present) and a
cache of T5 embeddings of its captions (tiny random T5, ``max_length`` 128; ``--xxl_shaped``
adds a cache of T5-XXL-sized [128, 4096] bf16 rows, the real training payload), then times
``pipeline.make_iterator`` in cache mode.

Peer: a ``torch.utils.data.DataLoader`` over the same records with the same worker count, doing
what imagen-pytorch's ``Dataset`` does (PIL decode, torchvision ``Resize`` + ``CenterCrop``,
``ToTensor``, scale to [-1, 1]) plus the same low-res resize and the same cache lookups.

Also times one jitted train step of the tiny base U-Net (``gin_configs/tiny/models/tiny_base``
widths) at 64 px on the same batch, i.e. how many images/s training consumes on this machine.
"""

from __future__ import annotations

import io
import os
import time

import numpy as np

# torchvision before TensorFlow (tfds preparation loads it): the other order segfaults here.
import torch
import torchvision.transforms as T
from absl import app, flags, logging
from PIL import Image

# jax and TensorFlow are imported lazily, after these.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

flags.DEFINE_string("data_dir", "/tmp/imagen_jax_bench/tfds", "tfds data_dir (reused).")
flags.DEFINE_string("cache_root", "/tmp/imagen_jax_bench/cache", "embedding caches (reused).")
flags.DEFINE_integer("num_train", 512, "examples per prepared dataset")
flags.DEFINE_integer("batch_size", 32, "per-host batch size")
flags.DEFINE_integer("num_batches", 12, "timed batches per configuration (after 2 warm-up)")
flags.DEFINE_list("workers", ["0", "2"], "worker process counts to time")
flags.DEFINE_bool("xxl_shaped", True, "also time a T5-XXL-shaped bf16 cache at 64 px")
flags.DEFINE_bool("train_step", True, "also time the tiny trainer's step at 64 px")
F = flags.FLAGS

MAX_LENGTH = 128  # PAPER_NOTES: our default T5 max length


class StubEncoder:
    """Random embeddings with T5-XXL's shape (D=4096): stands in for the 11B encoder, which
    cannot run here; the pipeline's cost depends only on the bytes it reads."""

    def __init__(self, tokenizer, embed_dim: int = 4096):
        self.tokenizer, self.embed_dim = tokenizer, embed_dim
        self.max_length = tokenizer.max_length
        self.fingerprint = f"stub-xxl-shaped-{embed_dim}"

    def tokenize(self, texts):
        return self.tokenizer(texts)

    def encode(self, ids, mask):
        rng = np.random.default_rng(int(ids.sum()))
        return rng.standard_normal((*ids.shape, self.embed_dim), dtype=np.float32)


def prepare(resolution: int):
    from imagen_jax.data import pipeline, shapes_tfds

    name = f"bench{resolution}n{F.num_train}"
    shapes_tfds.prepare(
        shapes_tfds.ShapesConfig(name=name, resolution=resolution, num_train=F.num_train,
                                 num_heldout=1),
        data_dir=F.data_dir,
    )
    return pipeline.SourceSpec(name=f"imagen_shapes/{name}", data_dir=F.data_dir)


def build_cache(source, encoder, tag: str, dtype: str = "float32") -> str:
    from imagen_jax.data import embed_cache, pipeline

    out = os.path.join(F.cache_root, f"{source.name.replace('/', '_')}_{tag}")
    report = embed_cache.build_cache(out, encoder, pipeline.CaptionTable(source), shard_size=256,
                                     encode_batch_size=32, dtype=dtype,
                                     dataset_info=pipeline.source_info(source))
    logging.info("cache %s: computed %d shards in %.1fs", out, len(report.computed_shards),
                 report.seconds)
    return out


def time_batches(iterator, num_batches: int, batch_size: int) -> float:
    for _ in range(2):  # warm-up: worker start-up, first reads
        next(iterator)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(iterator)
    return num_batches * batch_size / (time.perf_counter() - start)


class PeerDataset(torch.utils.data.Dataset):
    """imagen-pytorch's recipe (torchvision transforms) over the same records and cache."""

    def __init__(self, source_spec, resolution: int, lowres: int | None, cache_dir: str):
        self.spec, self.cache_dir = source_spec, cache_dir
        self.resolution, self.lowres = resolution, lowres
        self.transform = T.Compose([T.Resize(resolution), T.CenterCrop(resolution), T.ToTensor()])
        self.source = self.cache = None
        self.num_examples = len(self._tfds())

    def _tfds(self):
        from imagen_jax.data import pipeline

        return pipeline.TfdsSource(self.spec)

    def _open(self):  # per worker process: tfds / array_record handles are not shared
        from imagen_jax.data import embed_cache

        self.source = self._tfds()
        self.cache = embed_cache.EmbeddingCache(self.cache_dir)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int):
        if self.source is None:
            self._open()
        example = self.source[index]
        image = Image.open(io.BytesIO(example["image"])).convert("RGB")
        x = self.transform(image)  # [3, R, R] in [0, 1]
        out = {"image": x * 2 - 1}
        if self.lowres is not None:
            low = T.functional.resize(x, [self.lowres, self.lowres], antialias=True)
            out["lowres"] = low * 2 - 1
        embeds, mask = self.cache.lookup(self.source.example_id(example))
        out["text_embeds"] = torch.from_numpy(embeds.astype(np.float32))
        out["text_mask"] = torch.from_numpy(mask)
        return out


def peer_rate(source, resolution, lowres, cache_dir, workers: int) -> float:
    ds = PeerDataset(source, resolution, lowres, cache_dir)
    loader = torch.utils.data.DataLoader(ds, batch_size=F.batch_size, shuffle=True,
                                         num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0,
                                         # spawn, as grain: forking a process that already runs
                                         # jax / TensorFlow threads segfaults.
                                         multiprocessing_context="spawn" if workers else None,
                                         generator=torch.Generator().manual_seed(0))

    def forever():
        while True:
            yield from loader

    return time_batches(forever(), F.num_batches, F.batch_size)


def ours_rate(source, stage, cache_dir, fingerprint, workers: int) -> float:
    from imagen_jax.data import pipeline

    it = pipeline.make_iterator(
        source, stage,
        pipeline.LoaderSpec(batch_size=F.batch_size, worker_count=workers, process_index=0,
                            process_count=1, read_threads=2),
        pipeline.TextSpec(mode="cache", cache_dir=cache_dir),
        text_fingerprint=fingerprint,
    )
    try:
        return time_batches(it, F.num_batches, F.batch_size)
    finally:
        it.close()


def train_step_rate(batch_size: int, text_dim: int) -> str:
    """Images/s of one jitted train step of the tiny base U-Net at 64 px (or why not)."""
    try:
        import jax

        from imagen_jax import partitioning
        from imagen_jax.stage import Stage
        from imagen_jax.train import optim, state, step, testing

        model = testing.tiny_base(channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                  attn_resolutions=(8,), head_dim=16, num_groups=8,
                                  text_embed_dim=text_dim, text_cond_dim=32, image_size=64)
        stage = Stage(model=model, resolution=64, text_length=MAX_LENGTH, text_embed_dim=text_dim)
        mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        rules = ()  # one device: nothing to shard
        schedule = optim.learning_rate_schedule(peak_value=1e-4, kind="constant")
        tx = optim.make_optimizer(schedule)
        train_state, shardings = state.init_train_state(model, tx, stage, 0, mesh, rules)
        fn = step.make_train_step(stage, tx, schedule, step.StepConfig(), mesh, rules)
        rng = np.random.default_rng(0)
        batch = {
            "image": rng.uniform(-1, 1, (batch_size, 64, 64, 3)).astype(np.float32),
            "text_embeds": rng.standard_normal((batch_size, MAX_LENGTH, text_dim), np.float32),
            "text_mask": np.arange(MAX_LENGTH)[None] < rng.integers(1, 30, (batch_size, 1)),
        }
        batch_shardings = step.batch_shardings(batch, mesh)
        batch = {k: jax.device_put(v, batch_shardings[k]) for k, v in batch.items()}
        with partitioning.mesh_context(mesh):
            jitted = step.jit_train_step(fn, shardings, batch_shardings, mesh)
            train_state, _ = jitted(train_state, batch)  # compile
            jax.block_until_ready(train_state)
            n, start = 3, time.perf_counter()
            for _ in range(n):
                train_state, metrics = jitted(train_state, batch)
            jax.block_until_ready(metrics)
        rate = n * batch_size / (time.perf_counter() - start)
        return f"{rate:.1f} img/s ({model.__class__.__name__}, 64 px, batch {batch_size})"
    except Exception as e:  # noqa: BLE001 - the trainer stack is optional for this benchmark
        logging.exception("tiny train step failed")
        return f"n/a ({type(e).__name__}: {str(e)[:120]})"


def main(argv):
    del argv
    from imagen_jax.data import pipeline
    from imagen_jax.text import load_t5
    from imagen_jax.text.testing import write_random_t5

    os.makedirs(F.cache_root, exist_ok=True)
    src64, src256 = prepare(64), prepare(256)
    captions = [c for _, c in pipeline.CaptionTable(src64)]
    t5_dir = os.path.join(F.cache_root, "tiny_t5")
    if not os.path.exists(os.path.join(t5_dir, "model.safetensors")):
        write_random_t5(t5_dir, texts=captions, vocab_size=512)
    encoder = load_t5(t5_dir, max_length=MAX_LENGTH)
    configs = [
        ("64 px base", src64, pipeline.StageSpec(resolution=64), None,
         build_cache(src64, encoder, "tiny"), encoder.fingerprint),
        ("256 px SR (64 lowres)", src256, pipeline.StageSpec(resolution=256, lowres_resolution=64),
         64, build_cache(src256, encoder, "tiny"), encoder.fingerprint),
    ]
    if F.xxl_shaped:
        stub = StubEncoder(encoder.tokenizer)
        configs.append(("64 px base, XXL-shaped bf16 text", src64,
                        pipeline.StageSpec(resolution=64), None,
                        build_cache(src64, stub, "xxl_bf16", dtype="bfloat16"), stub.fingerprint))
    print(f"batch {F.batch_size}, {F.num_batches} timed batches after 2 warm-up; "
          f"{os.cpu_count()} CPUs")
    print("| pipeline | workers | ours img/s | torch DataLoader img/s | ratio (ours / peer) |")
    print("|---|---:|---:|---:|---:|")
    for label, source, stage, lowres, cache_dir, fingerprint in configs:
        for workers in map(int, F.workers):
            ours = ours_rate(source, stage, cache_dir, fingerprint, workers)
            peer = peer_rate(source, stage.resolution, lowres, cache_dir, workers)
            print(f"| {label} | {workers} | {ours:.0f} | {peer:.0f} | {ours / peer:.2f}x |",
                  flush=True)
    if F.train_step:
        print(f"tiny trainer step: {train_step_rate(F.batch_size, encoder.embed_dim)}")


if __name__ == "__main__":
    app.run(main)
