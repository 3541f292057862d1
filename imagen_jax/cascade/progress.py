"""Per-stage progress bars and wall times of a cascade run (fed by a host callback)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from imagen_jax.stage import Stage


class Progress:
    """Per-stage tqdm bars fed by a one-way host callback per sampling step.

    On a sharded batch the callback fires once per device shard per step; steps are counted by
    distinct ``t`` values so each bar advances once per step. Also records per-stage wall times.
    """

    def __init__(self, stages: Sequence[Stage], first_index: int, enabled: bool):
        self.enabled = enabled
        self.first_index = first_index
        self.stages = stages
        self.bars: dict[int, Any] = {}
        self.seen: dict[int, set[float]] = {}
        self.t_first: dict[int, float] = {}
        self.t_last: dict[int, float] = {}

    def __call__(self, index: int, t: np.ndarray) -> None:
        now = time.perf_counter()
        self.t_first.setdefault(index, now)
        self.t_last[index] = now
        key = float(np.asarray(t).reshape(-1)[0])
        seen = self.seen.setdefault(index, set())
        if key in seen:
            return
        seen.add(key)
        if self.enabled:
            if index not in self.bars:

                stage = self.stages[index - self.first_index]
                self.bars[index] = tqdm(
                    total=int(stage.sampling.num_steps),
                    desc=f"stage {index} {stage.name} {stage.resolution}px",
                    leave=True,
                )
            self.bars[index].update(1)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()

    def reset(self) -> None:
        self.bars, self.seen, self.t_first, self.t_last = {}, {}, {}, {}

    def stage_seconds(self) -> dict[str, float]:
        """Wall time from a stage's first to the next stage's first step (approximate)."""
        order = sorted(self.t_first)
        out = {}
        for j, index in enumerate(order):
            end = self.t_first[order[j + 1]] if j + 1 < len(order) else self.t_last[index]
            out[f"stage{index}_s"] = end - self.t_first[index]
        return out
