"""Tool-call parsing, whole and streamed, on well-formed and malformed model output."""

import json
import random

import pytest

from kimi_jax.text import tool_calls
from kimi_jax.text.chat_template import render_chat
from kimi_jax.text.tool_calls import (
    ALL_MARKERS,
    ContentDelta,
    ToolCallArgumentsDelta,
    ToolCallEnd,
    ToolCallStart,
    ToolCallStreamParser,
    collect_events,
    parse_tool_calls,
)

pytestmark = pytest.mark.unit

SB, SE = tool_calls.SECTION_BEGIN, tool_calls.SECTION_END
CB, ARG, CE = tool_calls.CALL_BEGIN, tool_calls.ARGUMENT_BEGIN, tool_calls.CALL_END


def call(name, idx, arguments):
    return {"id": f"functions.{name}:{idx}", "type": "function", "function": {"name": name, "arguments": arguments}}


def raw_call(call_id, arguments):
    return f"{CB}{call_id}{ARG}{arguments}{CE}"


WEATHER = '{"city": "Paris"}'
# (name, model output, expected content, expected calls)
CASES = [
    ("plain_text", "Just an answer.", "Just an answer.", []),
    ("empty", "", None, []),
    ("single_call", SB + raw_call("functions.get_weather:0", WEATHER) + SE, None, [call("get_weather", 0, WEATHER)]),
    (
        "content_then_calls",
        "Let me check both.\n" + SB + raw_call("functions.get_weather:0", WEATHER)
        + raw_call("functions.search:1", '{"q": "rome", "n": 3}') + SE,
        "Let me check both.\n",
        [call("get_weather", 0, WEATHER), call("search", 1, '{"q": "rome", "n": 3}')],
    ),
    (
        "whitespace_between_calls_and_around_args",
        SB + "\n " + CB + " functions.a.b:12 " + ARG + '\n {"x": [1, 2]} \n' + CE + "\n" + SE,
        None,
        [call("a.b", 12, '{"x": [1, 2]}')],
    ),
    (
        "unicode_arguments",
        SB + raw_call("functions.translate:0", '{"text": "你好 😀👨‍👩‍👧", "to": "fr\\u00e9"}') + SE,
        None,
        [call("translate", 0, '{"text": "你好 😀👨‍👩‍👧", "to": "fr\\u00e9"}')],
    ),
    ("id_without_prefix", SB + raw_call("lookup:3", "{}") + SE, None, [call("lookup", 3, "{}") | {"id": "lookup:3"}]),
    ("text_after_section", SB + raw_call("functions.f:0", "{}") + SE + " done", " done", [call("f", 0, "{}")]),
    # -- malformed: never raises; the unparseable part comes back verbatim as content ----------
    ("no_section_end", "Hi " + SB + raw_call("functions.f:0", "{}"), "Hi ", [call("f", 0, "{}")]),
    (
        "truncated_in_arguments",
        "Hi " + SB + raw_call("functions.f:0", "{}") + CB + "functions.g:1" + ARG + '{"a": ',
        "Hi " + CB + "functions.g:1" + ARG + '{"a": ',
        [call("f", 0, "{}")],
    ),
    (
        "truncated_in_marker",
        "Hi " + SB + CB + "functions.f:0<|tool_call_arg",
        "Hi " + CB + "functions.f:0<|tool_call_arg",
        [],
    ),
    ("truncated_after_section_begin", "Hi " + SB, "Hi ", []),
    (
        "bad_json_dropped_to_content",
        SB + raw_call("functions.f:0", '{"a": 1,}') + raw_call("functions.g:1", "{}") + SE,
        raw_call("functions.f:0", '{"a": 1,}'),
        [call("g", 1, "{}")],
    ),
    ("arguments_not_an_object", SB + raw_call("functions.f:0", "[1, 2]") + SE, raw_call("functions.f:0", "[1, 2]"), []),
    ("missing_name", SB + raw_call("functions.:0", "{}") + SE, raw_call("functions.:0", "{}"), []),
    ("missing_index", SB + raw_call("functions.f", "{}") + SE, raw_call("functions.f", "{}"), []),
    ("missing_argument_marker", SB + CB + "functions.f:0 {}" + CE + SE, CB + "functions.f:0 {}" + CE, []),
    (
        "two_argument_markers",
        SB + CB + "functions.f:0" + ARG + "{}" + ARG + "{}" + CE + SE,
        CB + "functions.f:0" + ARG + "{}" + ARG + "{}" + CE,
        [],
    ),
    (
        "missing_call_end_before_next_call",
        SB + CB + "functions.f:0" + ARG + "{}" + raw_call("functions.g:1", "{}") + SE,
        CB + "functions.f:0" + ARG + "{}",
        [call("g", 1, "{}")],
    ),
    (
        "missing_call_end_before_section_end",
        SB + CB + "functions.f:0" + ARG + "{}" + SE + "after",
        CB + "functions.f:0" + ARG + "{}" + "after",
        [],
    ),
    (
        "stray_markers_outside_section",
        "a" + CE + "b" + ARG + "c" + SE + "d" + CB,
        "a" + CE + "b" + ARG + "c" + SE + "d" + CB,
        [],
    ),
    (
        "stray_text_and_markers_inside_section",
        SB + " junk " + CE + raw_call("functions.f:0", "{}") + "\n" + SE,
        " junk " + CE,
        [call("f", 0, "{}")],
    ),
    (
        "two_sections",
        "A" + SB + raw_call("functions.f:0", "{}") + SE + "B" + SB + raw_call("functions.g:1", "{}") + SE,
        "AB",
        [call("f", 0, "{}"), call("g", 1, "{}")],
    ),
    ("lookalike_text", "Use <|tool_calls_section_begin to start", "Use <|tool_calls_section_begin to start", []),
]


