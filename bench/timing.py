"""Timing helper shared by the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], iters: int, warmup: bool = True) -> float:
    """Median wall time of ``iters`` calls of ``fn`` (which must block until its work is done),
    after one untimed warm-up call (compile / allocator) unless ``warmup`` is False."""
    if warmup:
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
