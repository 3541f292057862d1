"""Sharding equivalence of the train step, and the step's guards (NaN, EMA, accumulation).

The heavy part runs in one subprocess with XLA's cheap CPU compile flags (the step is compiled
once per mesh; the numbers do not depend on the LLVM optimisation level at 1e-5).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

# (data, fsdp, tensor), rule set, micro-batches.
CONFIGS = {
    "single": ((1, 1, 1), "DATA_PARALLEL_RULES", 1),
    "dp8": ((8, 1, 1), "DATA_PARALLEL_RULES", 1),
    "fsdp": ((2, 4, 1), "FSDP_RULES", 2),
    "fsdp_tp": ((2, 2, 2), "FSDP_TENSOR_RULES", 1),
}


def subprocess_env(num_devices: int = 8) -> dict:
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices} {FAST_XLA}",
        JAX_PLATFORMS="cpu", PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3",
    )
    return env


def _equivalence_worker(out_dir: str) -> None:
    """Three train steps per mesh from the same initial state; writes params and metrics."""
    import jax

    from imagen_jax import partitioning
    from imagen_jax.train import optim, state, step, testing

    stage = testing.tiny_test_stage()
    schedule = optim.learning_rate_schedule(peak_value=1e-3, kind="constant")
    tx = optim.make_optimizer(schedule, name="adam")
    data = testing.synthetic_data(batch_size=8, resolution=8, text_length=4, text_embed_dim=16)
    host_batches = [next(data) for _ in range(3)]
    host_batches[1]["image"][0, 0, 0, 0] = np.nan  # step 2 must be skipped by the guard
    single = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    init, _ = state.init_train_state(stage.model, tx, stage, 0, single, ())
    init = jax.device_get(init)
    for name, (shape, rules_name, micro) in CONFIGS.items():
        rules = getattr(partitioning, rules_name)
        devices = jax.devices()[: int(np.prod(shape))]
        mesh = partitioning.make_mesh(*shape, devices=devices)
        abstract, shardings = state.abstract_train_state(stage.model, tx, stage, mesh, rules)
        st = jax.device_put(init, shardings)
        specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in host_batches[0].items()
                 if k in ("image", "text_embeds", "text_mask")}
        bsh = step.batch_shardings(specs, mesh)
        fn = step.make_train_step(stage, tx, schedule, step.StepConfig(num_micro_batches=micro),
                                  mesh, rules)
        with partitioning.mesh_context(mesh):
            jitted = step.jit_train_step(fn, shardings, bsh, mesh)
            metrics = []
            for hb in host_batches:
                batch = {k: jax.device_put(hb[k], bsh[k]) for k in specs}
                st, m = jitted(st, batch)
                metrics.append({k: np.asarray(v).tolist() for k, v in jax.device_get(m).items()})
        kinds = sorted({str(x.sharding.spec) for x in jax.tree.leaves(st.params)})
        flat = {str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(jax.device_get(st)))}
        np.savez(os.path.join(out_dir, f"{name}.npz"), **flat)
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump({"metrics": metrics, "param_specs": kinds}, f)


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    out = tmp_path_factory.mktemp("equiv")
    code = f"from tests.test_train_sharding import _equivalence_worker as w; w({str(out)!r})"
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(8), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {}
    for name in CONFIGS:
        with np.load(out / f"{name}.npz") as z:
            leaves = [z[str(i)] for i in range(len(z.files))]
        with open(out / f"{name}.json") as f:
            results[name] = (leaves, json.load(f))
    return results


@pytest.mark.parametrize("name", ["dp8", "fsdp", "fsdp_tp"])
def test_sharded_training_matches_one_device(equivalence, name):
    ref, _ = equivalence["single"]
    got, info = equivalence[name]
    assert len(got) == len(ref)
    for a, b in zip(ref, got):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
    # The rule set really sharded the parameters (not everything replicated).
    if name != "dp8":
        assert any(s != "PartitionSpec()" for s in info["param_specs"]), info["param_specs"]
        axes = "tensor" if name == "fsdp_tp" else "fsdp"
        assert any(axes in s for s in info["param_specs"])


def test_nan_batch_is_skipped_and_counted(equivalence):
    leaves, info = equivalence["single"]
    m = info["metrics"]
    assert [x["step_ok"] for x in m] == [True, False, True]
    assert [x["bad_steps"] for x in m] == [0, 1, 0]
    assert [x["skipped_steps"] for x in m] == [0, 1, 1]
    assert all(np.isfinite(x["loss"]) for x in (m[0], m[2]))
    assert not np.isfinite(m[1]["loss"])
    assert all(np.isfinite(leaf).all() for leaf in leaves if leaf.dtype.kind == "f")
    # The EMA warm-up counts applied updates only: step 3 is update 2.
    assert m[0]["ema_decay"] == pytest.approx(1 / 10)
    assert m[2]["ema_decay"] == pytest.approx(2 / 11)
