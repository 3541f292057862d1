"""Prompts through the compiled cascade with a real (tiny, random) T5 inside the program.

Edge cases from the issue: empty prompt, 1,000-character prompt (truncated with a warning),
non-ASCII prompt, 1 prompt and 64 prompts all produce images; T5 runs inside the jitted program
and matches the standalone encoder; a cascade refuses a T5 other than the one its stages used.
"""

from __future__ import annotations

import numpy as np
import pytest

from imagen_jax import cascade
from imagen_jax.stage import Stage
from imagen_jax.text import load_t5
from imagen_jax.text.testing import write_random_t5
from imagen_jax.train.testing import tiny_base

TEXT_LEN = 16


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    texts = ["a red circle on the left", "a small blue star above a green square",
             "un cercle rouge", "ein grünes Quadrat"] * 8
    path = write_random_t5(str(tmp_path_factory.mktemp("t5")), texts=texts, vocab_size=64)
    return load_t5(path, max_length=TEXT_LEN)


@pytest.fixture(scope="module")
def base_cascade(t5):
    model = tiny_base(channels=16, channel_mult=(1, 2), attn_resolutions=(4,), head_dim=8,
                      text_embed_dim=t5.embed_dim, text_cond_dim=16, image_size=8,
                      num_groups=4)
    stage = Stage(
        model=model, resolution=8,
        sampling=cascade.SamplingConfig(num_steps=2, guidance_weight=2.0),
        text_embed_dim=t5.embed_dim, text_fingerprint=t5.fingerprint, name="base",
    )
    # max_batch: 1 and 64 prompts run through the same compiled program, in chunks.
    return cascade.Cascade([stage], [cascade.random_params(stage)], text_encoder=t5,
                           max_batch=16)


def test_prompt_edge_cases_all_produce_images(base_cascade):
    prompts = ["", "a red circle " * 77, "ein grünes Quadrat, 緑の四角 🟩", "a blue star"]
    assert len(prompts[1]) >= 1000
    with pytest.warns(UserWarning, match="truncated"):
        out = base_cascade.sample(prompts, seed=0)
    assert out.final.shape == (4, 8, 8, 3) and out.final.dtype == np.uint8
    assert np.isfinite(out.float_images[0]).all()
    one = base_cascade.sample("a blue star", seed=0)
    assert one.final.shape == (1, 8, 8, 3)
    many = base_cascade.sample([f"a red circle {i}" for i in range(64)], seed=0)
    assert many.final.shape == (64, 8, 8, 3)
    assert len(base_cascade._compiled) == 1, "1 and 64 prompts should share one program"
    # Chunks draw different noise: not all 64 images are the same.
    assert len({im.tobytes() for im in many.final}) > 1


def test_t5_inside_the_program_matches_given_embeddings(base_cascade, t5):
    prompts = ["a red circle on the left", "a small blue star"]
    from_text = base_cascade.sample(prompts, seed=3)
    embeds, mask = t5(prompts)
    from_embeds = base_cascade.sample(text_embeds=np.asarray(embeds), text_mask=mask, seed=3)
    np.testing.assert_allclose(from_text.float_images[0], from_embeds.float_images[0],
                               atol=1e-4)


def test_other_text_encoder_is_refused(base_cascade, t5):
    stage = base_cascade.stages[0].replace(text_fingerprint="t5-some-other-encoder")
    with pytest.raises(cascade.CascadeError, match="different text encoders"):
        cascade.Cascade([stage], base_cascade.params, text_encoder=t5)
