"""The FID InceptionV3 (pool3, 2048-d) in Flax, matching ``pytorch_fid.inception.InceptionV3``.

FID is only comparable across papers when computed with the exact network of the original TF
implementation (``inception-2015-12-05``), which pytorch-fid and torch-fidelity port to PyTorch.
That network differs from torchvision's Inception in four places, reproduced here:
  * average pools in the A/C/E_1 blocks exclude the zero padding from the mean (TF semantics);
  * the last E block (``Mixed_7c``) pools with a *max* pool, not an average pool;
  * inputs are resized bilinearly to 299x299 with ``align_corners=False`` and no anti-aliasing
    (``torch.nn.functional.interpolate``), then mapped to [-1, 1];
  * BatchNorm epsilon 1e-3 (as in TF).
Submodule names equal the PyTorch attribute names, so weight conversion is a rename + transpose.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import freeze
from jax.sharding import Mesh

from imagen_jax import partitioning
from imagen_jax.data.images import uint8_to_unit
from imagen_jax.eval.weights import load_state_dict

INCEPTION_RESOLUTION = 299  # The TF FID graph's input size.
POOL3_DIM = 2048
BN_EPSILON = 1e-3  # TF BatchNorm epsilon of the 2015 Inception graph.

Padding = tuple[tuple[int, int], tuple[int, int]]


def _pad(kernel: tuple[int, int]) -> Padding:
    """'Same' padding for odd kernels with stride 1 (what the PyTorch port spells out)."""
    return ((kernel[0] // 2, kernel[0] // 2), (kernel[1] // 2, kernel[1] // 2))


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (inference statistics) -> ReLU."""

    features: int
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: Padding | str = "VALID"
    precision: str | None = "highest"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=self.strides,
            padding=self.padding,
            use_bias=False,
            precision=self.precision,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")
            ),
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3_exclude_pad(x: jax.Array) -> jax.Array:
    # TF's average pool divides by the number of real (unpadded) pixels in the window.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionBlock(nn.Module):
    """A network of `BasicConv2d` units run at one matmul / conv ``precision`` (keyword-only, so
    that each block's own fields come first); ``self.conv(features, kernel, ...)`` builds one."""

    precision: str | None = dataclasses.field(default="highest", kw_only=True)

    def conv(self, features: int, kernel: tuple[int, int], **kwargs: Any) -> BasicConv2d:
        return BasicConv2d(features, kernel, precision=self.precision, **kwargs)


