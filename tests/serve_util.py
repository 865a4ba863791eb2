"""Helpers for the serving tests: a generator that scripts some replies, and a /metrics reader.

SCRIPTED REPLIES (test-only): most serving tests check the server's handling of exact replies, which a
model's sampled tokens do not give. `ScriptedGenerator` wraps the real Generator and is what the
scheduler runs: for a prompt that `weather_script` recognises, the tokens handed to the scheduler are
the script's instead of the model's. It forces Kimi's native tool-call tokens for a prompt that declares
the `get_weather` tool and holds no tool result yet (two calls when it asks about TWO_CITIES), a short
answer for a prompt holding a `## Return of` tool result, and 400 tokens with no stop for a prompt holding
`LONG_TALK` (the trained model ends its replies itself). Every other prompt gets the model's own tokens.
A scripted request still takes a slot, prefills and decodes with the others, and its reply is cut at the
request's max_tokens like a model's. Clearing its `running` event holds every decode call until it is
set again, so a test can act while a request is known to be mid-generation.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import jax.numpy as jnp
import numpy as np

from kimi_jax.serve.cli import LiveServer  # noqa: F401  (re-exported for the tests)

WEATHER_CALL = ('<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>'
                '{"city": "Beijing"}<|tool_call_end|><|tool_calls_section_end|>')
TWO_CALLS = WEATHER_CALL.replace("<|tool_calls_section_end|>", "") + (
    '<|tool_call_begin|>functions.get_weather:1<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
    '<|tool_calls_section_end|>')
TWO_CITIES = "Beijing and Paris"  # a weather question the script answers with two calls (TWO_CALLS)
WEATHER_ANSWER = "It is sunny in Beijing."
LONG_TALK = "talk for a long time"  # a prompt the script answers with 400 tokens that never stop

# The model card's "Tool Calling" example (kimi-k2-instruct README), as written there: the tool's
# declaration, the tool, and the client loop.
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Retrieve current weather information. Call this when the user asks about "
                                         "the weather.",
    "parameters": {"type": "object", "required": ["city"],
                   "properties": {"city": {"type": "string", "description": "Name of the city"}}}}}]


def get_weather(city: str) -> dict:
    return {"weather": "Sunny"}


def tool_call_with_client(client, model_name: str):
    """The model card's loop, unchanged (tool_choice auto, role: tool results): returns the tool calls
    made, round by round, and the final choice."""
    messages = [{"role": "system", "content": "You are Kimi, an AI assistant created by Moonshot AI."},
                {"role": "user", "content": "What's the weather like in Beijing today? Use the tool to check."}]
    tool_map = {"get_weather": get_weather}
    finish_reason, rounds = None, []
    while finish_reason is None or finish_reason == "tool_calls":
        completion = client.chat.completions.create(model=model_name, messages=messages, temperature=0.6,
                                                    tools=TOOLS, tool_choice="auto")
        choice = completion.choices[0]
        finish_reason = choice.finish_reason
        if finish_reason == "tool_calls":
            messages.append(choice.message)
            rounds.append(choice.message.tool_calls)
            for tool_call in choice.message.tool_calls:
                tool_result = tool_map[tool_call.function.name](**json.loads(tool_call.function.arguments))
                messages.append({"role": "tool", "tool_call_id": tool_call.id, "name": tool_call.function.name,
                                 "content": json.dumps(tool_result)})
    return rounds, choice


def collect():
    """A scheduler job's sink and what it gathers: {"tokens", "logprobs" (one entry per token of a job that
    asks for them), "reason", "done" (an Event set at the finish)}."""
    out = {"tokens": [], "logprobs": [], "reason": None, "done": threading.Event()}

    def sink(tokens, reason, logprobs=None):
        out["tokens"] += tokens
        out["logprobs"] += logprobs or []
        if reason is not None:
            out["reason"] = reason
            out["done"].set()

    return out, sink


def weather_script(tokenizer):
    def script(prompt):
        text = tokenizer.decode(prompt)
        if LONG_TALK in text:  # a reply of 400 tokens with no stop in it
            return tokenizer.encode("la " * 400)[:400]
        if "get_weather" not in text:
            return None
        answer = WEATHER_ANSWER if "## Return of" in text else TWO_CALLS if TWO_CITIES in text else WEATHER_CALL
        return tokenizer.encode_with_special(answer) + [tokenizer.im_end_id]

    return script


class ScriptedGenerator:
    """The real Generator, with the replies to scripted prompts rewritten (see the module docstring).

    script(prompt ids) -> token ids, or None for the model's own reply. The scheduler uses a generator
    through prefill_paged / decode (and its settings, forwarded): prefill gives a scripted row the
    script's first token and says which slot the row lands in, and each decode call's tokens for that
    slot are the script's next ones. The slot's real row runs with no stop ids and a
    length of the (cut) script, so the row's `done` falls exactly when the script ends.
    """

    def __init__(self, generator, script):
        self.generator, self.script = generator, script
        self._slots: dict[int, list] = {}  # slot -> [scripted tokens, how many handed out]
        self.running = threading.Event()  # cleared: decode calls wait (a test's pause)
        self.running.set()

    def __getattr__(self, name):  # cfg, dtype, mesh, layout, batch_shards, steps_per_call
        return getattr(self.generator, name)

    def prefill_paged(self, pool, counts, requests, slots, tables, starts, histories, allowed=None, ends=None):
        logits, pool, counts, state, rows, first = self.generator.prefill_paged(pool, counts, requests, slots, tables,
                                                                                starts, histories, allowed, ends)
        first, state = np.array(first), state._replace(done=np.array(state.done))
        for k, (request, slot, history) in enumerate(zip(requests, slots, histories)):
            if ends is not None and ends[k] < len(request.prompt) + len(history):
                continue  # a chunk of a longer prompt: its token is not taken
            tokens = self.script(request.prompt)
            tokens = None if tokens is None else list(tokens)[:request.max_new_tokens]  # bounded like a model
            if tokens:  # a resumed (preempted) row goes on from the tokens it was given
                given = min(len(history), len(tokens) - 1)
                first[k], state.done[k] = tokens[given], given + 1 == len(tokens)
                self._slots[slot] = [tokens, given + 1]
            else:
                self._slots.pop(slot, None)
        return logits, pool, counts, state, rows, first

    def decode(self, cache, state, rows, steps=None, logprobs=None, adjust=False, masks=None):
        self.running.wait()
        if self._slots:
            slots = np.array(list(self._slots))
            lengths = np.array([len(tokens) for tokens, _ in self._slots.values()], np.int32)
            rows = rows._replace(stop_ids=jnp.asarray(rows.stop_ids).at[slots].set(-1),
                                 max_new=jnp.asarray(rows.max_new).at[slots].set(lengths))
        cache, state, out, lps = self.generator.decode(cache, state, rows, steps, logprobs, adjust, masks)
        out = np.array(out)  # (steps, B)
        for slot, entry in self._slots.items():
            tokens, given = entry
            for step in np.flatnonzero(out[:, slot] >= 0):
                out[step, slot] = tokens[min(given, len(tokens) - 1)]
                given += 1
            entry[1] = given
        return cache, state, out, lps


def metrics(url: str) -> dict[str, float]:
    """The server's Prometheus samples as {name{labels}: value}."""
    import httpx

    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[re.sub(r"^kimi_jax_", "", name)] = float(value)
    return out


ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def serve_subprocess(args: list[str], logs: Path):
    """`python -m kimi_jax.serve ARGS` as a user starts it, on a free port; yields its URL once /health
    answers 200. Its stdout and stderr go to logs/stdout and logs/stderr."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "kimi_jax.serve", "--port", str(port), *args], cwd=ROOT,
                                env=env, stdout=out, stderr=err)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"server did not come up:\n{(logs / 'stderr').read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
