"""The scheduler's jobs and counters: what a request is while it is scheduled, and what /metrics reads.

A `Job` is one request inside the scheduler (runtime/scheduler.py), with the sink the model thread
hands its tokens to; `Metrics` are the plain numbers the model thread writes and serve/metrics.py
exports. The two errors are what the server turns into 429 and 503.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable

from kimi_jax.runtime.requests import Request

# One token's log probability and its top alternatives [(token id, log probability)], most likely first.
TokenLogProb = tuple[float, list[tuple[int, float]]]


class QueueFull(RuntimeError):
    """The waiting queue is at `max_queue`; the server answers 429."""


class SchedulerStopped(RuntimeError):
    """The model thread is gone (it failed or was stopped); the server answers 503."""


@dataclasses.dataclass(eq=False)
class Job:
    """One request in the scheduler. `sink(tokens, finish_reason, logprobs)` is called on the model
    thread with new token ids, and once more with a finish reason ("stop", "length", "cancelled",
    "error: …"); `logprobs` is one TokenLogProb per token when the request asks for them, else None."""

    request: Request
    sink: Callable[[list[int], str | None], None]
    id: int = -1  # numbered by process 0; the same job has the same id on every process
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    generated: int = 0
    output: list[int] = dataclasses.field(default_factory=list)  # the tokens generated so far
    preemptions: int = 0  # times its sequence was preempted (and recomputed)
    cancel_asked: bool = False  # set by `cancel`: no more tokens reach the sink
    cancelled: bool = False  # set when the cancel event is applied: the slot is freed
    finished: bool = False


class Metrics:
    """Counters and gauges the server exports (plain numbers; written by the model thread)."""

    TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(self) -> None:
        self.requests = collections.Counter()  # finish reason -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.decode_calls = 0
        self.decode_steps = 0
        self.occupied_slot_steps = 0  # sum over decode calls of (active slots × steps run)
        self.max_occupancy = 0
        self.prefill_calls = 0
        self.prefill_tokens = 0  # tokens computed by prefill (chunks included; prefix hits not)
        self.busy_seconds = 0.0  # model-thread time spent in prefill/decode
        self.ttft_count = 0
        self.ttft_sum = 0.0
        self.ttft_buckets = [0] * len(self.TTFT_BUCKETS)
        self.last_tokens_per_s = 0.0
        self.masked_tokens = 0  # tokens sampled under a grammar's mask (constrained decoding)
        self.mask_seconds = 0.0  # model-thread seconds computing those masks
        self.prefix_queried_tokens = 0  # tokens of the sequences prefilled (looked up in the prefix cache)
        self.prefix_hit_tokens = 0  # of which found in cached pages (not prefilled again)
        self.preemptions = 0
        self.warm_up_seconds = 0.0  # compiling (or loading) every program before taking requests
        self.warm_up_compilations = 0  # programs built then

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_count += 1
        self.ttft_sum += seconds
        for i, edge in enumerate(self.TTFT_BUCKETS):
            if seconds <= edge:
                self.ttft_buckets[i] += 1
