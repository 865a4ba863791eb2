"""Held-out evaluation of the tiny chat model: does it call `get_weather` for unseen cities, and answer
from the tool's result?

Two measurements over `corpus.heldout_weather_cases` (cities and phrasings no training
conversation contains), each greedy and sampled (temperature 0.6, a fixed seed per case):

  * tool call: from the user's question, the reply must hold exactly one well-formed Kimi tool
    call (as `tool_calls.parse_tool_calls` reads it) to `get_weather` whose JSON arguments are
    `{"city": <the city>}`;
  * answer: given the reference call and the tool's result, the reply must state the result's
    temperature and condition and make no tool call.

Generation goes through the engine (`Model.generate`: bucketed prefill, latent-cache decode),
exactly as a user's `model.chat` would, stopping at `<|im_end|>`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from typing import Any

from kimi_jax.text.tool_calls import parse_tool_calls
from kimi_jax.train.corpus import WeatherCase, heldout_weather_cases

SAMPLED_TEMPERATURE = 0.6  # the release's recommended temperature


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One case's reply and whether it passed."""

    city: str
    text: str
    ok: bool


def _replies(model, tokenizer, conversations: Sequence[tuple[list, list]], max_new_tokens: int,
             temperature: float, seed: int) -> list[str]:
    prompts = [tokenizer.apply_chat_template(messages, tools) for messages, tools in conversations]
    outs = model.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                          seed=[seed + i for i in range(len(prompts))], stop_token_ids=tokenizer.stop_ids)
    return [tokenizer.decode(ids[:-1] if ids and ids[-1] in tokenizer.stop_ids else ids) for ids in outs]


def is_weather_call(text: str, city: str) -> bool:
    """Exactly one parsed tool call, to get_weather, with arguments {"city": city}."""
    _, calls = parse_tool_calls(text)
    if len(calls) != 1 or calls[0]["function"]["name"] != "get_weather":
        return False
    try:
        return json.loads(calls[0]["function"]["arguments"]) == {"city": city}
    except ValueError:
        return False


def uses_result(text: str, case: WeatherCase) -> bool:
    """The reply states the result's temperature (as a whole number) and condition, and calls nothing."""
    content, calls = parse_tool_calls(text)
    if calls or content is None:
        return False
    temp = re.search(rf"(?<![\d-]){case.weather.temp}(?!\d)", content)
    return temp is not None and case.weather.condition in content


def tool_call_outcomes(model, tokenizer, cases: Sequence[WeatherCase], temperature: float = 0.0,
                       seed: int = 0, max_new_tokens: int = 40) -> list[Outcome]:
    texts = _replies(model, tokenizer, [(list(c.messages), list(c.tools)) for c in cases], max_new_tokens,
                     temperature, seed)
    return [Outcome(c.weather.city, t, is_weather_call(t, c.weather.city)) for c, t in zip(cases, texts)]


def answer_outcomes(model, tokenizer, cases: Sequence[WeatherCase], temperature: float = 0.0,
                    seed: int = 0, max_new_tokens: int = 48) -> list[Outcome]:
    texts = _replies(model, tokenizer, [(c.with_result(), list(c.tools)) for c in cases], max_new_tokens,
                     temperature, seed)
    return [Outcome(c.weather.city, t, uses_result(t, c)) for c, t in zip(cases, texts)]


def accuracy(outcomes: Sequence[Outcome]) -> float:
    return sum(o.ok for o in outcomes) / max(len(outcomes), 1)


def evaluate(model, tokenizer, cases: Sequence[WeatherCase] | None = None, seed: int = 0) -> dict[str, Any]:
    """Tool-call and answer accuracy, greedy and sampled, with the failing replies for inspection."""
    cases = list(cases) if cases is not None else heldout_weather_cases()
    report: dict[str, Any] = {"cases": len(cases), "failures": {}}
    for mode, temperature in (("greedy", 0.0), ("sampled", SAMPLED_TEMPERATURE)):
        for name, run in (("tool_call", tool_call_outcomes), ("answer", answer_outcomes)):
            outcomes = run(model, tokenizer, cases, temperature, seed)
            report[f"{name}_{mode}"] = accuracy(outcomes)
            report["failures"][f"{name}_{mode}"] = [(o.city, o.text) for o in outcomes if not o.ok]
    return report
