"""Frozen T5 text encoder (Imagen, Saharia et al. 2022, Section 2.1): checkpoints in, embeddings
out, sharded over a device mesh."""

from imagen_jax.text.checkpoints import CheckpointError
from imagen_jax.text.config import T5Config, UnsupportedT5ConfigError, t5_preset
from imagen_jax.text.encoder import TextEncoder, load_t5
from imagen_jax.text.t5 import T5Encoder
from imagen_jax.text.tokenizer import Tokenizer, VocabularyError

__all__ = [
    "CheckpointError",
    "T5Config",
    "T5Encoder",
    "TextEncoder",
    "Tokenizer",
    "UnsupportedT5ConfigError",
    "VocabularyError",
    "load_t5",
    "t5_preset",
]
