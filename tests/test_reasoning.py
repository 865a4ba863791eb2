"""A thinking model's output split into reasoning and reply: vLLM's kimi_k2 rules, whole and streamed
in every split, and tool calls after the reasoning parsed as before."""

import pytest

from kimi_jax.text.reasoning import ReasoningStreamParser, split_reasoning
from kimi_jax.text.tool_calls import parse_tool_calls

pytestmark = pytest.mark.unit

CALL = ('<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>'
        '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>')

CASES = [
    ("<think>The user greets.</think>Hello!", "The user greets.", "Hello!"),
    ("The prompt opened it.</think>Hello!", "The prompt opened it.", "Hello!"),  # no <think>: not required
    ("<think></think>Hi", None, "Hi"),
    ("<think>still thinking", "still thinking", ""),  # cut off: all reasoning
    ("plain", "plain", ""),
    ("<think>a</think>b</think>c", "a", "b</think>c"),  # only the first </think> ends it
    (" <think>a</think>b", " <think>a", "b"),  # a <think> that does not lead stays reasoning
    ("<think>need the tool</think>" + CALL, "need the tool", CALL),
    ("<think>need the tool" + CALL, "need the tool", CALL),  # the section ends the reasoning, and is the reply
    ("<think>x</think>Let me check. " + CALL, "x", "Let me check. " + CALL),
    ("<thin", "<thin", ""),  # a partial <think> at the very end is reasoning text
    ("", None, ""),
]


@pytest.mark.parametrize("text,reasoning,reply", CASES)
def test_split_follows_the_kimi_k2_rules(text, reasoning, reply):
    assert split_reasoning(text) == (reasoning, reply)


def test_thinking_off_is_the_identity():
    for text, _, _ in CASES:
        assert split_reasoning(text, thinking=False) == (None, text)


def feed_in_pieces(text: str, cuts) -> tuple[str, str]:
    parser, reasoning, reply, start = ReasoningStreamParser(), "", "", 0
    for cut in [*cuts, len(text)]:
        r, c = parser.feed(text[start:cut])
        reasoning, reply, start = reasoning + r, reply + c, cut
    r, c = parser.finish()
    return reasoning + r, reply + c


@pytest.mark.parametrize("text,reasoning,reply", CASES)
def test_any_split_of_the_stream_gives_the_same_split(text, reasoning, reply):
    """Markers cut anywhere across deltas (every single cut, and one character at a time)."""
    want = (reasoning or "", reply)
    for cut in range(len(text) + 1):
        assert feed_in_pieces(text, [cut]) == want, cut
    assert feed_in_pieces(text, range(1, len(text))) == want


def test_nothing_that_may_be_a_marker_leaks_into_the_reasoning():
    parser = ReasoningStreamParser()
    assert parser.feed("<think>abc</thi") == ("abc", "")  # "</thi" is held back
    assert parser.feed("nk>Hel") == ("", "Hel")
    assert parser.feed("lo") == ("", "lo")
    assert parser.finish() == ("", "")
    with pytest.raises(RuntimeError, match="after finish"):
        parser.feed("x")


def test_tool_calls_after_the_reasoning_parse_as_before():
    for text in ("<think>need the tool</think>" + CALL, "<think>need the tool" + CALL,
                 "<think>x</think>Let me check. " + CALL):
        _, reply = split_reasoning(text)
        content, calls = parse_tool_calls(reply)
        assert calls == parse_tool_calls(CALL)[1] and calls[0]["function"]["name"] == "get_weather"
        assert content in (None, "Let me check. ")
