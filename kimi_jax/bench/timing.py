"""Timing helper shared by the benchmarks."""

import statistics
import time
from collections.abc import Callable

import jax


def median_seconds(fn: Callable[[], object], reps: int) -> float:
    """Median wall time of `fn()` over `reps` runs after one warm-up, blocking on each result."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)
