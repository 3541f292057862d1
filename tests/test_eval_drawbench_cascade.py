"""DrawBench end to end with the real compiled cascade: 200 prompts -> T5 -> base -> SR -> report.

The tiny cascade has random weights (nothing can be downloaded; what is checked is the plumbing):
a random T5 whose vocabulary is trained on the DrawBench prompts, an 8 px base stage and an
8 -> 32 px SR stage, 2 steps each, 1 sample per prompt; the HTML report must open in headless
Chromium with all 200 images loaded.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from imagen_jax import cascade
from imagen_jax.eval import drawbench, report
from imagen_jax.stage import Stage
from imagen_jax.text import load_t5
from imagen_jax.text.testing import drawbench_prompts, write_random_t5
from imagen_jax.train.testing import tiny_base, tiny_sr
from tests.support_eval import chromium_probe

TEXT_LEN = 32
RES = (8, 32)


def _tiny_cascade(tmp_path) -> cascade.Cascade:
    t5_dir = write_random_t5(str(tmp_path / "t5"), texts=drawbench_prompts(), vocab_size=256)
    t5 = load_t5(t5_dir, max_length=TEXT_LEN)
    base = tiny_base(channels=16, channel_mult=(1, 2), attn_resolutions=(4,), head_dim=8,
                     text_embed_dim=t5.embed_dim, text_cond_dim=16, image_size=RES[0],
                     num_groups=4)
    sr = tiny_sr(blocks=((8, 1), (16, 1)), stem_channels=8, text_embed_dim=t5.embed_dim,
                 text_cond_dim=16, embed_dim=32, sinusoid_dim=16, num_groups=4)
    stages = [
        Stage(
            model=base if i == 0 else sr, resolution=res,
            lowres_resolution=None if i == 0 else RES[i - 1],
            sampling=cascade.SamplingConfig(sampler="ddim", num_steps=2, guidance_weight=3.0,
                                            aug_level=0.0 if i == 0 else 0.2),
            text_embed_dim=t5.embed_dim, text_fingerprint=t5.fingerprint, name=f"stage{i}",
        )
        for i, res in enumerate(RES)
    ]
    params = [cascade.random_params(s, seed=i) for i, s in enumerate(stages)]
    # max_batch >= prompts_per_batch below (a multiple of the 8 devices): one compiled program
    # serves all 200 prompts.
    return cascade.Cascade(stages, params, text_encoder=t5, max_batch=56)


def test_drawbench_200_prompts_with_the_tiny_cascade(tmp_path):
    imagen = _tiny_cascade(tmp_path)
    out = str(tmp_path / "run")
    run = drawbench.run_drawbench(imagen.sample_fn(), out, num_per_prompt=1,
                                  prompts_per_batch=50, label="tiny cascade")
    assert len(run["prompts"]) == 200
    assert len(run["grids"]) == 11
    assert len(imagen._compiled) == 1, "all 200 prompts should run through one program"
    images = [np.asarray(Image.open(os.path.join(out, e["images"][0]))) for e in run["prompts"]]
    assert all(im.shape == (RES[-1], RES[-1], 3) for im in images)
    # Different prompts and seeds give different images (the text reaches the program).
    assert len({im.tobytes() for im in images}) == 200

    page = report.write_report(out)
    result = chromium_probe(page, tmp_path)
    assert result["total"] == 200 and result["loaded"] == 200
