"""Helpers for the serving tests: a test-only output script and a /metrics reader.

SCRIPTED OUTPUT (test-only): the embedded default model has random weights, so it never writes a
tool call by itself. `weather_script` is passed as `Scheduler(script=...)`: for a prompt that
declares the `get_weather` tool and holds no tool result yet it forces Kimi's native tool-call
tokens, and for a prompt holding a `## Return of` tool result it forces a short answer. Every
other prompt gets the model's own tokens. Forced jobs still take a slot and decode with the
others; only the token ids handed to the server are replaced.
"""

from __future__ import annotations

import re

from kimi_jax.serve import LiveServer  # noqa: F401  (re-exported for the tests)

WEATHER_CALL = ('<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>'
                '{"city": "Beijing"}<|tool_call_end|><|tool_calls_section_end|>')
WEATHER_ANSWER = "It is sunny in Beijing."


def weather_script(tokenizer):
    def script(prompt):
        text = tokenizer.decode(prompt)
        if "get_weather" not in text:
            return None
        answer = WEATHER_ANSWER if "## Return of" in text else WEATHER_CALL
        return tokenizer.encode_with_special(answer) + [tokenizer.im_end_id]

    return script


def metrics(url: str) -> dict[str, float]:
    """The server's Prometheus samples as {name{labels}: value}."""
    import httpx

    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[re.sub(r"^kimi_jax_", "", name)] = float(value)
    return out
