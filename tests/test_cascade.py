"""The compiled cascade sampler on tiny random U-Nets (8 simulated CPU devices).

What is checked: the lowered program has exactly one loop per stage and no host callbacks; its
size does not depend on the step count; bitwise reproducibility; prefix/suffix slices agree with
the full cascade; the batch and parameters are sharded over the mesh; chain validation errors.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import cascade, partitioning
from imagen_jax.errors import ConfigError
from imagen_jax.stage import Stage
from imagen_jax.train.testing import tiny_base, tiny_sr
from tests.support import check_one_program, sampling_loops

EMBED_DIM = 16
TEXT_LEN = 6
# 4x super-resolution factors like the demo (Imagen App. F: 64 -> 256 -> 1024), kept tiny.
RES = (8, 32, 64)


def _stages(num_steps=(10, 10, 10), guidance=(2.0, 1.0, 3.0)):
    base = tiny_base(channels=16, channel_mult=(1, 2), attn_resolutions=(4,), head_dim=8,
                     text_embed_dim=EMBED_DIM, text_cond_dim=16, image_size=RES[0], num_groups=4)
    sr = tiny_sr(blocks=((8, 1), (16, 1)), stem_channels=8, text_embed_dim=EMBED_DIM,
                 text_cond_dim=16, embed_dim=32, sinusoid_dim=16, num_groups=4)
    samplers = ("ddpm", "ddim", "dpmpp_2m")
    out = []
    for i, res in enumerate(RES):
        sampling = cascade.SamplingConfig(
            sampler=samplers[i], num_steps=num_steps[i], guidance_weight=guidance[i],
            aug_level=0.0 if i == 0 else 0.2,
        )
        out.append(Stage(
            model=base if i == 0 else sr, resolution=res,
            lowres_resolution=None if i == 0 else RES[i - 1], sampling=sampling,
            text_embed_dim=EMBED_DIM, text_fingerprint="fp-test", name=f"s{i}",
        ))
    return out


@pytest.fixture(scope="module")
def tiny_cascade():
    stages = _stages()
    params = [cascade.random_params(s, seed=i) for i, s in enumerate(stages)]
    return cascade.Cascade(stages, params, embed_dim=EMBED_DIM)


def _embeds(n, seed=0):
    rng = np.random.default_rng(seed)
    embeds = rng.standard_normal((n, TEXT_LEN, EMBED_DIM)).astype(np.float32)
    mask = np.arange(TEXT_LEN)[None] < rng.integers(1, TEXT_LEN + 1, (n, 1))
    return embeds, mask


def _count(pattern, text):
    return len(re.findall(pattern, text))


def _compiled(c, batch=8):
    """The program ``Cascade.sample`` uses for embeddings of TEXT_LEN tokens (shared cache)."""
    return c.compile(batch, start=0, stop=None, encode=False, progress=False,
                     text_length=TEXT_LEN)


def test_one_loop_per_stage_no_host_round_trips(tiny_cascade):
    check_one_program(tiny_cascade.lower(8).as_text(), _compiled(tiny_cascade).as_text(), 3)


def test_progress_adds_callbacks_only_when_asked(tiny_cascade):
    text = tiny_cascade.lower(8, progress=True).as_text()
    assert "callback" in text
    assert sampling_loops(text) == 3


def _op_count(text):
    """Ops of a StableHLO module; constants' values (the step count, time grids) do not count."""
    return sum(1 for line in text.splitlines() if re.search(r"=\s*\"?stablehlo\.", line))


