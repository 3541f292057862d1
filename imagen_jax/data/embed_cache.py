"""Precomputed T5 text embeddings: a sharded on-disk cache keyed by example id.

The text encoder is frozen in Imagen (Sec. 2.1), so training can read its outputs from disk
instead of running a multi-billion-parameter encoder every step. ``build_cache`` encodes a
dataset's captions once; ``EmbeddingCache`` serves them back to the input pipeline by example id.

On-disk layout of a cache directory::

    meta.json                                  encoder fingerprint, max_length, dims, dtype, shards
    ids-SSSSS-of-NNNNN.npy                     int64 [rows]: example ids of shard S, record order
    embeds-SSSSS-of-NNNNN.array_record         one record per example (layout below)

A record is ``id`` int64 | ``mask`` uint8 [L] | embeddings of the real tokens only, row-major
``[sum(mask), D]`` in the cache dtype. Padded positions are not stored (for short captions they
are most of ``L``) and read back as zeros, which is exactly what ``TextEncoder.encode`` returns
there: cached and on-the-fly embeddings are bitwise identical in float32.

A shard is finished when its ``.array_record`` file exists: files are written under a temporary
name and renamed, so a killed run leaves no half-written shard behind and a rerun only computes
the missing shards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from typing import Any, Protocol

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging

from imagen_jax.errors import DataError

FORMAT_VERSION = 1
META_FILE = "meta.json"
# Storage dtypes; bf16 halves the disk and host->device traffic of T5-XXL embeddings (D=4096).
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# Writer options: group_size 1 makes every record randomly addressable (what the loader needs).
_WRITER_OPTIONS = "group_size:1"


class CacheError(DataError):
    """A cache directory that cannot be used as asked; the message names the fix."""


class CacheMismatchError(CacheError):
    """The cache was built with a different encoder, max_length or layout than requested."""


class TextEncoderLike(Protocol):
    """What the cache needs of ``imagen_jax.text.TextEncoder`` (see docs/DESIGN.md)."""

    max_length: int
    embed_dim: int
    fingerprint: str

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]: ...

    def encode(self, ids: Any, mask: Any) -> Any: ...


def masked_encode_fn(encoder: TextEncoderLike) -> Any:
    """``encode(ids, mask) -> float32 [B, L, D]`` for on-the-fly encoding in the trainer.

    Args:
      encoder: a ``TextEncoder`` (anything with ``encode(ids int [B, L], mask bool [B, L])``).

    Returns:
      A function of (ids int32 [B, L], mask bool [B, L]) (numpy or global ``jax.Array``s) giving
      float32 embeddings with exact zeros at padded positions, i.e. the values the cache stores
      and reads back, so a stage trains on the same inputs whether or not it uses a cache. An
      encoder built with ``zero_padding=False`` (DeepFloyd IF's convention) keeps its outputs at
      padded positions: an IF stage trains on the inputs it is sampled with.
    """
    keep_padding = getattr(encoder, "zero_padding", True) is False

    def encode(ids: Any, mask: Any) -> Any:
        embeds = jnp.asarray(encoder.encode(ids, mask), jnp.float32)
        if keep_padding:
            return embeds
        return jnp.where(jnp.asarray(mask, bool)[..., None], embeds, 0.0)

    return encode


class CaptionTable(Protocol):
    """Random-access ``(example id, caption)`` rows; ``pipeline.CaptionTable`` reads tfds."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[int, str]: ...


def _shard_name(kind: str, shard: int, num_shards: int, ext: str) -> str:
    return f"{kind}-{shard:05d}-of-{num_shards:05d}.{ext}"


def _encode_record(example_id: int, mask: np.ndarray, embeds: np.ndarray) -> bytes:
    """Serialises one example: id, mask [L] and the real-token rows of embeds [L, D]."""
    mask = np.asarray(mask, bool)
    return b"".join(
        [
            np.int64(example_id).tobytes(),
            mask.astype(np.uint8).tobytes(),
            np.ascontiguousarray(embeds[mask]).tobytes(),
        ]
    )


def _decode_record(
    record: bytes, max_length: int, embed_dim: int, dtype: np.dtype
) -> tuple[int, np.ndarray, np.ndarray]:
    """Inverse of ``_encode_record``: (id, embeds [L, D] zeros at padding, mask bool [L])."""
    example_id = int(np.frombuffer(record, np.int64, count=1)[0])
    mask = np.frombuffer(record, np.uint8, count=max_length, offset=8).astype(bool)
    rows = np.frombuffer(record, dtype, offset=8 + max_length).reshape(-1, embed_dim)
    if rows.shape[0] != mask.sum():
        raise CacheError(
            f"corrupt cache record for id {example_id}: {rows.shape[0]} embedding rows for "
            f"{mask.sum()} real tokens; rebuild the cache"
        )
    embeds = np.zeros((max_length, embed_dim), dtype)
    embeds[mask] = rows
    return example_id, embeds, mask


@dataclasses.dataclass(frozen=True)
class CacheMeta:
    """Everything that must agree between a cache and its users (stored as meta.json)."""

    encoder_fingerprint: str
    max_length: int
    embed_dim: int
    dtype: str
    num_examples: int
    shard_size: int
    dataset: dict = dataclasses.field(default_factory=dict)  # provenance, informational only
    format_version: int = FORMAT_VERSION

    @property
    def num_shards(self) -> int:
        return max(1, -(-self.num_examples // self.shard_size))

    def shard_rows(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_examples))

    @classmethod
    def load(cls, cache_dir: str) -> CacheMeta:
        path = os.path.join(cache_dir, META_FILE)
        if not os.path.exists(path):
            raise CacheError(
                f"{cache_dir!r} is not an embedding cache (no {META_FILE}); build one with "
                "`python -m launch.cache_embeddings --t5=... --dataset=... --out=DIR`"
            )
        with open(path) as f:
            raw = json.load(f)
        if raw.get("format_version") != FORMAT_VERSION:
            raise CacheError(
                f"cache {cache_dir!r} has format version {raw.get('format_version')}, this code "
                f"reads version {FORMAT_VERSION}; rebuild the cache"
            )
        return cls(**raw)

    def save(self, cache_dir: str) -> None:
        tmp = os.path.join(cache_dir, META_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=2, sort_keys=True)
        os.replace(tmp, os.path.join(cache_dir, META_FILE))


def check_encoder(
    meta: CacheMeta, cache_dir: str, fingerprint: str | None, max_length: int | None
) -> None:
    """Refuses a cache built by a different encoder (or the same one at another max_length)."""
    if fingerprint is not None and fingerprint != meta.encoder_fingerprint:
        raise CacheMismatchError(
            f"embedding cache {cache_dir!r} was built with encoder {meta.encoder_fingerprint!r} "
            f"but this run uses {fingerprint!r}; rebuild the cache with this encoder "
            "(launch.cache_embeddings --t5=...) or point the stage at the encoder it was built with"
        )
    if max_length is not None and max_length != meta.max_length:
        raise CacheMismatchError(
            f"embedding cache {cache_dir!r} holds max_length={meta.max_length} embeddings but "
            f"max_length={max_length} was requested; rebuild the cache with the new max_length "
            "or use the cache's"
        )


@dataclasses.dataclass(frozen=True)
class BuildReport:
    """What a ``build_cache`` call did."""

    num_shards: int
    computed_shards: tuple[int, ...]
    skipped_shards: tuple[int, ...]  # finished by an earlier (possibly killed) run
    seconds: float


def _commit(tmp_path: str, final_path: str) -> None:
    """Atomically publishes a finished file (rename within one directory)."""
    os.replace(tmp_path, final_path)


def _encode_rows(
    encoder: TextEncoderLike, captions: list[str], batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Encodes captions in fixed-size batches (one compiled shape); returns float32 + mask."""
    embeds, masks = [], []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start : start + batch_size]
        # Pad the last batch to batch_size so the jitted encoder never recompiles.
        padded = chunk + [""] * (batch_size - len(chunk))
        ids, mask = encoder.tokenize(padded)
        out = np.asarray(encoder.encode(ids, mask), np.float32)  # [batch, L, D]
        embeds.append(out[: len(chunk)])
        masks.append(np.asarray(mask, bool)[: len(chunk)])
    return np.concatenate(embeds), np.concatenate(masks)


def build_cache(
    out_dir: str,
    encoder: TextEncoderLike,
    captions: CaptionTable,
    *,
    shard_size: int = 4096,
    encode_batch_size: int = 64,
    dtype: str = "float32",
    dataset_info: dict | None = None,
) -> BuildReport:
    """Encodes every caption of ``captions`` into a sharded cache at ``out_dir``; resumable.

    Shards already finished in ``out_dir`` (by an earlier, possibly killed, run with the same
    encoder and layout) are kept, not recomputed. A directory built with another encoder,
    max_length, dtype or sharding is refused rather than mixed.
    """
    if dtype not in DTYPES:
        raise CacheError(f"unknown cache dtype {dtype!r}; use one of {sorted(DTYPES)}")
    if shard_size < 1 or encode_batch_size < 1:
        raise CacheError(
            f"shard_size ({shard_size}) and encode_batch_size ({encode_batch_size}) must be >= 1"
        )
    meta = CacheMeta(
        encoder_fingerprint=encoder.fingerprint,
        max_length=int(encoder.max_length),
        embed_dim=int(encoder.embed_dim),
        dtype=dtype,
        num_examples=len(captions),
        shard_size=shard_size,
        dataset=dict(dataset_info or {}),
    )
    if meta.num_examples == 0:
        raise CacheError("the caption table is empty; check the dataset split")
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, META_FILE)):
        old = CacheMeta.load(out_dir)
        check_encoder(old, out_dir, meta.encoder_fingerprint, meta.max_length)
        layout = ("dtype", "num_examples", "shard_size", "embed_dim")
        diffs = [k for k in layout if getattr(old, k) != getattr(meta, k)]
        if diffs or old.dataset != meta.dataset:
            diffs += ["dataset"] if old.dataset != meta.dataset else []
            raise CacheMismatchError(
                f"{out_dir!r} holds a cache with different {', '.join(diffs)} "
                f"({ {k: getattr(old, k) for k in diffs} } vs "
                f"{ {k: getattr(meta, k) for k in diffs} }); use a new --out directory"
            )
    else:
        meta.save(out_dir)

    start_time = time.perf_counter()
    n = meta.num_shards
    computed, skipped = [], []
    for shard in range(n):
        final = os.path.join(out_dir, _shard_name("embeds", shard, n, "array_record"))
        if os.path.exists(final):
            skipped.append(shard)
            continue
        rows = meta.shard_rows(shard)
        pairs = [captions[i] for i in rows]
        ids = np.asarray([int(p[0]) for p in pairs], np.int64)
        embeds, masks = _encode_rows(encoder, [p[1] for p in pairs], encode_batch_size)
        embeds = embeds.astype(DTYPES[dtype])
        if embeds.shape[1:] != (meta.max_length, meta.embed_dim):
            raise CacheError(
                f"encoder returned embeddings of shape {embeds.shape[1:]}, expected "
                f"(max_length, embed_dim) = {(meta.max_length, meta.embed_dim)}"
            )
        # ids file first: the shard counts as finished only once its records are renamed in.
        ids_path = os.path.join(out_dir, _shard_name("ids", shard, n, "npy"))
        with open(ids_path + ".tmp", "wb") as f:
            np.save(f, ids)
        _commit(ids_path + ".tmp", ids_path)
        # optional: only the embedding cache's on-disk format needs it
        from array_record.python.array_record_module import ArrayRecordWriter

        writer = ArrayRecordWriter(final + ".tmp", _WRITER_OPTIONS)
        for i in range(len(ids)):
            writer.write(_encode_record(ids[i], masks[i], embeds[i]))
        writer.close()
        _commit(final + ".tmp", final)
        computed.append(shard)
        logging.info("embedding cache %s: shard %d/%d done (%d rows)", out_dir, shard + 1, n,
                     len(ids))
    report = BuildReport(n, tuple(computed), tuple(skipped), time.perf_counter() - start_time)
    logging.info(
        "embedding cache %s: computed %d shards, kept %d finished ones, %.1fs",
        out_dir, len(computed), len(skipped), report.seconds,
    )
    return report


class EmbeddingCache:
    """Read side: ``lookup(example_id) -> (embeds [L, D], mask bool [L])``.

    Picklable (grain ships it to worker processes); file handles are reopened lazily.
    """

    def __init__(self, cache_dir: str):
        self.cache_dir = cache_dir
        self.meta = CacheMeta.load(cache_dir)
        n = self.meta.num_shards
        self._paths = [
            os.path.join(cache_dir, _shard_name("embeds", s, n, "array_record")) for s in range(n)
        ]
        missing = [p for p in self._paths if not os.path.exists(p)]
        if missing:
            raise CacheError(
                f"embedding cache {cache_dir!r} is incomplete ({len(missing)} of {n} shards "
                "missing, e.g. an interrupted build); rerun launch.cache_embeddings with the same "
                "arguments to finish it"
            )
        ids = np.concatenate(
            [np.load(os.path.join(cache_dir, _shard_name("ids", s, n, "npy"))) for s in range(n)]
        )
        if len(ids) != self.meta.num_examples:
            raise CacheError(
                f"cache {cache_dir!r} lists {len(ids)} ids for {self.meta.num_examples} examples; "
                "rebuild it"
            )
        # Sorted ids + their global record index: O(log N) lookup, 16 bytes per example.
        self._order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[self._order]
        dup = np.nonzero(self._sorted_ids[1:] == self._sorted_ids[:-1])[0]
        if len(dup):
            raise CacheError(
                f"example ids in cache {cache_dir!r} are not unique (e.g. "
                f"{self._sorted_ids[dup[0]]}); build it with id_feature=None (record indices)"
            )
        self._dtype = DTYPES[self.meta.dtype]
        self._reader = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_reader"] = None
        return state

    @property
    def max_length(self) -> int:
        return self.meta.max_length

    @property
    def embed_dim(self) -> int:
        return self.meta.embed_dim

    @property
    def fingerprint(self) -> str:
        return self.meta.encoder_fingerprint

    def __len__(self) -> int:
        return self.meta.num_examples

    def check_encoder(self, fingerprint: str | None, max_length: int | None = None) -> None:
        check_encoder(self.meta, self.cache_dir, fingerprint, max_length)

    def _record_index(self, example_id: int) -> int:
        pos = int(np.searchsorted(self._sorted_ids, example_id))
        if pos == len(self._sorted_ids) or self._sorted_ids[pos] != example_id:
            raise CacheError(
                f"example id {example_id} is not in the embedding cache {self.cache_dir!r} "
                f"(built for {self.meta.dataset or 'another dataset'}); rebuild the cache for "
                "this dataset and split"
            )
        return int(self._order[pos])

    def lookup(self, example_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings [L, D] (cache dtype, zeros at padding) and mask bool [L] of one example."""
        if self._reader is None:
            # optional: only the embedding cache's on-disk format needs it
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            self._reader = ArrayRecordDataSource(self._paths)
        record = self._reader[self._record_index(int(example_id))]
        got_id, embeds, mask = _decode_record(record, self.max_length, self.embed_dim, self._dtype)
        if got_id != example_id:
            raise CacheError(
                f"cache {self.cache_dir!r} is inconsistent: id index points {example_id} at a "
                f"record of id {got_id}; rebuild it"
            )
        return embeds, mask
