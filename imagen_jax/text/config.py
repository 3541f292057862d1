"""T5 encoder hyper-parameters, the public presets, and the Hugging Face ``config.json`` mapping.

Imagen conditions on a frozen T5-XXL encoder (Saharia et al. 2022, Section 2.1); the smaller
presets exist so the same code runs from a laptop to a pod. Preset numbers are those of the
public T5 releases (Raffel et al. 2020, Table 14; T5 v1.1 / Flan-T5 release notes).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import gin

from imagen_jax.errors import CheckpointError

# Activation names follow the Hugging Face `feed_forward_proj` suffixes; "gelu_new" is the tanh
# approximation that T5 v1.1 / Flan-T5 were trained with (`gated-gelu` maps to it in HF and T5X).
ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu")
DTYPES = ("float32", "bfloat16")


class UnsupportedT5ConfigError(CheckpointError):
    """A checkpoint config this encoder cannot represent; the message names the offending field."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture of a T5 encoder stack (the decoder is never built: Imagen freezes the encoder).

    Attributes:
      vocab_size: rows of the token embedding table (32128 for every public T5: 32100 pieces
        padded to a multiple of 128).
      d_model: width of the residual stream.
      num_heads, d_kv: attention heads and per-head width; ``num_heads * d_kv`` may differ from
        ``d_model`` (T5 v1.0 3B/11B, T5 v1.1 small).
      d_ff: hidden width of the feed-forward block.
      num_layers: encoder blocks.
      activation: one of ``ACTIVATIONS``.
      gated: gated feed-forward (``act(x wi_0) * (x wi_1)``, v1.1/Flan) instead of ``act(x wi)``
        (v1.0).
      relative_attention_num_buckets, relative_attention_max_distance: bucketed relative position
        bias, one table shared by every layer (T5 paper Section 2.1).
      layer_norm_epsilon: RMSNorm epsilon.
    """

    vocab_size: int = 32128
    d_model: int = 512
    num_heads: int = 8
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    activation: str = "relu"
    gated: bool = False
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise UnsupportedT5ConfigError(
                f"T5 activation {self.activation!r} is not supported; use one of {ACTIVATIONS} "
                "(Hugging Face feed_forward_proj 'relu', 'gated-gelu', 'gated-silu', ...)"
            )
        for name in ("vocab_size", "d_model", "num_heads", "d_kv", "d_ff", "num_layers"):
            if int(getattr(self, name)) <= 0:
                raise UnsupportedT5ConfigError(f"T5 config field {name} must be > 0")
        if self.relative_attention_num_buckets < 4 or self.relative_attention_num_buckets % 2:
            raise UnsupportedT5ConfigError(
                "relative_attention_num_buckets must be an even number >= 4 (bidirectional "
                f"buckets are split in halves), got {self.relative_attention_num_buckets}"
            )

    @property
    def inner_dim(self) -> int:
        """Width of the concatenated attention heads, ``num_heads * d_kv``."""
        return self.num_heads * self.d_kv

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


# (d_model, num_heads, d_kv, d_ff, num_layers) of the public encoders.
_V1_0 = {  # original T5 (ReLU FFN): Raffel et al. 2020, Section 3.7 / Table 14.
    "small": (512, 8, 64, 2048, 6),
    "base": (768, 12, 64, 3072, 12),
    "large": (1024, 16, 64, 4096, 24),
    "xl": (1024, 32, 128, 16384, 24),  # "t5-3b"
    "xxl": (1024, 128, 128, 65536, 24),  # "t5-11b"
}
_V1_1 = {  # T5 v1.1 / Flan-T5 (gated-GELU FFN, no embedding tying).
    "small": (512, 6, 64, 1024, 8),
    "base": (768, 12, 64, 2048, 12),
    "large": (1024, 16, 64, 2816, 24),
    "xl": (2048, 32, 64, 5120, 24),
    # The encoder Imagen uses (Saharia et al. 2022, Section 2.1: T5-XXL, 4.6B encoder params).
    "xxl": (4096, 64, 64, 10240, 24),
}
VARIANTS = ("v1_0", "v1_1")
SIZES = tuple(_V1_1)


@gin.configurable
def t5_preset(size: str = "xxl", variant: str = "v1_1", **overrides: Any) -> T5Config:
    """One of the public T5 encoder configurations, e.g. ``t5_preset("xxl", "v1_1")``.

    ``variant`` is ``"v1_0"`` (original T5, ReLU) or ``"v1_1"`` (T5 v1.1 and Flan-T5, gated
    GELU). ``overrides`` replace single fields (``vocab_size=...``).
    """
    variant = variant.replace(".", "_")
    table = {"v1_0": _V1_0, "v1_1": _V1_1}.get(variant)
    if table is None:
        raise UnsupportedT5ConfigError(f"unknown T5 variant {variant!r}; use one of {VARIANTS}")
    if size not in table:
        raise UnsupportedT5ConfigError(f"unknown T5 size {size!r}; use one of {tuple(table)}")
    d_model, num_heads, d_kv, d_ff, num_layers = table[size]
    act = {"v1_0": dict(activation="relu", gated=False),
           "v1_1": dict(activation="gelu_new", gated=True)}[variant]
    fields = dict(d_model=d_model, num_heads=num_heads, d_kv=d_kv, d_ff=d_ff,
                  num_layers=num_layers, **act)
    fields.update(overrides)
    return T5Config(**fields)


def _hf_activation(feed_forward_proj: str) -> tuple[str, bool]:
    """Hugging Face ``feed_forward_proj`` -> (activation, gated), with HF's own aliasing."""
    parts = feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise UnsupportedT5ConfigError(
            f"feed_forward_proj {feed_forward_proj!r} is not 'ACT' or 'gated-ACT'"
        )
    gated = len(parts) == 2
    act = parts[-1]
    if feed_forward_proj == "gated-gelu":
        act = "gelu_new"  # HF and T5X both use the tanh approximation here.
    if act not in ACTIVATIONS:
        raise UnsupportedT5ConfigError(
            f"feed_forward_proj {feed_forward_proj!r}: activation {act!r} is not supported "
            f"(supported: {ACTIVATIONS})"
        )
    return act, gated


