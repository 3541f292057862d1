"""Torch-free reading of published feature-extractor weights (Inception, CLIP).

The evaluation networks ship as PyTorch ``state_dict`` pickles (``.pth``/``.bin``, both the zip
container torch >= 1.6 writes and the older "legacy" stream), as ``.safetensors``, or as ``.npz``
files we convert to. All of them are read here into a flat ``{name: np.ndarray}`` dict without
importing torch: the unpickler only accepts the handful of globals a tensor ``state_dict`` needs,
so reading a file never executes arbitrary code.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Mapping

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file

StateDict = dict[str, np.ndarray]

# torch storage class name -> numpy dtype.
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
# Written by torch.save in the legacy (non-zip) stream format.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _StorageType:
    """Stands in for ``torch.FloatStorage`` & co. inside the pickle: carries the dtype."""

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    """numpy version of ``torch._utils._rebuild_tensor_v2`` (``storage`` is a flat array)."""
    del unused
    size, stride = tuple(size), tuple(stride)
    if not size:
        return storage[storage_offset].copy()
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:],
        shape=size,
        strides=tuple(s * storage.itemsize for s in stride),
        writeable=False,
    )
    return np.array(view)  # contiguous copy: the storage may be shared with other tensors


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
    del requires_grad, backward_hooks, unused
    return data


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("builtins", "set"): set,
}


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file, load_storage):
        super().__init__(file)
        self._load_storage = load_storage

    def find_class(self, module: str, name: str):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        raise pickle.UnpicklingError(
            f"checkpoint pickle refers to {module}.{name}, which a plain tensor state_dict never "
            "does (a whole pickled nn.Module or a TorchScript archive?). Re-save it with "
            "`torch.save(model.state_dict(), path)` or as .safetensors."
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id in checkpoint: {pid!r}")
        return self._load_storage(*pid[1:])


def _read_zip(path: str) -> Mapping[str, np.ndarray]:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl")]
        if not pkl:
            raise ValueError(f"{path}: zip file without data.pkl is not a torch checkpoint")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = zf.read(prefix + "byteorder").decode().strip()
        cache: dict[str, np.ndarray] = {}

        def load_storage(storage_type, key, location, numel):
            del location
            if key not in cache:
                dtype = storage_type.dtype.newbyteorder("<" if byteorder == "little" else ">")
                raw = zf.read(f"{prefix}data/{key}")
                cache[key] = np.frombuffer(raw, dtype=dtype, count=numel).astype(
                    storage_type.dtype, copy=False
                )
            return cache[key]

        return _StateDictUnpickler(io.BytesIO(zf.read(pkl[0])), load_storage).load()


def _read_legacy(path: str) -> Mapping[str, np.ndarray]:
    with open(path, "rb") as f:
        if pickle.load(f) != _LEGACY_MAGIC:
            raise ValueError(f"{path}: not a torch checkpoint (bad magic number)")
        if pickle.load(f) != _LEGACY_PROTOCOL:
            raise ValueError(f"{path}: unsupported legacy torch checkpoint protocol")
        sys_info = pickle.load(f)
        if not sys_info.get("little_endian", True):
            raise ValueError(f"{path}: big-endian legacy checkpoints are not supported")
        # Storages are filled after the object pickle: hand out placeholders, then fill them.
        pending: dict[str, tuple[np.dtype, list]] = {}
        tensors_to_fix: list = []

        class _Lazy:
            def __init__(self, key):
                self.key = key

        def load_storage(storage_type, key, location, numel, view_metadata=None):
            del location, numel
            if view_metadata is not None:
                raise ValueError(f"{path}: legacy storage views are not supported")
            pending.setdefault(key, (storage_type.dtype, []))
            return _Lazy(key)

        def lazy_rebuild(storage, storage_offset, size, stride, *unused):
            pending_tensor = _PendingTensor()
            tensors_to_fix.append((pending_tensor, storage, storage_offset, size, stride))
            return pending_tensor

        unpickler = _StateDictUnpickler(f, load_storage)
        unpickler.find_class = _legacy_find_class(unpickler.find_class, lazy_rebuild)
        obj = unpickler.load()
        keys = pickle.load(f)
        storages: dict[str, np.ndarray] = {}
        for key in keys:
            dtype = pending[key][0]
            numel = int(np.frombuffer(f.read(8), dtype="<i8")[0])
            storages[key] = np.frombuffer(f.read(numel * dtype.itemsize), dtype=dtype)
        for pending_tensor, lazy, offset, size, stride in tensors_to_fix:
            pending_tensor.value = _rebuild_tensor(storages[lazy.key], offset, size, stride)

    def resolve(x):
        if isinstance(x, _PendingTensor):
            return x.value
        if isinstance(x, dict):
            return OrderedDict((k, resolve(v)) for k, v in x.items())
        return x

    return resolve(obj)


class _PendingTensor:
    """A legacy-format tensor whose storage bytes come after the object pickle."""

    value: np.ndarray | None = None


def _legacy_find_class(find_class, lazy_rebuild):
    def wrapped(module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lazy_rebuild
        return find_class(module, name)

    return wrapped


def _flatten(tree: Mapping, prefix: str = "") -> StateDict:
    out: StateDict = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        elif isinstance(value, np.ndarray | np.generic):
            out[name] = np.asarray(value)
    return out


def load_state_dict(path: str) -> StateDict:
    """Reads a weights file into a flat ``{name: array}`` dict (no torch needed).

    Formats: torch ``state_dict`` pickles (zip or legacy), ``.safetensors``, ``.npz``. A pickle
    holding ``{"state_dict": {...}}`` or ``{"model": {...}}`` (common training checkpoints) is
    flattened with dotted names, so strip or map prefixes in the caller.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"weights file {path!r} does not exist; nothing is downloaded at run time, so copy "
            "the published file to this machine and pass its path"
        )
    if path.endswith(".npz"):
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    if path.endswith(".safetensors"):

        return dict(load_file(path))
    if zipfile.is_zipfile(path):
        tree = _read_zip(path)
    else:
        tree = _read_legacy(path)
    if not isinstance(tree, Mapping):
        raise ValueError(f"{path}: expected a state_dict (a mapping), got {type(tree).__name__}")
    return _flatten(tree)


def save_npz(state_dict: Mapping[str, np.ndarray], path: str) -> None:
    """Writes a flat state dict as ``.npz`` (the torch-free interchange format)."""
    np.savez(path, **{k: np.asarray(v) for k, v in state_dict.items()})
