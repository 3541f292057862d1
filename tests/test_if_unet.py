"""DeepFloyd IF U-Nets (issue 18, must-show points 1 and 2).

1. Parity: diffusers' ``UNet2DConditionModel`` is built here from a tiny IF-shaped config with a
   fixed seed (stage I-like: ADM layout, added-KV attention, pooled text, 6 outputs; stage II-
   like: per-level block counts, skip-time-act, output scale 1/0.7071, noise level as a second
   timestep, low-res input concatenated, only-cross attention at one level), every parameter is
   perturbed away from its init, saved with ``save_pretrained`` (safetensors, sharded for stage
   II), read by `load_if_unet`, and our forward pass must equal torch's within 1e-4 in float32
   on a batch whose text has padding tokens. No fixture files: the test builds the reference.
2. Keys: each safetensors key is read exactly once; a renamed, missing or extra key and an
   unsupported config option are one-line errors naming it.
"""

from __future__ import annotations

import json
import os

import diffusers  # test-extra reference: plainly imported, a broken install fails, not skips
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from imagen_jax import partitioning
from imagen_jax.errors import CheckpointError, ConfigError
from imagen_jax.nn.if_config import IFUNetConfig, read_if_config
from imagen_jax.nn.if_unet import IFUNet
from imagen_jax.nn.if_weights import (
    DiffusersUNetDir,
    abstract_if_params,
    key_map,
    load_if_unet,
)

TOLERANCE = 1e-4
PERTURBATION = 0.05  # std of the noise added to every parameter (moves it off its init)
SIDE = 16
BATCH = 2
TOKENS = 6
PADDING = 2  # trailing tokens of the second prompt are T5's padding embedding

STAGE_I = dict(  # IF-I-XL's options at toy widths
    sample_size=SIDE, in_channels=3, out_channels=6, block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                      "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                    "ResnetUpsampleBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", attention_head_dim=16,
    cross_attention_dim=32, encoder_hid_dim=24, addition_embed_type="text",
    addition_embed_type_num_heads=4, act_fn="gelu", norm_num_groups=8, norm_eps=1e-5,
    resnet_time_scale_shift="scale_shift", cross_attention_norm="group_norm",
)
STAGE_II = dict(  # IF-II-L's options at toy widths
    STAGE_I, in_channels=6, block_out_channels=(16, 32, 64), layers_per_block=(1, 2, 1),
    down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D",
                      "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D",
                    "ResnetUpsampleBlock2D"),
    only_cross_attention=(False, False, True), mid_block_only_cross_attention=False,
    class_embed_type="timestep", time_embedding_act_fn="gelu", time_embedding_dim=48,
    resnet_skip_time_act=True, resnet_out_scale_factor=1 / 0.7071,
    mid_block_scale_factor=1 / 0.7071,
)


