"""render_chat against the release's chat_template_0905.jinja, rendered the way Hugging Face does."""

import copy
import json
import os
from pathlib import Path

import jinja2
import jinja2.ext
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kimi_jax.text.chat_template import (
    normalize_tool_call_ids,
    render_chat,
    render_chat_segments,
)

pytestmark = pytest.mark.unit

TEMPLATE_NAME = "chat_template_0905.jinja"


def _template_path() -> Path:
    reference = Path(__file__).resolve().parents[2] / "shared/reference/kimi-k2-instruct"
    path = Path(os.environ.get("KIMI_REFERENCE_DIR", reference)) / TEMPLATE_NAME
    # tests/data holds a verbatim copy so that the tests never depend on ../shared.
    return path if path.is_file() else Path(__file__).resolve().parent / "data" / TEMPLATE_NAME


TEMPLATE_SOURCE = _template_path().read_text(encoding="utf-8")


def _hf_tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Hugging Face's replacement for jinja's tojson (which would HTML-escape and sort keys).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _jinja_render(messages, tools=None, add_generation_prompt=True) -> str:
    """Render as transformers' apply_chat_template does (environment, filters, inputs)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _hf_tojson
    # HF drops None-valued keys from messages before rendering.
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    return env.from_string(TEMPLATE_SOURCE).render(
        messages=messages, tools=tools, add_generation_prompt=add_generation_prompt
    )


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city — 天气",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "城市"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
SEARCH_TOOL = {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}


def _call(name, idx, arguments):
    return {"id": f"functions.{name}:{idx}", "type": "function", "function": {"name": name, "arguments": arguments}}


CONVERSATIONS = {
    "default_system": ([{"role": "user", "content": "Hello!"}], None),
    "custom_system": (
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
        None,
    ),
    "multi_turn": (
        [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4."},
            {"role": "user", "content": "And 3+3?\nThanks"},
        ],
        None,
    ),
    "list_content_parts": (
        [
            {"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "text", "text": "two parts"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Seen."}]},
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "x.png"}}, {"type": "text", "text": "and?"}],
            },
        ],
        None,
    ),
    "tools_declared": ([{"role": "user", "content": "Weather in Paris?"}], [WEATHER_TOOL, SEARCH_TOOL]),
    "tool_call_string_args": (
        [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [_call("get_weather", 0, '{"city": "Paris"}')]},
        ],
        [WEATHER_TOOL],
    ),
    "tool_call_dict_args_with_content": (
        [
            {"role": "user", "content": "Weather in 北京?"},
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [_call("get_weather", 0, {"city": "北京", "unit": "C"})],
            },
        ],
        [WEATHER_TOOL],
    ),
    "parallel_calls_and_results": (
        [
            {"role": "user", "content": "Paris and Rome?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [_call("get_weather", 0, {"city": "Paris"}), _call("get_weather", 1, '{"city":"Rome"}')],
            },
            {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "18°C, cloudy"},
            {"role": "tool", "tool_call_id": "functions.get_weather:1", "name": "get_weather", "content": "25°C"},
        ],
        [WEATHER_TOOL],
    ),
    "multi_turn_tool_loop": (
        [
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": "Find X then weather there."},
            {"role": "assistant", "content": None, "tool_calls": [_call("search", 0, {"q": "X"})]},
            {"role": "tool", "tool_call_id": "functions.search:0", "content": "X is Oslo"},
            {"role": "assistant", "tool_calls": [_call("get_weather", 1, {"city": "Oslo"})]},
            {"role": "tool", "tool_call_id": "functions.get_weather:1", "content": "-3°C"},
            {"role": "assistant", "content": "It is -3°C in Oslo."},
            {"role": "user", "content": "Thanks!"},
        ],
        [WEATHER_TOOL, SEARCH_TOOL],
    ),
    "named_participants": (
        [{"role": "user", "name": "alice", "content": "hi"}, {"role": "assistant", "name": "kimi", "content": "hey"}],
        None,
    ),
    "unicode_and_whitespace": (
        [
            {"role": "system", "content": "  spaced\tsystem\r\n"},
            {"role": "user", "content": "😀 👨‍👩‍👧 e\u0301 中文 \"quotes\" <b>html</b> & ' \\ "},
            {"role": "assistant", "content": "ответ — réponse"},
        ],
        [{"type": "function", "function": {"name": "f", "description": "é \"q\" </script> 😀"}}],
    ),
    "system_not_first": ([{"role": "user", "content": "a"}, {"role": "system", "content": "late"}], None),
    "empty_conversation": ([], None),
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_render_chat_matches_jinja_template(name, add_generation_prompt):
    messages, tools = CONVERSATIONS[name]
    before = copy.deepcopy(messages)
    expected = _jinja_render(messages, tools, add_generation_prompt)
    assert render_chat(messages, tools, add_generation_prompt) == expected
    assert messages == before  # inputs are not modified


def test_matches_transformers_renderer():
    # The strongest check: transformers' own chat-template code (transformers is in the test extra).
    from transformers.utils import chat_template_utils as chat_utils

    render = chat_utils.render_jinja_template
    for name, (messages, tools) in CONVERSATIONS.items():
        if not messages:
            continue
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        rendered, _ = render([messages], tools=tools, chat_template=TEMPLATE_SOURCE, add_generation_prompt=True)
        assert render_chat(messages, tools) == rendered[0], name


def test_list_content_in_tool_results_is_flattened():
    # A deliberate difference: the template would print the Python repr of the list.
    parts = [{"type": "text", "text": "X is "}, {"type": "text", "text": "Oslo"}]
    as_list = [{"role": "tool", "tool_call_id": "functions.search:0", "content": parts}]
    as_text = [{"role": "tool", "tool_call_id": "functions.search:0", "content": "X is Oslo"}]
    assert render_chat(as_list) == render_chat(as_text) == _jinja_render(as_text)
    assert "'type'" in _jinja_render(as_list)


def test_segments_mark_caller_text():
    messages, tools = CONVERSATIONS["parallel_calls_and_results"]
    segments = render_chat_segments(messages, tools)
    assert "".join(text for text, _ in segments) == render_chat(messages, tools)
    caller = {text for text, trusted in segments if not trusted}
    assert {"Paris and Rome?", "functions.get_weather:0", '{"city":"Rome"}', "get_weather", "25°C"} <= caller
    assert json.dumps([WEATHER_TOOL], ensure_ascii=False) in caller
    assert all("<|" not in text or text.startswith("{") for text in caller)  # markers are the template's


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "robot", "content": "x"}], r"message 0: unknown role 'robot'"),
        ([{"role": "user", "content": "x"}, {"role": "user"}], r"message 1 \(role 'user'\) has neither"),
        ([{"role": "assistant", "content": None, "tool_calls": []}], r"message 0 .*neither"),
        ([{"role": "tool", "content": "x"}], r"message 0: a tool result needs a string 'tool_call_id'"),
        ([{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}], r"message 0, tool call 0: .*'id'"),
        ([{"role": "assistant", "tool_calls": [{"id": "functions.f:0", "function": {}}]}], r"tool call 0: .*arguments"),
        ([{"role": "user", "content": [{"type": "text"}]}], r"message 0, content part 0: .*'text'"),
        ([{"role": "user", "content": 5}], r"message 0: 'content' must be a string or a list"),
        ([{"role": "user", "tool_calls": [_call("f", 0, "{}")]}], r"message 0: only assistant"),
        (["hello"], r"message 0: expected a mapping"),
    ],
)
def test_invalid_messages_name_the_index(messages, match):
    with pytest.raises(ValueError, match=match):
        render_chat(messages)


def test_normalize_tool_call_ids():
    messages = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "call_abc", "function": {"name": "search", "arguments": "{}"}},
                _call("get_weather", 1, "{}"),
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc", "content": "r1"},
        {"role": "tool", "tool_call_id": "functions.get_weather:1", "content": "r2"},
        {"role": "assistant", "tool_calls": [{"id": "call_xyz", "function": {"name": "search", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_xyz", "content": "r3"},
    ]
    before = copy.deepcopy(messages)
    out = normalize_tool_call_ids(messages)
    assert messages == before
    assert [c["id"] for c in out[1]["tool_calls"]] == ["functions.search:0", "functions.get_weather:1"]
    assert [m.get("tool_call_id") for m in out[2:4]] == ["functions.search:0", "functions.get_weather:1"]
    assert out[4]["tool_calls"][0]["id"] == "functions.search:2" and out[5]["tool_call_id"] == "functions.search:2"
    assert "## Return of functions.search:0" in render_chat(out)
