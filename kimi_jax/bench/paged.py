"""Serving over the paged cache (BENCHMARKS.md "Paged cache"): capacity, prefix caching, chunked prefill.

Each scenario starts `python -m kimi_jax.serve` as a user does (the embedded default model unless the
server flags say otherwise), on a free 127.0.0.1 port, and talks to it over HTTP with greedy requests;
the configurations a scenario compares run one after the other in the same invocation.

- capacity: a KV pool of 8 × 4,096 positions (`--kv-pages`) and 64 slots; `clients` requests of
  256 prompt + 256 reply tokens sent at once (their stop tokens banned with logit_bias, so each reply
  is exactly 256 tokens). Reported: the most sequences one decode call ran (`batch_occupancy_max`),
  preemptions, and the wall time.
- prefix: the model card's tool loop (tests/serve_util.py; tool results sent back as `role: tool`,
  a follow-up user turn when the reply calls no tool) behind a ~2,000-token system prompt with the
  model card's weather tool, `turns` turns; time to first token of each turn (request sent -> first
  streamed delta), with the prefix cache on and off (`--no-prefix-cache`), and the hit rate; two
  conversations with their own system prompts run first, unmeasured (they compile what it needs).
  The greedy replies of all three conversations (`replies`: every turn's assistant message, its
  text and tool calls) are returned too, so that the two runs' replies can be compared (in any `--dtype`).
- itl: 8 streams decoding when a 4,000-token prompt arrives. The inter-token latency of a stream is
  the gap between two of its deliveries (one per decode call, `--steps-per-call` tokens); reported
  are the p99 of the gaps that overlap the prompt's admission (sent -> its first token) and the
  median of the same gaps (the same streams at the same lengths) in a control run without the
  prompt (`matched_gaps`; 3 measured runs, their gaps pooled); the median gap before the prompt
  arrives is reported too. With `--prefill-chunk` 128 (the CPU default), 256, 512 (the GPU and TPU
  default) and 4096 (one chunk for the whole prompt: how the server prefilled before chunking); the
  prefix cache is off, so the long prompt is computed whole.
- warm_up: two starts on one empty compile cache, cold and then loading from it: launch -> ready,
  the warm-up's seconds and programs, and what a varied load compiles after ready (nothing).
- calls (in-process, no server): one compiled call timed alone, median of 5 after a warm-up call.
  A decode call of 8 steps over 16 slots with 8 rows of 400 tokens, with and without a 9th of 4,000,
  its attention reading through the page table (every slot as far as the longest row, the width
  bucketed) and as the scheduler reads it, through blocks of the rows' own pages; and a prefill
  chunk of 256 tokens after 0 / 768 / 1,792 / 3,584 cached positions.
- hits (in-process): a prompt prefilled from a prefix hit (its first pages another prompt's, cached)
  against the same prompt prefilled whole, last-token logits compared, for prompts of 40–96 tokens
  plus 9 of their own; in fp32 they agree to rounding, in bfloat16 the two computations round
  differently (the hit's chunk has other shapes), which can change a greedy token where the top two
  logits are that close.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import httpx
import jax.numpy as jnp
import numpy as np

from kimi_jax.bench.serve import chat_chunks
from kimi_jax.model.paged import init_pages, with_table
from kimi_jax.runtime import generation
from kimi_jax.runtime.compile_cache import COMPILE_CACHE_ENV
from kimi_jax.runtime.default_model import load_default
from kimi_jax.runtime.pages import decode_blocks, pages_for, table_width
from kimi_jax.runtime.requests import make_requests

MODEL = "kimi-k2-instruct"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Retrieve current weather information. Call this when the user asks about "
                                         "the weather.",
    "parameters": {"type": "object", "required": ["city"],
                   "properties": {"city": {"type": "string", "description": "Name of the city"}}}}}


@contextlib.contextmanager
def serve(*flags: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """`python -m kimi_jax.serve FLAGS` on a free port (with `env` added to the environment): yields its
    URL once /health answers 200."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "kimi_jax.serve", "--port", str(port), *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            if time.time() > deadline:
                raise RuntimeError("the server was not ready within 600 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        if proc.poll() is None:
            proc.kill()


def metrics(url: str) -> dict[str, float]:
    """The server's /metrics samples (unlabelled ones by name)."""
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("kimi_jax_"):
            name, value = line.rsplit(" ", 1)
            out[name.removeprefix("kimi_jax_")] = float(value)
    return out


def stop_bias(url: str) -> dict[str, float]:
    """logit_bias banning the model's end-of-turn tokens (from the server's tokenizer: the embedded model's)."""
    from kimi_jax.runtime.default_model import load_default  # deferred: the bench process needs no model otherwise

    return {str(t): -100.0 for t in load_default().stop_ids}


def text_of(url: str, tokens: int, tag: str) -> str:
    """A user message of about `tokens` prompt tokens (chat template included), distinct per `tag`:
    calibrated with one 1-token request."""
    def words(n):
        return " ".join(f"{tag} note {i} says the river {i % 7} is calm." for i in range(n))

    def prompt_tokens(text):
        body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 1, "temperature": 0}
        return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600).json()["usage"]["prompt_tokens"]

    probe = 40
    per = (prompt_tokens(words(probe)) - prompt_tokens(words(1))) / (probe - 1)
    n = max(1, int((tokens - prompt_tokens(words(1))) / per) + 1)
    while n > 1 and prompt_tokens(words(n)) > tokens:
        n -= 1
    return words(n)


