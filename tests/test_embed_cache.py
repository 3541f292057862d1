"""Text-embedding cache: equal to on-the-fly encoding, resumable after a kill, refuses mismatches.

Must show 5: cached embeddings are bitwise the float32 embeddings the trainer would compute on the
fly, and a killed ``launch.cache_embeddings`` run resumes without recomputing finished shards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

from imagen_jax.data import embed_cache, pipeline
from tests.support import REPO, SHAPES, loader, shapes_source

MAX_LENGTH = 64  # shapes captions are up to ~45 tokens with this tiny vocabulary
SHARD_SIZE = 7  # 24 examples -> shards of 7, 7, 7, 3
ENCODE_BATCH = 4


@pytest.fixture(scope="module")
def data_dir(pipeline_data_dir) -> str:
    """The shapes tfds data_dir of tests/conftest.py (pipeline_data_dir), shared with the
    pipeline tests."""
    return pipeline_data_dir


@pytest.fixture(scope="module")
def t5_dir(data_dir, tmp_path_factory) -> str:
    from imagen_jax.text.testing import write_random_t5

    captions = [c for _, c in pipeline.CaptionTable(shapes_source(data_dir))]
    return write_random_t5(str(tmp_path_factory.mktemp("t5")), texts=captions, vocab_size=256)


@pytest.fixture(scope="module")
def encoder(t5_dir):
    from imagen_jax.text import load_t5

    return load_t5(t5_dir, max_length=MAX_LENGTH)


class CountingEncoder:
    """Delegates to a TextEncoder and counts ``encode`` calls (to prove shards were skipped)."""

    def __init__(self, encoder):
        self.inner, self.encode_calls = encoder, 0
        self.max_length, self.embed_dim = encoder.max_length, encoder.embed_dim
        self.fingerprint = encoder.fingerprint

    def tokenize(self, texts):
        return self.inner.tokenize(texts)

    def encode(self, ids, mask):
        self.encode_calls += 1
        return self.inner.encode(ids, mask)


def build(out_dir, encoder, data_dir, split="train", **kw):
    source = shapes_source(data_dir, split)
    kw.setdefault("shard_size", SHARD_SIZE)
    kw.setdefault("encode_batch_size", ENCODE_BATCH)
    return embed_cache.build_cache(str(out_dir), encoder, pipeline.CaptionTable(source),
                                   dataset_info=pipeline.source_info(source), **kw)


@pytest.fixture(scope="module")
def cache_dir(encoder, data_dir, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("cache_f32")
    report = build(out, encoder, data_dir)
    assert report.computed_shards == (0, 1, 2, 3) and not report.skipped_shards
    return str(out)


def cache_iterator(data_dir, cache_dir, encoder, **kw):
    return pipeline.make_iterator(
        shapes_source(data_dir),
        pipeline.StageSpec(resolution=32),
        loader(batch_size=8, num_epochs=1, seed=2),
        pipeline.TextSpec(mode="cache", cache_dir=cache_dir),
        text_fingerprint=kw.get("fingerprint", encoder.fingerprint),
        text_max_length=kw.get("max_length", encoder.max_length),
    )


def test_cached_embeddings_bitwise_equal_on_the_fly_encoding(data_dir, cache_dir, encoder):
    cached = list(cache_iterator(data_dir, cache_dir, encoder))
    # The on-the-fly route: same loader in tokens mode, the trainer encodes the whole batch.
    tokens = pipeline.make_iterator(
        shapes_source(data_dir), pipeline.StageSpec(resolution=32),
        loader(batch_size=8, num_epochs=1, seed=2), pipeline.TextSpec(mode="tokens"),
        tokenizer=encoder,
    )
    captions = dict(pipeline.CaptionTable(shapes_source(data_dir)))
    for c, t in zip(cached, tokens, strict=True):
        np.testing.assert_array_equal(c["id"], t["id"])
        np.testing.assert_array_equal(c["image"], t["image"])
        assert c["text_embeds"].shape == (8, MAX_LENGTH, encoder.embed_dim)
        assert c["text_embeds"].dtype == np.float32 and c["text_mask"].dtype == bool
        ids, mask = encoder.tokenize([captions[int(i)] for i in c["id"]])
        np.testing.assert_array_equal(t["text_ids"], ids)
        np.testing.assert_array_equal(c["text_mask"], mask)
        on_the_fly = np.asarray(encoder.encode(t["text_ids"], t["text_mask"]))
        # Bitwise, padded positions included (zeros on both sides).
        assert c["text_embeds"].tobytes() == on_the_fly.tobytes()
        assert np.abs(on_the_fly).sum() > 0 and 3 < mask.sum(1).min() < MAX_LENGTH


def test_bfloat16_cache_is_the_rounded_float32_embeddings(data_dir, cache_dir, encoder, tmp_path):
    build(tmp_path, encoder, data_dir, dtype="bfloat16")
    f32, bf16 = embed_cache.EmbeddingCache(cache_dir), embed_cache.EmbeddingCache(str(tmp_path))
    for example_id in f32._sorted_ids[:5]:
        e32, m32 = f32.lookup(example_id)
        e16, m16 = bf16.lookup(example_id)
        assert e16.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(m16, m32)
        assert e16.tobytes() == e32.astype(ml_dtypes.bfloat16).tobytes()


def test_cache_refuses_another_encoder_or_max_length(data_dir, cache_dir, encoder, t5_dir):
    from imagen_jax.text import load_t5

    short = load_t5(t5_dir, max_length=16)  # same weights, other max_length: other fingerprint
    assert short.fingerprint != encoder.fingerprint
    with pytest.raises(embed_cache.CacheMismatchError, match="was built with encoder .* but this"):
        cache_iterator(data_dir, cache_dir, encoder, fingerprint=short.fingerprint)
    with pytest.raises(embed_cache.CacheMismatchError,
                       match=f"max_length={MAX_LENGTH} .* max_length=16"):
        cache_iterator(data_dir, cache_dir, encoder, max_length=16)
    # Resuming/extending a cache with a different encoder is refused, nothing is overwritten.
    before = sorted(os.listdir(cache_dir))
    with pytest.raises(embed_cache.CacheMismatchError, match="rebuild the cache with this encoder"):
        build(cache_dir, short, data_dir)
    with pytest.raises(embed_cache.CacheMismatchError, match="different shard_size"):
        build(cache_dir, encoder, data_dir, shard_size=5)
    assert sorted(os.listdir(cache_dir)) == before


def test_cache_of_another_split_is_refused(data_dir, encoder, tmp_path):
    build(tmp_path, encoder, data_dir, split="heldout")
    with pytest.raises(pipeline.DataError, match="was built for .*'heldout'"):
        cache_iterator(data_dir, str(tmp_path), encoder)
    cache = embed_cache.EmbeddingCache(str(tmp_path))
    with pytest.raises(embed_cache.CacheError, match="example id 12345 is not in the embedding"):
        cache.lookup(12345)


_KILLED_CHILD = textwrap.dedent(
    """
    import os
    import signal
    import sys

    from absl import app

    from imagen_jax.data import embed_cache
    from launch import cache_embeddings

    commit = embed_cache._commit

    def commit_or_die(tmp_path, final_path):
        # Dies by SIGKILL with shard 1 fully written but not yet published.
        if os.path.basename(final_path).startswith("embeds-00001"):
            os.kill(os.getpid(), signal.SIGKILL)
        commit(tmp_path, final_path)

    embed_cache._commit = commit_or_die
    app.run(cache_embeddings.main, argv=["cache_embeddings", *sys.argv[1:]])
    """
)


def test_killed_cache_run_resumes_without_recomputing_finished_shards(
    data_dir, cache_dir, encoder, t5_dir, tmp_path
):
    out = tmp_path / "cache"
    args = [f"--t5={t5_dir}", f"--dataset={SHAPES}", f"--data_dir={data_dir}", f"--out={out}",
            f"--max_length={MAX_LENGTH}", f"--shard_size={SHARD_SIZE}",
            f"--batch_size={ENCODE_BATCH}"]
    child = subprocess.run([sys.executable, "-c", _KILLED_CHILD, *args], cwd=REPO,
                           env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                           timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    files = sorted(os.listdir(out))
    assert "embeds-00000-of-00004.array_record" in files
    assert "embeds-00001-of-00004.array_record.tmp" in files  # the unpublished shard
    assert "embeds-00001-of-00004.array_record" not in files
    with pytest.raises(embed_cache.CacheError, match="incomplete .*rerun"):
        embed_cache.EmbeddingCache(str(out))
    finished = os.stat(out / "embeds-00000-of-00004.array_record")

    counting = CountingEncoder(encoder)
    report = build(out, counting, data_dir)
    assert report.skipped_shards == (0,) and report.computed_shards == (1, 2, 3)
    # Only shards 1-3 were encoded: 7 + 7 + 3 rows in batches of 4.
    assert counting.encode_calls == 2 + 2 + 1
    again = os.stat(out / "embeds-00000-of-00004.array_record")
    assert (again.st_ino, again.st_mtime_ns) == (finished.st_ino, finished.st_mtime_ns)
    # The resumed cache equals the one built in one go, record for record.
    resumed, whole = embed_cache.EmbeddingCache(str(out)), embed_cache.EmbeddingCache(cache_dir)
    assert resumed.meta == whole.meta
    for example_id in whole._sorted_ids:
        (a, ma), (b, mb) = resumed.lookup(example_id), whole.lookup(example_id)
        assert a.tobytes() == b.tobytes() and np.array_equal(ma, mb)
