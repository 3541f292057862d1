"""The configuration of a DeepFloyd IF U-Net, read from its diffusers ``unet/config.json``.

IF's stage I (IF-I-XL, 64 px) and stage II (IF-II-L, 64 -> 256 px) are both diffusers
``UNet2DConditionModel`` configs built from the same blocks: ``ResnetDownsampleBlock2D`` /
``SimpleCrossAttnDownBlock2D`` levels (resampling inside residual blocks), the
``UNetMidBlock2DSimpleCrossAttn`` middle and their up-block mirrors, with added-KV attention
(image keys/values and GroupNorm'd text keys/values in one softmax). The stages differ in options
only, all carried here: per-level block counts, a second timestep (``class_embed_type=
"timestep"``: stage II's noise level), the time-embedding activation applied once
(``time_embedding_act_fn`` + ``resnet_skip_time_act``), residual outputs divided by
``resnet_out_scale_factor`` (stage II: 1 / 0.7071), ``time_embedding_dim``.

The published configs (huggingface.co/DeepFloyd/IF-I-XL-v1.0 and IF-II-L-v1.0, ``unet/
config.json``) and diffusers' ``scripts/convert_if.py`` are the sources. Options this port does
not implement are refused by name (`ConfigError`), so an unfamiliar config never loads into a
network that silently differs from the one it was trained as.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import gin

from imagen_jax.errors import ConfigError

CONFIG_FILE = "config.json"
# A DeepFloyd IF U-Net named as the launchers and the trainer take it (``--stages=if:PATH``,
# ``TrainConfig.init_from="if:PATH"``, ``read_if_config.path``): PATH is its diffusers ``unet/``
# directory or the model directory holding one (`if_unet_dir`).
IF_PREFIX = "if:"
IF_UNET_DIR = "unet"
DOWN_BLOCKS = ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D")
UP_BLOCKS = ("ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D")
MID_BLOCK = "UNetMidBlock2DSimpleCrossAttn"
ACTIVATIONS = ("gelu", "silu", "swish")  # diffusers' names; IF uses exact "gelu"
# Attention's GroupNorm on the text tokens: diffusers' `Attention` fixes 32 groups and eps 1e-5
# (``cross_attention_norm_num_groups`` is not a UNet2DConditionModel option).
CROSS_NORM_GROUPS = 32
CROSS_NORM_EPSILON = 1e-5
# torch.nn.LayerNorm's default eps: the LayerNorms of the pooled-text embedding (TextTimeEmbedding).
LAYER_NORM_EPSILON = 1e-5
# Attention's own GroupNorm eps (diffusers' `Attention(eps=1e-5)` default).
ATTENTION_NORM_EPSILON = 1e-5

# Options this port implements only at one value: name -> the value it requires (diffusers'
# default or IF's). A config.json with another value is refused by name.
_FIXED = {
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "time_embedding_type": "positional",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "resnet_time_scale_shift": "scale_shift",
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "projection_class_embeddings_input_dim": None,
    "addition_time_embed_dim": None,
    "num_attention_heads": None,
    "attention_type": "default",
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
}
# Options that do not change the network these blocks build (SimpleCrossAttn blocks have no
# linear projection or transformer; the softmax is float32 in JAX; downsampling is by residual
# blocks, not strided convolutions).
_IGNORED = ("use_linear_projection", "upcast_attention", "downsample_padding")
_FIELDS_FROM_JSON = (
    "sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block",
    "down_block_types", "up_block_types", "mid_block_type", "only_cross_attention",
    "mid_block_only_cross_attention", "attention_head_dim", "cross_attention_dim",
    "encoder_hid_dim", "encoder_hid_dim_type", "addition_embed_type",
    "addition_embed_type_num_heads", "class_embed_type", "act_fn", "norm_num_groups",
    "norm_eps", "time_embedding_act_fn", "time_embedding_dim", "resnet_skip_time_act",
    "resnet_out_scale_factor", "mid_block_scale_factor", "cross_attention_norm", "dropout",
)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class IFUNetConfig:
    """A DeepFloyd IF U-Net's architecture (diffusers field names; lists are tuples).

    Build it with `IFUNetConfig.from_diffusers` (a config.json dict) or `read_if_config`
    (a ``unet/`` directory). Level ``l`` has ``block_out_channels[l]`` channels,
    ``layers_per_block[l]`` residual blocks going down and one more going up, and attention
    after each when its block type is a ``SimpleCrossAttn*`` one.
    """

    block_out_channels: tuple[int, ...]
    layers_per_block: tuple[int, ...]
    down_attention: tuple[bool, ...]  # per level: SimpleCrossAttnDownBlock2D
    up_attention: tuple[bool, ...]  # per level (not per up block): SimpleCrossAttnUpBlock2D
    only_cross_attention: tuple[bool, ...]  # per level: no image keys/values
    mid_only_cross_attention: bool
    attention_head_dim: int  # channels per head (diffusers' name for SimpleCrossAttn blocks)
    cross_attention_dim: int  # width of the text tokens the attention layers read
    encoder_hid_dim: int | None  # T5 width projected to cross_attention_dim (None: no proj)
    text_pool: bool  # addition_embed_type == "text": pooled raw text added to the embedding
    text_pool_heads: int
    noise_level_embed: bool  # class_embed_type == "timestep" (stage II)
    sample_size: int = 64
    in_channels: int = 3
    out_channels: int = 6
    act_fn: str = "gelu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    time_embedding_act_fn: str | None = None
    time_embedding_dim: int | None = None
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    mid_block_scale_factor: float = 1.0
    cross_attention_norm: bool = True  # "group_norm" on the text before add_k/add_v
    dropout: float = 0.0

    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def embed_dim(self) -> int:
        """Width of the timestep embedding (diffusers: time_embedding_dim or 4 x level-0)."""
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def text_dim(self) -> int:
        """Width D of the text embeddings the model is called with (T5-XXL: 4096)."""
        return self.encoder_hid_dim or self.cross_attention_dim

    @property
    def lowres_channels(self) -> int:
        """Channels of the low-res conditioning concatenated to x (stage II: 3, stage I: 0)."""
        return self.in_channels - self.out_channels // 2 if self.noise_level_embed else 0

    @classmethod
    def from_diffusers(cls, raw: dict[str, Any], where: str = "config.json") -> IFUNetConfig:
        """Parses a diffusers UNet2DConditionModel config dict; ConfigError (one line, naming
        the key) for a key this port does not know or a value it does not implement."""
        for key, value in raw.items():
            if key.startswith("_") or key in _FIELDS_FROM_JSON or key in _IGNORED:
                continue
            if key not in _FIXED:
                raise ConfigError(f"{where}: unknown UNet2DConditionModel option {key!r}; this "
                                  "reader knows DeepFloyd IF's U-Net configs only")
            if value != _FIXED[key]:
                raise ConfigError(f"{where}: {key}={value!r} is not supported (DeepFloyd IF "
                                  f"uses {_FIXED[key]!r})")
        get = raw.get
        channels = tuple(int(c) for c in get("block_out_channels", ()))
        levels = len(channels)
        if not levels:
            raise ConfigError(f"{where}: block_out_channels is missing or empty")

        def per_level(key: str, value: Any) -> tuple[Any, ...]:
            values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * levels
            if len(values) != levels:
                raise ConfigError(f"{where}: {key} has {len(values)} entries but "
                                  f"block_out_channels has {levels} levels")
            return values

        def choice(key: str, allowed: tuple[Any, ...], default: Any) -> Any:
            value = get(key, default)
            if value not in allowed:
                raise ConfigError(f"{where}: {key}={value!r} is not supported (expected one of "
                                  f"{allowed})")
            return value

        down = per_level("down_block_types", get("down_block_types", ()))
        up = per_level("up_block_types", get("up_block_types", ()))
        for key, types, allowed in (("down_block_types", down, DOWN_BLOCKS),
                                    ("up_block_types", up, UP_BLOCKS)):
            for block in types:
                if block not in allowed:
                    raise ConfigError(f"{where}: {key} entry {block!r} is not supported "
                                      f"(expected one of {allowed})")
        choice("mid_block_type", (MID_BLOCK,), None)
        head_dim = get("attention_head_dim", 8)
        cross_dim = get("cross_attention_dim", 1280)
        for key, value in (("attention_head_dim", head_dim), ("cross_attention_dim", cross_dim)):
            if not isinstance(value, int):
                raise ConfigError(f"{where}: {key}={value!r}: only one value for all levels is "
                                  "supported")
        encoder_hid_dim = get("encoder_hid_dim")
        choice("encoder_hid_dim_type", (None, "text_proj") if encoder_hid_dim else (None,), None)
        only_cross = get("only_cross_attention", False)
        mid_only_cross = get("mid_block_only_cross_attention")
        if mid_only_cross is None:  # diffusers: follows a single only_cross_attention bool
            mid_only_cross = only_cross if isinstance(only_cross, bool) else False
        return cls(
            block_out_channels=channels,
            layers_per_block=tuple(int(n) for n in per_level(
                "layers_per_block", get("layers_per_block", 2))),
            down_attention=tuple(block == DOWN_BLOCKS[1] for block in down),
            up_attention=tuple(block == UP_BLOCKS[1] for block in reversed(up)),
            only_cross_attention=tuple(bool(v) for v in per_level("only_cross_attention",
                                                                  only_cross)),
            mid_only_cross_attention=bool(mid_only_cross),
            attention_head_dim=head_dim,
            cross_attention_dim=cross_dim,
            encoder_hid_dim=encoder_hid_dim,
            text_pool=choice("addition_embed_type", (None, "text"), None) == "text",
            text_pool_heads=int(get("addition_embed_type_num_heads", 64)),
            noise_level_embed=choice("class_embed_type", (None, "timestep"), None) == "timestep",
            sample_size=int(get("sample_size") or 64),
            in_channels=int(get("in_channels", 4)),
            out_channels=int(get("out_channels", 4)),
            act_fn=choice("act_fn", ACTIVATIONS, "silu"),
            norm_num_groups=int(get("norm_num_groups", 32)),
            norm_eps=float(get("norm_eps", 1e-5)),
            time_embedding_act_fn=choice("time_embedding_act_fn", (None, *ACTIVATIONS), None),
            time_embedding_dim=get("time_embedding_dim"),
            resnet_skip_time_act=bool(get("resnet_skip_time_act", False)),
            resnet_out_scale_factor=float(get("resnet_out_scale_factor", 1.0)),
            mid_block_scale_factor=float(get("mid_block_scale_factor", 1.0)),
            cross_attention_norm=choice("cross_attention_norm", (None, "group_norm"),
                                        None) == "group_norm",
            dropout=float(get("dropout", 0.0)),
        )


def if_unet_dir(path: str) -> str:
    """The diffusers ``unet/`` directory ``path`` names (an optional ``if:`` prefix dropped):
    itself, or the model directory's ``unet/`` (IF-I-XL-v1.0/ -> IF-I-XL-v1.0/unet)."""
    path = path.removeprefix(IF_PREFIX)
    inner = os.path.join(path, IF_UNET_DIR)
    return inner if os.path.isdir(inner) else path


@gin.configurable
def read_if_config(path: str) -> IFUNetConfig:
    """`IFUNetConfig` of a diffusers ``unet/`` directory's config.json, of the model directory
    holding that ``unet/``, of ``if:`` either (`if_unet_dir`), or of the file itself.

    In gin, ``IFUNet.config = @read_if_config()`` builds the network a published config.json
    describes (gin_configs/if/stage_I.gin). Raises ConfigError (one line) if the file is absent,
    unparsable or not an IF U-Net.
    """
    path = if_unet_dir(path)
    file = path if os.path.isfile(path) else os.path.join(path, CONFIG_FILE)
    try:
        with open(file) as f:
            raw = json.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"{file} not found: a diffusers unet/ directory holds config.json "
                          "and diffusion_pytorch_model.safetensors") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from e
    name = raw.get("_class_name", "UNet2DConditionModel")
    if name != "UNet2DConditionModel":
        raise ConfigError(f"{file}: _class_name is {name!r}; DeepFloyd IF's U-Nets are "
                          "UNet2DConditionModel")
    return IFUNetConfig.from_diffusers(raw, file)