async def _stream(client: httpx.AsyncClient, url: str, body: dict, deliveries: list[float] | None = None) -> dict:
    """One streaming chat request -> {"sent", "deliveries", "message"}: the times (perf_counter) of the
    chunks that carried text or a call, appended to `deliveries` as they arrive (a cancelled stream
    keeps what it had), and the assistant message they make up."""
    sent, content, calls = time.perf_counter(), "", {}
    deliveries = [] if deliveries is None else deliveries
    async for chunk in chat_chunks(client, url, body):
        if not chunk["choices"]:
            continue
        delta = chunk["choices"][0]["delta"]
        if delta.get("content") or delta.get("tool_calls") or delta.get("reasoning_content"):
            deliveries.append(time.perf_counter())
        content += delta.get("content") or ""
        for call in delta.get("tool_calls") or []:
            got = calls.setdefault(call["index"], {"id": None, "name": "", "arguments": ""})
            got["id"] = call.get("id") or got["id"]
            got["name"] += call.get("function", {}).get("name") or ""
            got["arguments"] += call.get("function", {}).get("arguments") or ""
    message = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = [{"id": c["id"], "type": "function",
                                  "function": {"name": c["name"], "arguments": c["arguments"]}}
                                 for _, c in sorted(calls.items())]
    return {"sent": sent, "deliveries": deliveries, "message": message}


