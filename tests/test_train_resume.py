"""End-to-end runs of `launch.train` on the tiny base stage: kill -9 resume, SIGTERM, multi-host.

Every run is a separate process (as in production); they share a persistent XLA compilation
cache so only the first one compiles.
"""

import os
import signal
import socket
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.support import REPO, leaves_equal, subprocess_env

# The tiny base stage with synthetic in-memory data (no tfds / T5 preparation in tests).
TINY_BASE = [
    "--gin_file=gin_configs/tiny/base.gin",
    "--gin.train.data_fn=@synthetic_data",
    "--gin.train.text_encoder=None",
    "--gin.synthetic_data.resolution=16",
    "--gin.TEXT_LENGTH=16",
    "--gin.synthetic_data.text_length=16",
    "--gin.synthetic_data.text_embed_dim=32",
    "--gin.TrainConfig.progress_bar=False",
    "--gin.TrainConfig.log_every=5",
]


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("xla_cache")

    def env(num_devices=1):
        e = subprocess_env(num_devices)
        e.update(JAX_COMPILATION_CACHE_DIR=str(cache),
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        return e

    return env


def run_train(env, workdir, *extra, timeout=400, wait=True):
    cmd = [sys.executable, "-m", "launch.train", f"--workdir={workdir}", *TINY_BASE, *extra]
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def saved_state(workdir, step):
    """The raw arrays of a checkpoint (numpy, no target tree: independent of any mesh)."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    import jax

    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(path)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def steps_of(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(s) for s in os.listdir(d) if s.isdigit())


STEPS = ["--gin.TrainConfig.num_steps=20", "--gin.CheckpointConfig.save_every=5",
         "--gin.CheckpointConfig.keep=10"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_env):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    proc = run_train(cache_env(), workdir, *STEPS)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir


def test_kill9_then_restart_matches_uninterrupted_run(uninterrupted, tmp_path, cache_env):
    workdir = str(tmp_path)
    killed = run_train(cache_env(), workdir, *STEPS, "--gin.train.step_callback=@signal_at_step()",
                       "--gin.signal_at_step.step=12", "--gin.signal_at_step.signum=9")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert max(steps_of(workdir)) <= 12
    resumed = run_train(cache_env(), workdir, *STEPS)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming from" in resumed.stderr
    assert max(steps_of(workdir)) == 20
    a, b = saved_state(uninterrupted, 20), saved_state(workdir, 20)
    assert int(np.asarray(b["step"])) == 20
    leaves_equal(a["params"], b["params"])
    leaves_equal(a["ema_params"], b["ema_params"])
    leaves_equal(a["opt_state"], b["opt_state"])
    # The metrics log shows both runs, and the run's config is saved with the checkpoint.
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert len(f.readlines()) >= 4
    assert "Stage.model" in open(os.path.join(workdir, "config.gin")).read()


def test_sigterm_saves_a_checkpoint_at_that_step(tmp_path, cache_env):
    workdir = str(tmp_path)
    proc = run_train(cache_env(), workdir, *STEPS, "--gin.train.step_callback=@signal_at_step()",
                     "--gin.signal_at_step.step=12", "--gin.signal_at_step.signum=15")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert steps_of(workdir)[-1] == 12
    assert int(np.asarray(saved_state(workdir, 12)["step"])) == 12


def test_max_seconds_stops_with_a_checkpoint_and_a_rerun_resumes(tmp_path, cache_env):
    # A spent budget still trains one step, saves it, and the next call carries on.
    workdir = str(tmp_path)
    proc = run_train(cache_env(), workdir, *STEPS, "--gin.TrainConfig.max_seconds=0")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "max_seconds=0 spent: stopping at step 1 of 20" in proc.stderr
    assert steps_of(workdir) == [1]
    proc = run_train(cache_env(), workdir, *STEPS, "--gin.TrainConfig.max_seconds=1e6")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert max(steps_of(workdir)) == 20
    assert int(np.asarray(saved_state(workdir, 20)["step"])) == 20


def test_two_process_training_restores_in_one_process(tmp_path, cache_env):
    workdir = str(tmp_path / "mh")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [
        # max_seconds=0: process 0's clock stops both at the first step they both check
        # (log_every=5), else they would deadlock in the save.
        run_train(cache_env(2), workdir, "--gin.TrainConfig.num_steps=20",
                  "--gin.TrainConfig.max_seconds=0",
                  "--gin.CheckpointConfig.save_every=5", f"--coordinator_address=localhost:{port}",
                  "--num_processes=2", f"--process_id={i}", wait=False)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    assert steps_of(workdir)[-1] == 5
    data_files = sorted(f for f in os.listdir(os.path.join(workdir, "checkpoints", "5", "data"))
                        if f.startswith("process_"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
    raw = saved_state(workdir, 5)
    # Restore through the trainer's path onto a 1-device mesh in this (single) process.
    import gin
    import jax

    from imagen_jax import gin_utils, partitioning
    from imagen_jax.train import checkpoint, optim, state

    gin.clear_config()
    gin_utils.parse(bindings=[checkpoint.read_operative_config(workdir)], finalize=False)
    stage = gin.get_configurable("Stage")()
    tx = optim.make_optimizer(optim.learning_rate_schedule())
    mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    abstract, _ = state.abstract_train_state(stage.model, tx, stage, mesh, ())
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    restored = ckpt.restore(abstract)
    ema = ckpt.restore_params(abstract.ema_params)
    ckpt.close()
    gin.clear_config()
    assert int(restored.step) == 5
    leaves_equal(restored.params, raw["params"])
    leaves_equal(ema, raw["ema_params"])
    assert not all(np.array_equal(a, b) for a, b in
                   zip(jax.tree.leaves(raw["params"]), jax.tree.leaves(raw["ema_params"])))
