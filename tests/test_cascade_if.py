"""A DeepFloyd IF cascade (stage I -> stage II) in the compiled cascade (issue 18, must-show 4).

Tiny random IF-shaped U-Nets (`IFUNet` from diffusers-style configs; random weights) as discrete
`Stage`s: the record round-trips the nested `IFUNetConfig`; the cascade is ONE compiled program
with one sampling loop per stage and no host round-trip (the checks of tests/test_cascade.py);
its images equal the two stages sampled one after the other with the same random keys; guidance
reads the encoded empty prompt; ``load_cascade`` reads diffusers ``unet/`` directories given as
``if:PATH`` (torch and diffusers build them). 8 simulated CPU devices.
"""

from __future__ import annotations

import json

import diffusers  # test-extra reference: plainly imported, a broken install fails, not skips
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from imagen_jax import cascade
from imagen_jax.diffusion import IF_STAGE_I_SAMPLING, IF_STAGE_II_SAMPLING, DiscreteSchedule
from imagen_jax.errors import ConfigError
from imagen_jax.nn import IFUNet, IFUNetConfig, load_if_unet
from imagen_jax.stage import Stage, abstract_params
from tests.support import check_one_program, leaves_equal

EMBED_DIM = 16  # T5 width (IF: 4096), projected to CROSS_DIM inside the U-Nets
CROSS_DIM = 32  # a multiple of the 32 groups of attention's text GroupNorm
TEXT_LEN = 6
RES = (8, 32)  # IF's x4 upscale (64 -> 256), kept tiny
BATCH = 8  # one image per simulated device

# diffusers UNet2DConditionModel configs with IF-I-XL's and IF-II-L's options at toy widths.
STAGE_I = dict(
    sample_size=RES[0], in_channels=3, out_channels=6, block_out_channels=(16, 32),
    layers_per_block=1, down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", attention_head_dim=8,
    cross_attention_dim=CROSS_DIM, encoder_hid_dim=EMBED_DIM, addition_embed_type="text",
    addition_embed_type_num_heads=4, act_fn="gelu", norm_num_groups=8, norm_eps=1e-5,
    resnet_time_scale_shift="scale_shift", cross_attention_norm="group_norm",
)
STAGE_II = dict(
    STAGE_I, sample_size=RES[1], in_channels=6, block_out_channels=(8, 16),
    layers_per_block=(1, 2), only_cross_attention=(False, True),
    mid_block_only_cross_attention=False, class_embed_type="timestep",
    time_embedding_act_fn="gelu", resnet_skip_time_act=True, resnet_out_scale_factor=1 / 0.7071,
    mid_block_scale_factor=1 / 0.7071,
)


def save_if_model(config: dict, model_dir, seed: int) -> str:
    """A seeded random diffusers U-Net of ``config`` saved as IF's model directories hold it
    (``model_dir/unet``: config.json + safetensors); returns ``model_dir``."""
    torch.manual_seed(seed)
    diffusers.UNet2DConditionModel(**config).save_pretrained(str(model_dir / "unet"),
                                                             safe_serialization=True)
    return str(model_dir)


def if_stages(num_steps: tuple[int, int] = (4, 3)) -> list[Stage]:
    """IF stage I (8 px) and stage II (8 -> 32 px) with IF's sampler settings, few steps."""
    settings = (IF_STAGE_I_SAMPLING, IF_STAGE_II_SAMPLING)
    out = []
    for i, config in enumerate((STAGE_I, STAGE_II)):
        out.append(Stage(
            model=IFUNet(IFUNetConfig.from_diffusers(config)), resolution=RES[i],
            lowres_resolution=RES[i - 1] if i else None, text_length=TEXT_LEN,
            text_embed_dim=EMBED_DIM, schedule="discrete",
            sampling=cascade.SamplingConfig(**{**settings[i], "num_steps": num_steps[i]}),
            text_fingerprint="fp-test", name=f"if_{'I' * (i + 1)}",
        ))
    return out


