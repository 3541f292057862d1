"""SentencePiece tokenizer with T5 conventions: EOS (id 1) appended, pad id 0, fixed length,
and the sentinel ids `<extra_id_0>`... after the sentencepiece pieces."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from imagen_jax.errors import CheckpointError

PAD_ID = 0
EOS_ID = 1
DEFAULT_MAX_LENGTH = 128  # not stated in the paper (PAPER_NOTES: imagen-pytorch 256, IF 77)
# T5 checkpoints reserve 100 sentinel ids after the 32000 sentencepiece pieces (seqio's default
# T5 vocabulary, Hugging Face's T5Tokenizer); the embedding table's 28 further rows are padding.
T5_EXTRA_IDS = 100


def add_sentinels(model_bytes: bytes, extra_ids: int) -> bytes:
    """A sentencepiece model proto with `extra_ids` sentinel pieces appended, as seqio does.

    Pieces ``▁<extra_id_{extra_ids-1}>`` ... ``▁<extra_id_0>`` (so ``<extra_id_0>`` gets the last
    id), user-defined: sentencepiece matches them in text (at a word start) like any piece.
    Source: ``seqio.vocabularies._load_model_internal`` (reverse_extra_ids=True, the default).
    """

    model = sentencepiece_model_pb2.ModelProto.FromString(model_bytes)
    for i in reversed(range(extra_ids)):
        model.pieces.add(piece=f"\u2581<extra_id_{i}>", score=0.0,
                         type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED)
    return model.SerializeToString()


class VocabularyError(CheckpointError):
    """A missing / unreadable sentencepiece model or one that breaks T5 id conventions."""


class Tokenizer:
    """Prompts -> (ids int32 [B, L], mask bool [B, L]) with T5's EOS / padding conventions.

    A prompt that tokenizes to more than ``max_length - 1`` pieces is cut there and still ends
    with EOS (what seqio's ``append_eos_after_trim`` does); a warning says how many were dropped.

    ``extra_ids``: number of sentinel ids after the sentencepiece pieces (T5 checkpoints: 100,
    `T5_EXTRA_IDS`; `load_t5` derives it from the checkpoint). ``<extra_id_k>`` in a prompt then
    becomes the single id ``vocab_size - 1 - k``, as with ``seqio.SentencePieceVocabulary(path,
    extra_ids=N)``; with 0 it is spelled out in character pieces.
    """

    def __init__(self, spm_path: str, max_length: int = DEFAULT_MAX_LENGTH,
                 extra_ids: int = 0):

        if max_length < 1:
            raise ValueError(f"max_length must be >= 1 (room for EOS), got {max_length}")
        if isinstance(extra_ids, bool) or not isinstance(extra_ids, int) or extra_ids < 0:
            raise ValueError(f"extra_ids must be an int >= 0 (T5: {T5_EXTRA_IDS}), got "
                             f"{extra_ids!r}")
        try:
            with open(spm_path, "rb") as f:
                self.model_bytes = f.read()
            self.processor = spm.SentencePieceProcessor(model_proto=self.model_bytes)
        except FileNotFoundError as e:
            raise VocabularyError(
                f"sentencepiece model {spm_path!r} not found; pass vocab=PATH/spiece.model"
            ) from e
        except (RuntimeError, OSError) as e:
            raise VocabularyError(f"{spm_path!r} is not a sentencepiece model: {e}") from e
        if self.processor.eos_id() != EOS_ID:
            raise VocabularyError(
                f"{spm_path!r} has eos id {self.processor.eos_id()}; T5 vocabularies use "
                f"{EOS_ID} (train with eos_id=1, pad_id=0, unk_id=2, bos_id=-1)"
            )
        if self.processor.pad_id() not in (PAD_ID, -1):
            raise VocabularyError(
                f"{spm_path!r} has pad id {self.processor.pad_id()}; T5 pads with {PAD_ID}"
            )
        self.path = spm_path
        self.max_length = int(max_length)
        # Of the file itself: the encoder fingerprint (and so every embedding cache and trained
        # stage) stays valid; extra ids only change prompts that spell out a sentinel.
        self.sha256 = hashlib.sha256(self.model_bytes).hexdigest()
        self.num_pieces = self.processor.get_piece_size()
        self.extra_ids = extra_ids
        if extra_ids:
            self.processor = spm.SentencePieceProcessor(
                model_proto=add_sentinels(self.model_bytes, extra_ids))

    @property
    def vocab_size(self) -> int:
        """Sentencepiece pieces + extra ids (the ids this tokenizer can emit)."""
        return self.processor.get_piece_size()

    def __call__(self, texts: Sequence[str] | str) -> tuple[np.ndarray, np.ndarray]:
        """Tokenizes ``texts``: returns ids int32 [B, max_length] and mask bool [B, max_length]."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("tokenize expects a list of str prompts")
        pieces = self.processor.encode(texts, out_type=int) if texts else []
        ids = np.full((len(texts), self.max_length), PAD_ID, np.int32)
        keep = self.max_length - 1
        for row, (text, p) in enumerate(zip(texts, pieces)):
            if len(p) > keep:
                preview = text if len(text) <= 40 else text[:37] + "..."
                warnings.warn(
                    f"prompt {row} ({preview!r}) is {len(p) + 1} tokens with EOS; truncated to "
                    f"max_length={self.max_length}, dropped {len(p) - keep} tokens",
                    stacklevel=2,
                )
                p = p[:keep]
            ids[row, : len(p)] = p
            ids[row, len(p)] = EOS_ID
        mask = np.zeros_like(ids, dtype=bool)
        lengths = [min(len(p), keep) + 1 for p in pieces]
        for row, n in enumerate(lengths):
            mask[row, :n] = True
        return ids, mask
