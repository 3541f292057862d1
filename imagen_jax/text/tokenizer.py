"""SentencePiece tokenizer with T5 conventions: EOS (id 1) appended, pad id 0, fixed length."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence

import numpy as np

PAD_ID = 0
EOS_ID = 1
DEFAULT_MAX_LENGTH = 128  # not stated in the paper (PAPER_NOTES: imagen-pytorch 256, IF 77)


class VocabularyError(ValueError):
    """A missing / unreadable sentencepiece model or one that breaks T5 id conventions."""


class Tokenizer:
    """Prompts -> (ids int32 [B, L], mask bool [B, L]) with T5's EOS / padding conventions.

    A prompt that tokenizes to more than ``max_length - 1`` pieces is cut there and still ends
    with EOS (what seqio's ``append_eos_after_trim`` does); a warning says how many were dropped.
    """

    def __init__(self, spm_path: str, max_length: int = DEFAULT_MAX_LENGTH):
        import sentencepiece as spm

        if max_length < 1:
            raise ValueError(f"max_length must be >= 1 (room for EOS), got {max_length}")
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
        self.sha256 = hashlib.sha256(self.model_bytes).hexdigest()

    @property
    def vocab_size(self) -> int:
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