def _embeds(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompts' embeddings [n, L, D], their mask, the empty prompt's embeddings [L, D])."""
    rng = np.random.default_rng(seed)
    embeds = rng.standard_normal((n, TEXT_LEN, EMBED_DIM)).astype(np.float32)
    mask = np.arange(TEXT_LEN)[None] < rng.integers(1, TEXT_LEN + 1, (n, 1))
    null = rng.standard_normal((TEXT_LEN, EMBED_DIM)).astype(np.float32)
    return embeds, mask, null


@pytest.fixture(scope="module")
def if_cascade():
    stages = if_stages()
    params = [cascade.random_params(s, seed=i) for i, s in enumerate(stages)]
    return cascade.Cascade(stages, params, embed_dim=EMBED_DIM, null_embeds=_embeds(1, 0)[2])


def test_if_stage_record_round_trips_its_config():
    for stage in if_stages():
        record = json.loads(json.dumps(stage.to_dict()))  # what a checkpoint's JSON holds
        assert record["model"]["class"] == "IFUNet"
        assert record["model"]["fields"]["config"]["class"] == "IFUNetConfig"
        rebuilt = Stage.from_dict(record)
        assert rebuilt == stage
        assert isinstance(rebuilt.model.config, IFUNetConfig)
        assert rebuilt.model.config.layers_per_block == stage.model.config.layers_per_block
        assert rebuilt.get_schedule() == DiscreteSchedule()
        # The record rebuilds the same parameter tree (what a checkpoint restores into).
        same = jax.tree.map(lambda a, b: a.shape == b.shape, abstract_params(rebuilt),
                            abstract_params(stage))
        assert all(jax.tree.leaves(same))


def test_discrete_stages_and_samplers_go_together():
    base, sr = if_stages()
    with pytest.raises(ConfigError, match="sampler 'ddpm' with Stage.schedule='discrete'"):
        base.with_sampling(sampler="ddpm", threshold_max=0.0)
    with pytest.raises(ConfigError, match="sampler 'learned_range' with Stage.schedule='cosine'"):
        base.replace(schedule="cosine")
    with pytest.raises(ConfigError, match="aug_level=0.2505 is noise level 250.5 of 1000"):
        sr.with_sampling(aug_level=0.2505)
    with pytest.raises(ConfigError, match="schedule_kwargs"):
        base.replace(schedule_kwargs={"beta_schedule": "sigmoid"})


def test_if_cascade_is_one_program_with_one_loop_per_stage(if_cascade):
    compiled = if_cascade.compile(BATCH, start=0, stop=None, encode=False, progress=False,
                                  text_length=TEXT_LEN)
    check_one_program(if_cascade.lower(BATCH).as_text(), compiled.as_text(), 2)


def test_if_cascade_equals_its_stages_run_one_after_the_other(if_cascade):
    embeds, mask, null = _embeds(BATCH, 1)
    seed = 3
    out = if_cascade.sample(text_embeds=embeds, text_mask=mask, seed=seed)
    assert [x.shape for x in out.float_images] == [(BATCH, r, r, 3) for r in RES]

    fns = [jax.jit(lambda p, e, m, r, low, n, stage=stage: cascade.sample_stage(
        stage, p, e, m, r, lowres=low, null_embeds=n)) for stage in if_cascade.stages]

    def run(i, lowres, null_embeds):
        params = jax.tree.map(np.asarray, if_cascade.params[i])  # single-device copies
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), i)
        return np.asarray(fns[i](params, embeds, mask, rng, lowres, null_embeds))

    base = run(0, None, if_cascade.null_embeds)
    sr = run(1, jnp.asarray(base), if_cascade.null_embeds)
    # Up to compilation differences (8 batch shards here, one device there), as for our
    # cascade's slices in tests/test_cascade.py.
    np.testing.assert_allclose(out.float_images[0], base, atol=1e-4)
    np.testing.assert_allclose(out.float_images[1], sr, atol=1e-3)
    # Guidance reads the empty prompt's embeddings: another one gives other images.
    other = run(0, None, -np.asarray(if_cascade.null_embeds))
    assert float(np.abs(other - base).max()) > 0.1


def test_a_guided_if_stage_needs_the_empty_prompt():
    base = if_stages()[0]
    embeds, mask, _ = _embeds(2, 2)
    params = cascade.random_params(base)
    with pytest.raises(cascade.CascadeError, match="encoded empty prompt; pass null_embeds"):
        cascade.sample_stage(base, params, embeds, mask, jax.random.PRNGKey(0))


def test_load_cascade_reads_diffusers_if_unets(tmp_path):
    """``load_cascade(["if:IF_I", "if:IF_II"])`` (``launch.sample --stages=if:...``) reads
    diffusers model directories saved by ``UNet2DConditionModel.save_pretrained``."""
    entries = [f"{cascade.IF_PREFIX}{save_if_model(config, tmp_path / f'IF-{n}-tiny', seed)}"
               for seed, (n, config) in enumerate((("I", STAGE_I), ("II", STAGE_II)))]
    loaded = cascade.load_cascade(entries, overrides=[{"num_steps": 2}] * 2)
    want = if_stages()
    for stage, expected, params, entry in zip(loaded.stages, want, loaded.params, entries):
        assert stage.name == entry.rsplit("/", 1)[-1]
        assert stage.model == expected.model and stage.is_discrete
        assert (stage.resolution, stage.lowres_resolution) == (
            expected.resolution, expected.lowres_resolution)
        assert stage.sampling == expected.sampling.replace(num_steps=2)
        _, reference = load_if_unet(entry.removeprefix(cascade.IF_PREFIX) + "/unet")
        leaves_equal(params, reference)
    with pytest.raises(cascade.CascadeError, match="does not exist"):
        cascade.load_cascade([f"{cascade.IF_PREFIX}{tmp_path / 'absent'}"])


class _Encoder:
    """A stand-in text encoder: fixed random embeddings per prompt (what `Cascade` reads)."""

    embed_dim, max_length, fingerprint, params = EMBED_DIM, TEXT_LEN, "fp-test", {}
    zero_padding = False  # IF's convention: T5's outputs at padded positions kept

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def encode_fn(self, params, ids, mask):
        return jnp.zeros((*ids.shape, EMBED_DIM)) + ids[..., None]

    def __call__(self, texts):
        rows = [np.random.default_rng(len(t)).standard_normal((TEXT_LEN, EMBED_DIM)) for t in texts]
        return np.stack(rows).astype(np.float32), np.ones((len(texts), TEXT_LEN), bool)


def test_the_cascade_encodes_the_empty_prompt_for_if_stages():
    stages = if_stages()
    params = [cascade.random_params(s, seed=i) for i, s in enumerate(stages)]
    encoder = _Encoder()
    c = cascade.Cascade(stages, params, text_encoder=encoder)
    np.testing.assert_array_equal(np.asarray(c.null_embeds), encoder([""])[0][0])


@pytest.mark.parametrize("field,value,shown", [
    ("embed_dim", 24, "6 tokens x 24 dims"), ("max_length", 9, "9 tokens x 16 dims"),
    ("zero_padding", True, "padding zeroed")])
def test_if_stages_refuse_an_encoder_of_another_shape_or_padding(field, value, shown):
    """IF stages carry no fingerprint; the cascade refuses an encoder whose width, length or
    padding mode is not what they read, in one line naming both and the fix."""
    stages = if_stages()
    params = [cascade.random_params(s, seed=i) for i, s in enumerate(stages)]
    with pytest.raises(cascade.CascadeError) as e:
        cascade.Cascade(stages, params, text_encoder=_Encoder(**{field: value}))
    msg = str(e.value)
    assert "\n" not in msg and shown in msg, msg
    assert "reads T5 embeddings of 6 tokens x 16 dims, padding kept" in msg
    assert "max_length=6, zero_padding=False" in msg


def test_if_prompts_are_lower_cased_and_stripped_as_ifs_pipeline_does():
    """IF's pipelines feed T5 ``prompt.lower().strip()``; the cascade does the same for IF
    stages before tokenizing."""
    seen = []

    class Recording(_Encoder):
        def tokenize(self, texts):
            seen.extend(texts)
            return np.ones((len(texts), TEXT_LEN), np.int32), np.ones((len(texts), TEXT_LEN), bool)

    stages = if_stages()
    params = [cascade.random_params(s, seed=i) for i, s in enumerate(stages)]
    cascade.Cascade(stages, params, text_encoder=Recording()).tokenize(["  A Red CIRCLE ", "x"])
    assert seen == ["a red circle", "x"]


def test_a_mixed_cascade_gives_our_stages_zeroed_padding(monkeypatch):
    """IF stages followed by one of ours: with an encoder that keeps padding for IF, our stage
    gets its embeddings zeroed at padded positions (as it was trained) and is checked against the
    encoder's zeroed-mode fingerprint; IF stages get the embeddings as encoded."""
    from imagen_jax.cascade import program
    from imagen_jax.train.testing import tiny_sr

    ours = Stage(model=tiny_sr(text_embed_dim=EMBED_DIM), resolution=64, lowres_resolution=32,
                 text_length=TEXT_LEN, text_embed_dim=EMBED_DIM, text_fingerprint="t5-a",
                 name="ours")
    stages = [*(s.replace(text_fingerprint=None) for s in if_stages()), ours]  # as loaded
    params = [cascade.random_params(s, seed=i) for i, s in enumerate(stages)]
    encoder = _Encoder(fingerprint="t5-padkept-a",
                       fingerprint_for=lambda zeroed: "t5-a" if zeroed else "t5-padkept-a")
    assert cascade.Cascade(stages, params, text_encoder=encoder)._padding_kept
    with pytest.raises(cascade.CascadeError, match="different text encoders"):
        cascade.Cascade(stages[:2] + [ours.replace(text_fingerprint="t5-padkept-a")], params,
                        text_encoder=encoder)
    # IF stages fine-tuned by our trainer record the kept-padding fingerprint: they chain with
    # ours (same weights) and are checked in their own mode.
    tuned = [s.replace(text_fingerprint="t5-padkept-a") for s in stages[:2]]
    cascade.Cascade(tuned + [ours], params, text_encoder=encoder)
    with pytest.raises(cascade.CascadeError, match="different text encoders"):
        cascade.Cascade([s.replace(text_fingerprint="t5-a") for s in tuned] + [ours], params,
                        text_encoder=encoder)

    seen = {}

    def fake_sample_stage(stage, params, text_embeds, text_mask, rng, lowres=None, **kwargs):
        seen[stage.name] = np.asarray(text_embeds)
        side = stage.resolution
        return jnp.zeros((len(text_embeds), side, side, 3)), jnp.ones(len(text_embeds), bool)

    monkeypatch.setattr(program, "sample_stage", fake_sample_stage)
    embeds, mask, _ = _embeds(2, 5)
    assert not mask.all()
    for kept in (True, False):
        program.sample_cascade(stages, params, jnp.asarray(embeds), jnp.asarray(mask),
                               jax.random.PRNGKey(0), padding_kept=kept)
        for name in ("if_I", "if_II"):
            np.testing.assert_array_equal(seen[name], embeds)
        want = np.where(mask[..., None], embeds, 0.0) if kept else embeds
        np.testing.assert_array_equal(seen["ours"], want)