def test_program_size_does_not_depend_on_num_steps(tiny_cascade):
    sizes = {}
    assert {s.sampling.num_steps for s in tiny_cascade.stages} == {10}
    for steps in (10, 50):
        c = tiny_cascade  # 10 steps: reuses the program the other tests compiled
        if steps != 10:
            stages = [s.with_sampling(num_steps=steps) for s in tiny_cascade.stages]
            c = cascade.Cascade(stages, tiny_cascade.params, embed_dim=EMBED_DIM,
                                mesh=tiny_cascade.mesh)
        lowered = c.lower(8)
        compiled = _compiled(c).as_text()
        sizes[steps] = (_op_count(lowered.as_text()), _count(r"\n\s+\S+ = ", compiled))
    # The StableHLO is op-for-op the same; XLA may fold a constant differently (+-1 instruction
    # seen), far from the 5x an unrolled loop would give.
    assert sizes[10][0] == sizes[50][0]
    assert abs(sizes[10][1] - sizes[50][1]) <= 0.001 * sizes[10][1]


def test_bitwise_reproducible_and_seed_dependent(tiny_cascade):
    embeds, mask = _embeds(3)
    a = tiny_cascade.sample(text_embeds=embeds, text_mask=mask, seed=7)
    b = tiny_cascade.sample(text_embeds=embeds, text_mask=mask, seed=7)
    c = tiny_cascade.sample(text_embeds=embeds, text_mask=mask, seed=8)
    assert [x.shape for x in a.images] == [(3, r, r, 3) for r in RES]
    for x, y in zip(a.images, b.images):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(a.float_images, b.float_images):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.final, c.final)


def test_prefix_and_suffix_match_the_full_cascade(tiny_cascade):
    embeds, mask = _embeds(2, seed=1)
    full = tiny_cascade.sample(text_embeds=embeds, text_mask=mask, seed=3, num_per_prompt=2)
    base_only = tiny_cascade.sample(text_embeds=embeds, text_mask=mask, seed=3, num_per_prompt=2,
                                    stop=1)
    assert len(base_only.images) == 1
    np.testing.assert_allclose(base_only.float_images[0], full.float_images[0], atol=1e-5)
    # SR only, fed the base stage's float output: the same randomness per stage (fold_in of the
    # stage index), so the same images up to compilation differences.
    lowres = full.float_images[0][::2]  # one low-res image per prompt
    sr_only = tiny_cascade.sample(text_embeds=embeds, text_mask=mask, seed=3, num_per_prompt=2,
                                  start=1, lowres=lowres)
    assert [x.shape[1] for x in sr_only.images] == list(RES[1:])
    # Prompt-major order: prompt 0's two samples share their low-res input.
    np.testing.assert_allclose(sr_only.float_images[0][::2], full.float_images[1][::2],
                               atol=1e-3)
    np.testing.assert_allclose(sr_only.float_images[-1][::2], full.float_images[-1][::2],
                               atol=1e-3)
    # The agreement above would also hold for SR stages that ignored their low-res input: the
    # same program, seed and text with another low-res image must give other images.
    other = tiny_cascade.sample(text_embeds=embeds, text_mask=mask, seed=3, num_per_prompt=2,
                                start=1, lowres=-lowres)
    for changed, same_input in zip(other.float_images, sr_only.float_images):
        delta = float(np.abs(changed - same_input).max())
        assert delta > 0.1, f"another low-res input moved the SR output by only {delta}"


def test_batch_and_params_are_sharded_over_the_mesh(tiny_cascade):
    mesh = tiny_cascade.mesh
    assert mesh.devices.size == 8
    outs = _compiled(tiny_cascade).output_shardings
    for sharding in outs:
        assert sharding.spec[0] == tuple(a for a in partitioning.BATCH_AXES
                                        if a in mesh.axis_names)
    # Trainer-style FSDP rules: large kernels are split over fsdp, not replicated.
    fsdp_mesh = partitioning.make_mesh(data=2, fsdp=4)
    c = cascade.Cascade(tiny_cascade.stages, tiny_cascade.params, embed_dim=EMBED_DIM,
                        mesh=fsdp_mesh, rules=partitioning.FSDP_RULES)
    split = [x for x in jax.tree.leaves(c.params[0])
             if any(ax is not None for ax in x.sharding.spec)]
    assert split, "FSDP rules left every base-stage parameter replicated"
    embeds, mask = _embeds(3, seed=2)
    a = c.sample(text_embeds=embeds, text_mask=mask, seed=0, stop=1)
    b = tiny_cascade.sample(text_embeds=embeds, text_mask=mask, seed=0, stop=1)
    np.testing.assert_allclose(a.float_images[0], b.float_images[0], atol=1e-4)