@pytest.mark.parametrize("name, text, content, calls", CASES, ids=[c[0] for c in CASES])
def test_parse_tool_calls(name, text, content, calls):
    assert parse_tool_calls(text) == (content, calls)
    for c in calls:
        json.loads(c["function"]["arguments"])


def _stream(pieces):
    parser = ToolCallStreamParser()
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    return events + parser.finish()


@pytest.mark.parametrize("name, text, content, calls", CASES, ids=[c[0] for c in CASES])
def test_streaming_equals_whole_parse(name, text, content, calls):
    expected = parse_tool_calls(text)
    assert collect_events(_stream(list(text))) == expected  # one character at a time
    rng = random.Random(name)
    for _ in range(5):  # random splits
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text), 4)))
        pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        assert collect_events(_stream(pieces)) == expected


def test_stream_events_for_well_formed_output():
    text = "Checking.\n" + SB + raw_call("functions.get_weather:0", WEATHER) + raw_call("functions.s:1", "{}") + SE
    events = _stream(list(text))
    content = [e.text for e in events if isinstance(e, ContentDelta)]
    assert "".join(content) == "Checking.\n"
    assert not any(marker in piece for piece in content for marker in ALL_MARKERS)
    assert not any("<" in piece for piece in content)  # held-back marker prefixes never leak
    calls = [e for e in events if not isinstance(e, ContentDelta)]
    assert calls == [
        ToolCallStart(0, "functions.get_weather:0", "get_weather"),
        ToolCallArgumentsDelta(0, WEATHER),
        ToolCallEnd(0, "functions.get_weather:0", "get_weather", WEATHER),
        ToolCallStart(1, "functions.s:1", "s"),
        ToolCallArgumentsDelta(1, "{}"),
        ToolCallEnd(1, "functions.s:1", "s", "{}"),
    ]


