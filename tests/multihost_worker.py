"""One process of the tiny multi-host training run of `tests/test_multihost.py`.

    python -m tests.multihost_worker OUT_DIR DATA_DIR NUM_PROCESSES PROCESS_ID PORT

With NUM_PROCESSES > 1 the process joins a `jax.distributed` run whose coordinator listens on
127.0.0.1:PORT (CPU collectives: gloo, jax's default), reads its own host shard of the tfds
pipeline (`imagen_jax.data.pipeline`, process_index = jax.process_index()) and trains through
`imagen_jax.train.trainer.train`. With NUM_PROCESSES = 1 it is the one-process reference: its
data_fn concatenates the batches of the SIMULATED_HOSTS host shards in host order, i.e. the
global batch the multi-process run should assemble.

Process 0 writes OUT_DIR/result.npz: every global array the trainer built from host batches
(`_to_global`, gathered to the host), the loss of every step, the final params and EMA params.
Importing this module does not initialise a jax backend: the test imports its constants and
`host_iterator`.
"""

from __future__ import annotations

import os
import sys

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

SHAPES = "imagen_shapes/mh16"  # prepared by the test: 16 px shapes, see test_multihost.py
SIMULATED_HOSTS = 2
GLOBAL_BATCH = 8
NUM_STEPS = 3
RESOLUTION = 8
TEXT_LENGTH = 4
EMBED_DIM = 16
VOCAB = 256


class PixelTextModel(nn.Module):
    """A minimal denoiser with the U-Net call contract (DESIGN.md): every output pixel depends on
    its input pixel, on t and on the example's masked text embeddings, so a batch assembled in
    the wrong order or from the wrong examples changes the loss. Compiles in about a second,
    where the tiny U-Net takes tens of seconds on a loaded CPU; the architecture is irrelevant
    to batch assembly under data parallelism."""

    features: int = 16

    @nn.compact
    def __call__(self, x, t, text_embeds, text_mask, train: bool = False):
        del train
        mask = text_mask[..., None].astype(jnp.float32)
        text = (text_embeds * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)  # [B, D]
        cond = nn.Dense(self.features)(text) + nn.Dense(self.features)(t[:, None])
        h = nn.Dense(self.features)(x) + cond[:, None, None, :]
        return nn.Dense(x.shape[-1])(nn.silu(h))


def tiny_stage():
    """An 8 px base stage of `PixelTextModel` (4 text tokens, 16-dim embeddings)."""
    from imagen_jax.stage import Stage

    return Stage(model=PixelTextModel(), resolution=RESOLUTION, text_length=TEXT_LENGTH,
                 text_embed_dim=EMBED_DIM)


class CharTokenizer:
    """Bytes of the caption (truncated, then EOS = 1) as token ids; a stand-in for T5's."""

    max_length = TEXT_LENGTH

    def tokenize(self, texts):
        ids = np.zeros((len(texts), self.max_length), np.int32)
        for row, text in enumerate(texts):
            codes = list(text.encode()[: self.max_length - 1]) + [1]
            ids[row, : len(codes)] = codes
        return ids, ids > 0


def host_iterator(data_dir: str, batch_size: int, process_index: int, process_count: int):
    """The real grain pipeline of one host (tokens mode, 8 px images)."""
    from imagen_jax.data import pipeline

    return pipeline.make_iterator(
        pipeline.SourceSpec(name=SHAPES, data_dir=data_dir),
        pipeline.StageSpec(resolution=RESOLUTION),
        pipeline.LoaderSpec(batch_size=batch_size, seed=3, read_threads=1,
                            process_index=process_index, process_count=process_count),
        pipeline.TextSpec(mode="tokens"),
        tokenizer=CharTokenizer(),
    )


class _ConcatenatedHosts:
    """One-process reference data: host 0's batch, then host 1's, ... as one batch."""

    def __init__(self, data_dir: str, batch_size: int):
        per_host = batch_size // SIMULATED_HOSTS
        self.hosts = [host_iterator(data_dir, per_host, h, SIMULATED_HOSTS)
                      for h in range(SIMULATED_HOSTS)]

    def __iter__(self):
        return self

    def __next__(self):
        parts = [next(h) for h in self.hosts]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def main(argv: list[str]) -> None:
    out_dir, data_dir, num_processes, process_id, port = argv
    num_processes, process_id = int(num_processes), int(process_id)
    import jax

    if num_processes > 1:
        # Short timeouts: if one process dies the other fails fast instead of waiting minutes.
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
            process_id=process_id, initialization_timeout=120, shutdown_timeout_seconds=30)
    from jax.experimental import multihost_utils

    from imagen_jax import gin_utils
    from imagen_jax.train import trainer
    from imagen_jax.train.checkpoint import CheckpointConfig
    from imagen_jax.train.step import StepConfig

    gin_utils.parse(bindings=["learning_rate_schedule.kind = 'constant'",
                              "learning_rate_schedule.peak_value = 0.1",
                              "make_optimizer.name = 'sgd'",
                              "make_optimizer.clip_grad_norm = None"], finalize=False)

    if num_processes > 1:
        def data_fn(*, batch_size, process_index, process_count, stage=None):
            return host_iterator(data_dir, batch_size, process_index, process_count)
    else:
        def data_fn(*, batch_size, process_index, process_count, stage=None):
            del process_index, process_count, stage
            return _ConcatenatedHosts(data_dir, batch_size)

    table = jax.random.normal(jax.random.PRNGKey(7), (VOCAB, EMBED_DIM), jnp.float32)
    encode_fn = jax.jit(lambda ids, mask: table[ids] * mask[..., None])

    # Every global array the trainer assembles from host-local data, gathered to numpy.
    assembled: list[dict[str, np.ndarray]] = []
    to_global = trainer._to_global

    def recording_to_global(batch, shardings, global_batch):
        out = to_global(batch, shardings, global_batch)
        gathered = multihost_utils.process_allgather(out, tiled=True)
        assembled.append({k: np.asarray(v) for k, v in gathered.items()})
        return out

    trainer._to_global = recording_to_global
    losses: list[float] = []

    def record_loss(step, state, metrics):
        del step, state
        losses.append(float(np.asarray(metrics["loss"])))

    state = trainer.train(
        os.path.join(out_dir, "workdir"),
        stage=tiny_stage(),
        data_fn=data_fn,
        config=trainer.TrainConfig(batch_size=GLOBAL_BATCH, num_steps=NUM_STEPS, log_every=1,
                                   progress_bar=False),
        step_config=StepConfig(ema_decay=0.9),
        checkpoint_config=CheckpointConfig(save_every=1000, keep=1, keep_period=None,
                                           async_save=False),
        encode_fn=encode_fn,
        step_callback=record_loss,
    )
    params = multihost_utils.process_allgather(state.params, tiled=True)
    ema = multihost_utils.process_allgather(state.ema_params, tiled=True)
    if jax.process_index() == 0:
        arrays = {f"assembled/{i}/{k}": v for i, a in enumerate(assembled) for k, v in a.items()}
        arrays["loss"] = np.asarray(losses)
        arrays["devices"] = np.asarray(jax.device_count())
        arrays["processes"] = np.asarray(jax.process_count())
        arrays.update({f"params/{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))})
        arrays.update({f"ema/{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(ema))})
        np.savez(os.path.join(out_dir, "result.npz"), **arrays)


if __name__ == "__main__":
    main(sys.argv[1:])
