"""The multi-host scheduler protocol (runtime/lockstep.py) in one process: a leader and a follower
scheduler over an in-memory key-value store run the same iterations and make the same decisions;
a silent follower fails the leader's jobs; requests survive the wire exactly."""

from __future__ import annotations

import json
import threading
import time

import pytest
from serve_util import collect as _collect

from kimi_jax.runtime import lockstep
from kimi_jax.runtime.jobs import SchedulerStopped
from kimi_jax.runtime.requests import Request
from kimi_jax.runtime.sampling import SamplingParams
from kimi_jax.runtime.scheduler import Scheduler

pytestmark = pytest.mark.serve


class MemoryStore:
    """The coordination service's key-value calls, in memory (the error texts the runtime uses)."""

    def __init__(self):
        self.data, self.cond, self.sets = {}, threading.Condition(), 0

    def key_value_set(self, key, value, allow_overwrite=False):
        with self.cond:
            if key in self.data and not allow_overwrite:
                raise RuntimeError(f"ALREADY_EXISTS: {key}")
            self.data[key] = value
            self.sets += 1
            self.cond.notify_all()

    def blocking_key_value_get(self, key, timeout_ms):
        with self.cond:
            if not self.cond.wait_for(lambda: key in self.data, timeout_ms / 1000):
                raise RuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out with key: {key}")
            return self.data[key]

    def key_value_try_get(self, key):
        with self.cond:
            if key not in self.data:
                raise RuntimeError(f"NOT_FOUND: {key}")
            return self.data[key]

    def key_value_delete(self, key):
        with self.cond:
            self.data.pop(key, None)


def _request(model, prompt, max_new, temperature=0.0, seed=0, stop=True, **sampling):
    return Request(tuple(prompt), max_new, SamplingParams(temperature, seed=seed, **sampling),
                   tuple(model.stop_ids) if stop else ())


@pytest.fixture(scope="module")
def model():
    from kimi_jax.runtime.default_model import load_default

    return load_default()


def _pair(model, store, timeout_s=30.0, **kwargs):
    lead = Scheduler(model.generator, lockstep_=lockstep.Lockstep(store, 0, 2, timeout_s, heartbeat_s=0.05), **kwargs)
    follower = Scheduler(model.generator, lockstep_=lockstep.Lockstep(store, 1, 2, timeout_s, heartbeat_s=0.05),
                         **kwargs)
    thread = threading.Thread(target=follower.follow, daemon=True)
    thread.start()
    return lead.start(), follower, thread


def test_process_0_is_ready_only_once_every_follower_is():
    """`ready` on process 0 returns only after each follower's (their warm-up may take longer), and at
    once when a follower is lost instead."""
    store = MemoryStore()
    lead = lockstep.Lockstep(store, 0, 3, heartbeat_s=0.05)
    returned = threading.Event()
    waiter = threading.Thread(target=lambda: (lead.ready(), returned.set()), daemon=True)
    waiter.start()
    lockstep.Lockstep(store, 2, 3).ready()
    assert not returned.wait(1.5)  # process 1 has not said it is ready
    lockstep.Lockstep(store, 1, 3).ready()
    assert returned.wait(5)
    lost = lockstep.Lockstep(MemoryStore(), 0, 2)
    lost.lost = "process 1 of 2 stopped answering"
    lost.ready()  # returns: there is no one left to wait for


class GoneStore(MemoryStore):
    """The coordination service after process 0 died: calls fail as the runtime's do then."""

    def _gone(self, *_):
        raise RuntimeError("UNAVAILABLE: Failed to get key: GetKeyValue: Socket closed (grpc_status:14)")

    blocking_key_value_get = key_value_set = _gone


def test_a_follower_whose_coordinator_is_gone_raises_coordinator_lost():
    """A follower's wait for the next iteration (or its ready) fails with CoordinatorLost, which the
    serve CLI turns into the line naming the coordinator, not with the runtime's error."""
    follower = lockstep.Lockstep(GoneStore(), 1, 2)
    with pytest.raises(lockstep.CoordinatorLost, match="Socket closed"):
        follower.receive(0)
    with pytest.raises(lockstep.CoordinatorLost):
        follower.ready()
    assert lockstep.Lockstep(MemoryStore(), 1, 2).ready() is None  # a live store: no error
    line = lockstep.lost_coordinator(1, 2, "127.0.0.1:9")
    assert line.startswith("error: process 1 of 2 lost process 0 (coordinator 127.0.0.1:9)")


