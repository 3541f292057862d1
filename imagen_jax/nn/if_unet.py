"""DeepFloyd IF's pixel U-Nets (stage I, IF-I-XL; stage II, IF-II-L) as flax modules.

The network of diffusers' ``UNet2DConditionModel`` under an IF config (`IFUNetConfig`; read
``models/unets/unet_2d_condition.py``, ``unet_2d_blocks.py``, ``resnet.py``,
``attention_processor.py`` ``AttnAddedKVProcessor`` and ``embeddings.py`` ``TextTimeEmbedding``
for the reference), laid out like our `BaseUNet` (ADM: resampling residual blocks, attention
after each residual block of an attention level, a ResBlock-Attention-ResBlock middle), with its
own numerics: the configured activation (IF: exact GELU), GroupNorm eps ``norm_eps`` (1e-5),
scale-shift conditioning from the activated (or, with ``resnet_skip_time_act``, the raw)
embedding, residual outputs divided by ``resnet_out_scale_factor``, added-KV attention (queries
from the image; keys/values from the image and from the GroupNorm'd text tokens, no mask and no
null token: IF's unconditional branch is the encoded empty prompt), the timestep embedded from
its integer value (sinusoid scale 1), and ``addition_embed_type="text"``: attention pooling of
the raw (unprojected) T5 output, LayerNorm'd, added to the embedding.

Parameters carry the logical axis names of our U-Nets (`imagen_jax.nn.layers`,
`imagen_jax.nn.attention`), so `imagen_jax.partitioning` rules shard them the same way;
`imagen_jax.nn.if_weights` maps diffusers' safetensors keys onto this tree.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from imagen_jax.nn.attention import HeadsProjection, OutProjection
from imagen_jax.nn.if_config import (
    ATTENTION_NORM_EPSILON,
    CROSS_NORM_EPSILON,
    CROSS_NORM_GROUPS,
    LAYER_NORM_EPSILON,
    IFUNetConfig,
)
from imagen_jax.nn.layers import (
    Conv,
    EmbeddingMLP,
    GroupNorm,
    LayerNorm,
    constrain_image,
    dense,
    downsample_avg,
    upsample_nearest,
)

Array = jax.Array
Dtype = Any
# Integer timesteps go into the sinusoid unscaled (diffusers' Timesteps, scale 1).
_INTEGER_TIME_SCALE = 1.0


def activation(name: str | None):
    """diffusers' ``get_activation``: "gelu" is the exact (erf) GELU, "silu"/"swish" swish;
    None is the identity."""
    if name is None:
        return lambda x: x
    if name == "gelu":
        return functools.partial(nn.gelu, approximate=False)
    return nn.swish


class IFResBlock(nn.Module):
    """diffusers' ResnetBlock2D with ``time_embedding_norm="scale_shift"``.

    act(GroupNorm(x)) -> [resample x and h] -> conv3x3 -> GroupNorm * (1 + scale) + shift with
    (scale, shift) = Dense(act(emb)) (Dense(emb) with ``skip_time_act``) -> act -> dropout ->
    conv3x3, plus a 1x1-conv shortcut when channels change; the sum is divided by
    ``out_scale``. x [B, H, W, C_in], emb [B, E] -> [B, H', W', channels].
    """

    channels: int
    resample: str | None = None  # None | "down" | "up"
    act_fn: str = "gelu"
    skip_time_act: bool = False
    out_scale: float = 1.0
    num_groups: int = 32
    epsilon: float = 1e-5
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, emb: Array) -> Array:
        act = activation(self.act_fn)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(GroupNorm, self.num_groups, self.param_dtype, self.epsilon)
        h = act(norm(name="norm_0")(x))
        if self.resample == "down":
            h, x = downsample_avg(h), downsample_avg(x)
        elif self.resample == "up":
            h, x = upsample_nearest(h), upsample_nearest(x)
        h = Conv(self.channels, 3, name="conv_0", **kw)(h)
        emb = emb.astype(self.dtype)
        params = dense(2 * self.channels, ("embed", "mlp"), name="emb_proj", **kw)(
            emb if self.skip_time_act else act(emb))
        scale, shift = jnp.split(params[:, None, None, :], 2, axis=-1)  # [B, 1, 1, C] each
        h = act(norm(name="norm_1")(h) * (1 + scale) + shift)
        h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
        h = Conv(self.channels, 3, name="conv_1", **kw)(h)
        if x.shape[-1] != self.channels:
            x = Conv(self.channels, 1, name="shortcut", **kw)(x)
        return constrain_image((x + h) / self.out_scale)


class AddedKVAttention(nn.Module):
    """diffusers' Attention with AttnAddedKVProcessor: one softmax over text and image keys.

    Queries, keys and values of the image come from GroupNorm(x); the text's keys and values
    from the (optionally GroupNorm'd) text tokens; ``only_cross_attention`` drops the image's.
    No mask: every text position is attended (IF pads with T5's embedding of padding).
    x [B, H, W, C], text [B, L, D] -> x + attention, [B, H, W, C].
    """

    head_dim: int
    implementation: str | None = None  # `jax.nn.dot_product_attention` implementation
    only_cross_attention: bool = False
    cross_norm: bool = True
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, text: Array) -> Array:
        b, height, width, c = x.shape
        if c % self.head_dim:
            raise ValueError(f"AddedKVAttention: {c} channels are not a whole number of "
                             f"{self.head_dim}-channel heads; change attention_head_dim")
        heads = c // self.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def project(name: str, inputs: Array) -> Array:
            return HeadsProjection(heads, self.head_dim, name=name, **kw)(inputs)

        xn = GroupNorm(self.num_groups, self.param_dtype, ATTENTION_NORM_EPSILON, name="norm")(x)
        xn = xn.reshape(b, height * width, c)
        text = text.astype(self.dtype)
        if self.cross_norm:
            text = GroupNorm(CROSS_NORM_GROUPS, self.param_dtype, CROSS_NORM_EPSILON,
                             name="text_norm")(text)
        keys, values = [project("text_key", text)], [project("text_value", text)]
        if not self.only_cross_attention:
            keys.append(project("key", xn))
            values.append(project("value", xn))
        out = jax.nn.dot_product_attention(
            project("query", xn), jnp.concatenate(keys, axis=1), jnp.concatenate(values, axis=1),
            implementation=self.implementation)
        out = OutProjection(c, name="out", **kw)(out)  # [B, T, C]
        return constrain_image(x + out.reshape(b, height, width, c))


class TextPool(nn.Module):
    """diffusers' TextTimeEmbedding (``addition_embed_type="text"``), IF's pooled text.

    LayerNorm -> attention pooling (query: token mean + a learned position embedding; keys and
    values: that query token and the tokens) -> Dense to ``out_dim`` -> LayerNorm. Every token
    counts (no mask). text [B, L, D] -> [B, out_dim].
    """

    out_dim: int
    num_heads: int = 64  # diffusers' addition_embed_type_num_heads default (IF: 64)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, text: Array) -> Array:
        d = text.shape[-1]
        if d % self.num_heads:
            raise ValueError(f"TextPool: text width {d} is not divisible by "
                             f"{self.num_heads} heads (addition_embed_type_num_heads)")
        head_dim = d // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tn = LayerNorm(self.param_dtype, LAYER_NORM_EPSILON, name="norm_in")(
            text.astype(self.dtype))
        position = self.param(
            "position", nn.with_logical_partitioning(nn.initializers.normal(d ** -0.5),
                                                     ("embed",)), (d,), self.param_dtype)
        query_token = jnp.mean(tn, axis=1, keepdims=True) + position.astype(self.dtype)
        tokens = jnp.concatenate([query_token, tn], axis=1)  # [B, 1 + L, D]
        out = jax.nn.dot_product_attention(
            HeadsProjection(self.num_heads, head_dim, name="query", **kw)(query_token),
            HeadsProjection(self.num_heads, head_dim, name="key", **kw)(tokens),
            HeadsProjection(self.num_heads, head_dim, name="value", **kw)(tokens))
        # diffusers flattens the pooled heads and projects them: one (heads, kv) -> out step.
        out = OutProjection(self.out_dim, name="proj", **kw)(out)[:, 0]  # [B, out_dim]
        out = LayerNorm(self.param_dtype, LAYER_NORM_EPSILON, name="norm_out")(out)
        return nn.with_logical_constraint(out, ("batch", "channels"))


_REMAT_RES_BLOCK = nn.remat(IFResBlock)
_REMAT_ATTENTION = nn.remat(AddedKVAttention)


@gin.configurable
class IFUNet(nn.Module):
    """DeepFloyd IF U-Net (stage I or II, from `IFUNetConfig`) predicting eps and the
    learned-range variance value.

    Call: ``apply(variables, x [B, H, W, C] float, t int32 [B], text_embeds [B, L, D],
    lowres=None, noise_level=None, train=False) -> float32 [B, H, W, out_channels]`` (IF: 6
    channels, eps then v, as `imagen_jax.diffusion.discrete` reads them). Stage II
    (``config.noise_level_embed``) also takes ``lowres`` [B, H, W, C_low], the upsampled and
    noised low-resolution image (`imagen_jax.diffusion.discrete.noise_augment_upsampled`),
    concatenated to x, and its integer ``noise_level`` [B], embedded as a second timestep.
    ``text_embeds`` is the T5 output (IF: 77 tokens of T5-XXL, D = 4096) with no mask.
    """

    config: IFUNetConfig
    remat: bool = False  # rematerialise every residual and attention block
    attention_impl: str | None = None  # `jax.nn.dot_product_attention` implementation
    dtype: Any = "float32"
    param_dtype: Any = "float32"

    @nn.nowrap
    def check_inputs(self, x: Array, t: Array, text_embeds: Array, lowres: Array | None,
                     noise_level: Array | None) -> None:
        """One-line ValueErrors for mis-shaped or missing inputs (shapes are static)."""
        cfg = self.config
        b, height, width, channels = x.shape if x.ndim == 4 else (None,) * 4
        factor = 2 ** (cfg.num_levels - 1)
        if x.ndim != 4 or height % factor or width % factor:
            raise ValueError(f"IFUNet: x must be [B, H, W, C] with H and W divisible by "
                             f"{factor} ({cfg.num_levels} levels), got {x.shape}")
        if cfg.noise_level_embed:
            want = (b, height, width, cfg.lowres_channels)
            if lowres is None or tuple(lowres.shape) != want:
                raise ValueError(f"IFUNet: this stage II model needs lowres {want} (the "
                                 "upsampled, noised low-res image: noise_augment_upsampled), "
                                 f"got {None if lowres is None else lowres.shape}")
            if noise_level is None or tuple(noise_level.shape) != (b,):
                raise ValueError(f"IFUNet: this stage II model needs noise_level int [B={b}], "
                                 f"got {None if noise_level is None else noise_level.shape}")
        elif lowres is not None or noise_level is not None:
            raise ValueError("IFUNet: a stage I model (no class_embed_type) takes no lowres or "
                             "noise_level")
        if channels + (cfg.lowres_channels if cfg.noise_level_embed else 0) != cfg.in_channels:
            raise ValueError(f"IFUNet: x has {channels} channels; the config's in_channels "
                             f"is {cfg.in_channels}")
        if t.shape != (b,):
            raise ValueError(f"IFUNet: t must be int [B={b}], got {t.shape}")
        if text_embeds.ndim != 3 or text_embeds.shape[0] != b or (
                text_embeds.shape[-1] != cfg.text_dim):
            raise ValueError(f"IFUNet: text_embeds must be [B={b}, L, {cfg.text_dim}], got "
                             f"{text_embeds.shape}")

    @nn.compact
    def __call__(self, x: Array, t: Array, text_embeds: Array, lowres: Array | None = None,
                 noise_level: Array | None = None, train: bool = False) -> Array:
        self.check_inputs(x, t, text_embeds, lowres, noise_level)
        cfg = self.config
        kw = dict(dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))
        act = activation(cfg.act_fn)

        def embed_time(steps: Array, name: str) -> Array:
            return EmbeddingMLP(cfg.embed_dim, cfg.block_out_channels[0], name=name,
                                time_scale=_INTEGER_TIME_SCALE, activation=act,
                                **kw)(steps.astype(jnp.float32))

        emb = embed_time(t, "time_embed")
        if cfg.noise_level_embed:
            emb = emb + embed_time(noise_level, "noise_level_embed")
        if cfg.text_pool:
            emb = emb + TextPool(cfg.embed_dim, cfg.text_pool_heads, name="text_pool",
                                 **kw)(text_embeds)
        emb = activation(cfg.time_embedding_act_fn)(emb)
        emb = nn.with_logical_constraint(emb, ("batch", "channels"))
        text = text_embeds.astype(kw["dtype"])
        if cfg.encoder_hid_dim:
            text = dense(cfg.cross_attention_dim, (None, "embed"), name="text_proj", **kw)(text)
        text = nn.with_logical_constraint(text, ("batch", "length", "channels"))

        def resblock(channels: int, name: str, resample: str | None = None,
                     out_scale: float = cfg.resnet_out_scale_factor) -> Any:
            cls = _REMAT_RES_BLOCK if self.remat else IFResBlock
            return cls(channels, resample, cfg.act_fn, cfg.resnet_skip_time_act, out_scale,
                       cfg.norm_num_groups, cfg.norm_eps, cfg.dropout, not train, name=name,
                       **kw)

        def attention(h: Array, name: str, only_cross: bool) -> Array:
            cls = _REMAT_ATTENTION if self.remat else AddedKVAttention
            return cls(cfg.attention_head_dim, self.attention_impl, only_cross,
                       cfg.cross_attention_norm, cfg.norm_num_groups, name=name, **kw)(h, text)

        h = x if lowres is None else jnp.concatenate([x, lowres.astype(x.dtype)], axis=-1)
        h = constrain_image(h.astype(kw["dtype"]))
        h = Conv(cfg.block_out_channels[0], 3, channel_axes=(None, "conv_out"), name="conv_in",
                 **kw)(h)
        skips = [h]
        last = cfg.num_levels - 1
        for level, channels in enumerate(cfg.block_out_channels):
            for i in range(cfg.layers_per_block[level]):
                h = resblock(channels, f"down_{level}_res_{i}")(h, emb)
                if cfg.down_attention[level]:
                    h = attention(h, f"down_{level}_attn_{i}", cfg.only_cross_attention[level])
                skips.append(h)
            if level != last:
                h = resblock(channels, f"down_{level}_downsample", "down")(h, emb)
                skips.append(h)

        mid = cfg.block_out_channels[-1]
        h = resblock(mid, "mid_res_0", out_scale=cfg.mid_block_scale_factor)(h, emb)
        h = attention(h, "mid_attn", cfg.mid_only_cross_attention)
        h = resblock(mid, "mid_res_1", out_scale=cfg.mid_block_scale_factor)(h, emb)

        for level in reversed(range(cfg.num_levels)):
            channels = cfg.block_out_channels[level]
            for i in range(cfg.layers_per_block[level] + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = resblock(channels, f"up_{level}_res_{i}")(h, emb)
                if cfg.up_attention[level]:
                    h = attention(h, f"up_{level}_attn_{i}", cfg.only_cross_attention[level])
            if level:
                h = resblock(channels, f"up_{level}_upsample", "up")(h, emb)

        h = act(GroupNorm(cfg.norm_num_groups, kw["param_dtype"], cfg.norm_eps,
                          name="norm_out")(h))
        out = Conv(cfg.out_channels, 3, channel_axes=("conv_in", None), name="conv_out", **kw)(h)
        return constrain_image(out.astype(jnp.float32))
