"""Multi-host batch assembly: two real `jax.distributed` processes (CPU, 2 devices each) train
a tiny stage through `trainer.train` from their own host shards of the tfds pipeline; the
global batch they assemble and the losses and parameters they reach equal a one-process run
(4 devices) fed the concatenation of the two host shards' batches, and equal the pipeline's
host batches read independently here.

The workers are `tests/multihost_worker.py`; each subprocess is bounded by a timeout.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from imagen_jax.data import shapes_tfds
from tests import multihost_worker as worker
from tests.support import REPO, subprocess_env

TIMEOUT_S = 300  # all three workers together (pytest-timeout allows 600 s per test)
# Three jax processes (about 30 s of CPU in all): part of `make test`, marked as long-running.
pytestmark = pytest.mark.slow


def _env(num_devices: int) -> dict:
    # Cheap CPU compiles; all three workers use the same flags, so their programs compare alike.
    return subprocess_env(num_devices)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out_dir, data_dir, num_processes, process_id, port, num_devices):
    os.makedirs(out_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "tests.multihost_worker", str(out_dir), data_dir,
           str(num_processes), str(process_id), str(port)]
    return subprocess.Popen(cmd, env=_env(num_devices), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait(procs):
    """Waits for all workers within TIMEOUT_S in total; kills any left over (e.g. a process
    waiting for a peer that died)."""
    deadline = time.monotonic() + TIMEOUT_S
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]


def _load(path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    data_dir = str(root / "tfds")
    shapes_tfds.prepare(shapes_tfds.ShapesConfig(name="mh16", resolution=16, num_train=40,
                                                 num_heldout=4), data_dir=data_dir)
    port = _free_port()
    procs = [_launch(root / "two", data_dir, 2, i, port, num_devices=2) for i in range(2)]
    procs.append(_launch(root / "one", data_dir, 1, 0, 0, num_devices=4))
    _wait(procs)
    return {"two": _load(root / "two" / "result.npz"), "one": _load(root / "one" / "result.npz"),
            "data_dir": data_dir}


def _host_batches(data_dir: str) -> list[dict[str, np.ndarray]]:
    """The pipeline's batches of hosts 0 and 1 (read here, in one process), concatenated."""
    per_host = worker.GLOBAL_BATCH // worker.SIMULATED_HOSTS
    hosts = [worker.host_iterator(data_dir, per_host, h, worker.SIMULATED_HOSTS)
             for h in range(worker.SIMULATED_HOSTS)]
    out = []
    for _ in range(worker.NUM_STEPS):
        parts = [next(h) for h in hosts]
        assert len(set(parts[0]["id"]) & set(parts[1]["id"])) == 0  # disjoint host shards
        out.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    return out


def test_runs_are_what_they_claim(runs):
    assert int(runs["two"]["processes"]) == 2 and int(runs["two"]["devices"]) == 4
    assert int(runs["one"]["processes"]) == 1 and int(runs["one"]["devices"]) == 4


def test_two_processes_assemble_the_global_batch_of_one_process(runs):
    expected = _host_batches(runs["data_dir"])
    for name in ("two", "one"):
        got = runs[name]
        # Per step the trainer assembles the token ids (to encode), then the batch.
        calls = sorted({int(k.split("/")[1]) for k in got if k.startswith("assembled/")})
        assert len(calls) == 2 * worker.NUM_STEPS
        for step, batch in enumerate(expected):
            ids = f"assembled/{2 * step}/"
            images = f"assembled/{2 * step + 1}/"
            np.testing.assert_array_equal(got[ids + "text_ids"], batch["text_ids"])
            np.testing.assert_array_equal(got[ids + "text_mask"], batch["text_mask"])
            np.testing.assert_array_equal(got[images + "image"], batch["image"])
            np.testing.assert_array_equal(got[images + "text_mask"], batch["text_mask"])
            assert got[images + "image"].shape == (worker.GLOBAL_BATCH, worker.RESOLUTION,
                                                   worker.RESOLUTION, 3)
    # Consecutive steps see different examples (the data really advances).
    assert not np.array_equal(expected[0]["image"], expected[1]["image"])


def test_two_processes_train_like_one_process(runs):
    two, one = runs["two"], runs["one"]
    assert two["loss"].shape == (worker.NUM_STEPS,)
    assert np.isfinite(two["loss"]).all()
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)
    params = sorted(k for k in one if k.startswith(("params/", "ema/")))
    assert params and params == sorted(k for k in two if k.startswith(("params/", "ema/")))
    for k in params:
        np.testing.assert_allclose(two[k], one[k], atol=1e-6, rtol=1e-5, err_msg=k)
    # Training moved the parameters away from the EMA (the comparison is not of a no-op).
    assert any(not np.allclose(one[f"params/{k.split('/')[1]}"], one[k])
               for k in params if k.startswith("ema/"))
