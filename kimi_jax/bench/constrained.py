"""What one constrained stream costs the batch it shares: decode throughput of `streams` streams with
`constrained` of them following a JSON-Schema grammar, against the same streams all unconstrained.

Both batches run through the scheduler (continuous batching, the server's path without HTTP), on
the same model and prompts, alternately round by round after a warm-up that compiles every program.
Every stream makes exactly `max_new` tokens (no stop ids; the grammar — an array of `max_new` enum
items — cannot end sooner), so both sides do the same work and only the constraint differs: its
masks on the host, asked for by every step of the decode loop while it is active (runtime/constrained.py).
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time

import numpy as np

from kimi_jax.runtime.requests import Constraint, make_requests
from kimi_jax.runtime.scheduler import Scheduler
from kimi_jax.text.grammar import Grammars, json_grammar


def _schema(items: int) -> dict:
    """An array no reply can finish in fewer than `items` tokens."""
    return {"type": "array", "items": {"enum": ["alpha", "beta", "gamma"]}, "minItems": items, "maxItems": items}


def _run_batch(scheduler: Scheduler, requests) -> float:
    """Submit all requests at once; seconds until the last one finishes."""
    left, done = [len(requests)], threading.Event()

    def sink(tokens, reason, logprobs=None):
        if reason is not None:
            if reason not in ("length", "stop"):
                raise RuntimeError(f"a benchmark request ended with {reason}")
            left[0] -= 1
            if left[0] == 0:
                done.set()

    start = time.perf_counter()
    for r in requests:
        scheduler.submit(r, sink)
    if not done.wait(3600):
        raise TimeoutError("the benchmark batch did not finish within an hour")
    return time.perf_counter() - start


def run(model, streams: int = 16, constrained: int = 1, max_new: int = 256, rounds: int = 3, log=print) -> dict:
    """Rounds of (all free, `constrained` constrained) batches -> tokens/s medians and their ratio."""
    tok = model.tokenizer
    grammars = Grammars(tok, model.config.padded_vocab_size)
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"List some words ({i})."}])
               for i in range(streams)]
    free = make_requests(model.config, prompts, max_new, temperature=0.0)  # no stop ids: max_new tokens each
    grammar = Constraint(json_grammar(_schema(max_new)))
    mixed = [dataclasses.replace(r, constraint=grammar) if i < constrained else r for i, r in enumerate(free)]
    scheduler = Scheduler(model.generator, max_batch=streams, max_context=max(len(p) for p in prompts) + max_new + 1,
                          grammars=grammars).start()
    try:
        for batch in (free, mixed):  # warm-up, shorter: compiles prefill and both decode calls at these shapes
            _run_batch(scheduler, [dataclasses.replace(r, max_new_tokens=8) for r in batch])
        seconds: dict[str, list[float]] = {"free": [], "mixed": []}
        for r in range(rounds):
            for name, batch in (("free", free), ("mixed", mixed)):
                masks_before = scheduler.metrics.mask_seconds
                seconds[name].append(_run_batch(scheduler, batch))
                log(f"round {r + 1}/{rounds} {name}: {seconds[name][-1]:.2f} s "
                    f"(host masks {scheduler.metrics.mask_seconds - masks_before:.2f} s)")
    finally:
        scheduler.stop()
    tokens = streams * max_new
    rate = {name: tokens / statistics.median(s) for name, s in seconds.items()}
    return {"streams": streams, "constrained": constrained, "max_new_tokens": max_new, "rounds": rounds,
            "seconds": seconds, "tokens_per_s": rate, "slowdown": rate["free"] / rate["mixed"] - 1}


def markdown(result: dict, command: str, machine: str) -> str:
    r, rate = result, result["tokens_per_s"]
    return "\n".join([
        f"`{command}` — {machine}", "",
        f"{r['streams']} streams × {r['max_new_tokens']} tokens, {r['constrained']} of them constrained by a JSON "
        f"Schema; medians of {r['rounds']} alternating rounds:", "",
        "| batch | tokens/s | seconds per round |", "|---|---:|---|",
        f"| all unconstrained | {rate['free']:.1f} | {', '.join(f'{s:.2f}' for s in r['seconds']['free'])} |",
        f"| {r['constrained']} constrained | {rate['mixed']:.1f} | "
        f"{', '.join(f'{s:.2f}' for s in r['seconds']['mixed'])} |", "",
        f"Slowdown of the batch: **{100 * r['slowdown']:.1f}%**.",
    ])


def callback_cost(model, streams: int = 16, steps: int = 16, calls: int = 40) -> dict:
    """What the per-step mask callback itself costs a decode step, apart from any grammar: decode calls of
    `steps` steps over `streams` rows, alternately without masks and with a mask source that returns
    "everything allowed" at once. -> median ms per step of each, and their difference. Every 8th call
    prefills the rows again (so the context stays short) and is not timed."""
    g, tok = model.generator, model.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"List some words ({i})."}])
               for i in range(streams)]
    requests = make_requests(model.config, prompts, 2 * 8 * steps + 1, temperature=0.0,  # 8 calls of each kind
                             stop_token_ids=[])
    everything = np.full((streams, -(-model.config.padded_vocab_size // 32)), -1, np.int32)
    source = g.register_masks(lambda tokens, generated, done: everything)
    ms: dict[str, list[float]] = {"free": [], "masked": []}
    for i in range(calls):
        if i % 8 == 0:
            _, cache, state, rows, _ = g.prefill(requests)
        for name, masks in (("free", None), ("masked", source)):
            start = time.perf_counter()
            cache, state, out, _ = g.decode(cache, state, rows, steps, masks=masks)
            np.asarray(out)  # blocks on the call
            if i % 8:
                ms[name].append(1e3 * (time.perf_counter() - start) / steps)
    free, masked = (statistics.median(ms[k]) for k in ("free", "masked"))
    return {"streams": streams, "steps_per_call": steps, "timed_calls": len(ms["free"]),
            "ms_per_step": {"free": free, "masked": masked}, "added_ms": masked - free}
