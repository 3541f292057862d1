"""``python -m launch.sample --stages=if:PATH_I,if:PATH_II --t5=PATH`` end to end (issue 18).

Tiny random DeepFloyd IF stage I (8 px) and stage II (8 -> 32 px) are saved as diffusers model
directories laid out as on the Hugging Face hub (``unet/``; stage I also ``text_encoder/`` and
``tokenizer/spiece.model``, a tiny random T5 whose width the U-Nets read). The README's command
("Sample DeepFloyd IF weights") runs as written, as a subprocess in the directory holding them
(named as the hub's), plus a step count, two samples and no progress bar: IF's sampler settings
(guided: the encoded empty prompt is the unconditional branch), bfloat16 U-Nets and T5, IF's
separate tokenizer/ vocabulary, all set through ``--gin.``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from imagen_jax import cascade
from imagen_jax.cascade.loading import IF_TEXT_LENGTH
from imagen_jax.diffusion import IF_STAGE_I_SAMPLING, IF_STAGE_II_SAMPLING
from imagen_jax.text.testing import write_random_t5
from tests.test_cascade_if import STAGE_I, STAGE_II, save_if_model
from tests.test_documented_commands import readme_commands

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T5_WIDTH = 32  # d_model of write_random_t5's "tiny" T5 (IF: 4096, T5 v1.1 XXL)
STEPS = 2
MODELS = ("IF-I-XL-v1.0", "IF-II-L-v1.0")  # the hub's names, as the README's command reads them


@pytest.fixture(scope="module")
def if_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("if_launch")
    t5 = write_random_t5(str(root / MODELS[0] / "text_encoder"),
                         texts=["a red circle", "a blue star"] * 8, vocab_size=64)
    vocab = root / MODELS[0] / "tokenizer" / "spiece.model"
    vocab.parent.mkdir()
    os.rename(os.path.join(t5, "spiece.model"), vocab)  # IF keeps it apart from the weights
    entries = [f"{cascade.IF_PREFIX}"
               f"{save_if_model(dict(config, encoder_hid_dim=T5_WIDTH), root / MODELS[i], i)}"
               for i, config in enumerate((STAGE_I, STAGE_II))]
    return {"stages": entries, "t5": t5, "vocab": str(vocab), "root": root}


def test_load_cascade_keeps_t5_padding_for_if_stages(if_dirs):
    """The cascade's T5 keeps padded positions for IF stages; the U-Nets' and T5's dtype and the
    vocabulary are gin bindings (``load_if_stage.dtype``, ``load_t5.dtype``, ``load_t5.vocab``)."""
    with gin.unlock_config():
        gin.parse_config([f"load_t5.vocab = '{if_dirs['vocab']}'",
                          "load_if_stage.dtype = 'bfloat16'", "load_t5.dtype = 'bfloat16'"])
    try:
        c = cascade.load_cascade(if_dirs["stages"], if_dirs["t5"])
    finally:
        gin.clear_config()
    assert {x.dtype for p in c.params for x in jax.tree.leaves(p)} == {jnp.dtype(jnp.bfloat16)}
    assert c.text_encoder.dtype == "bfloat16"
    encoder = c.text_encoder
    assert encoder.zero_padding is False and "padkept" in encoder.fingerprint
    assert encoder.max_length == IF_TEXT_LENGTH == c.stages[0].text_length
    assert c.null_embeds.shape == (IF_TEXT_LENGTH, T5_WIDTH)
    assert np.abs(np.asarray(c.null_embeds)[1:]).min() > 0  # "" is EOS + 76 kept pads


def test_readme_command_writes_if_images(if_dirs):
    [command] = [c for c in readme_commands() if "--stages=if:" in c]
    argv = shlex.split(command.split("#")[0])
    assert argv[:3] == ["python", "-m", "launch.sample"]
    out = if_dirs["root"] / next(a for a in argv if a.startswith("--out="))[len("--out="):]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, *argv[1:], "--num_per_prompt=2", "--noprogress",
         f"--gin.SamplingConfig.num_steps={STEPS}"],
        cwd=if_dirs["root"], env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "samples.json").read_text(encoding="utf-8"))
    stages = record["stages"]
    assert [s["name"] for s in stages] == list(MODELS)
    assert [s["resolution"] for s in stages] == [8, 32] and stages[1]["lowres_resolution"] == 8
    for stage, want in zip(stages, (IF_STAGE_I_SAMPLING, IF_STAGE_II_SAMPLING)):
        assert stage["num_steps"] == STEPS
        assert stage["guidance_weight"] == want["guidance_weight"] != 1.0
        assert stage["sampler"] == want["sampler"]
    files = [im["file"] for im in record["images"]] + [g["file"] for g in record["grids"]]
    assert len(files) == 3 and all((out / f).exists() for f in files)
    for f in files[:2]:
        pixels = np.asarray(Image.open(out / f), np.float32)
        assert pixels.shape == (32, 32, 3) and pixels.std() > 1.0, f
    first, second = (np.asarray(Image.open(out / f)) for f in files[:2])
    assert not np.array_equal(first, second)  # two samples of one prompt differ
