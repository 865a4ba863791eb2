"""Serving across processes: process 0 decides, every process runs the same compiled steps.

A model sharded over several hosts runs each compiled program on all of them at once, so every
process must call the same programs with the same inputs in the same order. The scheduler
(runtime/scheduler.py) is deterministic given what arrives from outside: new requests,
cancellations and the stop. So process 0, which alone serves HTTP, writes those *events* of each
scheduler iteration to the `jax.distributed` coordination service's key-value store before it
acts on them, and every other process reads iteration n's events, applies them to its own copy
of the scheduler and runs iteration n. Tokens are sampled on device with each request's seed,
so every process computes the same tokens and makes the same decisions from them (which slots
finish, what to admit next); only process 0 hands tokens to clients.

Liveness. Each follower writes a heartbeat (a counter and the last iteration it finished) every
`heartbeat_s`; a watchdog thread on process 0 reads them, deletes the events every follower has
read, and calls `on_lost` when a follower's counter has not moved for `timeout_s` (SIGKILL,
crash, a hung host). A follower that loses process 0 is ended by JAX's distributed runtime,
which aborts every process whose coordinator is gone (SIGABRT, "Terminating process because
the JAX distributed service detected fatal errors"). So a follower whose process id is known
before it joins runs as a child of a small supervisor (`supervise`), which turns that abort into
an exit status 1 and a line naming the coordinator.

Messages are JSON: `[{"submit": id, "request": {...}}, {"cancel": id}, {"stop": true}]`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from kimi_jax.runtime.requests import Constraint, Request
from kimi_jax.runtime.sampling import SamplingParams

PREFIX = "kimi_jax/serve"
DEFAULT_TIMEOUT_S = 30.0  # a follower silent this long is lost (--worker-timeout)
HEARTBEAT_S = 1.0
POLL_MS = 1000  # a follower's wait for the next iteration is a loop of gets this long


class CoordinatorLost(Exception):
    """A follower's call to the coordination service failed: process 0, which serves it, is gone.
    (Usually JAX's runtime aborts the follower first; this is the case where the call fails first.)"""


class Solo:
    """One process: nothing to tell anyone."""

    leader = True
    num_processes = 1

    def __init__(self) -> None:
        self.on_lost: list[Callable[[str], None]] = []  # never called: there is no one to lose

    def publish(self, step: int, events: list[dict[str, Any]]) -> None:
        pass

    def start(self) -> None:
        pass

    def finished(self, step: int, active: int) -> None:
        pass

    def ready(self) -> None:
        pass

    def processes(self) -> dict[int, tuple[int, int]]:
        return {}

    def stop(self) -> None:
        pass


class Lockstep:
    """Process 0 publishes each iteration's events; the others receive them (module docstring).

    client: the coordination service client (`jax._src.distributed.global_state.client`, or
    anything with key_value_set / blocking_key_value_get / key_value_try_get / key_value_delete).
    """

    def __init__(self, client, process_id: int, num_processes: int, timeout_s: float = DEFAULT_TIMEOUT_S,
                 heartbeat_s: float = HEARTBEAT_S):
        self.client, self.process_id, self.num_processes = client, process_id, num_processes
        self.leader = process_id == 0
        self.timeout_s, self.heartbeat_s = timeout_s, heartbeat_s
        self._done, self._active = -1, 0  # the last iteration this process finished, and its slots in use then
        self._seen: dict[int, tuple[int, int]] = {}  # process 0: each follower's last reported (iteration, active)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_lost: list[Callable[[str], None]] = []  # process 0: called (once) with why a follower is lost
        self.lost: str | None = None  # process 0: why a follower was lost (once it was)
        self.publish_seconds = 0.0  # time spent writing events (process 0), for /metrics

    @classmethod
    def from_jax(cls, timeout_s: float = DEFAULT_TIMEOUT_S) -> Lockstep | Solo:
        """The lockstep of this JAX process (Solo when there is one process)."""
        import jax

        if jax.process_count() == 1:
            return Solo()
        from jax._src.distributed import global_state

        return cls(global_state.client, jax.process_index(), jax.process_count(), timeout_s)

    # Events --------------------------------------------------------------------------------------
    def publish(self, step: int, events: list[dict[str, Any]]) -> None:
        """Process 0: iteration `step`'s events, written before process 0 acts on them."""
        start = time.perf_counter()
        self.client.key_value_set(f"{PREFIX}/step/{step}", json.dumps(events, separators=(",", ":")))
        self.publish_seconds += time.perf_counter() - start

    def receive(self, step: int) -> list[dict[str, Any]]:
        """A follower: iteration `step`'s events, waiting as long as process 0 has nothing to do.
        CoordinatorLost when the coordination service stops answering (process 0 is gone)."""
        key = f"{PREFIX}/step/{step}"
        while True:
            try:
                return json.loads(self.client.blocking_key_value_get(key, POLL_MS))
            except Exception as e:  # the runtime's error type; a timeout just means process 0 is idle
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise CoordinatorLost(str(e)) from e

    def finished(self, step: int, active: int) -> None:
        """This process has run iteration `step` and holds `active` jobs in its slots (followers report
        both in their heartbeat)."""
        self._done, self._active = step, active

    def ready(self) -> None:
        """This process has built its programs (the scheduler's warm-up) and is about to run iteration 0.
        A follower says so; process 0 waits until every follower has (or one is lost). Without it,
        process 0 would finish its warm-up first (its programs run no step, so no collective holds it
        back) and its first prefill's collective would wait on a follower still compiling, past the
        CPU collectives' timeout."""
        if not self.leader:
            try:
                self.client.key_value_set(f"{PREFIX}/ready/{self.process_id}", "1")
            except Exception as e:  # the runtime's error type: the coordination service is gone
                raise CoordinatorLost(str(e)) from e
            return
        for p in range(1, self.num_processes):
            while self.lost is None and not self._stop.is_set():
                try:
                    self.client.blocking_key_value_get(f"{PREFIX}/ready/{p}", POLL_MS)
                    break
                except Exception as e:  # a timeout: not yet
                    if "DEADLINE_EXCEEDED" not in str(e):
                        raise

    def processes(self) -> dict[int, tuple[int, int]]:
        """Process 0: each follower's (last iteration run, slots in use), from its last heartbeat."""
        return dict(self._seen)

    # Liveness ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Followers: start the heartbeat. Process 0: start the watchdog, which calls each of
        `on_lost` once if a follower falls silent for `timeout_s`. Start both as soon as the
        processes have joined, so that a follower lost while the model loads is noticed too.
        Starting again does nothing."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch if self.leader else self._beat,
                                            name="kimi-jax-lockstep", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _beat(self) -> None:
        count = 0
        while not self._stop.is_set():
            count += 1
            try:
                self.client.key_value_set(f"{PREFIX}/alive/{self.process_id}",
                                          f"{count} {self._done} {self._active}", allow_overwrite=True)
            except Exception:  # the coordinator is gone: the runtime ends this process
                return
            self._stop.wait(self.heartbeat_s)

    def _watch(self) -> None:
        followers = range(1, self.num_processes)
        seen = {p: (None, time.monotonic()) for p in followers}
        deleted = -1
        while not self._stop.wait(self.heartbeat_s / 2):
            now, done = time.monotonic(), []
            for p in followers:
                try:
                    value = self.client.key_value_try_get(f"{PREFIX}/alive/{p}")
                except Exception:  # NOT_FOUND: no heartbeat yet (timed from the watchdog's start)
                    value = None
                if value != seen[p][0]:
                    seen[p] = (value, now)
                elif now - seen[p][1] > self.timeout_s:
                    why = (f"process {p} of {self.num_processes} stopped answering (no heartbeat for "
                           f"{now - seen[p][1]:.0f} s; --worker-timeout {self.timeout_s:g}): the model spans every "
                           "process, so this server cannot go on; restart all processes")
                    print(f"[kimi_jax] error: {why}", file=sys.stderr, flush=True)
                    self.lost = why
                    for callback in list(self.on_lost):
                        callback(why)
                    return
                if value:
                    _, step, active = map(int, value.split())
                    self._seen[p] = (step, active)
                done.append(self._seen.get(p, (-1, 0))[0])
            # Events every follower has run are read: drop them from the store.
            for step in range(deleted + 1, min(done, default=-1) + 1):
                self.client.key_value_delete(f"{PREFIX}/step/{step}")
                deleted = step


SUPERVISED = "KIMI_SERVE_SUPERVISED"  # set in the supervised child's environment


def supervise(argv: list[str], process_id: int, num_processes: int, coordinator: str) -> int:
    """Run this follower (`python -m kimi_jax.serve ARGV`) as a child and exit as it did, except that
    an abort by JAX's runtime (the coordinator is gone) becomes status 1 and a line naming it.
    SIGTERM and SIGINT are passed on; the child dies with the supervisor (`die_with_parent`)."""
    child = subprocess.Popen([sys.executable, "-m", "kimi_jax.serve", *argv], env={**os.environ, SUPERVISED: "1"})
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _: child.send_signal(s))
    code = child.wait()
    if code in (-signal.SIGABRT, 128 + signal.SIGABRT):
        print(lost_coordinator(process_id, num_processes, coordinator), file=sys.stderr, flush=True)
        return 1
    return code if code >= 0 else 128 - code


