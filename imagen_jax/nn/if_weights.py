"""Reads a diffusers ``unet/`` directory of DeepFloyd IF into the `IFUNet` parameter tree.

A directory holds ``config.json`` and ``diffusion_pytorch_model[.fp16|.bf16].safetensors``, or
shards listed by ``diffusion_pytorch_model[...].safetensors.index.json``; tensors may be float32,
float16 (IF's published ``fp16`` variant) or bfloat16, and are cast to the parameter dtype
(float32 by default). Every parameter of our tree names exactly one safetensors key
(`torch_key`), so loading is one loop, as for T5
(`imagen_jax.text.checkpoints`): read one tensor, change its layout (conv kernels
[O, I, kh, kw] -> [kh, kw, I, O], Linear weights [out, in] -> [in, out] reshaped to our head
axes), put it straight into its device shards, drop it. Before anything is read, a key the tree
does not name (unknown, e.g. renamed) or a key it names that the files lack (missing) is a
one-line `CheckpointError` naming it, so every key is consumed exactly once.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401 - names bfloat16 for numpy: safetensors then reads BF16
import numpy as np
from flax import traverse_util
from safetensors import safe_open

from imagen_jax.errors import CheckpointError
from imagen_jax.nn.if_config import IFUNetConfig, read_if_config
from imagen_jax.nn.if_unet import IFUNet

WEIGHTS_STEM = "diffusion_pytorch_model"
# Full precision first (diffusers' default file), then its half-precision variants.
VARIANTS = ("", ".fp16", ".bf16")

# Our module names -> diffusers' (module path segments). Blocks are numbered per level ``l``;
# diffusers numbers up blocks from the bottom (up_blocks.0 is the deepest level).
_BLOCK = re.compile(r"(down|up)_(\d+)_(res|attn)_(\d+)|(down)_(\d+)_downsample|(up)_(\d+)_upsample")
_TOP = {
    "conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out",
    "time_embed": "time_embedding", "noise_level_embed": "class_embedding",
    "text_proj": "encoder_hid_proj", "text_pool": "add_embedding",
    "mid_res_0": "mid_block.resnets.0", "mid_res_1": "mid_block.resnets.1",
    "mid_attn": "mid_block.attentions.0",
}
_INNER = {
    # EmbeddingMLP
    "dense_0": "linear_1", "dense_1": "linear_2",
    # IFResBlock
    "norm_0": "norm1", "conv_0": "conv1", "emb_proj": "time_emb_proj", "norm_1": "norm2",
    "conv_1": "conv2", "shortcut": "conv_shortcut",
    # AddedKVAttention
    "norm": "group_norm", "text_norm": "norm_cross", "query": "to_q", "key": "to_k",
    "value": "to_v", "text_key": "add_k_proj", "text_value": "add_v_proj", "out": "to_out.0",
}
# TextPool (diffusers' TextTimeEmbedding, whose attention pooling is its submodule ``pool``).
_POOL = {
    "norm_in": "norm1", "norm_out": "norm2", "proj": "proj",
    "position": "pool.positional_embedding", "query": "pool.q_proj", "key": "pool.k_proj",
    "value": "pool.v_proj",
}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}
# Wrapper submodules of our layers (Conv's nn.Conv, GroupNorm's and LayerNorm's flax norm).
_WRAPPERS = ("conv", "norm")


def _block_path(name: str, num_levels: int) -> str:
    """diffusers' module path of one of our top-level blocks (``down_1_res_0`` ->
    ``down_blocks.1.resnets.0``)."""
    if name in _TOP:
        return _TOP[name]
    m = _BLOCK.fullmatch(name)
    if m is None:
        raise KeyError(name)
    if m.group(1):
        side, level, kind, i = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        index = level if side == "down" else num_levels - 1 - level
        part = "resnets" if kind == "res" else "attentions"
        return f"{side}_blocks.{index}.{part}.{i}"
    if m.group(5):
        return f"down_blocks.{m.group(6)}.downsamplers.0"
    return f"up_blocks.{num_levels - 1 - int(m.group(8))}.upsamplers.0"


def torch_key(name: str, config: IFUNetConfig) -> str:
    """The diffusers safetensors key of our flat parameter ``name`` ("down_1_res_0/conv_0/conv/
    kernel" -> "down_blocks.1.resnets.0.conv1.weight"). KeyError for a name it cannot map."""
    top, *modules, leaf = name.split("/")
    prefix = _block_path(top, config.num_levels)
    if top == "text_pool" and leaf == "position":
        return f"{prefix}.{_POOL[leaf]}"
    if modules and modules[-1] in _WRAPPERS:  # our layer's inner flax module
        modules = modules[:-1]
    table = _POOL if top == "text_pool" else _INNER
    return ".".join([prefix, *(table[m] for m in modules), _LEAF[leaf]])


def to_our_layout(tensor: np.ndarray, shape: tuple[int, ...], key: str) -> np.ndarray:
    """One diffusers tensor in our layout: conv [O, I, kh, kw] -> [kh, kw, I, O]; Linear
    [out, in] -> [in, out] reshaped to ``shape`` (head axes split); others reshaped (position
    [1, D] -> [D]). CheckpointError when the sizes disagree."""
    if tensor.size != int(np.prod(shape)):
        raise CheckpointError(f"tensor {key!r} has shape {tuple(tensor.shape)}, the config "
                              f"implies {shape}; the config does not match these weights")
    if tensor.ndim == 4:
        tensor = tensor.transpose(2, 3, 1, 0)
    elif tensor.ndim == 2 and len(shape) > 1:
        tensor = tensor.T
    if tensor.shape != shape:
        tensor = tensor.reshape(shape)
    return tensor


def abstract_if_params(config: IFUNetConfig, param_dtype: Any = jnp.float32) -> Any:
    """Boxed (logically partitioned) ShapeDtypeStructs of the `IFUNet` parameters; allocates
    nothing."""
    model = IFUNet(config, param_dtype=param_dtype)
    side = 2 ** (config.num_levels - 1)
    image = config.in_channels - config.lowres_channels
    x = jax.ShapeDtypeStruct((1, side, side, image), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    text = jax.ShapeDtypeStruct((1, 1, config.text_dim), jnp.float32)
    lowres = noise_level = None
    if config.noise_level_embed:
        lowres = jax.ShapeDtypeStruct((1, side, side, config.lowres_channels), jnp.float32)
        noise_level = t
    return jax.eval_shape(model.init, jax.random.key(0), x, t, text, lowres,
                          noise_level)["params"]


class DiffusersUNetDir:
    """A diffusers ``unet/`` directory: its `IFUNetConfig` and its tensors by key.

    ``read(key)`` returns the tensor as stored (float32, float16 or ml_dtypes.bfloat16 numpy)
    and counts the read in ``reads`` (the loader's proof that each key is consumed once).
    """

    def __init__(self, path: str, variant: str | None = None):
        if not os.path.isdir(path):
            raise CheckpointError(f"IF U-Net directory {path!r} does not exist (pass a diffusers "
                                  "unet/ directory: config.json + diffusion_pytorch_model"
                                  ".safetensors)")
        self.path = path
        self.config = read_if_config(path)
        variants = VARIANTS if variant is None else (variant,)
        self._key_to_file: dict[str, str] = {}
        self._handles: dict[str, Any] = {}
        self.reads: dict[str, int] = {}
        for var in variants:
            single = f"{WEIGHTS_STEM}{var}.safetensors"
            index = os.path.join(path, f"{single}.index.json")
            if os.path.exists(index):
                with open(index) as f:
                    self._key_to_file = dict(json.load(f)["weight_map"])
                break
            if os.path.exists(os.path.join(path, single)):
                self._key_to_file = {key: single for key in self._keys_of(single)}
                break
        else:
            raise CheckpointError(
                f"{path}: no {WEIGHTS_STEM}{{,.fp16,.bf16}}.safetensors[.index.json]; found "
                f"{sorted(os.listdir(path))} (convert a .bin once with safetensors.torch)")
        self.description = f"diffusers:{os.path.abspath(path)}"

    def _keys_of(self, fname: str) -> list[str]:
        return list(self._handle(fname).keys())

    def _handle(self, fname: str) -> Any:
        if fname not in self._handles:
            try:
                self._handles[fname] = safe_open(os.path.join(self.path, fname),
                                                 framework="numpy")
            except Exception as e:  # noqa: BLE001 - safetensors raises several error types
                raise CheckpointError(f"{self.path}: cannot read safetensors file {fname}: "
                                      f"{e}") from e
        return self._handles[fname]

    def keys(self) -> set[str]:
        return set(self._key_to_file)

    def read(self, key: str) -> np.ndarray:
        if key not in self._key_to_file:
            raise CheckpointError(f"{self.path}: tensor {key!r} missing from the safetensors "
                                  "files")
        self.reads[key] = self.reads.get(key, 0) + 1
        handle = self._handle(self._key_to_file[key])
        try:
            return handle.get_tensor(key)
        except TypeError as e:  # a dtype numpy has no name for (F8, ...)
            stored = handle.get_slice(key).get_dtype()
            raise CheckpointError(f"{self.path}: tensor {key!r} is stored as {stored}, which "
                                  "this reader does not convert; save the U-Net in float32, "
                                  "float16 or bfloat16") from e


def key_map(config: IFUNetConfig) -> tuple[dict[str, str], dict[str, Any]]:
    """(our flat parameter name -> its diffusers key, name -> ShapeDtypeStruct) for every
    parameter of the config's `IFUNet`; no two names share a key."""
    abstract = traverse_util.flatten_dict(nn.meta.unbox(abstract_if_params(config)), sep="/")
    names = {name: torch_key(name, config) for name in abstract}
    if len(set(names.values())) != len(names):
        raise AssertionError("two IFUNet parameters map to one diffusers key")
    return names, abstract


def check_keys(source: DiffusersUNetDir, names: dict[str, str]) -> None:
    """CheckpointError (one line, naming the first of each) unless the files hold exactly the
    keys ``names`` maps to: unknown keys (renamed, or from another architecture) and missing
    ones (a renamed key is both)."""
    wanted = set(names.values())
    problems = []
    unknown = sorted(source.keys() - wanted)
    if unknown:
        problems.append(f"unknown tensor {unknown[0]!r} ({len(unknown)} unknown in all)")
    missing = sorted(wanted - source.keys())
    if missing:
        problems.append(f"tensor {missing[0]!r} missing ({len(missing)} missing in all)")
    if problems:
        raise CheckpointError(f"{source.path}: {'; '.join(problems)}; its config.json does not "
                              "describe these weights")


def load_if_unet(
    path: str | DiffusersUNetDir,
    param_dtype: Any = jnp.float32,
    shardings: Any | None = None,
    device: jax.Device | None = None,
    progress: Callable[[Iterator[str]], Iterator[str]] | None = None,
) -> tuple[IFUNetConfig, dict[str, Any]]:
    """(config, params) of a diffusers IF ``unet/`` directory, one tensor at a time.

    Each tensor goes straight into its shards (``jax.make_array_from_callback``) when
    ``shardings`` (a tree of ``jax.sharding.Sharding`` matching the parameter tree, e.g. from
    `imagen_jax.partitioning.logical_to_shardings` of `abstract_if_params`) is given, else onto
    ``device`` (default: the first device); the host holds one tensor at a time. Raises
    ConfigError for an unsupported config and CheckpointError for missing, unknown or
    mis-shaped tensors.
    """
    source = path if isinstance(path, DiffusersUNetDir) else DiffusersUNetDir(path)
    config = source.config
    names, abstract = key_map(config)
    check_keys(source, names)
    flat_shardings = (traverse_util.flatten_dict(shardings, sep="/")
                      if shardings is not None else None)
    device = device or jax.devices()[0]
    order: Iterator[str] = iter(sorted(names))
    if progress is not None:
        order = progress(order)
    out = {}
    for name in order:
        shape = tuple(abstract[name].shape)
        array = to_our_layout(source.read(names[name]), shape, names[name]).astype(param_dtype)
        if flat_shardings is not None:
            out[name] = jax.make_array_from_callback(shape, flat_shardings[name],
                                                     lambda idx, a=array: a[idx])
        else:
            out[name] = jax.device_put(array, device)
        del array  # one host copy at a time
    return config, traverse_util.unflatten_dict(out, sep="/")
