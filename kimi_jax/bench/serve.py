"""Serving benchmark: output tokens/s and time to first token against concurrent streaming clients.

Each level starts `clients` streaming chat requests at once (greedy, `max_tokens` each, distinct
prompts of similar length), `rounds` times back to back per client; a warm-up pass at the level
first compiles the prefill shapes it needs. Reported per level: output tokens/s over the level's
wall time, and p50 / p99 time to first token (request sent -> first content chunk received),
plus the mean decode-batch occupancy from the server's /metrics.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import numpy as np


async def chat_chunks(client, url: str, body: dict) -> AsyncIterator[dict]:
    """The parsed SSE chunks of one streaming chat completion (`body` gets stream and usage on)."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])


async def _one(client, url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """One streaming request -> (seconds to its first content chunk, completion tokens)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0}
    start, first, tokens = time.perf_counter(), None, 0
    async for chunk in chat_chunks(client, url, body):
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = time.perf_counter() - start
    return (first if first is not None else time.perf_counter() - start), tokens


def _occupancy(url: str) -> tuple[float, float]:
    import httpx

    samples = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("kimi_jax_"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples["kimi_jax_batch_occupancy_slot_steps_total"], samples["kimi_jax_decode_steps_total"]


async def run_level(url: str, model: str, clients: int, rounds: int, max_tokens: int) -> dict:
    """One concurrency level (after a warm-up pass) -> its measurements."""
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker(i: int, n_rounds: int, tokens: int):
            return [await _one(client, url, model, f"Request {i}.{r}: describe the number {i * 31 + r}.", tokens)
                    for r in range(n_rounds)]

        await asyncio.gather(*(worker(i, 1, 4) for i in range(clients)))  # warm-up: compiles this level's shapes
        occupied0, steps0 = _occupancy(url)
        start = time.perf_counter()
        results = await asyncio.gather(*(worker(i, rounds, max_tokens) for i in range(clients)))
        wall = time.perf_counter() - start
        occupied1, steps1 = _occupancy(url)
    flat = [x for per_client in results for x in per_client]
    ttft = np.array([t for t, _ in flat])
    tokens = sum(n for _, n in flat)
    return {"clients": clients, "requests": len(flat), "output_tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1), "ttft_p50_ms": round(float(np.percentile(ttft, 50)) * 1e3, 1),
            "ttft_p99_ms": round(float(np.percentile(ttft, 99)) * 1e3, 1),
            "mean_occupancy": round((occupied1 - occupied0) / max(steps1 - steps0, 1), 1)}


def markdown_table(rows: list[dict]) -> str:
    head = "| clients | requests | output tokens | wall s | output tokens/s | TTFT p50 ms | TTFT p99 ms | mean batch |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['output_tokens']} | {r['wall_s']} | {r['tokens_per_s']} "
                     f"| {r['ttft_p50_ms']} | {r['ttft_p99_ms']} | {r['mean_occupancy']} |")
    return "\n".join(lines)


def bench(url: str, model: str, levels: list[int], rounds: int, max_tokens: int) -> list[dict]:
    rows = []
    for clients in levels:
        rows.append(asyncio.run(run_level(url, model, clients, rounds, max_tokens)))
        print(json.dumps(rows[-1]), flush=True)
    return rows
