"""Conditioning shared by both U-Nets: timestep / augmentation-level / pooled-text embedding."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax.nn.attention import AttentionPool
from imagen_jax.nn.layers import EmbeddingMLP, dense

Dtype = Any
Array = jax.Array


class Conditioning(nn.Module):
    """Builds the per-example embedding and the text tokens every attention layer reads.

    emb = MLP(sinusoid(t)) [+ MLP(sinusoid(aug_level)), SR models: the noise-augmentation level
    is embedded like the timestep, App. B.1] [+ attention-pooled text, App. F.1].
    Text embeddings [B, L, D_text] are projected once to ``text_cond_dim`` so the per-layer
    key/value projections do not scale with the (4096-wide T5-XXL) encoder width.
    Returns (emb [B, embed_dim], text_tokens [B, L, text_cond_dim]).
    """

    embed_dim: int
    sinusoid_dim: int
    text_cond_dim: int
    attn_pool: bool = True
    attn_pool_heads: int = 8
    use_aug_level: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: Array, text_embeds: Array, text_mask: Array,
                 aug_level: Array | None = None) -> tuple[Array, Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb = EmbeddingMLP(self.embed_dim, self.sinusoid_dim, name="time_embed", **kw)(t)
        if self.use_aug_level:
            emb = emb + EmbeddingMLP(self.embed_dim, self.sinusoid_dim, name="aug_embed",
                                     **kw)(aug_level)
        text_tokens = dense(self.text_cond_dim, (None, "embed"), name="text_proj",
                            **kw)(text_embeds.astype(self.dtype))
        text_tokens = nn.with_logical_constraint(text_tokens, ("batch", "length", "channels"))
        if self.attn_pool:
            emb = emb + AttentionPool(self.embed_dim, self.attn_pool_heads, name="text_pool",
                                      **kw)(text_tokens, text_mask)
        return nn.with_logical_constraint(emb, ("batch", "channels")), text_tokens
