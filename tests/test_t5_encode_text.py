"""`python -m launch.encode_text`: prompt files in, embeddings .npz out."""

import os
import subprocess
import sys

import numpy as np
import pytest

from imagen_jax.text import load_t5
from imagen_jax.text.testing import drawbench_prompts, write_random_t5
from launch.encode_text import encode_prompts, read_prompts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_random_t5(str(tmp_path_factory.mktemp("t5")), texts=drawbench_prompts(),
                           seed=5)


def test_read_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\nÜber 猫\n\n", encoding="utf-8")
    assert read_prompts(str(tmp_path / "p.txt")) == ["a cat", "", "Über 猫"]
    (tmp_path / "p.tsv").write_text("id\tPrompt\n1\ta dog\n2\ta, b\n")
    assert read_prompts(str(tmp_path / "p.tsv")) == ["a dog", "a, b"]
    assert read_prompts(os.path.join(REPO, "imagen_jax/assets/drawbench.csv")) == \
        drawbench_prompts()
    (tmp_path / "bad.csv").write_text("text,label\nx,y\n")
    with pytest.raises(ValueError, match="no Prompt/Prompts column"):
        read_prompts(str(tmp_path / "bad.csv"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(str(tmp_path / "missing.txt"))


def test_encode_prompts_pads_last_batch(ckpt):
    enc = load_t5(ckpt, max_length=32)
    prompts = drawbench_prompts()[:5]
    embeds, mask = encode_prompts(enc, prompts, batch_size=4, progress=False)
    ref, ref_mask = enc(prompts)
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_allclose(embeds, np.asarray(ref), atol=1e-6)


def test_cli_writes_npz(ckpt, tmp_path):
    out = tmp_path / "emb.npz"
    env = dict(os.environ, PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "launch.encode_text", f"--t5={ckpt}",
           f"--prompts={os.path.join(REPO, 'imagen_jax/assets/drawbench.csv')}",
           f"--out={out}", "--max_length=48", "--batch_size=64"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "encoding" in proc.stderr  # the progress bar
    data = np.load(out)
    prompts = drawbench_prompts()
    assert data["embeddings"].shape == (200, 48, 32) and data["mask"].shape == (200, 48)
    assert list(data["prompts"]) == prompts
    enc = load_t5(ckpt, max_length=48)
    assert str(data["fingerprint"]) == enc.fingerprint
    ref, ref_mask = enc(prompts[-3:])
    np.testing.assert_array_equal(data["mask"][-3:], ref_mask)
    np.testing.assert_allclose(data["embeddings"][-3:], np.asarray(ref), atol=1e-5)