def test_content_streams_before_the_section_is_complete():
    parser = ToolCallStreamParser()
    assert parser.feed("Hello <|tool") == [ContentDelta("Hello ")]  # "<|tool" may be a marker
    assert parser.feed("s are fun") == [ContentDelta("<|tools are fun")]
    assert parser.feed(SB + CB + "functions.f:0" + ARG + "{") == []  # a call is held until its end
    assert parser.feed("}" + CE)[0] == ToolCallStart(0, "functions.f:0", "f")
    assert parser.finish() == []
    with pytest.raises(RuntimeError, match="after finish"):
        parser.feed("x")


def test_parses_what_the_chat_template_renders():
    # The assistant turn as render_chat writes it is what the model is trained to produce.
    calls = [call("get_weather", 0, {"city": "北京"}), call("search", 1, '{"q": "x"}')]
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Sure.", "tool_calls": calls}]
    rendered = render_chat(messages, add_generation_prompt=False)
    assistant_turn = rendered.split("<|im_assistant|>assistant<|im_middle|>")[-1]
    content, parsed = parse_tool_calls(assistant_turn)
    assert content == "Sure."
    assert [json.loads(c["function"]["arguments"]) for c in parsed] == [{"city": "北京"}, {"q": "x"}]
    assert [(c["id"], c["function"]["name"]) for c in parsed] == [(c["id"], c["function"]["name"]) for c in calls]


def _incremental(text: str, step: int = 1):
    parser = ToolCallStreamParser(incremental=True)
    events = []
    for i in range(0, len(text), step):
        events += parser.feed(text[i:i + step])
    return events + parser.finish()


WELL_FORMED = [c for c in CASES if c[0] in (
    "plain_text", "single_call", "content_then_calls", "whitespace_between_calls_and_around_args", "unicode_arguments",
    "id_without_prefix", "text_after_section", "no_section_end", "two_sections",
    "stray_text_and_markers_inside_section")]


@pytest.mark.parametrize("name, text, content, calls", WELL_FORMED, ids=[c[0] for c in WELL_FORMED])
def test_incremental_equals_whole_parse_on_valid_calls(name, text, content, calls):
    for step in (1, 3, len(text)):
        assert collect_events(_incremental(text, step)) == (content, calls), (name, step)


def test_incremental_streams_arguments_as_they_come():
    """Fed a character at a time, a call starts at its argument marker and its arguments arrive in many
    deltas, before the call's end marker has been seen; the deltas join to the (stripped) arguments."""
    args = '{"city": "Beijing", "days": [1, 2, 3]}'
    text = "Sure." + SB + CB + "functions.get_weather:0" + ARG + "  " + args + " \n" + CE + SE
    parser = ToolCallStreamParser(incremental=True)
    seen, end_at = [], None
    for i, ch in enumerate(text):
        for event in parser.feed(ch):
            seen.append((i, event))
    seen += [(len(text), e) for e in parser.finish()]
    start = [i for i, e in seen if isinstance(e, ToolCallStart)]
    deltas = [(i, e.delta) for i, e in seen if isinstance(e, ToolCallArgumentsDelta)]
    end_at = text.index(CE)
    assert start and start[0] < end_at and len(deltas) > 10 and all(i < end_at for i, _ in deltas)
    assert "".join(d for _, d in deltas) == args
    ends = [e for _, e in seen if isinstance(e, ToolCallEnd)]
    assert [(e.id, e.name, e.arguments) for e in ends] == [("functions.get_weather:0", "get_weather", args)]


def test_incremental_keeps_an_announced_call():
    """A call announced (valid id, argument marker seen) stays a call even if its arguments turn out
    malformed or cut off; one with an invalid id is content, as in the whole parse."""
    bad = SB + raw_call("functions.f:0", '{"a": 1,}') + SE
    assert collect_events(_incremental(bad)) == (None, [call("f", 0, '{"a": 1,}')])
    cut = "Hi " + SB + CB + "functions.g:1" + ARG + '{"a": '
    assert collect_events(_incremental(cut)) == ("Hi ", [call("g", 1, '{"a":')])
    nameless = SB + raw_call("functions.:0", "{}") + SE
    assert collect_events(_incremental(nameless)) == parse_tool_calls(nameless)
