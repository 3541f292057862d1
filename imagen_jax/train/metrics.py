"""Training metrics: TensorBoard event files, `metrics.jsonl`, and FLOP/s from XLA cost analysis.

The TensorBoard writer encodes the (tiny) `Event`/`Summary` protobufs and TFRecord framing itself,
so logging needs neither TensorFlow nor the tensorboard package; any TensorBoard reads the files.
Only process 0 writes.
"""

from __future__ import annotations

import io
import json
import math
import os
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from imagen_jax.data.images import uint8_to_unit, unit_to_uint8

# --------------------------------------------------------------------------- protobuf + TFRecord

_CRC32C_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1  # Castagnoli polynomial (reflected)
    _CRC32C_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    # TFRecord masks the CRC so that CRCs of CRCs stay well distributed.
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        bits = n & 0x7F
        n >>= 7
        if n:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint((number << 3) | wire_type) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           values: list[bytes] = ()) -> bytes:
    """An `Event` proto: wall_time=1 (double), step=2 (int64), file_version=3, summary=5."""
    msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        msg += _bytes_field(3, file_version.encode())
    if values:
        msg += _bytes_field(5, b"".join(_bytes_field(1, v) for v in values))  # Summary.value
    return msg


def _scalar_value(tag: str, value: float) -> bytes:
    # Summary.Value: tag=1, simple_value=2 (float).
    return _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", value))


def _image_value(tag: str, png: bytes, height: int, width: int) -> bytes:
    # Summary.Image: height=1, width=2, colorspace=3 (3 = RGB), encoded_image_string=4.
    image = (_field(1, 0, _varint(height)) + _field(2, 0, _varint(width))
             + _field(3, 0, _varint(3)) + _bytes_field(4, png))
    return _bytes_field(1, tag.encode()) + _bytes_field(4, image)


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class TensorBoardWriter:
    """Appends scalar and image summaries to one `events.out.tfevents.*` file."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "ab")  # noqa: SIM115 - closed in close()
        self._write(_event(time.time(), 0, file_version="brain.Event:2"))

    def _write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        self._file.write(header + struct.pack("<I", _masked_crc(header)) + record
                         + struct.pack("<I", _masked_crc(record)))

    def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        values = [_scalar_value(k, float(v)) for k, v in scalars.items()]
        self._write(_event(time.time(), step, values=values))

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        image = np.asarray(image, np.uint8)
        self._write(_event(time.time(), step,
                           values=[_image_value(tag, encode_png(image), *image.shape[:2])]))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# --------------------------------------------------------------------------- run-level writer


def flatten_metrics(metrics: Mapping[str, Any], edges: Any = ()) -> dict[str, float]:
    """Host scalars from a step's metrics; vector `bucket_loss` becomes one scalar per bucket."""
    out = {}
    for key, value in metrics.items():
        value = np.asarray(value)
        if key == "bucket_loss":
            bounds = [-math.inf, *edges, math.inf]
            for i, v in enumerate(value.reshape(-1)):
                if np.isfinite(v):
                    out[f"loss_logsnr/{bounds[i]:g}_{bounds[i + 1]:g}"] = float(v)
        elif value.size == 1:
            out[key] = float(value)
    return out


class MetricWriter:
    """TensorBoard events under `<workdir>/tb/` plus one JSON line per log step in
    `<workdir>/metrics.jsonl`. No-op on processes other than 0."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        self.tb = TensorBoardWriter(os.path.join(workdir, "tb"))
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.active:
            return
        self.tb.scalars(step, scalars)
        self._jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}})
                          + "\n")
        self._jsonl.flush()
        self.tb.flush()

    def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
        if self.active:
            self.tb.image(step, tag, image)
            self.tb.flush()

    def close(self) -> None:
        if self.active:
            self.tb.close()
            self._jsonl.close()


# --------------------------------------------------------------------------- FLOPs


def compiled_flops(compiled: Any) -> float | None:
    """FLOPs of one execution of a compiled XLA program (per device for SPMD programs), or None
    where the backend gives no cost analysis."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    flops = float(cost["flops"])
    return flops if flops > 0 else None


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """[N, H, W, 3] floats in [-1, 1] (the model convention) or uint8 -> one uint8 grid image."""
    images = np.asarray(images)
    if images.dtype == np.uint8:  # already pixels (e.g. CascadeOutput.images): map to [-1, 1]
        images = uint8_to_unit(images)
    images = images.astype(np.float32)
    n, h, w, c = images.shape
    columns = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / columns))
    grid = np.zeros((rows * h, columns * w, c), np.float32)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = img
    return unit_to_uint8(grid)