def test_leader_and_follower_run_the_same_iterations(model):
    store = MemoryStore()
    lead, follower, thread = _pair(model, store, max_batch=4, max_context=128)
    prompts = [[1, 5, 9, 13], [1, 7, 7], [1, 20, 30, 40, 50], [1, 2]]
    outs = []
    for i, p in enumerate(prompts):  # greedy, sampled with a seed, one with penalties and a bias
        out, sink = _collect()
        extra = dict(presence_penalty=0.5, logit_bias=((11, 3.0),)) if i == 2 else {}
        lead.submit(_request(model, p, 12, temperature=0.7 * (i % 2), seed=i, **extra), sink)
        outs.append(out)
    long_out, long_sink = _collect()
    long_job = lead.submit(_request(model, [1, 3, 3, 3], 100, stop=False), long_sink)  # cancelled
    for out in outs:
        assert out["done"].wait(120)
    while long_out["tokens"] == []:
        time.sleep(0.01)
    lead.cancel(long_job)
    assert long_out["done"].wait(60) and long_out["reason"] == "cancelled"
    # Events every process has run are deleted from the store.
    deadline = time.time() + 10
    while sum(k.startswith(f"{lockstep.PREFIX}/step/") for k in store.data) > 0:
        assert time.time() < deadline, sorted(store.data)
        time.sleep(0.05)
    lead.stop()
    thread.join(60)
    assert not thread.is_alive()  # the stop event reached the follower

    for p, out in zip(prompts[::2], outs[::2]):  # the greedy ones are Model.generate's
        if p is not prompts[2]:
            assert out["tokens"] == model.generate([p], max_new_tokens=12, temperature=0)[0]
    # The follower ran every iteration and decided the same: the same tokens made, the same finishes,
    # no job left in a slot.
    assert follower.iterations == lead.iterations
    assert follower.metrics.generation_tokens == lead.metrics.generation_tokens
    assert follower.metrics.requests == lead.metrics.requests
    assert follower.active == lead.active == 0


def test_leader_and_follower_take_the_same_page_decisions(model):
    """A pool of one sequence's pages for 4 slots: admission waits, sequences are preempted and prompts
    hit the prefix cache, identically on both processes (the follower decides from the events alone)."""
    store = MemoryStore()
    lead, follower, thread = _pair(model, store, max_batch=4, max_context=64, page_size=8, num_pages=8,
                                   prefill_chunk=5)  # prompts are prefilled in chunks, and preempted between them
    prompts = [[1, 5, 9, 13] * 5, [1, 7, 7], [1, 5, 9, 13] * 5 + [2, 3], [3, 1, 4, 1, 5, 9, 2, 6]]
    outs = []
    for p in prompts:
        out, sink = _collect()
        lead.submit(_request(model, p, 20), sink)
        outs.append(out)
    for out in outs:
        assert out["done"].wait(300)
    lead.stop()
    thread.join(60)
    for p, out in zip(prompts, outs):
        assert out["tokens"] == model.generate([p], max_new_tokens=20, temperature=0)[0]
    assert lead.metrics.preemptions > 0
    for name in ("preemptions", "prefix_hit_tokens", "prefix_queried_tokens", "prefill_calls", "decode_calls"):
        assert getattr(follower.metrics, name) == getattr(lead.metrics, name), name
    assert follower.pages.evictions == lead.pages.evictions
    assert follower.pages._free == lead.pages._free and list(follower.pages._lru) == list(lead.pages._lru)


def test_silent_follower_fails_the_leaders_jobs(model):
    store = MemoryStore()
    lead = Scheduler(model.generator, max_batch=2, max_context=128,
                     lockstep_=lockstep.Lockstep(store, 0, 2, timeout_s=0.5, heartbeat_s=0.05)).start()
    out, sink = _collect()  # no follower ever beats
    lead.submit(_request(model, [1, 2, 3], 8), sink)
    assert out["done"].wait(30)
    assert out["reason"].startswith("error: process 1 of 2 stopped answering"), out["reason"]
    assert not lead.alive
    with pytest.raises(SchedulerStopped, match="stopped answering"):
        lead.submit(_request(model, [1, 2], 4), _collect()[1])
    lead.stop()


def test_requests_cross_the_wire_exactly():
    r = Request((1, 2, 300000), 17, SamplingParams(0.6000000000000001, 0.95, 40, 2**32 - 1, -1.5, 0.25,
                                                   ((5, -100.0), (7, 0.1))), (2, 163586), True)
    import json

    assert lockstep.request_from_json(json.loads(json.dumps(lockstep.request_to_json(r)))) == r


def test_constrained_requests_run_alike_on_every_process(model):
    """Each process matches the grammars itself: the same masks, tokens and finishes without sending them."""
    import dataclasses

    import jsonschema

    from kimi_jax.runtime.requests import Constraint
    from kimi_jax.text.grammar import Grammars, json_grammar, tool_call_grammar
    from kimi_jax.text.tool_calls import SECTION_BEGIN

    tok = model.tokenizer
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    marker = tok.special_ids[SECTION_BEGIN]
    store = MemoryStore()
    lead, follower, thread = _pair(model, store, max_batch=4, max_context=128,
                                   grammars=Grammars(tok, model.config.padded_vocab_size))
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the weather in Paris?"}])
    constraints = [Constraint(json_grammar(schema)), None,
                   Constraint(tool_call_grammar(tok, [("get_weather", {"type": "object"})], opened=True), marker)]
    outs = []
    for i, c in enumerate(constraints):
        out, sink = _collect()
        lead.submit(dataclasses.replace(_request(model, prompt, 40, temperature=1.0, seed=i), constraint=c), sink)
        outs.append(out)
    for out in outs:
        assert out["done"].wait(120)
    lead.stop()
    thread.join(60)
    jsonschema.validate(json.loads(tok.decode(outs[0]["tokens"][:-1])), schema)
    assert follower.metrics.masked_tokens == lead.metrics.masked_tokens > 0
    assert follower.metrics.generation_tokens == lead.metrics.generation_tokens
    assert follower.metrics.requests == lead.metrics.requests and follower.iterations == lead.iterations
