"""Parse Kimi-K2 tool calls out of decoded model output, whole or streamed.

The model writes, after any plain content,

    <|tool_calls_section_begin|>
      <|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{json}<|tool_call_end|>
      ...
    <|tool_calls_section_end|>

(without the whitespace). Both parsers below share one state machine, so feeding text to
`ToolCallStreamParser` in any split gives exactly the result of `parse_tool_calls`.

Rules (they never raise):
- Outside a section only `<|tool_calls_section_begin|>` is a marker; all other text, stray
  markers included, is content.
- Inside a section, whitespace between calls is dropped; any other text between calls (stray
  markers included) is content. `<|tool_calls_section_end|>` returns to content; text after it
  is content. A section that never ends is fine: the calls it holds still count.
- A call runs from `<|tool_call_begin|>` to `<|tool_call_end|>`. It is accepted when it holds
  exactly one `<|tool_call_argument_begin|>`, its id (stripped) matches `[functions.]NAME:IDX`
  and its arguments (stripped) are a JSON object. Otherwise its raw text, markers included,
  goes to content, so nothing the model wrote is lost. A call cut off by a new
  `<|tool_call_begin|>`, by `<|tool_calls_section_end|>` or by the end of the text is
  unparseable in the same way.
- Content is the concatenation of all content pieces in order; `parse_tool_calls` returns None
  for empty content.

Because a call is only accepted once its `<|tool_call_end|>` arrives, the streaming parser
emits a call's start, its arguments (one delta) and its end together at that point; content is
streamed as it comes, holding back only text that may be the start of a marker.

`ToolCallStreamParser(incremental=True)` streams arguments as they are generated instead, as vLLM
and SGLang do: a call starts (ToolCallStart) at its `<|tool_call_argument_begin|>` once the id
before it is valid, its arguments follow as deltas (whitespace at their ends held back, so the
deltas join to the stripped arguments), and ToolCallEnd comes at `<|tool_call_end|>`. A call
announced this way stays a call: if its arguments turn out not to be a JSON object, or it is cut
off, it still ends with the arguments written (the client has seen it begin), where the whole
parse would have made it content. With a valid call the events' calls equal the whole parse's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
ALL_MARKERS = (SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARGUMENT_BEGIN, CALL_END)

# `NAME:IDX` after an optional `functions.` prefix (so that a call the model wrote without
# it is not lost). NAME is the non-blank run before the last `:digits`.
_CALL_ID = re.compile(r"(?P<name>[^\s:]\S*):(?P<index>\d+)")
_CALL_ID_PREFIX = "functions."


@dataclass(frozen=True)
class ContentDelta:
    """Plain text for the reply's content."""

    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """A tool call begins; `index` counts accepted calls from 0."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgumentsDelta:
    """A piece of the call's JSON arguments string."""

    index: int
    delta: str


@dataclass(frozen=True)
class ToolCallEnd:
    """The call is complete; `arguments` is the whole JSON arguments string."""

    index: int
    id: str
    name: str
    arguments: str


ToolCallEvent = ContentDelta | ToolCallStart | ToolCallArgumentsDelta | ToolCallEnd


def tool_call_dict(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    """An OpenAI-style tool call: `{"id", "type": "function", "function": {name, arguments}}`."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _parse_call(body: str) -> tuple[str, str, str] | None:
    """(id, name, arguments) from the text between CALL_BEGIN and CALL_END, or None if malformed."""
    pieces = body.split(ARGUMENT_BEGIN)
    if len(pieces) != 2:
        return None
    call_id, arguments = pieces[0].strip(), pieces[1].strip()
    match = _CALL_ID.fullmatch(call_id.removeprefix(_CALL_ID_PREFIX))
    if match is None:
        return None
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return None
    if not isinstance(parsed, dict):
        return None
    return call_id, match["name"], arguments


def partial_marker_len(text: str, markers: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `markers`: text a
    stream must hold back until it knows whether a marker (or a stop string) starts there."""
    longest = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:n]):
                longest = n
                break
    return longest