def test_guidance_uses_one_doubled_batch_model_call():
    """w != 1 runs cond + uncond in one call on 2B; w == 1 skips the unconditional half."""
    stages = _stages(num_steps=(2, 2, 2), guidance=(1.0, 1.0, 1.0))
    seen, uncond_masked = [], []

    class Spy:
        def apply(self, variables, x, t, embeds, mask, lowres=None, aug_level=None):
            seen.append(x.shape[0])
            second_half_null = jnp.all(~mask[x.shape[0] // 2:]) & jnp.all(
                embeds[x.shape[0] // 2:] == 0)
            jax.debug.callback(lambda v: uncond_masked.append(bool(v)), second_half_null)
            return jnp.zeros_like(x)

    for w, expect in ((1.0, 4), (3.0, 8)):
        seen.clear()
        uncond_masked.clear()
        stage = stages[0].replace(model=Spy()).with_sampling(guidance_weight=w, num_steps=1)
        embeds, mask = _embeds(4, seed=3)
        mask[:, 0] = True
        cascade.sample_stage(stage, {}, jnp.asarray(embeds), jnp.asarray(mask),
                             jax.random.PRNGKey(0))
        assert seen and all(b == expect for b in seen)
        assert uncond_masked and all(uncond_masked) == (w != 1.0)


def test_chain_errors_are_clear():
    stages = _stages()
    with pytest.raises(cascade.CascadeError, match="s1 expects 16px inputs but s0 makes 8px"):
        cascade.check_chain([stages[0], stages[1].replace(lowres_resolution=16)])
    with pytest.raises(cascade.CascadeError, match="different text encoders"):
        cascade.check_chain([stages[0], stages[1].replace(text_fingerprint="other")])
    with pytest.raises(cascade.CascadeError, match="only the first stage may be a base"):
        cascade.check_chain([stages[0], stages[0]])
    with pytest.raises(cascade.CascadeError, match="different sizes"):
        cascade.check_chain([stages[0], stages[1].replace(text_embed_dim=EMBED_DIM + 1)])
    with pytest.raises(ConfigError, match="sampler 'euler' unknown"):
        stages[0].with_sampling(sampler="euler")


def test_bad_inputs_are_clear(tiny_cascade):
    embeds, mask = _embeds(2)
    with pytest.raises(cascade.CascadeError, match="pass lowres images of 8px"):
        tiny_cascade.sample(text_embeds=embeds, text_mask=mask, start=1)
    with pytest.raises(cascade.CascadeError, match=r"expects \(2, 8, 8, 3\)"):
        tiny_cascade.sample(text_embeds=embeds, text_mask=mask, start=1,
                            lowres=np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(cascade.CascadeError, match="dimension"):
        tiny_cascade.sample(text_embeds=np.zeros((2, 3, EMBED_DIM + 1), np.float32))
    with pytest.raises(cascade.CascadeError, match="no text encoder"):
        tiny_cascade.sample(["a red circle"])
    with pytest.raises(cascade.CascadeError, match="out of range"):
        tiny_cascade.sample(text_embeds=embeds, text_mask=mask, start=2, stop=2)


def test_gin_sampling_overrides_per_stage():
    import gin

    gin.clear_config()
    try:
        gin.parse_config([
            "SamplingConfig.num_steps = 7",
            "stage1/SamplingConfig.aug_level = 0.3",
        ])
        overrides = cascade.gin_sampling_overrides(3)
    finally:
        gin.clear_config()
    assert overrides == [{"num_steps": 7}, {"num_steps": 7, "aug_level": 0.3}, {"num_steps": 7}]
