"""Half-written checkpoint steps (issue 15.3): the trainer, `load_stage` and the evaluate launcher
use the newest COMPLETE step, with a warning naming each incomplete one, and delete nothing but
orbax's own temporary directories.

The incomplete steps are made the ways preemption, a full disk or an interrupted copy leave them:
an empty directory, a missing item (state, data iterator), missing or garbled metadata files,
a save never finalised, orbax's temporary directory, and truncated array files.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import cascade, gin_utils, partitioning
from imagen_jax.train import checkpoint, optim, state, testing, trainer
from tests.support import leaves_equal

LOGGER = "imagen_jax.train.checkpoint"
# When one array read fails, orbax closes its event loop while tensorstore still completes the
# other reads; their callbacks then raise "Event loop is closed" in a background thread (orbax's
# internals, harmless: the restore already failed and the fallback runs on a new loop).
ORBAX_LATE_CALLBACKS = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")


# --------------------------------------------------------------------------- ways to break a step


def _truncate_arrays(step_dir: str) -> None:
    """Every array data file cut to half its length (a copy interrupted mid-file)."""
    cut = 0
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        if os.path.basename(root) == "d":
            for name in files:
                path = os.path.join(root, name)
                os.truncate(path, os.path.getsize(path) // 2)
                cut += 1
    assert cut, f"no array files under {step_dir}"


def _unfinalised(step_dir: str) -> None:
    """A save preempted before orbax wrote its commit timestamp (in-place object-store save)."""
    path = os.path.join(step_dir, "_CHECKPOINT_METADATA")
    meta = json.load(open(path))
    meta["commit_timestamp_nsecs"] = None
    with open(path, "w") as f:
        json.dump(meta, f)


def _garble(relative: str):
    def damage(step_dir: str) -> None:
        path = os.path.join(step_dir, relative)
        text = open(path).read()
        with open(path, "w") as f:
            f.write(text[: len(text) // 2])  # JSON cut mid-way
    return damage


def _remove(relative: str):
    def damage(step_dir: str) -> None:
        path = os.path.join(step_dir, relative)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return damage


def _empty(step_dir: str) -> None:
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)


# (damage, the reason the warning must give). All are detected from the files alone.
STRUCTURAL = {
    "empty directory": (_empty, "directory is empty"),
    "state item missing": (_remove("state"), "item 'state' is missing"),
    "data-iterator item missing": (_remove("data"), "item 'data' is missing"),
    "meta item missing": (_remove("meta"), "item 'meta' is missing"),
    "step metadata missing": (_remove("_CHECKPOINT_METADATA"), "_CHECKPOINT_METADATA is missing"),
    "step metadata garbled": (_garble("_CHECKPOINT_METADATA"), "unreadable"),
    "save never finalised": (_unfinalised, "no commit timestamp"),
    "meta JSON garbled": (_garble("meta/metadata"), "meta/metadata is unreadable"),
    "array metadata garbled": (_garble("state/_METADATA"), "state/_METADATA is unreadable"),
    "data-iterator file missing": (_remove("data/process_0-of-1.json"), "data/ holds no"),
    "OCDBT manifest missing": (_remove("state/manifest.ocdbt"), "manifest.ocdbt is missing"),
}


def _break(checkpoints: str, source_step: int, step: int, damage,
           source: str | None = None) -> None:
    """Copies step `source_step` (of `source`, default `checkpoints`) to `step`, then damages
    the copy."""
    target = os.path.join(checkpoints, str(step))
    shutil.copytree(os.path.join(source or checkpoints, str(source_step)), target,
                    dirs_exist_ok=True)
    damage(target)


# --------------------------------------------------------------------------- read-only loading


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Steps 1, 5, 10 of random states (different values per step), written by the Checkpointer."""
    stage = testing.tiny_test_stage()
    tx = optim.make_optimizer(optim.learning_rate_schedule(), name="adam")
    mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    abstract, shardings = state.abstract_train_state(stage.model, tx, stage, mesh, ())
    workdir = str(tmp_path_factory.mktemp("saved"))
    ckpt = checkpoint.Checkpointer(workdir, checkpoint.CheckpointConfig(save_every=1, keep=10,
                                                                        async_save=False))
    data = testing.synthetic_data(batch_size=2)
    hosts = {}
    for i, step in enumerate((1, 5, 10)):
        rng = np.random.default_rng(i)
        host = jax.tree.map(
            lambda a, rng=rng: rng.standard_normal(a.shape).astype(a.dtype)
            if np.issubdtype(a.dtype, np.floating) else np.zeros(a.shape, a.dtype), abstract)
        host = host.replace(step=np.asarray(step, np.int32))
        next(data)
        ckpt.save(step, jax.device_put(host, shardings), data,
                  {"operative_config": "x = 1", "param_shapes": state.param_shapes(host.params)},
                  force=True)
        hosts[step] = host
    ckpt.close()
    return workdir, abstract, hosts