class ToolCallStreamParser:
    """Incremental tool-call parser: `feed` text pieces, then `finish` once.

    Example:
      parser = ToolCallStreamParser()
      for piece in stream:
          for event in parser.feed(piece):
              ...
      for event in parser.finish():
          ...

    See the module docstring for the rules; events are ContentDelta, ToolCallStart,
    ToolCallArgumentsDelta and ToolCallEnd.
    """

    # The markers each state reacts to; CONTENT only knows the section opener.
    _CONTENT, _SECTION, _CALL = "content", "section", "call"
    _MARKERS: ClassVar[dict[str, tuple[str, ...]]] = {
        _CONTENT: (SECTION_BEGIN,),
        _SECTION: ALL_MARKERS,
        _CALL: (CALL_BEGIN, CALL_END, SECTION_END),
    }

    def __init__(self, incremental: bool = False) -> None:
        self._incremental = incremental
        self._markers = dict(self._MARKERS)
        if incremental:  # the argument marker starts a call's streamed arguments
            self._markers[self._CALL] = (*self._MARKERS[self._CALL], ARGUMENT_BEGIN)
        self._started: tuple[str, str] | None = None  # (id, name) of a call announced incrementally
        self._args, self._args_ws = "", ""  # its arguments so far, and whitespace held back after them
        self._state = self._CONTENT
        self._pending = ""  # text received but not yet consumed
        self._call_body = ""  # raw text of the current call after its CALL_BEGIN
        self._between = ""  # text between calls; kept only if it is not all whitespace
        self._num_calls = 0
        self._finished = False

    def feed(self, text: str) -> list[ToolCallEvent]:
        """Consume a piece of decoded output; return the events it completes."""
        if self._finished:
            raise RuntimeError("ToolCallStreamParser.feed called after finish()")
        self._pending += text
        events: list[ToolCallEvent] = []
        while self._step(events, final=False):
            pass
        return events

    def finish(self) -> list[ToolCallEvent]:
        """Flush held-back text and any unfinished call as content; the parser is then done."""
        if self._finished:
            return []
        events: list[ToolCallEvent] = []
        while self._step(events, final=True):
            pass
        if self._state == self._CALL:  # cut off by the end of the text
            self._cut_off(events)
        self._flush_between(events)
        self._finished = True
        return events

    def _step(self, events: list[ToolCallEvent], final: bool) -> bool:
        """Consume pending text up to and including the next marker; False when stuck."""
        markers = self._markers[self._state]
        found = [(i, m) for m in markers if (i := self._pending.find(m)) >= 0]
        if not found:
            # No whole marker: consume all but a possible marker prefix (all when final).
            keep = 0 if final else partial_marker_len(self._pending, markers)
            text, self._pending = self._pending[: len(self._pending) - keep], self._pending[
                len(self._pending) - keep :
            ]
            self._consume_text(events, text)
            return False
        index, marker = min(found)
        self._consume_text(events, self._pending[:index])
        self._pending = self._pending[index + len(marker) :]
        self._on_marker(events, marker)
        return True

    def _consume_text(self, events: list[ToolCallEvent], text: str) -> None:
        if not text:
            return
        if self._state == self._CALL:
            self._call_body += text
            if self._started is not None:
                self._stream_arguments(events, text)
        elif self._state == self._SECTION:
            # Decided at the next marker, so that the split of the stream cannot matter.
            self._between += text
        else:
            self._emit_content(events, text)

    def _on_marker(self, events: list[ToolCallEvent], marker: str) -> None:
        if self._state == self._CONTENT:  # only SECTION_BEGIN reaches here
            self._state = self._SECTION
        elif self._state == self._SECTION:
            self._flush_between(events)
            if marker == CALL_BEGIN:
                self._state, self._call_body = self._CALL, ""
            elif marker == SECTION_END:
                self._state = self._CONTENT
            else:  # stray ARGUMENT_BEGIN / CALL_END / SECTION_BEGIN inside a section
                self._emit_content(events, marker)
        elif marker == CALL_END:
            self._close_call(events)
            self._state = self._SECTION
        elif marker == ARGUMENT_BEGIN:  # incremental only
            self._call_body += marker
            if self._started is not None:  # a second one: part of the (now malformed) arguments
                self._stream_arguments(events, marker)
                return
            match = _CALL_ID.fullmatch(self._call_body[: -len(marker)].strip().removeprefix(_CALL_ID_PREFIX))
            if match is not None:
                self._started = (self._call_body[: -len(marker)].strip(), match["name"])
                events.append(ToolCallStart(self._num_calls, *self._started))
        else:  # CALL_BEGIN or SECTION_END before this call's end: the call is cut off
            self._cut_off(events)
            self._state = self._CALL if marker == CALL_BEGIN else self._CONTENT

    def _stream_arguments(self, events: list[ToolCallEvent], text: str) -> None:
        """An announced call's argument text as deltas, without leading or trailing whitespace."""
        text = self._args_ws + text
        body = text.rstrip()
        self._args_ws = text[len(body):]
        if not self._args:
            body = body.lstrip()
        if body:
            self._args += body
            events.append(ToolCallArgumentsDelta(self._num_calls, body))

    def _end_started(self, events: list[ToolCallEvent]) -> None:
        """End an announced call with the arguments it streamed, whatever they are."""
        call_id, name = self._started
        events.append(ToolCallEnd(self._num_calls, call_id, name, self._args))
        self._num_calls += 1
        self._started, self._args, self._args_ws, self._call_body = None, "", "", ""

    def _cut_off(self, events: list[ToolCallEvent]) -> None:
        """A call with no end: content (its raw text), or, announced incrementally, ended as it stands."""
        if self._started is not None:
            self._end_started(events)
        else:
            self._emit_content(events, CALL_BEGIN + self._call_body)
            self._call_body = ""

    def _close_call(self, events: list[ToolCallEvent]) -> None:
        if self._started is not None:
            self._end_started(events)
            return
        parsed = _parse_call(self._call_body)
        if parsed is None:
            self._emit_content(events, CALL_BEGIN + self._call_body + CALL_END)
        else:
            call_id, name, arguments = parsed
            index = self._num_calls
            self._num_calls += 1
            events.append(ToolCallStart(index, call_id, name))
            events.append(ToolCallArgumentsDelta(index, arguments))
            events.append(ToolCallEnd(index, call_id, name, arguments))
        self._call_body = ""

    def _flush_between(self, events: list[ToolCallEvent]) -> None:
        if self._between.strip():  # stray text between calls is kept; whitespace is layout
            self._emit_content(events, self._between)
        self._between = ""

    @staticmethod
    def _emit_content(events: list[ToolCallEvent], text: str) -> None:
        # Merge adjacent content so that a flush yields one delta, not many.
        if events and isinstance(events[-1], ContentDelta):
            events[-1] = ContentDelta(events[-1].text + text)
        else:
            events.append(ContentDelta(text))


def collect_events(events: list[ToolCallEvent]) -> tuple[str | None, list[dict[str, Any]]]:
    """Fold a complete event list into `(content or None, OpenAI-style tool calls)`."""
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    calls = [tool_call_dict(e.id, e.name, e.arguments) for e in events if isinstance(e, ToolCallEnd)]
    return (content or None), calls


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Split decoded model output into content and tool calls.

    Args:
      text: decoded output, special tokens written as their names.

    Returns:
      `(content, tool_calls)`: content is the text outside accepted calls (None when empty);
      each call is `{"id": "functions.NAME:IDX", "type": "function",
      "function": {"name": NAME, "arguments": JSON string}}`. Malformed calls come back as
      content, verbatim; see the module docstring for the exact rules. Never raises.
    """
    parser = ToolCallStreamParser()
    events = parser.feed(text) + parser.finish()
    return collect_events(events)
