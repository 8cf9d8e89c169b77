"""Timing shared by the benchmark scripts: medians of repeated calls, synchronised on a GPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def median_seconds(fn: Callable[[], Any], repeats: int, sync: Callable[[], None] = lambda: None,
                   warmup: int = 0) -> float:
    """Median wall time of `repeats` calls of fn after `warmup` untimed ones; sync() brackets each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
