"""U-Net behaviour: shapes, null-token text conditioning, attention parity against a numpy
transcription, logical axis names, sharded init, remat, dtypes, error messages; the gin model
files build exactly the Python models (one set of sizes)."""

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import gin_utils, partitioning
from imagen_jax.nn import BaseUNet, EfficientUNet
from imagen_jax.nn.attention import AttentionBlock, AttentionPool
from imagen_jax.nn.layers import ResBlock, sinusoidal_embedding
from imagen_jax.train.testing import tiny_base, tiny_sr
from tests.support_unet import random_params

B, SIZE, L, D = 2, 16, 5, 32


def _inputs(seed=0, size=SIZE, lowres=None):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((B, size, size, 3)), jnp.float32)
    t = jnp.asarray([0.25, 0.8], jnp.float32)
    embeds = jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    args = [x, t, embeds, mask]
    if lowres is not None:
        args += [jnp.asarray(rng.standard_normal((B, lowres, lowres, 3)), jnp.float32),
                 jnp.asarray([0.0, 0.3], jnp.float32)]
    return args


_perturbed_params = random_params


@pytest.fixture(scope="module")
def base_setup():
    model = tiny_base()
    args = _inputs()
    return model, args, _perturbed_params(model, args)


@pytest.fixture(scope="module")
def sr_setup():
    model = tiny_sr()
    args = _inputs(size=16, lowres=4)
    return model, args, _perturbed_params(model, args)


def test_zero_init_output_and_shapes(sr_setup):
    # One-level model: compiling the real init costs time proportional to the layer count.
    model = sr_setup[0].clone(blocks=((16, 1),), self_attention=True, cross_attention=True)
    args = sr_setup[1]
    variables = jax.jit(model.init)(jax.random.key(0), *args)
    out = jax.jit(model.apply)(variables, *args)
    assert out.shape == args[0].shape and out.dtype == jnp.float32
    # The output conv is zero-initialised: an untrained model predicts eps = 0.
    np.testing.assert_array_equal(np.asarray(out), 0.0)


@pytest.mark.parametrize("which", ["base", "sr"])
def test_null_condition_is_finite_and_ignores_masked_tokens(which, base_setup, sr_setup):
    model, args, params = base_setup if which == "base" else sr_setup
    apply = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    x, t, embeds, mask = args[:4]
    rest = args[4:]
    # Classifier-free unconditional case (DESIGN.md): zero embeddings, all-False mask.
    uncond = apply(params, x, t, jnp.zeros_like(embeds), jnp.zeros_like(mask), *rest)
    assert np.isfinite(np.asarray(uncond)).all()
    # With an all-False mask the text content must not matter at all.
    uncond_noise = apply(params, x, t, embeds * 7.0, jnp.zeros_like(mask), *rest)
    np.testing.assert_allclose(uncond, uncond_noise, atol=1e-5)
    # Masked-out tokens (example 0, positions 3-4) must not influence the output ...
    changed = embeds.at[0, 3:].set(100.0)
    cond = apply(params, x, t, embeds, mask, *rest)
    cond_changed = apply(params, x, t, changed, mask, *rest)
    np.testing.assert_allclose(cond, cond_changed, atol=1e-5)
    # ... while real tokens do: the text condition reaches the output.
    assert float(jnp.abs(cond - uncond).max()) > 1e-4


def test_sr_output_depends_on_lowres_and_aug_level(sr_setup):
    """An SR U-Net that ignored its low-res image or its augmentation level would pass every
    shape test: each conditioning input must move the output, and only its own example's."""
    model, args, params = sr_setup
    apply = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    x, t, embeds, mask, lowres, aug_level = args
    out = np.asarray(apply(params, *args))
    scale = float(np.abs(out).max())
    other_low = lowres.at[0].set(-lowres[0])  # example 0 only
    out_low = np.asarray(apply(params, x, t, embeds, mask, other_low, aug_level))
    other_aug = aug_level.at[0].set(0.9)
    out_aug = np.asarray(apply(params, x, t, embeds, mask, lowres, other_aug))
    for what, changed in (("lowres", out_low), ("aug_level", out_aug)):
        delta = float(np.abs(changed[0] - out[0]).max())
        assert delta > 1e-2 * scale, f"changing {what} moved the output by {delta} of {scale}"
        np.testing.assert_allclose(changed[1], out[1], atol=1e-5, err_msg=what)


