"""The `Cascade` runtime: stages + sharded parameters + text encoder + compiled programs.

The batch is split over the mesh's data axes (``partitioning.BATCH_AXES``); parameters use the
same logical-axis rules the trainer shards them with, so a cascade restored onto any mesh samples
without gathering weights on one device. Large requests run in chunks of ``max_batch`` through
one compiled program.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from imagen_jax import partitioning
from imagen_jax.cascade.params import param_shardings
from imagen_jax.cascade.program import check_chain, check_text_encoder, sample_cascade
from imagen_jax.cascade.progress import Progress
from imagen_jax.data.images import uint8_to_unit, unit_to_uint8
from imagen_jax.errors import CascadeError
from imagen_jax.stage import Stage

PyTree = Any



def _non_finite_images(x: np.ndarray) -> list[int]:
    """Indices (leading axis) of the images in ``x`` holding a NaN or Inf."""
    if x.size == 0:
        return []
    flat = x.reshape(len(x), -1) if x.ndim > 1 else x.reshape(-1, 1)
    return [int(i) for i in np.flatnonzero(~np.isfinite(flat).all(axis=1))]


def to_uint8(images: np.ndarray | jax.Array) -> np.ndarray:
    """float [-1, 1] [N, ...] -> uint8 [0, 255] (round to nearest).

    Raises ``CascadeError`` if any value is NaN/Inf: numpy would cast NaN to 0, a black pixel.
    """
    x = np.asarray(images, np.float32)
    bad = _non_finite_images(x)
    if bad:
        raise CascadeError(
            f"images {bad[:8]} hold NaN/Inf values; refusing to turn them into black pixels"
        )
    return unit_to_uint8(x)


def from_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] (or float already in [-1, 1]) [N, r, r, 3] -> float32 [-1, 1].

    Raises ``CascadeError`` for float images outside [-1, 1] or holding NaN/Inf (naming the
    image's index): such inputs would make every output pixel NaN.
    """
    x = np.asarray(images)
    if x.dtype == np.uint8:
        return uint8_to_unit(x)
    x = x.astype(np.float32)
    bad = _non_finite_images(x)
    if bad:
        count = int((~np.isfinite(x[bad[0]])).sum())
        raise CascadeError(
            f"low-resolution image {bad[0]} (of {len(x)}) holds {count} NaN/Inf value(s)"
            + (f", and images {bad[1:8]} hold more" if len(bad) > 1 else "")
            + "; pass finite pixels (uint8 [0, 255] or float [-1, 1])"
        )
    if x.size and (x.min() < -1.001 or x.max() > 1.001):
        raise CascadeError(
            "float low-resolution images must lie in [-1, 1]; pass uint8 [0, 255] or rescale"
        )
    return x


@dataclasses.dataclass
class CascadeOutput:
    """Images of every stage that ran (uint8 [N, R, R, 3]; ``float_images``: float32 [-1, 1]),
    plus the prompt of each image, the seed and wall-clock timings."""

    images: list[np.ndarray]
    float_images: list[np.ndarray]
    prompts: list[str]
    seed: int
    timings: dict[str, float]

    @property
    def final(self) -> np.ndarray:
        return self.images[-1]