@pytest.fixture
def run(saved, tmp_path):
    """A fresh copy of the saved run (tests damage it)."""
    workdir, abstract, hosts = saved
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    return copy, abstract, hosts


def _listing(workdir: str) -> list[str]:
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


@pytest.mark.parametrize("way", sorted(STRUCTURAL))
def test_incomplete_newest_step_is_skipped_when_loading(run, way, caplog):
    """Issue case (empty `checkpoints/15`) and every other structural way: step 10 is used."""
    workdir, abstract, hosts = run
    damage, reason = STRUCTURAL[way]
    _break(os.path.join(workdir, "checkpoints"), 10, 15, damage)
    before = _listing(workdir)
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert ckpt.latest_step() == 10
        assert ckpt.all_steps() == [1, 5, 10]
        ema = ckpt.restore_params(abstract.ema_params)
        meta = ckpt.read_meta()
    ckpt.close()
    assert ckpt.restored_step == 10
    leaves_equal(ema, hosts[10].ema_params)
    assert meta["operative_config"] == "x = 1"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and r.name == LOGGER]
    assert any("step 15" in w and reason in w for w in warnings), warnings
    assert _listing(workdir) == before  # reading never moves or deletes anything


@ORBAX_LATE_CALLBACKS
def test_unreadable_arrays_fall_back_to_the_previous_complete_step(run, caplog):
    """A complete-looking step with truncated array files: restore uses step 10 with a warning;
    asked for explicitly it fails with one line naming the step."""
    workdir, abstract, hosts = run
    _break(os.path.join(workdir, "checkpoints"), 10, 15, _truncate_arrays)
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    assert ckpt.latest_step() == 15  # not visible from the files alone
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        restored = ckpt.restore(abstract, testing.synthetic_data(batch_size=2))
    assert ckpt.restored_step == 10
    leaves_equal(restored, hosts[10])
    assert any("step 15" in r.getMessage() and "cannot be restored" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(checkpoint.IncompleteCheckpointError,
                       match=r"step 15 .* cannot be restored .*complete steps: \[1, 5, 10, 15\]"):
        ckpt.restore_params(abstract.ema_params, step=15)
    ckpt.close()


def test_explicit_incomplete_step_and_no_complete_step_are_one_line_errors(run):
    workdir, abstract, _ = run
    os.makedirs(os.path.join(workdir, "checkpoints", "15"))
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    with pytest.raises(checkpoint.IncompleteCheckpointError,
                       match=r"step 15 .* is incomplete \(the directory is empty\)"):
        ckpt.restore_params(abstract.ema_params, step=15)
    ckpt.close()
    for step in (1, 5, 10):
        _remove("state")(os.path.join(workdir, "checkpoints", str(step)))
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.restore_params(abstract.ema_params)
    ckpt.close()


def test_opening_for_writing_sets_incomplete_steps_aside_and_deletes_only_orbax_tmp(run, caplog):
    workdir, _, _ = run
    root = os.path.join(workdir, "checkpoints")
    _break(root, 10, 15, _remove("state"))
    os.makedirs(os.path.join(root, "15.incomplete"))  # set aside by an earlier run
    _break(root, 10, 20, _empty)
    shutil.copytree(os.path.join(root, "10"), os.path.join(root, "25.orbax-checkpoint-tmp"))
    os.makedirs(os.path.join(root, "notes"))  # not a step: left alone
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ckpt = checkpoint.Checkpointer(workdir, checkpoint.CheckpointConfig(save_every=1))
    assert ckpt.latest_step() == 10 and ckpt.all_steps() == [1, 5, 10]
    ckpt.close()
    assert _listing(workdir) == ["1", "10", "15.incomplete", "15.incomplete-2", "20.incomplete",
                                 "5", "notes"]
    assert not os.path.exists(os.path.join(root, "15.incomplete-2", "state"))  # moved, not made
    assert os.path.exists(os.path.join(root, "15.incomplete-2", "meta"))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "step 15" in text and "moved it to 15.incomplete-2" in text
    assert "resuming from step 10" in text
    assert "step 20" in text and "25.orbax-checkpoint-tmp" in text


# --------------------------------------------------------------------------- sampling, evaluation

STAGE_CONFIG = "train.stage = @Stage()\n" + testing.gin_model_bindings(testing.tiny_base(
    channels=16, channel_mult=(1,), head_dim=8, num_groups=4, text_embed_dim=16, text_cond_dim=16,
    image_size=8,
)) + """Stage.resolution = 8
Stage.text_length = 4
Stage.text_embed_dim = 16
SamplingConfig.num_steps = 2
"""


@pytest.fixture
def stage_dir(tmp_path):
    """A stage workdir as the trainer leaves it: steps 3 and 6 with different EMA parameters."""
    from imagen_jax.stage import Stage
    from imagen_jax.train.state import TrainState, param_shapes

    gin_utils.register_all()
    gin.clear_config()
    gin.parse_config(STAGE_CONFIG)
    train_stage = Stage()
    gin.clear_config()
    cstage = train_stage
    workdir = str(tmp_path / "stage")
    ckpt = checkpoint.Checkpointer(workdir, checkpoint.CheckpointConfig(save_every=1,
                                                                        async_save=False))
    emas = {}
    for seed, step in enumerate((3, 6)):
        params = jax.tree.map(jnp.asarray, cascade.random_params(cstage, seed=seed))
        emas[step] = jax.tree.map(lambda x: x * 0.5, params)
        st = TrainState(step=jnp.asarray(step, jnp.int32), params=params, ema_params=emas[step],
                        opt_state={}, rng=jax.random.PRNGKey(0),
                        bad_steps=jnp.zeros((), jnp.int32),
                        skipped_steps=jnp.zeros((), jnp.int32))
        ckpt.save(step, st, None, {"operative_config": STAGE_CONFIG,
                                   "stage": train_stage.to_dict(),
                                   "param_shapes": param_shapes(params)}, force=True)
    ckpt.close()
    return workdir, emas


@ORBAX_LATE_CALLBACKS
def test_load_stage_uses_the_newest_complete_step(stage_dir, caplog):
    workdir, emas = stage_dir
    root = os.path.join(workdir, "checkpoints")
    os.makedirs(os.path.join(root, "9"))  # the case
    _break(root, 6, 12, _truncate_arrays)  # and a truncated copy above it
    mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _, params = cascade.load_stage(workdir, mesh=mesh, rules=())
    leaves_equal(params, emas[6])
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "step 9" in text and "step 12" in text and "cannot be restored" in text


def test_evaluate_launcher_builds_the_cascade_from_the_newest_complete_step(stage_dir):
    from launch import evaluate

    workdir, emas = stage_dir
    _remove("state")(os.path.join(workdir, "checkpoints", "6"))
    os.makedirs(os.path.join(workdir, "checkpoints", "9"))
    built = evaluate.build_cascade([workdir], None)
    leaves_equal(built.params[0], emas[3])


# --------------------------------------------------------------------------- training resumes


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent XLA cache for this module, so the resumed run does not compile again."""
    from jax.experimental.compilation_cache import compilation_cache  # reset: use the new dir

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    values = (str(tmp_path_factory.mktemp("xla_cache")), 0.0, 0)
    for n, v in zip(names, values):
        jax.config.update(n, v)
    compilation_cache.reset_cache()
    yield
    for n, v in old.items():
        jax.config.update(n, v)
    compilation_cache.reset_cache()


STAGE = testing.tiny_test_stage()
DATA_FN = functools.partial(testing.synthetic_data, resolution=STAGE.resolution,
                            text_length=STAGE.text_length, text_embed_dim=16)
CONFIG = trainer.TrainConfig(batch_size=8, num_steps=4, log_every=2, progress_bar=False)
CHECKPOINTS = checkpoint.CheckpointConfig(save_every=2, keep=20, keep_period=None)


def _train(workdir: str) -> state.TrainState:
    # One device: the subject is the step choice, and one device compiles in half the time.
    mesh = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    return trainer.train(workdir, stage=STAGE, data_fn=DATA_FN, config=CONFIG, mesh=mesh,
                         checkpoint_config=CHECKPOINTS)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, compile_cache):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    return workdir, jax.device_get(_train(workdir))


# Ways to leave the newest steps incomplete, fabricated from the finished run's step 4 (a copy
# of its files, then damaged): step -> (way). Step 4 itself loses its state item (preempted
# mid-save in an object store), so the run must go back to step 2.
RESUME_WAYS = {
    4: "state item missing",
    5: "empty directory",
    6: "data-iterator item missing",
    7: "step metadata missing",
    8: "save never finalised",
    9: "meta JSON garbled",
    10: "array metadata garbled",
}
TRUNCATED = 11  # structurally complete, array files truncated: found at restore


@ORBAX_LATE_CALLBACKS
def test_trainer_resumes_from_last_complete_step_bit_identical(uninterrupted, tmp_path, caplog):
    reference_dir, reference = uninterrupted
    workdir = str(tmp_path / "resumed")
    shutil.copytree(reference_dir, workdir)
    root = os.path.join(workdir, "checkpoints")
    assert sorted(int(s) for s in os.listdir(root)) == [1, 2, 4]
    source = os.path.join(reference_dir, "checkpoints")
    for step, way in RESUME_WAYS.items():
        _break(root, 4, step, STRUCTURAL[way][0], source=source)
    _break(root, 4, TRUNCATED, _truncate_arrays, source=source)
    shutil.copytree(os.path.join(source, "4"), os.path.join(root, "12.orbax-checkpoint-tmp"))

    with caplog.at_level(logging.INFO, logger="imagen_jax"):
        final = _train(workdir)

    # Continued from step 2 and ended bit-identical to the run that was never interrupted.
    assert int(final.step) == 4
    leaves_equal(jax.device_get(final), reference)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("resuming from") and m.endswith("step 2") for m in messages), messages
    warnings = [m for m, r in zip(messages, caplog.records) if r.levelno >= logging.WARNING]
    for step, way in RESUME_WAYS.items():  # each found from its files, with its own reason
        assert any(f"step {step} in {root} is incomplete (" in w and STRUCTURAL[way][1] in w
                   and f"moved it to {step}.incomplete" in w for w in warnings), (step, warnings)
    assert any(f"step {TRUNCATED} in {root} cannot be restored" in w for w in warnings), warnings
    # Nothing deleted but orbax's temporary directory; the new step 4 is the finished one.
    names = set(os.listdir(root))
    assert {f"{s}.incomplete" for s in [*RESUME_WAYS, TRUNCATED]} <= names
    assert "12.orbax-checkpoint-tmp" not in names
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    assert ckpt.all_steps() == [1, 2, 4]
    ckpt.close()
    with open(os.path.join(root, "4", "data", "process_0-of-1.json")) as f:
        assert json.load(f) == {"json": {"index": 4}}