def _np_attention(q, k, v, mask):
    """Numpy transcription of masked multi-head softmax attention. q [B,T,N,H], k/v [B,S,N,H]."""
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask[:, None, None, :], logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", weights, v)


def _np_group_norm(x, groups, scale, bias, eps=1e-6):
    b, h, w, c = x.shape
    g = x.reshape(b, h * w, groups, c // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(b, h, w, c) * scale + bias


def _np_layer_norm(x, scale, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def test_attention_block_matches_numpy_transcription():
    """Self-attention with null token + text keys/values (App. D.3.1) against numpy."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((B, 4, 4, 16)).astype(np.float32)
    text = rng.standard_normal((B, L, 8)).astype(np.float32)
    mask = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0]], bool)  # example 1: unconditional
    block = AttentionBlock(head_dim=8, num_groups=4)
    params = _perturbed_params(block, [x, text, mask], seed=4)
    got = np.asarray(jax.jit(block.apply)({"params": params}, x, text, mask))

    p = jax.tree.map(np.asarray, params)
    xn = _np_group_norm(x, 4, p["norm"]["norm"]["scale"], p["norm"]["norm"]["bias"])
    xn = xn.reshape(B, 16, 16)
    tn = _np_layer_norm(text, p["text_norm"]["norm"]["scale"], p["text_norm"]["norm"]["bias"])

    def proj(name, inp):
        return np.einsum("btc,cnh->btnh", inp, p[name]["kernel"]) + p[name]["bias"]

    null_k = np.broadcast_to(p["null_key"], (B, 1, 2, 8))
    null_v = np.broadcast_to(p["null_value"], (B, 1, 2, 8))
    k = np.concatenate([proj("key", xn), null_k, proj("text_key", tn)], axis=1)
    v = np.concatenate([proj("value", xn), null_v, proj("text_value", tn)], axis=1)
    full_mask = np.concatenate([np.ones((B, 17), bool), mask], axis=1)
    attn = _np_attention(proj("query", xn), k, v, full_mask)
    out = np.einsum("btnh,nhc->btc", attn, p["out"]["kernel"]) + p["out"]["bias"]
    want = x + out.reshape(x.shape)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_attention_pool_matches_numpy_transcription():
    rng = np.random.default_rng(5)
    text = rng.standard_normal((B, L, 16)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], bool)
    pool = AttentionPool(out_dim=12, num_heads=2)
    params = _perturbed_params(pool, [text, mask], seed=6)
    got = np.asarray(jax.jit(pool.apply)({"params": params}, text, mask))
    p = jax.tree.map(np.asarray, params)
    tn = _np_layer_norm(text, p["text_norm"]["norm"]["scale"], p["text_norm"]["norm"]["bias"])
    counts = np.maximum(mask.sum(1, keepdims=True), 1)[..., None]
    mean = (tn * mask[..., None]).sum(1, keepdims=True) / counts  # [B, 1, 16]
    tokens = np.concatenate([mean, tn], axis=1)

    def proj(name, inp):
        return np.einsum("btc,cnh->btnh", inp, p[name]["kernel"]) + p[name]["bias"]

    k = np.concatenate([np.broadcast_to(p["null_key"], (B, 1, 2, 8)), proj("key", tokens)], 1)
    v = np.concatenate([np.broadcast_to(p["null_value"], (B, 1, 2, 8)), proj("value", tokens)],
                       1)
    full_mask = np.concatenate([np.ones((B, 2), bool), mask], axis=1)
    attn = _np_attention(proj("query", mean), k, v, full_mask)
    want = np.einsum("btnh,nhc->btc", attn, p["out"]["kernel"])[:, 0] + p["out"]["bias"]
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_sinusoidal_embedding_matches_formula():
    t = np.array([0.0, 0.1, 0.5, 1.0], np.float32)
    dim, half = 16, 8
    freqs = np.exp(-np.log(10_000.0) * np.arange(half) / half)
    args = 1000.0 * t[:, None] * freqs[None]
    want = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    np.testing.assert_allclose(sinusoidal_embedding(jnp.asarray(t), dim), want, rtol=1e-5,
                               atol=1e-4)


@pytest.mark.parametrize("which", ["base", "sr"])
def test_every_parameter_has_logical_axes(which):
    model = tiny_base() if which == "base" else tiny_sr()
    args = _inputs() if which == "base" else _inputs(size=16, lowres=4)
    abstract = jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a), *args)
    leaves = jax.tree.leaves(abstract["params"],
                             is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), f"unannotated parameter {leaf}"
        assert len(leaf.names) == leaf.value.ndim


def test_sharded_apply_matches_single_device(sr_setup):
    """Parameters FSDP-sharded by their logical names on the 8-device mesh (the shardings
    `partitioning.sharded_init` uses); the sharded forward equals the single-device one."""
    model, args, params = sr_setup
    mesh = partitioning.make_mesh(data=2, fsdp=4)
    rules = partitioning.FSDP_RULES
    abstract = jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a), *args)
    shardings = partitioning.logical_to_shardings(partitioning.logical_specs(abstract), mesh,
                                                  rules)["params"]
    kernel = shardings["down_1_res_0"]["conv_0"]["conv"]["kernel"]  # [3, 3, 32, 32]
    assert kernel.spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    # The image-facing 3-channel sides are never split (3 is not divisible by the mesh).
    assert all(a is None for a in shardings["conv_out"]["conv"]["kernel"].spec)
    single = jax.jit(model.apply)({"params": params}, *args)
    params = jax.device_put(params, shardings)
    with mesh, nn.logical_axis_rules(tuple(rules)):
        sharded = jax.jit(lambda p, *a: model.apply({"params": p}, *a))(params, *args)
    np.testing.assert_allclose(sharded, single, rtol=1e-4, atol=1e-5)


def test_remat_wraps_every_block_and_keeps_gradients(base_setup):
    model, args, params = base_setup

    def loss(m, p):
        return jnp.mean(m.apply({"params": p}, *args, train=True) ** 2)

    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: loss(model.clone(remat=True), p)))(params))
    # tiny_base: residual blocks 3 down (incl. downsample), 2 mid, 5 up (incl. upsample) = 10;
    # attention blocks 1 down, 1 mid, 2 up = 4: one rematerialised region each.
    assert jaxpr.count("remat2[") == 14
    assert "remat2[" not in str(jax.make_jaxpr(jax.grad(lambda p: loss(model, p)))(params))
    # Numerics of the rematerialised gradient, on one residual block (cheap to compile).
    block = ResBlock(16, num_groups=4)
    x, emb = jnp.ones((2, 4, 4, 8)) * jnp.arange(8.0), jnp.linspace(-1, 1, 2 * 12).reshape(2, 12)
    block_params = random_params(block, [x, emb])
    grads = [jax.jit(jax.grad(lambda p, m=m: jnp.sum(m.apply({"params": p}, x, emb) ** 2)))(
        block_params) for m in (block, nn.remat(ResBlock)(16, num_groups=4))]
    for a, b in zip(*map(jax.tree.leaves, grads)):
        # Remat recomputes the forward pass in another fusion order, so a few of ~2k gradients
        # (magnitude ~0.1) differ by float32 rounding: up to 2.3e-5 absolute on a fresh clone.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_bfloat16_compute_keeps_float32_params(sr_setup):
    model, args, params = sr_setup
    bf16 = model.clone(dtype="bfloat16")
    variables = jax.eval_shape(lambda *a: bf16.init(jax.random.key(0), *a), *args)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.meta.unbox(variables)))
    out = jax.jit(bf16.apply)({"params": params}, *args)
    ref = jax.jit(model.apply)({"params": params}, *args)
    assert out.dtype == jnp.float32
    # bf16 has an 8-bit mantissa: agreement to a few percent of the output scale.
    assert float(jnp.abs(out - ref).max()) < 0.05 * float(jnp.abs(ref).max()) + 1e-3


def test_clear_errors_on_bad_inputs(base_setup, sr_setup):
    model, args, params = base_setup
    with pytest.raises(ValueError, match="text_embed_dim"):
        model.apply({"params": params}, args[0], args[1], args[2][..., :8], args[3])
    with pytest.raises(ValueError, match="lowres=None"):
        model.apply({"params": params}, *args, lowres=args[0])
    with pytest.raises(ValueError, match=r"t must be float32 \[B=2\]"):
        model.apply({"params": params}, args[0], args[1][:1], *args[2:])
    sr_model, sr_args, sr_params = sr_setup
    with pytest.raises(ValueError, match="pass lowres"):
        sr_model.apply({"params": sr_params}, *sr_args[:4])
    with pytest.raises(ValueError, match="divisible by 4"):
        sr_model.apply({"params": sr_params}, sr_args[0][:, :14, :14], *sr_args[1:])


def _space_to_depth(x, p):
    """numpy transcription: out[b, i, j, (di * p + dj) * C + c] = x[b, i*p + di, j*p + dj, c]."""
    b, h, w, c = x.shape
    out = np.zeros((b, h // p, w // p, p * p * c), x.dtype)
    for di in range(p):
        for dj in range(p):
            out[..., (di * p + dj) * c:(di * p + dj + 1) * c] = x[:, di::p, dj::p, :]
    return out


def _depth_to_space(y, p, c):
    b, hp, wp, _ = y.shape
    out = np.zeros((b, hp * p, wp * p, c), y.dtype)
    for di in range(p):
        for dj in range(p):
            out[:, di::p, dj::p, :] = y[..., (di * p + dj) * c:(di * p + dj + 1) * c]
    return out


def test_patch_size_folds_pixels_into_channels(base_setup):
    """patch_size=2 is the same U-Net run on the space-to-depth image, its output unfolded."""
    model, args, _ = base_setup
    patched = model.clone(patch_size=2)
    inner = model.clone(image_size=SIZE // 2, out_channels=12)  # 2 * 2 * 3 channels in and out
    x = np.asarray(args[0])
    folded = [jnp.asarray(_space_to_depth(x, 2)), *args[1:]]
    params = _perturbed_params(patched, args)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape,
                                                           _perturbed_params(inner, folded))
    out = patched.apply({"params": params}, *args)
    want = _depth_to_space(np.asarray(inner.apply({"params": params}, *folded)), 2, 3)
    assert out.shape == x.shape
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="patch_size 2"):
        patched.apply({"params": params}, args[0][:, :14, :14], *args[1:])


def test_exports():
    assert isinstance(tiny_base(), BaseUNet) and isinstance(tiny_sr(), EfficientUNet)


@pytest.mark.parametrize("gin_file, python_model", [
    ("models/base_2b.gin", BaseUNet),  # the dataclass defaults are the paper's models
    ("models/sr256_600m.gin", EfficientUNet),
    ("models/sr1024_400m.gin", lambda: EfficientUNet(self_attention=(False,) * 4,
                                                     attn_every_res_block=False)),
    ("tiny/models/tiny_base.gin", tiny_base),
    ("tiny/models/tiny_sr.gin", tiny_sr),
])
def test_gin_model_files_build_the_python_models(gin_file, python_model):
    """Model sizes live in gin (`MODEL = @BaseUNet()` + field bindings); the dataclass defaults
    and the tiny test constructors must not drift from them. gin gives lists, the module holds
    tuples, so the gin-built model equals (and hashes like) the one written in Python."""
    gin.clear_config()
    try:
        gin_utils.parse([gin_file], finalize=False)
        built = gin.query_parameter("%MODEL").scoped_configurable_fn()
    finally:
        gin.clear_config()  # before building the Python model: no binding may reach it
    want = python_model()
    assert built == want
    assert hash(built) == hash(want)
