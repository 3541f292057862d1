"""Light helpers shared by several test modules and by their child processes.

Not a test module (pytest does not collect it). It imports only the standard library, numpy and
imagen_jax (the input pipeline lazily), so a child process started with ``PYTHONPATH=REPO`` can
``from tests.support import ...`` without loading pytest, torch or TensorFlow.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from imagen_jax.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Cheap CPU compiles for child jax processes (results agree to 1e-5 with or without them).
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# 32 px shapes (24 train / 8 heldout), prepared by tests.support_data.prepare_pipeline_data.
SHAPES = "imagen_shapes/p32"


def subprocess_env(num_devices: int = 8) -> dict[str, str]:
    """Environment for a child jax process: ``num_devices`` simulated CPU devices, cheap
    compiles, the repository on ``PYTHONPATH``, TensorFlow's logging silenced."""
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices} {FAST_XLA}",
        JAX_PLATFORMS="cpu", PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3",
    )
    return env


def sampling_loops(stablehlo: str) -> int:
    """While loops of a lowered program outside jax's PRNG helpers (threefry lowers its rounds to
    a loop on CPU): one per sampling loop (the cascade tests)."""
    funcs = re.split(r"(?=func\.func )", stablehlo)
    return sum(len(re.findall(r"stablehlo\.while", f)) for f in funcs
               if not re.match(r"func\.func (private |public )?@_?threefry", f))


def check_one_program(lowered: str, compiled: str, num_stages: int) -> None:
    """Asserts that a cascade's lowered (StableHLO) and compiled (HLO) texts are one program with
    one sampling loop per stage and no host round-trip."""
    assert sampling_loops(lowered) == num_stages, "expected one sampling loop per stage"
    # A host round-trip would show up as a callback custom-call, infeed/outfeed or send/recv.
    for op in ("callback", "infeed", "outfeed", "stablehlo.send", "stablehlo.recv"):
        assert op not in lowered, f"{op} in the cascade program"
    assert "callback" not in compiled
    # One executable: the stages are not separate programs glued together by the host.
    assert compiled.count("\nENTRY ") == 1


class CharTokenizer:
    """Tiny deterministic tokenizer (bytes + EOS) standing in for T5's in tokens-mode tests.

    ``tokenize(texts)`` returns (ids int32 [len(texts), 24], mask bool [len(texts), 24]); texts
    longer than 23 bytes are truncated, id 1 is EOS and 0 is padding.
    """

    max_length = 24

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.zeros((len(texts), self.max_length), np.int32)
        for row, text in enumerate(texts):
            codes = list(text.encode()[: self.max_length - 1]) + [1]
            ids[row, : len(codes)] = codes
        return ids, ids > 0


def shapes_source(data_dir: str, split: str = "train") -> pipeline.SourceSpec:
    """The prepared 32 px shapes dataset (``SHAPES``) in ``data_dir``, split "train"/"heldout"."""
    from imagen_jax.data import pipeline

    return pipeline.SourceSpec(name=SHAPES, split=split, data_dir=data_dir)


def loader(**kw) -> pipeline.LoaderSpec:
    """A LoaderSpec for one host (process 0 of 1) and one read thread unless ``kw`` says so."""
    from imagen_jax.data import pipeline

    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    kw.setdefault("read_threads", 1)
    return pipeline.LoaderSpec(**kw)


def tokens_iterator(data_dir: str, stage: pipeline.StageSpec | None = None,
                    source: pipeline.SourceSpec | None = None,
                    **loader_kw) -> pipeline.InputIterator:
    """Tokens-mode iterator (CharTokenizer) over ``source`` (default: the shapes train split)
    at ``stage`` (default: the 32 px base stage); ``loader_kw`` go to :func:`loader`."""
    from imagen_jax.data import pipeline

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
    from imagen_jax.data import pipeline

    stage = pipeline.StageSpec(resolution=16, lowres_resolution=8, source_resolution=32,
                               crop="random")
    return tokens_iterator(data_dir, stage, batch_size=5, seed=11, worker_count=1,
                           worker_buffer_size=1)


def leaves_equal(a, b) -> None:
    """Asserts two pytrees have the same leaves, bit for bit (host copies of device arrays)."""
    import jax  # lazy: this module stays importable without initialising a backend

    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(jax.device_get(x)), np.asarray(jax.device_get(y)))
