"""Checkpoint resharding, EMA-only restore, model-mismatch refusal, config errors, metrics, optim.

All in-process and compile-free: states are built from `jax.eval_shape` + random host values.
"""

import functools
import json
import os

import gin
import jax
import numpy as np
import optax
import pytest

from imagen_jax import partitioning
from imagen_jax.train import checkpoint, metrics, optim, state, testing, trainer
from tests.support import leaves_equal


def random_state(stage, tx, mesh, rules, seed=0):
    abstract, shardings = state.abstract_train_state(stage.model, tx, stage, mesh, rules)
    rng = np.random.default_rng(seed)
    host = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype)
                        if np.issubdtype(a.dtype, np.floating) else np.zeros(a.shape, a.dtype),
                        abstract)
    return jax.device_put(host, shardings), abstract


def mesh_of(data, fsdp, tensor):
    return partitioning.make_mesh(data, fsdp, tensor,
                                  devices=jax.devices()[: data * fsdp * tensor])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint written from a (data 8) mesh."""
    stage = testing.tiny_test_stage()
    tx = optim.make_optimizer(optim.learning_rate_schedule(), name="adam")
    st, _ = random_state(stage, tx, mesh_of(8, 1, 1), partitioning.DATA_PARALLEL_RULES)
    st = st.replace(step=jax.numpy.asarray(7, jax.numpy.int32))
    workdir = str(tmp_path_factory.mktemp("ckpt"))
    ckpt = checkpoint.Checkpointer(workdir, checkpoint.CheckpointConfig(save_every=1))
    data = testing.synthetic_data(batch_size=2)
    next(data)
    next(data)
    ckpt.save(7, st, data, {"operative_config": "x = 1",
                            "param_shapes": state.param_shapes(st.params)}, force=True)
    ckpt.close()
    return workdir, stage, tx, jax.device_get(st)


@pytest.mark.parametrize("shape,rules", [((1, 4, 2), partitioning.FSDP_TENSOR_RULES),
                                         ((1, 1, 1), partitioning.DATA_PARALLEL_RULES)])
def test_restore_onto_a_different_mesh(saved, shape, rules):
    workdir, stage, tx, host = saved
    mesh = mesh_of(*shape)
    abstract, shardings = state.abstract_train_state(stage.model, tx, stage, mesh, rules)
    data = testing.synthetic_data(batch_size=2)
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    restored = ckpt.restore(abstract, data)
    ckpt.close()
    leaves_equal(restored, host)
    assert data.get_state() == {"index": 2}
    got = {x.sharding for x in jax.tree.leaves(restored.params)}
    assert got <= set(jax.tree.leaves(shardings.params))
    if shape[2] == 2:  # really resharded: some parameter split over `tensor`
        assert any("tensor" in str(s.spec) for s in got)


def test_ema_only_restore(saved):
    workdir, stage, tx, host = saved
    abstract, _ = state.abstract_train_state(stage.model, tx, stage, mesh_of(1, 1, 1), ())
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    ema = ckpt.restore_params(abstract.ema_params)
    params = ckpt.restore_params(abstract.params, which="params")
    ckpt.close()
    leaves_equal(ema, host.ema_params)
    leaves_equal(params, host.params)


def test_checkpoint_of_a_different_model_is_refused(saved):
    workdir, _, tx, _ = saved
    other = testing.tiny_test_stage(super_res=True)
    abstract, _ = state.abstract_train_state(other.model, tx, other, mesh_of(1, 1, 1), ())
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="different model"):
        ckpt.restore(abstract)
    ckpt.close()


def test_optimizer_slots_shard_like_their_params():
    """Leaf by leaf: Adam's mu and nu (and Adafactor's per-parameter v) take their parameter's
    sharding; anything of another shape (factored statistics, counters) is replicated."""
    stage = testing.tiny_test_stage()
    mesh = mesh_of(1, 4, 2)
    replicated = jax.sharding.PartitionSpec()
    for name, slots in (("adam", ("mu", "nu")), ("adafactor", ("v_row", "v_col", "v"))):
        tx = optim.make_optimizer(optim.learning_rate_schedule(), name=name)
        abstract, sh = state.abstract_train_state(stage.model, tx, stage, mesh,
                                                  partitioning.FSDP_TENSOR_RULES)
        params, param_specs = jax.tree.leaves(abstract.params), jax.tree.leaves(sh.params)
        assert any(p.spec != replicated for p in param_specs)  # the rules split something
        for slot in slots:
            specs = jax.tree.leaves(optax.tree_utils.tree_get(sh.opt_state, slot))
            shapes = jax.tree.leaves(optax.tree_utils.tree_get(abstract.opt_state, slot))
            for p, p_spec, s, s_spec in zip(params, param_specs, shapes, specs, strict=True):
                want = p_spec.spec if s.shape == p.shape else replicated
                assert s_spec.spec == want, (name, slot, p.shape, s.shape, s_spec.spec)
        counts = optax.tree_utils.tree_get_all_with_path(sh.opt_state, "count")
        assert counts and all(c.spec == replicated for _, c in counts)


def test_config_errors_stop_before_compute(tmp_path):
    stage = testing.tiny_test_stage()
    kwargs = dict(stage=stage, data_fn=testing.synthetic_data)
    with pytest.raises(trainer.ConfigError, match="does not divide"):
        trainer.train(str(tmp_path / "a"), config=trainer.TrainConfig(batch_size=12), **kwargs)
    gin.bind_parameter("make_mesh.data", 3)
    try:
        with pytest.raises(trainer.ConfigError, match="does not divide the 8"):
            trainer.train(str(tmp_path / "b"), config=trainer.TrainConfig(batch_size=8), **kwargs)
    finally:
        gin.clear_config()
    assert not os.path.exists(tmp_path / "b" / "checkpoints")


def test_batch_shape_mismatch_names_the_key():
    stage = testing.tiny_test_stage()
    batch = next(testing.synthetic_data(batch_size=4, resolution=16, text_embed_dim=16,
                                        text_length=4))
    with pytest.raises(trainer.ConfigError, match="'image' has shape"):
        trainer.check_batch(batch, stage, 4, encode=False)


def test_learning_rate_schedule_matches_paper_shape():
    lr = optim.learning_rate_schedule(peak_value=1e-4, warmup_steps=10_000, decay_steps=2_500_000)
    assert float(lr(0)) == 0.0
    assert float(lr(5_000)) == pytest.approx(5e-5)
    assert float(lr(10_000)) == pytest.approx(1e-4)
    # Cosine over the remaining steps: half-way is half the peak.
    assert float(lr(10_000 + 1_245_000)) == pytest.approx(5e-5, rel=1e-4)
    assert float(lr(2_500_000)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="adamax"):
        optim.make_optimizer(lr, name="adamax")


def test_clipping_is_by_global_norm():
    tx = optim.make_optimizer(optax.constant_schedule(1.0), name="sgd", clip_grad_norm=1.0)
    params = {"a": np.zeros(3, np.float32), "b": np.zeros(4, np.float32)}
    grads = {"a": np.full(3, 3.0, np.float32), "b": np.full(4, 4.0, np.float32)}
    updates, _ = tx.update(grads, tx.init(params), params)
    norm = np.sqrt(sum(np.sum(np.square(u)) for u in jax.tree.leaves(updates)))
    assert norm == pytest.approx(1.0, rel=1e-5)


def test_tensorboard_events_parse_with_tensorflow(tmp_path):
    import tensorflow as tf  # installed by the test extra (seqio -> tensorflow-text)

    writer = metrics.MetricWriter(str(tmp_path))
    writer.write_scalars(3, {"loss": 0.5, "grad_norm": 2.0})
    image = np.zeros((4, 6, 3), np.uint8)
    image[1, 2] = (255, 0, 0)
    writer.write_image(3, "samples", image)
    writer.close()
    (path,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    events = [tf.compat.v1.Event.FromString(r.numpy())
              for r in tf.data.TFRecordDataset(str(path))]
    assert events[0].file_version == "brain.Event:2"
    scalars = {v.tag: v.simple_value for e in events for v in e.summary.value if v.HasField(
        "simple_value")}
    assert scalars == {"loss": 0.5, "grad_norm": 2.0}
    img = [v.image for e in events for v in e.summary.value if v.HasField("image")][0]
    decoded = tf.io.decode_png(img.encoded_image_string).numpy()
    np.testing.assert_array_equal(decoded, image)
    assert (img.height, img.width) == (4, 6)
    with open(tmp_path / "metrics.jsonl") as f:
        assert json.loads(f.readline()) == {"step": 3, "loss": 0.5, "grad_norm": 2.0}


def test_mesh_gin_files_mirror_rule_sets():
    for name, rules in (("dp", partitioning.DATA_PARALLEL_RULES),
                        ("fsdp", partitioning.FSDP_RULES),
                        ("fsdp_tp", partitioning.FSDP_TENSOR_RULES)):
        gin.clear_config()
        gin.parse_config_file(os.path.join(partitioning.__file__.rsplit("/", 2)[0],
                                           "gin_configs", "mesh", f"{name}.gin"))
        assert partitioning.logical_axis_rules() == tuple(rules)
    gin.clear_config()


def test_periodic_sample_grids_from_ema_params(tmp_path):
    """TrainConfig.sample_every writes PNG grids and TensorBoard images from the EMA params."""
    import tensorflow as tf  # installed by the test extra (seqio -> tensorflow-text)
    from PIL import Image

    from imagen_jax import cascade

    stage = testing.tiny_test_stage()
    workdir = str(tmp_path / "run")
    config = trainer.TrainConfig(batch_size=8, num_steps=2, log_every=1, sample_every=2,
                                 num_samples=4, sample_steps=2, progress_bar=False)
    data_fn = functools.partial(testing.synthetic_data, resolution=stage.resolution,
                                text_length=stage.text_length, text_embed_dim=16)
    # Parameters that move in two steps and an EMA that lags them (decay 0.5, no warm-up), so
    # the online and the EMA parameters give visibly different grids.
    gin.bind_parameter("learning_rate_schedule.kind", "constant")
    gin.bind_parameter("learning_rate_schedule.peak_value", 0.05)
    seen = {}

    def keep(step, st, step_metrics):
        seen[step] = jax.device_get((st.params, st.ema_params))

    try:
        trainer.train(workdir, stage=stage, data_fn=data_fn, config=config, step_callback=keep,
                      step_config=trainer.StepConfig(ema_decay=0.5, ema_warmup=False))
    finally:
        gin.clear_config()
    grids = sorted(os.listdir(os.path.join(workdir, "samples")))
    assert grids == ["00000002.png"]
    grid = np.asarray(Image.open(os.path.join(workdir, "samples", grids[0])))
    assert grid.ndim == 3 and grid.shape[2] == 3
    assert grid.shape[0] * grid.shape[1] >= 4 * stage.resolution**2  # num_samples tiles
    # The grid, rebuilt as documented from each parameter set of step 2 (the first num_samples
    # examples of the first batch, the stage's sampler at sample_steps, PRNGKey(0)), is the EMA
    # one. The trainer samples on the 8-device mesh: allow one grey level of rounding.
    first = next(data_fn(batch_size=8))
    sampling = stage.replace(name="train").with_sampling(
        num_steps=config.sample_steps)
    sample = jax.jit(lambda p: cascade.sample_stage(
        sampling, p, first["text_embeds"][:4], first["text_mask"][:4], jax.random.PRNGKey(0)))
    online, ema = (metrics.image_grid(np.asarray(sample(p))).astype(int) for p in seen[2])
    assert np.abs(grid - ema).max() <= 1, np.abs(grid - ema).max()
    assert np.abs(grid - online).mean() > 5, np.abs(grid - online).mean()
    events = os.listdir(os.path.join(workdir, "tb"))
    images = [v.image for path in events
              for r in tf.data.TFRecordDataset(os.path.join(workdir, "tb", path))
              for v in tf.compat.v1.Event.FromString(r.numpy()).summary.value
              if v.HasField("image")]
    assert len(images) == 1
    np.testing.assert_array_equal(tf.io.decode_png(images[0].encoded_image_string).numpy(), grid)
