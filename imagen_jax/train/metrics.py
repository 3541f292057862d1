"""Training metrics: TensorBoard event files, `metrics.jsonl`, and FLOP/s from XLA cost analysis.

TensorBoard files are written by tensorboardX (no TensorFlow needed; any TensorBoard reads them);
`metrics.jsonl` holds the same scalars, one JSON line per log step. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from imagen_jax.data.images import uint8_to_unit, unit_to_uint8

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
        # heavy: tensorboardX imports torch whenever it is installed (1.4 s); only the process
        # that writes pays it, not every importer of image_grid.
        import tensorboardX

        self.tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tb"))
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.active:
            return
        for tag, value in scalars.items():
            self.tb.add_scalar(tag, float(value), step)
        self._jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}})
                          + "\n")
        self._jsonl.flush()
        self.tb.flush()

    def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
        if self.active:
            self.tb.add_image(tag, np.asarray(image, np.uint8), step, dataformats="HWC")
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
