"""Must show 3: take 7 batches, save the iterator state, restore it in a NEW process, take 3
more; they equal batches 8-10 of an uninterrupted run.

This module stays light (no torch / TensorFlow imports) because the child process imports it;
it also holds the small helpers test_pipeline.py shares.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from imagen_jax.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = "imagen_shapes/p32"  # 32 px shapes (24 train / 8 heldout), see test_pipeline._prepare


class CharTokenizer:
    """Tiny deterministic tokenizer (bytes + EOS) standing in for T5's in tokens-mode tests."""

    max_length = 24

    def tokenize(self, texts):
        ids = np.zeros((len(texts), self.max_length), np.int32)
        for row, text in enumerate(texts):
            codes = list(text.encode()[: self.max_length - 1]) + [1]
            ids[row, : len(codes)] = codes
        return ids, ids > 0


def shapes_source(data_dir: str, split: str = "train") -> pipeline.SourceSpec:
    return pipeline.SourceSpec(name=SHAPES, split=split, data_dir=data_dir)


def loader(**kw) -> pipeline.LoaderSpec:
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    kw.setdefault("read_threads", 1)
    return pipeline.LoaderSpec(**kw)


def tokens_iterator(data_dir, stage=None, source=None, **loader_kw) -> pipeline.InputIterator:
    return pipeline.make_iterator(
        source or shapes_source(data_dir),
        stage or pipeline.StageSpec(resolution=32),
        loader(**loader_kw),
        pipeline.TextSpec(mode="tokens"),
        tokenizer=CharTokenizer(),
    )


def resume_iterator(data_dir: str) -> pipeline.InputIterator:
    """SR pairs from random crops, decoded in a worker process; 24 examples in batches of 5, so
    the 10 batches cross two epoch boundaries (reshuffles) and the state is mid-epoch."""
    stage = pipeline.StageSpec(resolution=16, lowres_resolution=8, source_resolution=32,
                               crop="random")
    return tokens_iterator(data_dir, stage, batch_size=5, seed=11, worker_count=1,
                           worker_buffer_size=1)


_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from imagen_jax.data import pipeline
    from tests.test_pipeline_resume import resume_iterator

    if __name__ == "__main__":
        data_dir, state_path, out_path = sys.argv[1:]
        it = pipeline.restore_state(resume_iterator(data_dir), state_path)
        batches = pipeline.iterate(it, 3)
        it.close()
        np.savez(out_path, **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})
    """
)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    from tests.test_pipeline import _prepare  # Heavy (tfds preparation): only in pytest.

    return _prepare(str(tmp_path_factory.getbasetemp()))


def test_resume_in_new_process_matches_uninterrupted(data_dir, tmp_path):
    it = resume_iterator(data_dir)
    pipeline.iterate(it, 7)
    state_path = str(tmp_path / "iterator_state.json")
    pipeline.save_state(it, state_path)
    uninterrupted = pipeline.iterate(it, 3)  # batches 8-10 of the run that never stopped
    it.close()
    with open(state_path) as f:
        assert json.load(f)["pipeline"]  # plain JSON, as grain's orbax handler writes it
    out = str(tmp_path / "resumed.npz")
    child = tmp_path / "resume_child.py"
    child.write_text(_CHILD)
    subprocess.run([sys.executable, str(child), data_dir, state_path, out], cwd=REPO,
                   env=dict(os.environ, PYTHONPATH=REPO), check=True, timeout=300)
    resumed = np.load(out)
    assert len(resumed.files) == 3 * len(uninterrupted[0])
    for i, batch in enumerate(uninterrupted):
        for key, value in batch.items():
            np.testing.assert_array_equal(resumed[f"{i}/{key}"], value,
                                          err_msg=f"batch {8 + i}, {key!r}")