def die_with_parent() -> None:
    """A supervised follower: get SIGKILL when the supervisor dies (Linux prctl; elsewhere a no-op)."""
    if os.environ.get(SUPERVISED) != "1":
        return
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the supervisor was already gone
        os._exit(1)


def lost_coordinator(process_id: int, num_processes: int, coordinator: str | None) -> str:
    """The line a follower that lost process 0 ends with, however it noticed."""
    return (f"error: process {process_id} of {num_processes} lost process 0 (coordinator "
            f"{coordinator or 'from the TPU metadata'}): it stopped or cannot be reached, and the model spans "
            "every process; exiting")


def follower_notice(process_id: int, num_processes: int, coordinator: str | None) -> str:
    return (f"[kimi_jax] process {process_id} of {num_processes}: following process 0 (coordinator "
            f"{coordinator or 'from the TPU metadata'}); it serves HTTP, this process binds nothing")


# Requests on the wire ------------------------------------------------------------------------------
def request_to_json(request: Request) -> dict[str, Any]:
    s = request.sampling
    c = request.constraint
    return {"prompt": list(request.prompt), "max_new_tokens": request.max_new_tokens,
            "stop_ids": list(request.stop_ids), "logprobs": request.logprobs,
            "sampling": {**dataclasses.asdict(s), "logit_bias": [list(p) for p in s.logit_bias]},
            "constraint": None if c is None else {"grammar": c.grammar, "after": c.after}}


def request_from_json(data: dict[str, Any]) -> Request:
    s = data["sampling"]
    sampling = SamplingParams(**{**s, "logit_bias": tuple((int(t), b) for t, b in s["logit_bias"])})
    c = data.get("constraint")
    return Request(tuple(data["prompt"]), data["max_new_tokens"], sampling, tuple(data["stop_ids"]),
                   data["logprobs"], None if c is None else Constraint(c["grammar"], c["after"]))