class InceptionA(InceptionBlock):
    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.conv(64, (1, 1), name="branch1x1")(x)
        b5 = self.conv(48, (1, 1), name="branch5x5_1")(x)
        b5 = self.conv(64, (5, 5), padding=_pad((5, 5)), name="branch5x5_2")(b5)
        b3 = self.conv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = self.conv(96, (3, 3), padding=_pad((3, 3)), name="branch3x3dbl_2")(b3)
        b3 = self.conv(96, (3, 3), padding=_pad((3, 3)), name="branch3x3dbl_3")(b3)
        pooled = _avg_pool_3x3_exclude_pad(x)
        bp = self.conv(self.pool_features, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(InceptionBlock):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.conv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
        bd = self.conv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = self.conv(96, (3, 3), padding=_pad((3, 3)), name="branch3x3dbl_2")(bd)
        bd = self.conv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(InceptionBlock):
    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        b1 = self.conv(192, (1, 1), name="branch1x1")(x)
        b7 = self.conv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = self.conv(c7, (1, 7), padding=_pad((1, 7)), name="branch7x7_2")(b7)
        b7 = self.conv(192, (7, 1), padding=_pad((7, 1)), name="branch7x7_3")(b7)
        bd = self.conv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = self.conv(c7, (7, 1), padding=_pad((7, 1)), name="branch7x7dbl_2")(bd)
        bd = self.conv(c7, (1, 7), padding=_pad((1, 7)), name="branch7x7dbl_3")(bd)
        bd = self.conv(c7, (7, 1), padding=_pad((7, 1)), name="branch7x7dbl_4")(bd)
        bd = self.conv(192, (1, 7), padding=_pad((1, 7)), name="branch7x7dbl_5")(bd)
        bp = self.conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(InceptionBlock):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.conv(192, (1, 1), name="branch3x3_1")(x)
        b3 = self.conv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
        b7 = self.conv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = self.conv(192, (1, 7), padding=_pad((1, 7)), name="branch7x7x3_2")(b7)
        b7 = self.conv(192, (7, 1), padding=_pad((7, 1)), name="branch7x7x3_3")(b7)
        b7 = self.conv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(InceptionBlock):
    """``max_pool_branch``: the FID graph's last block (Mixed_7c) max-pools its pool branch."""

    max_pool_branch: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.conv(320, (1, 1), name="branch1x1")(x)
        b3 = self.conv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                self.conv(384, (1, 3), padding=_pad((1, 3)), name="branch3x3_2a")(b3),
                self.conv(384, (3, 1), padding=_pad((3, 1)), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = self.conv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = self.conv(384, (3, 3), padding=_pad((3, 3)), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                self.conv(384, (1, 3), padding=_pad((1, 3)), name="branch3x3dbl_3a")(bd),
                self.conv(384, (3, 1), padding=_pad((3, 1)), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        if self.max_pool_branch:
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3_exclude_pad(x)
        bp = self.conv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3FID(InceptionBlock):
    """Input float [B, 299, 299, 3] in [-1, 1] -> pool3 features float32 [B, 2048].

    ``precision``: matmul/conv precision; "highest" keeps float32 on TPU/GPU so features match
    the reference to ~1e-5 (lower precision shifts FID by more than papers' error bars).
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)  # [B, 149, 149, 32]
        x = self.conv(32, (3, 3), name="Conv2d_2a_3x3")(x)  # [B, 147, 147, 32]
        x = self.conv(64, (3, 3), padding=_pad((3, 3)), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)  # [B, 73, 73, 64]
        x = self.conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = self.conv(192, (3, 3), name="Conv2d_4a_3x3")(x)  # [B, 71, 71, 192]
        x = _max_pool_3x3_s2(x)  # [B, 35, 35, 192]
        x = InceptionA(32, precision=self.precision, name="Mixed_5b")(x)
        x = InceptionA(64, precision=self.precision, name="Mixed_5c")(x)
        x = InceptionA(64, precision=self.precision, name="Mixed_5d")(x)  # [B, 35, 35, 288]
        x = InceptionB(precision=self.precision, name="Mixed_6a")(x)  # [B, 17, 17, 768]
        for name, c7 in (
            ("Mixed_6b", 128),
            ("Mixed_6c", 160),
            ("Mixed_6d", 160),
            ("Mixed_6e", 192),
        ):
            x = InceptionC(c7, precision=self.precision, name=name)(x)
        x = InceptionD(precision=self.precision, name="Mixed_7a")(x)  # [B, 8, 8, 1280]
        x = InceptionE(False, precision=self.precision, name="Mixed_7b")(x)
        x = InceptionE(True, precision=self.precision, name="Mixed_7c")(x)  # [B, 8, 8, 2048]
        return jnp.mean(x, axis=(1, 2))  # adaptive average pool to 1x1


# ----------------------------------------------------------------------------- preprocessing


def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """float32 [out, in] matrix of ``F.interpolate(mode="bilinear", align_corners=False)``.

    Source coordinate ``(dst + 0.5) * in / out - 0.5`` clamped at 0, linear between its two
    neighbours (the right one clamped to the edge); no anti-aliasing when downsampling. The
    coordinates are computed in float32 like PyTorch's CPU/GPU kernels, so the weights agree to
    the last bit rather than to float32 rounding of a float64 formula.
    """
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    src = scale * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5)
    src = np.maximum(src, f32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = np.clip(src - i0.astype(f32), f32(0.0), f32(1.0)).astype(np.float64)
    m = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), 1.0 - frac)
    np.add.at(m, (rows, i1), frac)
    return m.astype(np.float32)


def preprocess(images: jax.Array, size: int = INCEPTION_RESOLUTION) -> jax.Array:
    """uint8 [B, H, W, 3] or float [B, H, W, 3] in [-1, 1] -> float32 [B, size, size, 3] in [-1, 1].

    Resizing is linear with rows summing to 1, so resizing in [-1, 1] equals pytorch-fid's
    resize in [0, 1] followed by ``2x - 1``.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"Inception input must be [B, H, W, 3], got shape {images.shape}")
    if images.dtype == jnp.uint8:
        x = uint8_to_unit(images)
    else:
        x = images.astype(jnp.float32)
    h, w = images.shape[1:3]
    if (h, w) != (size, size):
        rh = jnp.asarray(bilinear_resize_matrix(h, size))
        rw = jnp.asarray(bilinear_resize_matrix(w, size))
        hp = jax.lax.Precision.HIGHEST
        x = jnp.einsum("oh,bhwc->bowc", rh, x, precision=hp)
        x = jnp.einsum("pw,bowc->bopc", rw, x, precision=hp)
    return x


# ----------------------------------------------------------------------------- weights

# pytorch_fid.inception.InceptionV3 (the wrapper) stores the torchvision modules as blocks.i.j.
_WRAPPER_BLOCKS = {
    "blocks.0.0": "Conv2d_1a_3x3",
    "blocks.0.1": "Conv2d_2a_3x3",
    "blocks.0.2": "Conv2d_2b_3x3",
    "blocks.1.0": "Conv2d_3b_1x1",
    "blocks.1.1": "Conv2d_4a_3x3",
    "blocks.2.0": "Mixed_5b",
    "blocks.2.1": "Mixed_5c",
    "blocks.2.2": "Mixed_5d",
    "blocks.2.3": "Mixed_6a",
    "blocks.2.4": "Mixed_6b",
    "blocks.2.5": "Mixed_6c",
    "blocks.2.6": "Mixed_6d",
    "blocks.2.7": "Mixed_6e",
    "blocks.3.0": "Mixed_7a",
    "blocks.3.1": "Mixed_7b",
    "blocks.3.2": "Mixed_7c",
}


def _canonical_name(name: str) -> str:
    for prefix, target in _WRAPPER_BLOCKS.items():
        if name.startswith(prefix + "."):
            return target + name[len(prefix) :]
    return name


def variables_from_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """PyTorch FID-Inception state dict -> Flax variables ``{"params", "batch_stats"}``.

    Accepts the published ``pt_inception-2015-12-05`` file (torchvision attribute names, with
    the unused ``fc`` classifier and ``AuxLogits``) and a ``pytorch_fid...InceptionV3`` wrapper's
    own state dict (``blocks.i.j`` names). Conv kernels OIHW -> HWIO.
    """
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}

    def put(tree, path, value):
        for p in path[:-1]:
            tree = tree.setdefault(p, {})
        tree[path[-1]] = np.asarray(value, np.float32)

    for raw_name, value in state_dict.items():
        name = _canonical_name(raw_name)
        if name.startswith(("fc.", "AuxLogits.")) or name.endswith("num_batches_tracked"):
            continue  # classifier heads are not part of pool3
        path = name.split(".")
        leaf, module = path[-1], path[:-1]
        if module[-1] == "conv" and leaf == "weight":
            put(params, [*module, "kernel"], np.transpose(value, (2, 3, 1, 0)))
        elif module[-1] == "bn" and leaf in ("weight", "bias"):
            put(params, [*module, "scale" if leaf == "weight" else "bias"], value)
        elif module[-1] == "bn" and leaf in ("running_mean", "running_var"):
            put(stats, [*module, "mean" if leaf == "running_mean" else "var"], value)
        else:
            raise ValueError(
                f"unexpected tensor {raw_name!r} in the Inception weights; expected the "
                "pytorch-fid FID Inception state_dict (pt_inception-2015-12-05-*.pth)"
            )
    variables = {"params": params, "batch_stats": stats}
    _check_structure(variables)
    return variables


def _check_structure(variables: Mapping[str, Any]) -> None:
    abstract = jax.eval_shape(
        InceptionV3FID().init,
        jax.random.PRNGKey(0),
        jnp.zeros((1, INCEPTION_RESOLUTION, INCEPTION_RESOLUTION, 3)),
    )
    expected = {
        jax.tree_util.keystr(k): v.shape
        for k, v in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(abstract))
    }
    got = {
        jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(variables)
    }
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    bad = sorted(k for k in set(expected) & set(got) if tuple(expected[k]) != tuple(got[k]))
    if missing or extra or bad:
        raise ValueError(
            "Inception weights do not match the FID InceptionV3: "
            f"missing {missing[:5]}, unexpected {extra[:5]}, wrong shapes {bad[:5]} "
            "(is this the torchvision ImageNet Inception rather than the FID one?)"
        )


def load_inception_variables(path: str) -> dict[str, Any]:
    """Reads FID Inception weights (.pth state_dict, .safetensors or .npz) from a local file."""
    return variables_from_state_dict(load_state_dict(path))


def file_fingerprint(path: str) -> str:
    """Short content hash naming which weights produced a set of statistics."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- extractor


@functools.lru_cache(maxsize=8)
def _compiled_fns(precision: str | None, mesh: Mesh) -> tuple[Callable, Callable]:
    """Jitted (apply, preprocess), shared by extractors on the same mesh: compile once."""
    apply = jax.jit(
        InceptionV3FID(precision=precision).apply,
        out_shardings=partitioning.batch_sharding(mesh, 2),
    )
    return apply, jax.jit(preprocess, out_shardings=partitioning.batch_sharding(mesh, 4))


class InceptionExtractor:
    """Batched, data-parallel pool3 feature extraction on a device mesh.

    ``extractor(images)`` takes uint8 [N, H, W, 3] (or float in [-1, 1]) host arrays of any
    size and returns float32 [N, 2048]. Batches are split over the mesh's (data, fsdp) axes;
    the last one is padded to a multiple of the device count and the padding dropped.
    """

    def __init__(
        self,
        variables: Mapping[str, Any],
        *,
        batch_size: int = 64,
        mesh: Mesh | None = None,
        precision: str | None = "highest",
        fingerprint: str = "unknown",
    ):
        self.mesh = mesh if mesh is not None else partitioning.make_mesh()
        self.model = InceptionV3FID(precision=precision)
        self.fingerprint = fingerprint
        n_batch_shards = int(np.prod([self.mesh.shape[a] for a in partitioning.BATCH_AXES]))
        # Round up so every batch splits evenly over the batch shards.
        self.batch_size = -(-batch_size // n_batch_shards) * n_batch_shards
        self._in_sharding = partitioning.batch_sharding(self.mesh, 4)
        self.variables = jax.device_put(freeze(variables), partitioning.replicated(self.mesh))
        self._apply, self._preprocess = _compiled_fns(precision, self.mesh)

    def features_on_device(self, images: jax.Array) -> jax.Array:
        """One batch (already a multiple of the batch shards) -> float32 [B, 2048]."""
        return self._apply(self.variables, self._preprocess(images))

    def __call__(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [N, H, W, 3], got shape {images.shape}")
        if images.dtype != np.uint8:
            lo, hi = float(images.min(initial=0)), float(images.max(initial=0))
            if lo < -1.001 or hi > 1.001:
                raise ValueError(
                    f"float images must lie in [-1, 1] (got [{lo:.3f}, {hi:.3f}]); pass uint8 "
                    "images or rescale with x / 127.5 - 1"
                )
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            n = len(batch)
            if n < self.batch_size:
                pad = np.zeros((self.batch_size - n, *batch.shape[1:]), batch.dtype)
                batch = np.concatenate([batch, pad])
            batch = jax.device_put(batch, self._in_sharding)
            out.append(np.asarray(self.features_on_device(batch))[:n])
        if not out:
            return np.zeros((0, POOL3_DIM), np.float32)
        return np.concatenate(out).astype(np.float32)


@gin.configurable
def make_inception_extractor(
    weights_path: str = gin.REQUIRED,
    batch_size: int = 64,
    precision: str | None = "highest",
    mesh: Mesh | None = None,
) -> InceptionExtractor:
    """Builds the extractor from a local weights file (the published FID Inception)."""
    return InceptionExtractor(
        load_inception_variables(weights_path),
        batch_size=batch_size,
        mesh=mesh,
        precision=precision,
        fingerprint=f"{os.path.basename(weights_path)}:{file_fingerprint(weights_path)}",
    )
