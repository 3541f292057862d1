"""Presets and config mapping: parameter counts agree with transformers; gin presets parse."""

import dataclasses

import gin
import numpy as np
import pytest

from imagen_jax import gin_utils
from imagen_jax.text.checkpoints import param_names_and_shapes
from imagen_jax.text.config import (
    SIZES,
    VARIANTS,
    T5Config,
    UnsupportedT5ConfigError,
    from_hf_config,
    t5_preset,
    to_hf_config,
)


@pytest.mark.parametrize("variant", VARIANTS)
def test_preset_parameter_counts_match_transformers(variant):
    """Every preset, counted by jax.eval_shape, equals HF's T5EncoderModel built on 'meta'."""
    import torch  # the test extra installs both: a broken install fails, never skips
    import transformers

    for size in SIZES:
        cfg = t5_preset(size, variant)
        hf_cfg = transformers.T5Config(**to_hf_config(cfg))
        with torch.device("meta"):  # shapes only, no memory
            ref = transformers.T5EncoderModel(hf_cfg)
        n_ref = sum(p.numel() for p in ref.parameters())
        n_ours = sum(int(np.prod(s)) for s in param_names_and_shapes(cfg).values())
        assert n_ours == n_ref, (size, variant)
        assert from_hf_config(to_hf_config(cfg)) == cfg


def test_hf_activation_mapping():
    base = to_hf_config(t5_preset("small", "v1_0"))
    for proj, act, gated in [("relu", "relu", False), ("gated-gelu", "gelu_new", True),
                             ("gelu", "gelu", False), ("gated-silu", "silu", True)]:
        cfg = from_hf_config({**base, "feed_forward_proj": proj})
        assert (cfg.activation, cfg.gated) == (act, gated)
    with pytest.raises(UnsupportedT5ConfigError, match="lacks the T5 field 'd_ff'"):
        from_hf_config({k: v for k, v in base.items() if k != "d_ff"})
    with pytest.raises(UnsupportedT5ConfigError, match="unknown T5 size"):
        t5_preset("huge")
    with pytest.raises(UnsupportedT5ConfigError, match="even number"):
        dataclasses.replace(T5Config(), relative_attention_num_buckets=7)


def test_gin_presets_parse():
    try:
        gin_utils.parse(["t5/t5_1_1_xxl.gin"], finalize=False)
        cfg = gin.query_parameter("load_t5.config").scoped_configurable_fn()
        assert cfg == t5_preset("xxl", "v1_1") and cfg.d_model == 4096
    finally:
        gin.clear_config()
