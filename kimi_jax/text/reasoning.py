"""Split a thinking model's output into its reasoning and its reply, whole or streamed.

Kimi-K2-Thinking (and K2.5/K2.6 in thinking mode) writes `<think>{reasoning}</think>{reply}`; the
reply may hold a tool-call section. The rules are those of vLLM's `kimi_k2` reasoning parser:

- a leading `<think>` is consumed if present (it is not required: the prompt may have opened it);
- the reasoning is the text before the first `</think>`, which is dropped; the reply is the rest;
- without a `</think>`, `<|tool_calls_section_begin|>` also ends the reasoning, and the reply starts
  at the section (so the tool-call parser sees it);
- with neither, all output is reasoning;
- `thinking=False` (a request's `chat_template_kwargs`) makes the parser an identity: all reply.

`ReasoningStreamParser` runs one state machine for both uses: feeding text in any split gives
exactly `split_reasoning`'s result, holding back only text that may be the start of a marker.
"""

from __future__ import annotations

from dataclasses import dataclass

from kimi_jax.text.tool_calls import SECTION_BEGIN, partial_marker_len

THINK_START, THINK_END = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningDelta:
    """A piece of the model's reasoning (never part of the reply's content)."""

    text: str


class ReasoningStreamParser:
    """Incremental reasoning/reply split: `feed` text pieces, then `finish` once; each returns
    `(reasoning, reply)`, the text of each that the piece completes (module docstring)."""

    _START, _REASONING, _REPLY = "start", "reasoning", "reply"

    def __init__(self, thinking: bool = True):
        self._state = self._START if thinking else self._REPLY
        self._pending = ""
        self._finished = False

    def feed(self, text: str) -> tuple[str, str]:
        """Consume a piece of decoded output; return the (reasoning, reply) text now certain."""
        if self._finished:
            raise RuntimeError("ReasoningStreamParser.feed called after finish()")
        self._pending += text
        return self._step(final=False)

    def finish(self) -> tuple[str, str]:
        """The end of the output: everything still held back (the parser is then done)."""
        if self._finished:
            return "", ""
        self._finished = True
        return self._step(final=True)

    def _step(self, final: bool) -> tuple[str, str]:
        if self._state == self._START:
            if THINK_START.startswith(self._pending) and not final:
                return "", ""  # may still become `<think>`
            if self._pending.startswith(THINK_START):
                self._pending = self._pending[len(THINK_START):]
            self._state = self._REASONING
        if self._state == self._REPLY:
            reply, self._pending = self._pending, ""
            return "", reply
        found = [(i, m) for m in (THINK_END, SECTION_BEGIN) if (i := self._pending.find(m)) >= 0]
        if not found:
            keep = 0 if final else partial_marker_len(self._pending, (THINK_END, SECTION_BEGIN))
            cut = len(self._pending) - keep
            reasoning, self._pending = self._pending[:cut], self._pending[cut:]
            return reasoning, ""
        index, marker = min(found)
        reasoning = self._pending[:index]
        reply = self._pending[index + len(marker):] if marker == THINK_END else self._pending[index:]
        self._state, self._pending = self._REPLY, ""
        return reasoning, reply


def split_reasoning(text: str, thinking: bool = True) -> tuple[str | None, str]:
    """Whole decoded output -> (reasoning or None when there is none, reply text)."""
    parser = ReasoningStreamParser(thinking)
    r1, c1 = parser.feed(text)
    r2, c2 = parser.finish()
    return (r1 + r2) or None, c1 + c2