class Cascade:
    """Stages with their parameters on a mesh, an optional text encoder, and compiled programs.

    Build with ``Cascade(stages, params, text_encoder=...)`` (random or in-memory parameters) or
    ``Cascade.from_checkpoints(stage_dirs, t5=...)``. ``sample(prompts, seed)`` returns uint8
    images of every stage that ran.

    Discrete (DeepFloyd IF) stages are guided towards their unconditional condition, the encoded
    EMPTY prompt: ``null_embeds`` float [L, D], computed with ``text_encoder`` when not given
    (without either, such a stage can only run unguided).
    """

    def __init__(
        self,
        stages: Sequence[Stage],
        params: Sequence[PyTree],
        *,
        text_encoder: Any = None,
        mesh: Mesh | None = None,
        rules: partitioning.LogicalRules | None = None,
        embed_dim: int | None = None,
        max_batch: int | None = None,
        null_embeds: np.ndarray | jax.Array | None = None,
    ):
        stages = list(stages)
        if len(params) != len(stages):
            raise CascadeError(f"got {len(stages)} stages but {len(params)} parameter trees")
        # Continuous stages read zeroed padding (`sample_cascade` zeroes it for them when the
        # encoder keeps it for IF stages), discrete ones kept padding: each stage is compared
        # with the encoder's fingerprint in its own mode.
        check_chain(stages, getattr(text_encoder, "fingerprint_for", None)
                    or getattr(text_encoder, "fingerprint", None))
        if text_encoder is not None:
            check_text_encoder(stages, text_encoder)
        self._padding_kept = getattr(text_encoder, "zero_padding", True) is False
        self.stages = stages
        self.mesh = mesh if mesh is not None else partitioning.make_mesh()
        self.rules = tuple(rules if rules is not None else partitioning.logical_axis_rules())
        self.text_encoder = text_encoder
        self.embed_dim = (
            embed_dim
            or getattr(text_encoder, "embed_dim", None)
            or next((s.text_embed_dim for s in stages if s.text_embed_dim), None)
        )
        if text_encoder is not None and stages[0].text_embed_dim not in (None, self.embed_dim):
            raise CascadeError(
                f"the text encoder makes {self.embed_dim}-dim embeddings but the stages were "
                f"trained on {stages[0].text_embed_dim}-dim ones; load their T5"
            )
        self.params = [self._shard_params(s, p) for s, p in zip(stages, params)]
        if null_embeds is None and text_encoder is not None and any(
                s.is_discrete for s in stages):
            null_embeds = text_encoder([""])[0][0]
        # An argument of the program (replicated), not a constant; None when no stage reads it.
        self.null_embeds = None if null_embeds is None else jax.device_put(
            jnp.asarray(null_embeds, jnp.float32), partitioning.replicated(self.mesh))
        self.max_batch = max_batch
        if max_batch is not None and max_batch % self.batch_multiple:
            raise CascadeError(
                f"max_batch {max_batch} must be a multiple of the {self.batch_multiple} batch "
                "shards of the mesh"
            )
        self._text_parts = _text_encoder_parts(text_encoder) if text_encoder is not None else None
        # T5 parameters enter the program as (replicated) arguments, never as constants.
        self._text_params = None
        if self._text_parts is not None:
            self._text_params = jax.tree_util.tree_map(
                lambda x: x if _on_mesh(x, self.mesh) else jax.device_put(
                    x, partitioning.replicated(self.mesh)),
                self._text_parts[1],
            )
        self._programs: dict[Any, Any] = {}
        self._compiled: dict[Any, Any] = {}
        self._progress: dict[Any, Progress | None] = {}

    # -- parameters --------------------------------------------------------------------------

    def _param_shardings(self, stage: Stage, params: PyTree) -> PyTree:
        """The trainer's shardings for ``stage``'s parameters on this cascade's mesh."""
        return param_shardings(stage, self.mesh, self.rules, params)

    def _shard_params(self, stage: Stage, params: PyTree) -> PyTree:
        if isinstance(params, dict) and "params" in params and len(params) == 1:
            params = params["params"]
        params = nn.meta.unbox(params)
        return jax.device_put(params, self._param_shardings(stage, params))

    # -- the compiled program ----------------------------------------------------------------

    @property
    def batch_multiple(self) -> int:
        """Batch sizes are padded to a multiple of the number of batch shards."""
        return int(
            np.prod([self.mesh.shape[a] for a in partitioning.BATCH_AXES if a in self.mesh.shape])
        )

    def _slice(self, start: int, stop: int | None) -> tuple[int, int]:
        n = len(self.stages)
        stop = n if stop is None else stop
        if not (0 <= start < stop <= n):
            raise CascadeError(
                f"cascade slice [{start}:{stop}] is empty or out of range for {n} stages"
            )
        return start, stop

    def program(
        self, start: int = 0, stop: int | None = None, *, encode: bool, progress: bool = False
    ) -> Callable[..., tuple[jax.Array, ...]]:
        """The jitted cascade for ``stages[start:stop]``.

        Signature: ``fn(params, text_params, text, text_mask, rng, lowres, null_embeds)`` where
        ``text`` is int32 token ids [B, L] when ``encode`` (T5 runs inside the program) else
        float embeddings [B, L, D]; ``text_params`` is None without encoding; ``lowres`` is None
        unless ``stages[start]`` is an SR stage; ``null_embeds`` is ``self.null_embeds``.
        Returns each stage's float images [B, R_i, R_i, 3], then each stage's bool [B] "this
        image came out finite" (``sample_stage``), all sharded over the batch: ``Cascade.sample``
        checks the flags on the host.
        """
        start, stop = self._slice(start, stop)
        key = self._program_key(start, stop, encode, progress)
        if key in self._programs:
            return self._programs[key]
        stages = self.stages[start:stop]
        if encode and self._text_parts is None:
            raise CascadeError("this cascade has no text encoder; pass text embeddings instead")
        encode_fn = self._text_parts[0] if encode else None
        batch_spec = partitioning.batch_sharding
        mesh = self.mesh
        tracker = Progress(stages, start, enabled=True) if progress else None
        self._progress[key] = tracker

        def on_step(index, t):
            jax.debug.callback(lambda tt: tracker(index, tt), t)

        def cascade_fn(params, text_params, text, text_mask, rng, lowres, null_embeds):
            if encode:
                embeds = encode_fn(text_params, text, text_mask)
            else:
                embeds = text
            embeds = jax.lax.with_sharding_constraint(
                embeds.astype(jnp.float32), batch_spec(mesh, 3)
            )
            if lowres is not None:
                lowres = jax.lax.with_sharding_constraint(lowres, batch_spec(mesh, 4))
            outs, finite = sample_cascade(
                stages,
                params,
                embeds,
                text_mask,
                rng,
                lowres,
                first_stage_index=start,
                on_step=on_step if progress else None,
                return_finite=True,
                null_embeds=null_embeds,
                padding_kept=encode and self._padding_kept,
            )
            images = tuple(jax.lax.with_sharding_constraint(o, batch_spec(mesh, 4)) for o in outs)
            return images + tuple(finite)

        out_shardings = tuple(batch_spec(mesh, 4) for _ in stages) + tuple(
            batch_spec(mesh, 1) for _ in stages
        )
        fn = jax.jit(cascade_fn, out_shardings=out_shardings)
        self._programs[key] = fn
        return fn

    @staticmethod
    def _program_key(start: int, stop: int, encode: bool, progress: bool) -> tuple:
        return (start, stop, encode, progress)

    def _abstract_inputs(
        self, batch_size: int, start: int, encode: bool, text_length: int | None
    ) -> tuple[Any, Any, Any]:
        """ShapeDtypeStructs (with batch shardings) of (text, text_mask, lowres)."""
        if batch_size % self.batch_multiple:
            raise CascadeError(
                f"batch_size {batch_size} is not a multiple of the {self.batch_multiple} batch "
                "shards of the mesh"
            )
        null_length = None if self.null_embeds is None else self.null_embeds.shape[0]
        length = (text_length or getattr(self.text_encoder, "max_length", None) or null_length
                  or 16)
        shard = partitioning.batch_sharding
        b = batch_size
        if encode:
            text = jax.ShapeDtypeStruct((b, length), jnp.int32, sharding=shard(self.mesh, 2))
        else:
            if self.embed_dim is None:
                raise CascadeError("embed_dim unknown: pass embed_dim= or a text encoder")
            text = jax.ShapeDtypeStruct(
                (b, length, self.embed_dim), jnp.float32, sharding=shard(self.mesh, 3)
            )
        mask = jax.ShapeDtypeStruct((b, length), jnp.bool_, sharding=shard(self.mesh, 2))
        lowres = None
        if self.stages[start].is_super_res:
            r = self.stages[start].lowres_resolution
            lowres = jax.ShapeDtypeStruct((b, r, r, 3), jnp.float32, sharding=shard(self.mesh, 4))
        return text, mask, lowres

    def lower(
        self,
        batch_size: int,
        *,
        start: int = 0,
        stop: int | None = None,
        encode: bool = False,
        progress: bool = False,
        text_length: int | None = None,
    ) -> jax.stages.Lowered:
        """Lowers the program for ``batch_size`` examples (HLO inspection, AOT compilation).

        ``batch_size`` must be a multiple of ``batch_multiple``; ``text_length`` defaults to the
        encoder's ``max_length``, else to the length of ``null_embeds``.
        """
        start, stop = self._slice(start, stop)
        fn = self.program(start, stop, encode=encode, progress=progress)
        text, mask, lowres = self._abstract_inputs(batch_size, start, encode, text_length)
        text_params = self._text_params if encode else None
        with _mesh_context(self.mesh), nn.logical_axis_rules(self.rules):
            return fn.lower(self.params[start:stop], text_params, text, mask, self._rng(0), lowres,
                            self.null_embeds)

    def compile(self, batch_size: int, **kwargs: Any) -> jax.stages.Compiled:
        """The compiled program (cached per slice, batch size, text length and mode)."""
        key = (batch_size, tuple(sorted(kwargs.items())))
        if key not in self._compiled:
            self._compiled[key] = self.lower(batch_size, **kwargs).compile()
        return self._compiled[key]

    def _rng(self, seed: int) -> jax.Array:
        return jax.device_put(jax.random.PRNGKey(seed), partitioning.replicated(self.mesh))

    # -- user entry points -------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and mask for ``prompts`` (long prompts are truncated with a warning).

        With a discrete (DeepFloyd IF) stage the prompts are lower-cased and stripped first, as
        IF's pipelines do to every prompt (`IFPipeline._text_preprocessing`; its optional
        ``clean_caption`` rewriting, which needs bs4 and ftfy, is not reproduced).
        """
        if self.text_encoder is None:
            raise CascadeError("this cascade has no text encoder; pass text embeddings instead")
        prompts = list(prompts)
        if any(s.is_discrete for s in self.stages):
            prompts = [p.lower().strip() for p in prompts]
        # The tokenizer cuts prompts at max_length (keeping EOS) and warns about each one.
        ids, mask = self.text_encoder.tokenize(prompts)
        return np.asarray(ids, np.int32), np.asarray(mask, bool)

    def sample(
        self,
        prompts: Sequence[str] | str | None = None,
        seed: int = 0,
        *,
        num_per_prompt: int = 1,
        text_embeds: np.ndarray | None = None,
        text_mask: np.ndarray | None = None,
        lowres: np.ndarray | None = None,
        start: int = 0,
        stop: int | None = None,
        progress: bool = False,
    ) -> CascadeOutput:
        """Samples ``num_per_prompt`` images per prompt through ``stages[start:stop]``.

        Give ``prompts`` (T5 runs inside the compiled program) or ``text_embeds`` [N, L, D] +
        ``text_mask`` [N, L]. For a slice starting at an SR stage also give ``lowres``
        (uint8 or [-1, 1] float [N, r, r, 3], one per prompt). Images are ordered prompt-major
        (prompt 0's samples first). With ``max_batch`` set, the work runs in chunks of that size
        through one compiled program; chunk k draws its randomness from ``fold_in(seed, k)``.
        """
        start, stop = self._slice(start, stop)
        if num_per_prompt < 1:
            raise CascadeError(f"num_per_prompt must be >= 1, got {num_per_prompt}")
        if (prompts is None) == (text_embeds is None):
            raise CascadeError("pass exactly one of prompts= and text_embeds=")
        encode = prompts is not None
        if encode:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            if not prompts:
                raise CascadeError("no prompts given; pass at least one prompt")
            text, mask = self.tokenize(prompts)
            n = len(prompts)
        else:
            text = np.asarray(text_embeds, np.float32)
            if text.ndim != 3:
                raise CascadeError(f"text_embeds must be [N, L, D], got shape {text.shape}")
            mask = (
                np.ones(text.shape[:2], bool) if text_mask is None else np.asarray(text_mask, bool)
            )
            if mask.shape != text.shape[:2]:
                raise CascadeError(
                    f"text_mask shape {mask.shape} does not match text_embeds {text.shape[:2]}"
                )
            if self.embed_dim is not None and text.shape[-1] != self.embed_dim:
                raise CascadeError(
                    f"text_embeds have dimension {text.shape[-1]} but the stages expect "
                    f"{self.embed_dim}"
                )
            bad = _non_finite_images(text)
            if bad:
                raise CascadeError(
                    f"text_embeds of prompt {bad[0]} (of {len(text)}) hold NaN/Inf values; pass "
                    "finite embeddings"
                )
            n = text.shape[0]
            prompts = [f"<embedding {i}>" for i in range(n)]
        low = self._check_lowres(lowres, start, n)
        if self.null_embeds is not None and self.null_embeds.shape[0] != text.shape[1]:
            raise CascadeError(
                f"the empty prompt's embeddings have {self.null_embeds.shape[0]} tokens but the "
                f"prompts' have {text.shape[1]}; encode both to the same length")

        # Prompt-major repetition; chunks padded to a multiple of the batch shards.
        text = np.repeat(text, num_per_prompt, axis=0)
        mask = np.repeat(mask, num_per_prompt, axis=0)
        low = None if low is None else np.repeat(low, num_per_prompt, axis=0)
        total = n * num_per_prompt
        chunk = self.max_batch or -(-total // self.batch_multiple) * self.batch_multiple
        kwargs = dict(start=start, stop=stop, encode=encode, progress=progress,
                      text_length=text.shape[1])
        t0 = time.perf_counter()
        compiled = self.compile(chunk, **kwargs)
        timings = {"compile_s": time.perf_counter() - t0}
        text_params = self._text_params if encode else None
        shard = partitioning.batch_sharding
        outs: list[list[np.ndarray]] = []
        num_stages = stop - start
        tracker = self._progress.get(self._program_key(start, stop, encode, progress))
        t0 = time.perf_counter()
        for k, lo in enumerate(range(0, total, chunk)):
            hi = min(lo + chunk, total)
            args = [_pad(text[lo:hi], chunk), _pad(mask[lo:hi], chunk)]
            args = [jax.device_put(a, shard(self.mesh, a.ndim)) for a in args]
            chunk_low = None
            if low is not None:
                chunk_low = jax.device_put(_pad(low[lo:hi], chunk), shard(self.mesh, 4))
            rng = self._rng(seed) if lo == 0 else jax.device_put(
                jax.random.fold_in(jax.random.PRNGKey(seed), k),
                partitioning.replicated(self.mesh),
            )
            with _mesh_context(self.mesh), nn.logical_axis_rules(self.rules):
                result = compiled(self.params[start:stop], text_params, *args, rng, chunk_low,
                                  self.null_embeds)
            result = [np.asarray(o)[: hi - lo] for o in jax.block_until_ready(result)]
            try:
                self._check_finite(result[num_stages:], start, lo, seed)
            except CascadeError:
                if tracker is not None:
                    tracker.close()
                    tracker.reset()
                raise
            outs.append(result[:num_stages])
        timings["sample_s"] = time.perf_counter() - t0
        if tracker is not None:
            tracker.close()
            timings.update(tracker.stage_seconds())
            tracker.reset()
        float_images = [np.concatenate(parts, axis=0) for parts in zip(*outs)]
        return CascadeOutput(
            images=[to_uint8(x) for x in float_images],
            float_images=float_images,
            prompts=[p for p in prompts for _ in range(num_per_prompt)],
            seed=seed,
            timings=timings,
        )

    def _check_finite(self, finite: Sequence[np.ndarray], start: int, offset: int,
                      seed: int) -> None:
        """Raises ``CascadeError`` naming the first stage whose images came out NaN/Inf.

        ``finite[i]`` is stage ``start + i``'s bool [b] from the compiled program; ``offset`` is
        the index of the chunk's first image. Later stages inherit a NaN, so the first is named.
        """
        for i, ok in enumerate(finite):
            bad = np.flatnonzero(~np.asarray(ok, bool))
            if bad.size:
                stage = self.stages[start + i]
                raise CascadeError(
                    f"stage {start + i} ({stage.name or 'unnamed'}) produced NaN/Inf pixels in "
                    f"{bad.size} of {len(ok)} images (first: image {offset + int(bad[0])}, seed "
                    f"{seed}); its parameters have probably diverged or hold NaN: sample an "
                    "earlier checkpoint of that stage. No images were returned."
                )

    def _check_lowres(self, lowres: np.ndarray | None, start: int, n: int) -> np.ndarray | None:
        first = self.stages[start]
        if not first.is_super_res:
            if lowres is not None:
                raise CascadeError(
                    "lowres images are only used when the slice starts at an SR stage"
                )
            return None
        if lowres is None:
            raise CascadeError(
                f"the slice starts at SR stage {start} ({first.name}): pass lowres images of "
                f"{first.lowres_resolution}px"
            )
        low = from_uint8(lowres)
        want = (n, first.lowres_resolution, first.lowres_resolution, 3)
        if low.shape != want:
            raise CascadeError(
                f"lowres images have shape {low.shape}; stage {start} ({first.name}) expects "
                f"{want} (one {first.lowres_resolution}px RGB image per prompt)"
            )
        return low

    def sample_fn(self, **kwargs: Any) -> Callable[[list[str], int], np.ndarray]:
        """``sample_fn(prompts, seed) -> uint8 [N, H, W, 3]`` (final stage) for the eval tools."""

        def fn(prompts: list[str], seed: int) -> np.ndarray:
            return self.sample(prompts, seed, **kwargs).final

        return fn


def _mesh_context(mesh: Mesh) -> Any:
    """Makes ``mesh`` current while tracing, so the U-Nets' logical activation constraints apply
    (``partitioning.mesh_context``: ``jax.set_mesh``; the legacy ``with mesh:`` drops them)."""
    return partitioning.mesh_context(mesh)


def _on_mesh(x: Any, mesh: Mesh) -> bool:
    sharding = getattr(x, "sharding", None)
    return isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh == mesh


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    """Pads the leading axis to ``size`` by repeating the last row (never seen by users)."""
    if x.shape[0] == size:
        return x
    reps = np.repeat(x[-1:], size - x.shape[0], axis=0)
    return np.concatenate([x, reps], axis=0)


def _text_encoder_parts(encoder: Any) -> tuple[Callable[..., jax.Array], PyTree]:
    """(pure ``encode(params, ids, mask) -> [B, L, D]``, params) of a ``TextEncoder``.

    The parameters are passed into the compiled cascade as arguments (not closed-over
    constants) so a large T5 is not baked into the program.
    """
    if hasattr(encoder, "encode_fn") and hasattr(encoder, "params"):
        return encoder.encode_fn, encoder.params
    module = getattr(encoder, "model", None) or getattr(encoder, "module", None)
    if isinstance(module, nn.Module) and hasattr(encoder, "params"):

        def encode(params, ids, mask):
            return module.apply({"params": params}, ids, mask)

        return encode, encoder.params
    raise CascadeError(
        f"text encoder {type(encoder).__name__} exposes neither (encode_fn, params) nor "
        "(model, params); use imagen_jax.text.load_t5"
    )