# Scenarios ------------------------------------------------------------------------------------
def warm_up(flags: list[str]) -> list[dict]:
    """Two starts of the server on one empty compile cache (cold, then loading from it): the seconds
    from launch to /health ready, the warm-up's own seconds and programs, and the compilations after a
    varied load (a long prompt, a prefix hit, n=2, logprobs, logit_bias, a json_schema) — none if the
    warm-up built everything."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    out = []
    with tempfile.TemporaryDirectory() as cache:
        for start in ("cold", "from the compile cache"):
            launched = time.perf_counter()
            with serve(*flags, env={COMPILE_CACHE_ENV: cache}) as url:
                ready = time.perf_counter() - launched
                ready_metrics = metrics(url)
                long = text_of(url, 1500, "w")
                bodies = [{"messages": [{"role": "user", "content": long}]},
                          {"messages": [{"role": "user", "content": long + " again"}], "n": 2, "temperature": 0.7,
                           "seed": 1},
                          {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 3},
                          {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"7": -100}},
                          {"messages": [{"role": "user", "content": "a city"}],
                           "response_format": {"type": "json_schema",
                                               "json_schema": {"name": "c", "schema": schema, "strict": True}}}]

                async def run(bodies: list[dict]) -> list[httpx.Response]:
                    async with httpx.AsyncClient(timeout=1800) as client:
                        return await asyncio.gather(*(client.post(f"{url}/v1/chat/completions", json={
                            "model": MODEL, "max_tokens": 24, "temperature": 0, **b}) for b in bodies))

                failed = [r.text for r in asyncio.run(run(bodies)) if r.status_code != 200]
                if failed:
                    raise RuntimeError(f"a warm-up bench request failed: {failed[0][:500]}")
                after = metrics(url)
            out.append({"start": start, "ready_s": round(ready, 1),
                        "warm_up_s": round(ready_metrics["warm_up_seconds"], 1),
                        "warm_up_programs": int(ready_metrics["warm_up_compilations"]),
                        "compiled_after_ready": int(after["compilations_total"] - ready_metrics["compilations_total"])})
    return out


def capacity(flags: list[str], clients: int = 32, prompt: int = 256, reply: int = 256) -> dict:
    """`clients` requests of prompt + reply tokens at once into a pool of 8 × 4,096 positions."""
    pages = 8 * 4096 // 64
    with serve("--max-batch", "64", "--max-context", "4096", "--page-size", "64", "--kv-pages", str(pages),
               *flags) as url:
        bias = stop_bias(url)
        texts = [text_of(url, prompt, f"c{i}") for i in range(clients)]

        async def run():
            async with httpx.AsyncClient(timeout=1800, limits=httpx.Limits(max_connections=clients + 4)) as client:
                body = {"model": MODEL, "max_tokens": reply, "temperature": 0, "logit_bias": bias}
                await _stream(client, url, {**body, "max_tokens": 4,  # warm-up: the shapes of this load
                                            "messages": [{"role": "user", "content": text_of(url, prompt, "w")}]})
                before = metrics(url)
                start = time.perf_counter()
                got = await asyncio.gather(*(_stream(client, url, {**body, "messages": [
                    {"role": "user", "content": t}]}) for t in texts))
                return got, time.perf_counter() - start, before

        got, wall, before = asyncio.run(run())
        after = metrics(url)
    tokens = sum(len(g["deliveries"]) for g in got)
    return {"clients": clients, "positions_each": prompt + reply, "kv_positions": pages * 64,
            "max_concurrent": int(after["batch_occupancy_max"]),
            "preemptions": int(after["preemptions_total"] - before["preemptions_total"]),
            "wall_s": round(wall, 2), "deliveries": tokens}


def prefix(flags: list[str], turns: int = 4, system_tokens: int = 2000) -> dict:
    """The model card's tool loop behind a long system prompt: TTFT per turn, and the hit rate. Two
    conversations with system prompts of their own run first, unmeasured: the programs the measured one
    needs are compiled by then."""
    with serve("--max-context", "4096", *flags) as url:
        systems = [text_of(url, system_tokens, f"system{k}") for k in range(3)]

        async def conversation(system: str) -> list[float]:
            async with httpx.AsyncClient(timeout=1800) as client:
                messages = [{"role": "system", "content": system},
                            {"role": "user", "content": "What's the weather like in Beijing today? Use the tool to "
                                                        "check."}]
                ttft = []
                for _ in range(turns):
                    got = await _stream(client, url, _turn(messages))
                    ttft.append(got["deliveries"][0] - got["sent"])
                    replies.append(got["message"])
                    messages.append(got["message"])
                    for call in got["message"].get("tool_calls") or []:
                        messages.append({"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"],
                                         "content": json.dumps({"weather": "Sunny"})})
                    if not got["message"].get("tool_calls"):
                        messages.append({"role": "user", "content": "And tomorrow?"})
                return ttft

        replies: list[dict] = []  # every turn's assistant message
        for system in systems[:2]:
            asyncio.run(conversation(system))
        before = metrics(url)
        ttft = asyncio.run(conversation(systems[2]))
        after = metrics(url)
    queried = after["prefix_cache_queried_tokens_total"] - before["prefix_cache_queried_tokens_total"]
    hits = after["prefix_cache_hit_tokens_total"] - before["prefix_cache_hit_tokens_total"]
    return {"ttft_ms": [round(t * 1e3, 1) for t in ttft], "later_over_first": round(max(ttft[1:]) / ttft[0], 3),
            "hit_rate": round(hits / queried, 3) if queried else 0.0, "replies": replies}


def _turn(messages: list[dict]) -> dict:
    return {"model": MODEL, "messages": messages, "tools": [WEATHER_TOOL], "tool_choice": "auto",
            "max_tokens": 32, "temperature": 0}


def itl(flags: list[str], streams: int = 8, long_tokens: int = 4000, baseline_s: float = 3.0, repeats: int = 3) -> dict:
    """Inter-token latency of `streams` running streams while a long prompt is admitted, against the same
    streams at the same lengths without it (`matched_gaps`). On one server: a warm-up run with a long
    prompt (unmeasured: every program it needs is compiled by then, or loaded from the compile cache),
    a control run without one, then `repeats` measured runs, each with a prompt of its own, whose gaps
    are pooled (a run's admission spans only ~10–40 decode calls, each delaying all the streams at
    once, so one run's p99 is about its single worst call)."""
    # No prefix cache: the long prompt is computed whole (calibrating its length has sent it once).
    with serve("--max-batch", "16", "--max-context", "4096", "--no-prefix-cache", *flags) as url:
        bias = stop_bias(url)
        longs = [text_of(url, long_tokens, f"long{k}") for k in range(repeats + 1)]

        async def once(long: str | None, tag: str):
            """-> (each stream's delivery times, when the long prompt was sent, its first token's time)."""
            times = [[] for _ in range(streams)]
            async with httpx.AsyncClient(timeout=1800, limits=httpx.Limits(max_connections=streams + 4)) as client:
                body = {"model": MODEL, "temperature": 0, "logit_bias": bias}
                runs = [asyncio.create_task(_stream(client, url, {**body, "max_tokens": 2500, "messages": [
                    {"role": "user", "content": f"Stream {tag}{i}: tell a long story."}]}, times[i]))
                    for i in range(streams)]
                while min(map(len, times)) < 2:  # every stream is decoding
                    await asyncio.sleep(0.05)
                await asyncio.sleep(baseline_s)
                arrived, admitted = time.perf_counter(), None
                if long is not None:
                    got = await _stream(client, url, {**body, "max_tokens": 4, "messages": [
                        {"role": "user", "content": long}]})
                    admitted = got["deliveries"][0]
                await asyncio.sleep(0.5 if long is not None else 5.0)  # the control runs past any admission
                for task in runs:
                    task.cancel()
                await asyncio.gather(*runs, return_exceptions=True)
            return times, arrived, admitted

        asyncio.run(once(longs[0], "warm"))
        control, _, _ = asyncio.run(once(None, "control"))
        runs = [asyncio.run(once(long, f"run{k}")) for k, long in enumerate(longs[1:])]
    return matched_gaps(runs, control, baseline_s)


def matched_gaps(runs: list[tuple[list[list[float]], float, float]], control: list[list[float]],
                 baseline_s: float) -> dict:
    """The `itl` figures from measured runs, each (every stream's delivery times, when the long prompt
    was sent, when its first token came), and `control`, the streams' delivery times without it.

    A gap is the time between two consecutive deliveries of a stream; gap j of a stream ends its
    (j+1)-th delivery, so with the same tokens per delivery it falls at the same length of the stream
    in every run. The gaps *during* are those that overlap an admission, pooled over the runs; the
    ratio is their p99 over the median of the control's gaps with the same indices: the same streams,
    as long, without the prompt. A decode call's cost grows with its rows (their blocks of keys), so
    the gaps before the prompt arrived, the streams still shorter, are reported apart
    (`median_before_ms`) and are not the reference."""
    before, during, without = [], [], []
    for times, arrived, admitted in runs:
        for ts, alone in zip(times, control):
            for j, (a, b) in enumerate(zip(ts, ts[1:])):
                if arrived - baseline_s <= a and b < arrived:
                    before.append(b - a)
                elif a < admitted and b > arrived:  # overlaps the admission (the gap it widens ends after it)
                    during.append(b - a)
                    if j + 1 < len(alone):
                        without.append(alone[j + 1] - alone[j])
    if not during or not without or not before:
        raise ValueError(f"no gaps to compare ({len(before)} before, {len(during)} during the admissions, "
                         f"{len(without)} matched in the control): the streams ended before the prompt was in")
    median, p99 = float(np.median(without)), float(np.percentile(during, 99))
    admission = [admitted - arrived for _, arrived, admitted in runs]
    return {"median_itl_ms": round(median * 1e3, 1), "p99_itl_admitting_ms": round(p99 * 1e3, 1),
            "ratio": round(p99 / median, 2), "median_before_ms": round(float(np.median(before)) * 1e3, 1),
            "ratio_to_before": round(p99 / float(np.median(before)), 2), "gaps_before": len(before),
            "gaps_during": len(during), "gaps_matched": len(without), "runs": len(runs),
            "admission_ms": round(float(np.median(admission)) * 1e3, 1),
            "worst_gap_ms": round(max(during) * 1e3, 1)}


def _median_ms(call, repeats: int = 5) -> float:
    call()  # compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return round(float(np.median(times)) * 1e3, 1)


def calls(page_size: int = 64, slots: int = 16, num_pages: int = 1024) -> dict:
    """The `calls` scenario (module docstring) on the embedded model in fp32 -> {name: ms}."""
    model = load_default()
    cfg, gen = model.config, model.generator
    state = {"pool": init_pages(cfg, num_pages, page_size, model.dtype)}
    requests = make_requests(cfg, [[5]] * slots, max_new_tokens=cfg.max_position_embeddings - 1,
                                        temperature=0)
    rows = generation.request_rows(requests, slots)
    out = {}

    def decode(lengths: list[int], read: str) -> float:
        held, first = {}, 0
        for row, n in enumerate(lengths):
            count = pages_for(n + gen.steps_per_call, page_size)
            held[row], first = list(range(first, first + count)), first + count
        table = np.full((slots, pages_for(cfg.max_position_embeddings, page_size)), -1, np.int32)
        for row, pages in held.items():
            table[row, :len(pages)] = pages
        blocks = None
        if read == "blocks":  # as the scheduler reads
            blocks = decode_blocks(held, page_size, slots)
        else:  # how it read before blocks: the table cut to the longest row (bucketed)
            table = table[:, :table_width(max(map(len, held.values())), page_size, table.shape[1])]
        positions = np.array(lengths + [0] * (slots - len(lengths)), np.int32)
        done = np.arange(slots) >= len(lengths)

        def call():
            start = generation.DecodeState(np.zeros(slots, np.int32), positions.copy(), np.zeros(slots, np.int32),
                                           done.copy(), np.zeros((slots, cfg.padded_vocab_size), np.int32))
            cache, _, tokens, _ = gen.decode(with_table(state["pool"], table, blocks), start, rows)
            np.asarray(tokens)
            state["pool"] = with_table(cache, None)
        return _median_ms(call)

    for name, lengths in (("8 x 400", [400] * 8), ("8 x 400 + 4000", [400] * 8 + [4000])):
        for read in ("table", "blocks"):
            out[f"decode {name}, {read}"] = decode(lengths, read)
    counts = np.zeros((slots, cfg.padded_vocab_size), np.int32)
    for start in (0, 768, 1792, 3584):
        end = start + 256
        whole = pages_for(cfg.max_position_embeddings, page_size)
        table = np.full((1, table_width(pages_for(end, page_size), page_size, whole)), -1, np.int32)
        table[0, :pages_for(end, page_size)] = np.arange(pages_for(end, page_size))
        request = make_requests(cfg, [list(np.arange(end) % 1000 + 3)], max_new_tokens=4, temperature=0)

        def chunk(request=request, table=table, start=start, end=end):
            nonlocal counts
            _, state["pool"], counts, *_, first = gen.prefill_paged(state["pool"], counts, request, [0], table,
                                                                    [start], [[]], None, [end])
            np.asarray(first)
        out[f"chunk of 256 after {start}"] = _median_ms(chunk)
    return out


def hit_logits(model, trials: int = 8, page_size: int = 8) -> dict:
    """The `hits` scenario (module docstring) on `model` -> the largest difference between a prefix
    hit's last logits and a full prefill's, relative to the largest logit, and how many of `trials`
    prompts' greedy next tokens differ."""
    cfg, gen = model.config, model.generator
    rng = np.random.default_rng(0)
    worst, flips = 0.0, 0
    for trial in range(trials):
        base = list(rng.integers(3, cfg.vocab_size - 1, 5 * page_size + trial * page_size))
        longer = base + list(rng.integers(3, cfg.vocab_size - 1, page_size + 1))
        full_pages, width = len(base) // page_size, pages_for(len(longer), page_size) + 1
        pool = init_pages(cfg, 2 * width, page_size, model.dtype)
        counts = jnp.zeros((1, cfg.padded_vocab_size), jnp.int32)
        table = np.full((1, width), -1, np.int32)
        table[0, :pages_for(len(base), page_size)] = np.arange(pages_for(len(base), page_size))
        _, pool, counts, *_ = gen.prefill_paged(pool, counts, make_requests(cfg, [base], 2, temperature=0), [0],
                                                table, [0], [[]])
        # The hit: base's full pages, then pages of its own (base's partly filled page is not shared).
        table = np.full((1, width), -1, np.int32)
        own = pages_for(len(longer), page_size) - full_pages
        table[0, :full_pages + own] = list(range(full_pages)) + list(range(width, width + own))
        request = make_requests(cfg, [longer], 2, temperature=0)
        hit, *_ = gen.prefill_paged(pool, counts, request, [0], table, [full_pages * page_size], [[]])
        full, *_ = gen.prefill(request)
        hit, full = np.asarray(hit[0]), np.asarray(full[0])
        worst = max(worst, float(np.abs(hit - full).max() / np.abs(full).max()))
        flips += int(hit.argmax() != full.argmax())
    return {"max_rel": float(f"{worst:.2g}"), "argmax_differs": flips, "trials": trials}
