"""Loading stages from trainer checkpoints and `python -m launch.sample`.

Checkpoints are written through the trainer's own `Checkpointer` (train state with EMA
parameters + the operative gin config in the metadata), from a gin config like the trainer's,
so loading exercises the real on-disk layout without a training run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import cascade, gin_utils, partitioning
from imagen_jax.text import load_t5
from imagen_jax.text.testing import write_random_t5
from imagen_jax.train.testing import gin_model_bindings, tiny_base, tiny_sr

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_LEN = 16

MODELS = {
    "base": gin_model_bindings(tiny_base(
        channels=16, attn_resolutions=(4,), head_dim=8, num_groups=4, text_cond_dim=16,
        image_size=8,
    )) + """Stage.resolution = 8
SamplingConfig.guidance_weight = 2.0
SamplingConfig.sampler = 'ddim'
""",
    "sr": gin_model_bindings(tiny_sr(
        blocks=((8, 1), (16, 1)), stem_channels=8, text_cond_dim=16, embed_dim=32,
        sinusoid_dim=16, num_groups=4,
    )) + """Stage.resolution = {res}
Stage.lowres_resolution = {low}
SamplingConfig.guidance_weight = 1.0
SamplingConfig.sampler = 'ddpm'
SamplingConfig.aug_level = 0.1
""",
}


def _config(model: str, fingerprint: str) -> str:
    return (f"train.stage = @Stage()\n{model}Stage.text_length = {TEXT_LEN}\n"
            f"Stage.text_embed_dim = 32\nSamplingConfig.num_steps = 2\n"
            f"Stage.text_fingerprint = '{fingerprint}'\n")


def write_stage(workdir: str, config: str, seed: int) -> dict:
    """A checkpoint as the trainer writes it; returns the saved EMA params."""
    from imagen_jax.stage import Stage
    from imagen_jax.train.checkpoint import CheckpointConfig, Checkpointer
    from imagen_jax.train.state import TrainState, param_shapes

    gin_utils.register_all()
    gin.clear_config()
    gin.parse_config(config)
    stage = Stage()
    gin.clear_config()
    params = jax.tree.map(jnp.asarray, cascade.random_params(stage, seed=seed))
    ema = jax.tree.map(lambda x: x * 0.5, params)
    state = TrainState(step=jnp.asarray(3, jnp.int32), params=params, ema_params=ema,
                       opt_state={}, rng=jax.random.PRNGKey(0),
                       bad_steps=jnp.zeros((), jnp.int32), skipped_steps=jnp.zeros((), jnp.int32))
    ckpt = Checkpointer(workdir, CheckpointConfig(save_every=1, keep=1, keep_period=None,
                                                  async_save=False))
    ckpt.save(3, state, None, {"operative_config": config, "stage": stage.to_dict(),
                               "param_shapes": param_shapes(params)}, force=True)
    ckpt.close()
    return ema


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    t5_dir = write_random_t5(str(root / "t5"), texts=["a red circle", "a blue star"] * 8,
                             vocab_size=64)
    fingerprint = load_t5(t5_dir, max_length=TEXT_LEN).fingerprint
    configs = [_config(MODELS["base"], fingerprint),
               _config(MODELS["sr"].format(res=16, low=8), fingerprint),
               _config(MODELS["sr"].format(res=32, low=16), fingerprint)]
    dirs, emas = [], []
    for i, config in enumerate(configs):
        d = str(root / f"stage{i}")
        emas.append(write_stage(d, config, seed=i))
        dirs.append(d)
    other = str(root / "other_t5")
    write_stage(other, _config(MODELS["sr"].format(res=16, low=8), "t5-another"), seed=9)
    return {"dirs": dirs, "emas": emas, "t5": t5_dir, "other_t5": other, "root": root}


def test_loads_ema_params_and_settings_onto_any_mesh(checkpoints):
    mesh = partitioning.make_mesh(data=2, fsdp=4)
    c = cascade.load_cascade(checkpoints["dirs"], checkpoints["t5"], mesh=mesh,
                             rules=partitioning.FSDP_RULES,
                             overrides=[{"num_steps": 3, "aug_level": 0.2}, {},
                                        {"aug_level": 0.3}])
    for got, want in zip(c.params, checkpoints["emas"]):
        jax.tree.map(lambda g, w: np.testing.assert_array_equal(np.asarray(g), np.asarray(w)),
                     got, want)
        assert {x.sharding.mesh for x in jax.tree.leaves(got)} == {mesh}
    assert [s.resolution for s in c.stages] == [8, 16, 32]
    assert c.stages[0].sampling.sampler == "ddim" and c.stages[0].sampling.num_steps == 3
    assert c.stages[0].sampling.guidance_weight == 2.0
    # An (unscoped) aug_level reaches the SR stages only: the base stage has no low-res input.
    assert c.stages[0].sampling.aug_level == 0.0
    assert c.stages[1].sampling.aug_level == pytest.approx(0.1)
    assert c.stages[2].sampling.aug_level == pytest.approx(0.3)
    assert c.text_encoder.fingerprint == c.stages[0].text_fingerprint


def test_mismatched_stages_are_refused(checkpoints):
    d = checkpoints["dirs"]
    with pytest.raises(cascade.CascadeError, match="stage2 expects 16px inputs but stage0 makes"):
        cascade.load_cascade([d[0], d[2]], checkpoints["t5"])
    with pytest.raises(cascade.CascadeError, match="different text encoders"):
        cascade.load_cascade([d[0], checkpoints["other_t5"]], checkpoints["t5"])
    with pytest.raises(cascade.CascadeError, match="only the first stage may be a base"):
        cascade.load_cascade([d[0], d[0]], checkpoints["t5"])
    with pytest.raises(cascade.CascadeError, match="holds no complete checkpoint"):
        os.makedirs(checkpoints["root"] / "empty", exist_ok=True)
        cascade.load_cascade([str(checkpoints["root"] / "empty")], checkpoints["t5"])


def test_launcher_writes_images_grids_and_json(checkpoints, tmp_path):
    from absl import flags

    from launch import sample as launcher

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\nun cercle rouge, très petit\n", encoding="utf-8")
    out = tmp_path / "out"
    flags.FLAGS.unparse_flags()
    flags.FLAGS([
        "sample", f"--stages={','.join(checkpoints['dirs'])}", f"--t5={checkpoints['t5']}",
        f"--prompts={prompts}", f"--out={out}", "--seed=5", "--num_per_prompt=2",
        "--noprogress",
    ])
    try:
        record = launcher.run(["SamplingConfig.num_steps = 2"])
    finally:
        flags.FLAGS.unparse_flags()
    files = sorted(os.listdir(out))
    assert files.count("samples.json") == 1
    assert len([f for f in files if f.endswith("_grid.png")]) == 2
    assert len([f for f in files if "_sample" in f]) == 4
    saved = json.loads((out / "samples.json").read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(record))
    assert saved["seed"] == 5 and saved["images"][2]["prompt"] == "un cercle rouge, très petit"
    assert [s["num_steps"] for s in saved["stages"]] == [2, 2, 2]
    assert {"compile_s", "sample_s", "load_s"} <= set(saved["timings"])
    import numpy as np
    from PIL import Image

    assert Image.open(out / files[-2]).size in ((32, 32), (64, 32), (32, 64))
    # A prompt's grid holds exactly its samples' pixels (a uint8 -> float mix-up once made every
    # grid white).
    grid = np.asarray(Image.open(out / "prompt000_grid.png"))
    samples = [np.asarray(Image.open(out / f"prompt000_sample{k}.png")) for k in range(2)]
    assert grid.tobytes() in (np.concatenate(samples, 1).tobytes(),
                              np.concatenate(samples, 0).tobytes())


def test_missing_stage_dir_is_a_one_line_error(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "launch.sample", f"--stages={tmp_path}/nope", "--t5=x",
         "--prompts=a red circle", f"--out={tmp_path}/out"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "does not exist" in last and "nope" in last
    assert "Traceback" not in proc.stderr
