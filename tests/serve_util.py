"""Helpers for the serving tests: a test-only output script and a /metrics reader.

SCRIPTED OUTPUT (test-only): most serving tests check the server's handling of exact replies, which a
model's sampled tokens do not give. `weather_script` is passed as `Scheduler(script=...)`: for a prompt that
declares the `get_weather` tool and holds no tool result yet it forces Kimi's native tool-call
tokens, and for a prompt holding a `## Return of` tool result it forces a short answer; a prompt
holding `LONG_TALK` gets 400 tokens with no stop (the trained model ends its replies itself). Every
other prompt gets the model's own tokens. Forced jobs still take a slot and decode with the
others; only the token ids handed to the server are replaced.
"""

from __future__ import annotations

import json
import re

from kimi_jax.serve.cli import LiveServer  # noqa: F401  (re-exported for the tests)

WEATHER_CALL = ('<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>'
                '{"city": "Beijing"}<|tool_call_end|><|tool_calls_section_end|>')
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


def weather_script(tokenizer):
    def script(prompt):
        text = tokenizer.decode(prompt)
        if LONG_TALK in text:  # a reply of 400 tokens with no stop in it (a scripted row runs as long as its script)
            return tokenizer.encode("la " * 400)[:400]
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