def from_hf_config(hf: dict[str, Any]) -> T5Config:
    """Maps a Hugging Face T5 ``config.json`` dict to a ``T5Config`` (encoder fields only)."""
    model_type = hf.get("model_type", "t5")
    if model_type not in ("t5", "mt5", "umt5"):
        raise UnsupportedT5ConfigError(
            f"config.json has model_type {model_type!r}; only T5-family encoders (t5, mt5) are "
            "supported"
        )
    if model_type == "umt5":
        raise UnsupportedT5ConfigError(
            "umt5 has a relative position table per layer, this encoder shares one table "
            "(T5, mT5, Flan-T5); use a t5/mt5 checkpoint"
        )
    try:
        activation, gated = _hf_activation(hf.get("feed_forward_proj", "relu"))
        return T5Config(
            vocab_size=int(hf["vocab_size"]),
            d_model=int(hf["d_model"]),
            num_heads=int(hf["num_heads"]),
            d_kv=int(hf["d_kv"]),
            d_ff=int(hf["d_ff"]),
            num_layers=int(hf["num_layers"]),
            activation=activation,
            gated=gated,
            relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
            relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
        )
    except KeyError as e:
        raise UnsupportedT5ConfigError(f"config.json lacks the T5 field {e.args[0]!r}") from e


def to_hf_config(cfg: T5Config) -> dict[str, Any]:
    """The Hugging Face ``config.json`` dict of ``cfg`` (loadable by ``T5EncoderModel``)."""
    if cfg.activation == "gelu_new" and cfg.gated:
        ff = "gated-gelu"
    elif cfg.activation == "gelu_new":
        raise UnsupportedT5ConfigError("HF T5 cannot express a non-gated gelu_new feed-forward")
    else:
        ff = ("gated-" if cfg.gated else "") + cfg.activation
    return {
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "num_heads": cfg.num_heads,
        "d_kv": cfg.d_kv,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.num_layers,
        "num_decoder_layers": cfg.num_layers,
        "feed_forward_proj": ff,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "dropout_rate": 0.0,
        "is_encoder_decoder": True,
        "tie_word_embeddings": not cfg.gated,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }


def read_hf_config(path: str) -> T5Config:
    """Reads ``path/config.json`` with a clear error when it is missing or malformed."""
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path) as f:
            return from_hf_config(json.load(f))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{cfg_path} not found: a Hugging Face T5 directory needs its "
                                "config.json next to the safetensors") from e
    except json.JSONDecodeError as e:
        raise UnsupportedT5ConfigError(f"{cfg_path} is not valid JSON: {e}") from e
