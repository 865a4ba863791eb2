"""Timing and process-memory helpers shared by the benchmarks."""

import statistics
import time
from collections.abc import Callable
from pathlib import Path

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


def timed_stream(generator, requests):
    """(seconds to the first tokens, seconds for the rest, tokens generated after the first) of one
    `Generator.stream` over `requests`."""
    start = time.perf_counter()
    stream = generator.stream(requests)
    first = next(stream)
    t_first = time.perf_counter()
    rest = sum(len(t) for chunk in stream for t in chunk)
    t_end = time.perf_counter()
    assert all(len(t) == 1 for t in first)
    return t_first - start, t_end - t_first, rest


def status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS, VmHWM, RssAnon, ...)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")