def _save_reference(config: dict, path: str, seed: int, shard: str | None = None,
                    variant: str | None = None):
    """A perturbed diffusers U-Net saved to ``path`` (as float16 for ``variant="fp16"``);
    returns the torch module."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(PERTURBATION * torch.randn_like(p))
    kwargs = {"max_shard_size": shard} if shard else {}
    saved = model.half() if variant == "fp16" else model
    saved.save_pretrained(path, safe_serialization=True, variant=variant, **kwargs)
    return saved


def _inputs(config: dict, seed: int):
    rng = np.random.default_rng(seed)
    image = config["out_channels"] // 2
    x = rng.standard_normal((BATCH, SIDE, SIDE, image)).astype(np.float32)
    t = np.array([999, 17], np.int32)
    text = rng.standard_normal((BATCH, TOKENS, config["encoder_hid_dim"])).astype(np.float32)
    text[1, -PADDING:] = rng.standard_normal(config["encoder_hid_dim"]).astype(np.float32)
    lowres = level = None
    if config.get("class_embed_type"):
        lowres = rng.standard_normal((BATCH, SIDE, SIDE, image)).astype(np.float32)
        level = np.array([250, 3], np.int32)
    return x, t, text, lowres, level


def _torch_forward(model, x, t, text, lowres, level) -> np.ndarray:
    sample = x if lowres is None else np.concatenate([x, lowres], axis=-1)
    with torch.no_grad():
        out = model(torch.from_numpy(sample.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                    torch.from_numpy(text),
                    class_labels=None if level is None else torch.from_numpy(level)).sample
    return out.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("name,config,shard", [("stage_I", STAGE_I, None),
                                               ("stage_II", STAGE_II, "500KB")])
def test_forward_matches_diffusers(tmp_path, name, config, shard):
    path = str(tmp_path / name)
    model = _save_reference(config, path, seed=0, shard=shard)
    if shard:
        index = os.path.join(path, "diffusion_pytorch_model.safetensors.index.json")
        with open(index) as f:
            assert len(set(json.load(f)["weight_map"].values())) > 1
    source = DiffusersUNetDir(path)
    cfg, params = load_if_unet(source)
    assert set(source.reads) == source.keys() and set(source.reads.values()) == {1}
    x, t, text, lowres, level = _inputs(config, seed=1)
    want = _torch_forward(model, x, t, text, lowres, level)
    got = jax.jit(IFUNet(cfg).apply)({"params": params}, x, t, text, lowres, level)
    assert got.shape == (BATCH, SIDE, SIDE, 6)
    assert np.abs(np.asarray(got) - want).max() < TOLERANCE, np.abs(np.asarray(got) - want).max()


@pytest.fixture(scope="module")
def saved_stage_i(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("if") / "unet")
    _save_reference(STAGE_I, path, seed=2)
    return path


def _rewrite(src: str, dst: str, edit) -> None:
    """Copies a unet/ directory with its tensors dict changed by ``edit``."""
    from safetensors.numpy import load_file, save_file  # test-only helper

    os.makedirs(dst)
    tensors = load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        config = f.read()
    with open(os.path.join(dst, "config.json"), "w") as f:
        f.write(config)


def test_every_key_maps_to_one_parameter(saved_stage_i):
    names, _ = key_map(read_if_config(saved_stage_i))
    assert set(names.values()) == DiffusersUNetDir(saved_stage_i).keys()
    assert len(set(names.values())) == len(names)


KEY = "down_blocks.1.attentions.0.add_k_proj.weight"


@pytest.mark.parametrize("case", ["renamed", "missing", "extra"])
def test_bad_keys_are_named(saved_stage_i, tmp_path, case):
    def edit(tensors):
        value = tensors.pop(KEY) if case != "extra" else tensors[KEY]
        if case == "renamed":
            tensors[KEY.replace("add_k_proj", "add_key_proj")] = value
        elif case == "extra":
            tensors["mid_block.attentions.0.spare.weight"] = value

    bad = str(tmp_path / "bad")
    _rewrite(saved_stage_i, bad, edit)
    with pytest.raises(CheckpointError) as err:
        load_if_unet(bad)
    message = str(err.value)
    assert "\n" not in message
    named = {"renamed": [KEY.replace("add_k_proj", "add_key_proj"), KEY], "missing": [KEY],
             "extra": ["mid_block.attentions.0.spare.weight"]}[case]
    assert all(repr(key) in message for key in named), message
    assert ("missing" in message) == (case != "extra")
    assert ("unknown" in message) == (case != "missing")


def test_mis_shaped_tensor_is_named(saved_stage_i, tmp_path):
    bad = str(tmp_path / "bad")
    _rewrite(saved_stage_i, bad, lambda t: t.update({KEY: t[KEY][:, :-1]}))
    with pytest.raises(CheckpointError, match=KEY.replace(".", r"\.")):
        load_if_unet(bad)


@pytest.mark.parametrize("key,value", [("resnet_time_scale_shift", "default"),
                                       ("down_block_types", ["DownBlock2D"] * 3),
                                       ("no_such_option", 1)])
def test_unsupported_config_is_named(saved_stage_i, key, value):
    with open(os.path.join(saved_stage_i, "config.json")) as f:
        raw = json.load(f)
    raw[key] = value
    with pytest.raises(ConfigError, match=key) as err:
        IFUNetConfig.from_diffusers(raw)
    assert "\n" not in str(err.value)


def test_stage_ii_needs_its_low_res_input(saved_stage_i):
    cfg = IFUNetConfig.from_diffusers(dict(STAGE_II, layers_per_block=[1, 2, 1]))
    x = jnp.zeros((1, SIDE, SIDE, 3))
    with pytest.raises(ValueError, match="lowres"):
        IFUNet(cfg).init(jax.random.key(0), x, jnp.zeros((1,), jnp.int32),
                         jnp.zeros((1, 2, 24)))


def test_loads_into_shards_and_reads_the_fp16_variant(tmp_path):
    """Each tensor is placed straight into its mesh shards (FSDP rules); a directory holding
    only ``diffusion_pytorch_model.fp16.safetensors`` loads, cast to the parameter dtype."""
    path = str(tmp_path / "fp16")
    model = _save_reference(STAGE_I, path, seed=3, variant="fp16")
    assert sorted(os.listdir(path)) == ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
    cfg = read_if_config(path)
    mesh = partitioning.make_mesh(data=2, fsdp=4)
    shardings = partitioning.logical_to_shardings(
        partitioning.logical_specs(abstract_if_params(cfg)), mesh, partitioning.FSDP_RULES)
    _, params = load_if_unet(path, shardings=shardings)
    kernel = params["down_1_attn_0"]["text_key"]["kernel"]  # [D, heads, head_dim]
    assert kernel.dtype == jnp.float32
    assert kernel.sharding == shardings["down_1_attn_0"]["text_key"]["kernel"]
    assert not kernel.sharding.is_fully_replicated
    want = model.down_blocks[1].attentions[0].add_k_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(kernel).reshape(want.shape[1], -1), want.T)


# Max |output difference| relative to max |float32 output| after rounding every weight to the
# precision (fp16: 11-bit mantissa; bf16: 8-bit).
HALF_TOLERANCE = {"float16": 5e-3, "bfloat16": 5e-2}


@pytest.mark.parametrize("dtype,variant", [("float16", None), ("bfloat16", "bf16")])
def test_half_precision_files_load(saved_stage_i, tmp_path, dtype, variant):
    """A U-Net saved in float16 (in the default file) or bfloat16 (the ``bf16`` variant) loads:
    every parameter is the float32 one rounded to that precision, cast to float32 (or kept in
    bfloat16 with ``param_dtype``), and the forward pass equals the float32 model's within the
    precision's tolerance."""
    path = str(tmp_path / dtype)
    model = diffusers.UNet2DConditionModel.from_pretrained(saved_stage_i)
    model.to(getattr(torch, dtype)).save_pretrained(path, safe_serialization=True,
                                                   variant=variant)
    cfg, full = load_if_unet(saved_stage_i)
    _, half = load_if_unet(path)
    rounded = jax.tree.map(lambda p: np.asarray(p).astype(jnp.dtype(dtype)).astype(np.float32),
                           full)
    for got, want in zip(jax.tree.leaves(half), jax.tree.leaves(rounded)):
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got), want)
    _, kept = load_if_unet(path, param_dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(kept)} == {jnp.dtype(jnp.bfloat16)}
    x, t, text, lowres, level = _inputs(STAGE_I, seed=4)
    apply = jax.jit(IFUNet(cfg).apply)
    want = np.asarray(apply({"params": full}, x, t, text, lowres, level))
    got = np.asarray(apply({"params": half}, x, t, text, lowres, level))
    err = np.abs(got - want).max() / np.abs(want).max()
    assert np.isfinite(got).all() and err < HALF_TOLERANCE[dtype], err
