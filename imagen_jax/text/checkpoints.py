"""Checkpoint readers: Hugging Face safetensors directories and T5X (msgpack + tensorstore).

Both readers present the same interface, ``read(name) -> np.ndarray`` in *our* layout (the
``T5Encoder`` parameter tree, flattened with "/"), so loading is one loop: read one array,
place it straight into its device shards, drop it. The host never holds more than one array,
which keeps T5-XXL (4.7 B parameters) loadable with host memory for about one embedding table.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import tensorstore as ts
from flax import serialization
from safetensors import safe_open

from imagen_jax.errors import CheckpointError
from imagen_jax.text.config import T5Config, UnsupportedT5ConfigError, read_hf_config
from imagen_jax.text.t5 import T5Encoder

HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
# transformers' ``variant="fp16"`` files (DeepFloyd IF's text_encoder/ ships them next to the
# float32 ones): read when the float32 files are absent.
HF_FP16_WEIGHTS = "model.fp16.safetensors"
HF_FP16_INDEX = "model.safetensors.index.fp16.json"
T5X_MSGPACK = "checkpoint"
# Elements hashed per parameter for the fingerprint: a strided sample distinguishes any two
# trained or random checkpoints without reading 19 GB through a hash.
_FINGERPRINT_SAMPLES = 4096


class WeightSource(Protocol):
    """A checkpoint that yields our-layout numpy arrays by parameter name."""

    config: T5Config
    description: str

    def read(self, name: str) -> np.ndarray: ...


def param_names_and_shapes(cfg: T5Config) -> dict[str, tuple[int, ...]]:
    """Flat parameter name ("layers_0/attention/query") -> shape, via ``jax.eval_shape``."""
    abstract = abstract_params(cfg)
    return {name: tuple(x.shape) for name, x in _flatten(nn.meta.unbox(abstract)).items()}


def abstract_params(cfg: T5Config, param_dtype: Any = jnp.float32) -> Any:
    """Boxed (logically partitioned) ShapeDtypeStructs of the encoder; allocates nothing."""
    model = T5Encoder(cfg, param_dtype=param_dtype)
    ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    mask = jax.ShapeDtypeStruct((1, 2), jnp.bool_)
    return jax.eval_shape(model.init, jax.random.key(0), ids, mask)["params"]


def _is_ts_spec(x: Any) -> bool:
    return isinstance(x, dict) and "driver" in x


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}; tensorstore spec dicts count as leaves."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict) and not _is_ts_spec(v):
            out.update(_flatten(v, name))
        else:
            out[name] = v
    return out


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, v in flat.items():
        *path, leaf = name.split("/")
        node = tree
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


_LAYER = re.compile(r"layers_(\d+)/(.*)")


# ----------------------------------------------------------------------------- Hugging Face
def _read_safetensors_raw(path: str, key: str) -> np.ndarray:
    """Reads one tensor by parsing the safetensors header (u64 length + JSON) ourselves.

    Used for dtypes the numpy backend of ``safetensors`` rejects (BF16 checkpoints).
    """

    dtypes = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32}
    with open(path, "rb") as f:
        (header_len,) = np.frombuffer(f.read(8), "<u8")
        header = json.loads(f.read(int(header_len)))
        info = header[key]
        if info["dtype"] not in dtypes:
            raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        f.seek(8 + int(header_len) + begin)
        data = f.read(end - begin)
    return np.frombuffer(data, dtypes[info["dtype"]]).reshape(info["shape"])



class HFSource:
    """A Hugging Face T5 directory: ``config.json`` + ``model.safetensors`` (or sharded + index),
    or transformers' fp16 variant of either (``model.fp16.safetensors``,
    ``model.safetensors.index.fp16.json``) when the float32 files are absent.

    Hugging Face stores ``nn.Linear`` weights as [out, in]; they are transposed and the fused
    head axis split into (heads, kv). The shared relative position table lives in block 0.
    """

    def __init__(self, path: str, config: T5Config | None = None):

        self.path = path
        self.config = config or read_hf_config(path)
        for index_name, single_name in ((HF_INDEX, HF_WEIGHTS), (HF_FP16_INDEX, HF_FP16_WEIGHTS)):
            single, index = os.path.join(path, single_name), os.path.join(path, index_name)
            if os.path.exists(index):
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
                files = sorted(set(weight_map.values()))
                break
            if os.path.exists(single):
                files = [single_name]
                weight_map = None
                break
        else:
            hint = ""
            if os.path.exists(os.path.join(path, "pytorch_model.bin")):
                hint = (" (found pytorch_model.bin: convert it once with `safetensors.torch."
                        "save_file(torch.load(...), 'model.safetensors')`)")
            raise CheckpointError(f"{path}: no {HF_WEIGHTS} or {HF_INDEX} (or their fp16 "
                                  f"variants){hint}")
        self._handles = {}
        try:
            for fname in files:
                self._handles[fname] = safe_open(os.path.join(path, fname), framework="numpy")
        except Exception as e:  # noqa: BLE001 - safetensors raises several error types
            raise CheckpointError(f"{path}: cannot read safetensors file {fname}: {e}") from e
        self._key_to_file = {}
        for fname, h in self._handles.items():
            for key in h.keys():
                if weight_map is None or weight_map.get(key) == fname:
                    self._key_to_file[key] = fname
        self.description = f"hf:{os.path.abspath(path)}"

    def _get(self, *keys: str) -> np.ndarray:
        for key in keys:
            if key in self._key_to_file:
                fname = self._key_to_file[key]
                try:
                    return self._handles[fname].get_tensor(key)
                except TypeError:  # safetensors' numpy backend has no bfloat16
                    return _read_safetensors_raw(os.path.join(self.path, fname), key)
        raise CheckpointError(
            f"{self.path}: tensor {keys[0]!r} missing from the safetensors files; is this a T5 "
            "checkpoint whose config.json matches its weights?"
        )

    def read(self, name: str) -> np.ndarray:
        cfg = self.config
        if name == "token_embedder":
            return self._get("shared.weight", "encoder.embed_tokens.weight")
        if name == "relpos_bias/rel_embedding":
            key = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
            return self._get(key).T  # [buckets, H] -> [H, buckets]
        if name == "encoder_norm/scale":
            return self._get("encoder.final_layer_norm.weight")
        m = _LAYER.fullmatch(name)
        if m is None:
            raise KeyError(name)
        blk = f"encoder.block.{m.group(1)}"
        rest = m.group(2)
        if rest == "pre_attention_layer_norm/scale":
            return self._get(f"{blk}.layer.0.layer_norm.weight")
        if rest == "pre_mlp_layer_norm/scale":
            return self._get(f"{blk}.layer.1.layer_norm.weight")
        if rest.startswith("attention/"):
            proj = {"query": "q", "key": "k", "value": "v", "out": "o"}[rest.split("/")[1]]
            w = self._get(f"{blk}.layer.0.SelfAttention.{proj}.weight")
            if proj == "o":  # [D, H*K] -> [H, K, D]
                return w.T.reshape(cfg.num_heads, cfg.d_kv, cfg.d_model)
            return w.T.reshape(cfg.d_model, cfg.num_heads, cfg.d_kv)  # [H*K, D] -> [D, H, K]
        if rest.startswith("mlp/"):
            return self._get(f"{blk}.layer.1.DenseReluDense.{rest.split('/')[1]}.weight").T
        raise KeyError(name)


# ----------------------------------------------------------------------------- T5X
def _find_target(state: dict[str, Any], path: str) -> dict[str, Any]:
    if "target" in state:
        return state["target"]
    if "optimizer" in state and "target" in state["optimizer"]:  # pre-2022 T5X layout
        return state["optimizer"]["target"]
    raise CheckpointError(f"{path}: the msgpack checkpoint has no 'target' tree (keys: "
                          f"{sorted(state)}); is this a T5X checkpoint_N directory?")


def infer_t5x_config(flat: dict[str, tuple[int, ...]], path: str) -> T5Config:
    """Derives a ``T5Config`` from T5X parameter shapes (T5X directories carry no config).

    The activation follows the feed-forward layout (gated -> gated GELU as in T5 v1.1 / Flan,
    single ``wi`` -> ReLU as in T5 v1.0); the relative-position max distance is not stored and
    takes T5's 128. Pass ``config=`` to ``load_t5`` to override.
    """
    try:
        vocab, d_model = flat["token_embedder/embedding"]
        num_heads, num_buckets = flat["encoder/relpos_bias/rel_embedding"]
        inner = flat["encoder/layers_0/attention/query/kernel"][-1]
        gated = "encoder/layers_0/mlp/wi_0/kernel" in flat
        d_ff = flat["encoder/layers_0/mlp/" + ("wi_0" if gated else "wi") + "/kernel"][-1]
    except KeyError as e:
        scanned = any(k.startswith("encoder/encoder/") for k in flat)
        hint = " (scanned-layer T5X checkpoints are not supported)" if scanned else ""
        raise UnsupportedT5ConfigError(
            f"{path}: T5X parameter {e.args[0]!r} not found{hint}; expected the "
            "t5x/examples/t5 network layout"
        ) from e
    num_layers = len({k.split("/")[1] for k in flat if k.startswith("encoder/layers_")})
    return T5Config(
        vocab_size=vocab, d_model=d_model, num_heads=num_heads, d_kv=inner // num_heads,
        d_ff=d_ff, num_layers=num_layers, activation="gelu_new" if gated else "relu",
        gated=gated, relative_attention_num_buckets=num_buckets,
    )


class T5XSource:
    """A T5X ``checkpoint_N`` directory: msgpack ``checkpoint`` + one zarr array per parameter.

    Leaves of the msgpack tree are either inline arrays or tensorstore specs whose path is
    relative to the checkpoint directory (``target.encoder.layers_0.attention.query.kernel``).
    T5X keeps attention kernels 2-D ([D, H*K] and [H*K, D]); they are split into heads here.
    """

    def __init__(self, path: str, config: T5Config | None = None):

        self.path = path
        ckpt = os.path.join(path, T5X_MSGPACK)
        try:
            with open(ckpt, "rb") as f:
                state = serialization.msgpack_restore(f.read())
        except FileNotFoundError as e:
            raise CheckpointError(f"{ckpt} not found: a T5X checkpoint directory holds a "
                                  "msgpack 'checkpoint' file") from e
        except Exception as e:  # noqa: BLE001 - msgpack raises many types on corrupt input
            raise CheckpointError(f"{ckpt}: unreadable msgpack ({e})") from e
        self._leaves = _flatten(_find_target(state, path))
        shapes = {k: self._shape(k, v) for k, v in self._leaves.items()}
        self.config = config or infer_t5x_config(shapes, path)
        self.description = f"t5x:{os.path.abspath(path)}"

    def _spec(self, leaf: dict[str, Any]) -> dict[str, Any]:
        spec = json.loads(json.dumps(leaf))  # deep copy, bytes-free
        kv = spec.get("kvstore")
        if isinstance(kv, dict) and "path" in kv:
            if kv.get("driver", "file") == "file" and not os.path.isabs(kv["path"]):
                kv["path"] = os.path.join(self.path, kv["path"])
        elif "path" in spec:  # tensorstore < 0.1.14 spec layout
            if not os.path.isabs(spec["path"]):
                spec["path"] = os.path.join(self.path, spec["path"])
        else:
            raise CheckpointError(f"{self.path}: tensorstore spec without a path: {leaf}")
        return spec

    def _open(self, name: str) -> Any:

        try:
            return ts.open(self._spec(self._leaves[name]), read=True).result()
        except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError / OSError
            raise CheckpointError(f"{self.path}: cannot open the tensorstore array of "
                                  f"{name!r}: {e}") from e

    def _shape(self, name: str, leaf: Any) -> tuple[int, ...]:
        if _is_ts_spec(leaf):
            meta = leaf.get("metadata", {})
            if "shape" in meta:
                return tuple(meta["shape"])
            return tuple(self._open(name).shape)
        return tuple(np.shape(leaf))

    def _get(self, name: str) -> np.ndarray:
        if name not in self._leaves:
            raise CheckpointError(f"{self.path}: T5X parameter {name!r} missing")
        leaf = self._leaves[name]
        if _is_ts_spec(leaf):
            return np.asarray(self._open(name).read().result())
        return np.asarray(leaf)

    def read(self, name: str) -> np.ndarray:
        cfg = self.config
        if name == "token_embedder":
            return self._get("token_embedder/embedding")
        if name.endswith(("/attention/query", "/attention/key", "/attention/value")):
            w = self._get(f"encoder/{name}/kernel")
            return w.reshape(cfg.d_model, cfg.num_heads, cfg.d_kv)
        if name.endswith("/attention/out"):
            return self._get(f"encoder/{name}/kernel").reshape(cfg.num_heads, cfg.d_kv,
                                                               cfg.d_model)
        if "/mlp/" in name:
            return self._get(f"encoder/{name}/kernel")
        return self._get(f"encoder/{name}")


def open_checkpoint(path: str, config: T5Config | None = None) -> WeightSource:
    """Picks the reader: ``config.json`` -> Hugging Face, msgpack ``checkpoint`` -> T5X."""
    if not os.path.isdir(path):
        raise CheckpointError(f"T5 checkpoint directory {path!r} does not exist (pass a Hugging "
                              "Face directory with config.json or a T5X checkpoint_N directory)")
    if os.path.exists(os.path.join(path, "config.json")):
        return HFSource(path, config)
    if os.path.exists(os.path.join(path, T5X_MSGPACK)):
        return T5XSource(path, config)
    raise CheckpointError(
        f"{path!r} is neither a Hugging Face T5 directory (config.json + model.safetensors) nor "
        f"a T5X checkpoint directory (msgpack 'checkpoint' file); found {sorted(os.listdir(path))}"
    )


def _sample_bytes(x: np.ndarray) -> bytes:
    flat = x.reshape(-1)
    stride = max(1, flat.size // _FINGERPRINT_SAMPLES)
    return np.ascontiguousarray(flat[::stride].astype(np.float32)).tobytes()


def load_params(
    source: WeightSource,
    param_dtype: Any,
    shardings: Any | None = None,
    device: jax.Device | None = None,
    progress: Callable[[Iterator[str]], Iterator[str]] | None = None,
) -> tuple[dict[str, Any], str]:
    """Reads every encoder parameter into device memory, one array at a time.

    Each array goes straight into its shards (``jax.make_array_from_callback`` with the target
    sharding) when ``shardings`` (a tree of ``jax.sharding.Sharding`` matching the parameter
    tree) is given, else onto ``device`` (default: the first device).
    Returns (params tree, weights digest) where the digest hashes names, shapes and a strided
    sample of every array.
    """
    expected = param_names_and_shapes(source.config)
    flat_shardings = _flatten(shardings) if shardings is not None else None
    if device is None:
        device = jax.devices()[0]
    digest = hashlib.sha256(source.config.to_json().encode())
    names: Iterator[str] = iter(sorted(expected))
    if progress is not None:
        names = progress(names)
    out = {}
    for name in names:
        shape = expected[name]
        arr = source.read(name)
        if tuple(arr.shape) != shape:
            raise CheckpointError(
                f"{source.description}: parameter {name} has shape {tuple(arr.shape)}, the "
                f"config implies {shape}; the config does not match these weights"
            )
        digest.update(name.encode() + str(shape).encode() + _sample_bytes(arr))
        arr = arr.astype(param_dtype)
        if flat_shardings is not None:
            out[name] = jax.make_array_from_callback(
                shape, flat_shardings[name], lambda idx, a=arr: a[idx]
            )
        else:
            out[name] = jax.device_put(arr, device)
        del arr  # only one host copy alive at a time
    return _unflatten(out), digest.hexdigest()
