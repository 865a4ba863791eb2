"""Generated token ids to text, one token at a time: the one streaming detokenizer.

`Model.stream` and the HTTP server both turn tokens into text with `Detokenizer`:

- a character split over several byte-level tokens comes out whole, with the token that
  completes it (`Tokenizer.stream_decoder`);
- a stop token (`<|im_end|>`, `[EOS]`, …) ends the text and adds none of its own;
- the last token (a stop token, or the one that reaches the request's length) flushes what is
  still held: a truncated character becomes U+FFFD;
- with stop strings, text that may be the start of one is held back until it is known not to
  be; when one appears the text ends just before it (`stop_sequence` names it).

Every pushed token gives one `Piece(token_id, text)`; the pieces' text joined is the output's
text, up to (not including) a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from kimi_jax.text.tool_calls import partial_marker_len


class Piece(NamedTuple):
    """One generated token and the text it completes ("" while a character is partial, while text
    may begin a stop string, for a stop token, or without a tokenizer)."""

    token_id: int
    text: str


class Detokenizer:
    """Incremental text of one generated sequence.

    tokenizer: a kimi_jax Tokenizer, or None (every piece's text is then "").
    stop_ids: token ids that end the sequence; they are never text.
    stop_strings: strings that end the text where they first appear.

    After the last push `finish_reason` is "stop" or "length" (None before), and `stop_sequence`
    the stop string that ended the text, if one did.
    """

    def __init__(self, tokenizer: Any = None, stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = ()):
        self._decoder = tokenizer.stream_decoder() if tokenizer is not None else None
        self._stop_ids = frozenset(stop_ids)
        self._stops = tuple(stop_strings)
        self._held = ""  # decoded text not yet handed out (it may begin a stop string)
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None

    @property
    def done(self) -> bool:
        """True once the sequence has ended (its last token pushed, or a stop string seen)."""
        return self.finish_reason is not None

    def push(self, token_id: int, last: bool = False) -> Piece:
        """Add one generated token; `last` says that generation ends with it (a stop token always
        ends it). Returns the token and the text that is now certain."""
        self._check_open(f"push({token_id})")
        stop_token = token_id in self._stop_ids
        if self._decoder is not None and not stop_token:
            self._held += self._decoder.push(token_id)
        return Piece(token_id, self._release(last or stop_token, "stop" if stop_token else "length"))

    def finish(self, finish_reason: str = "length") -> str:
        """End the sequence without another token (generation stopped between tokens); returns the
        text still held."""
        self._check_open("finish()")
        return self._release(True, finish_reason)

    def _check_open(self, call: str) -> None:
        if self.done:
            raise RuntimeError(f"Detokenizer.{call} after the sequence ended ({self.finish_reason})")

    def _release(self, last: bool, finish_reason: str) -> str:
        """The held text that is now certain: all of it at the end, else all but a possible start of
        a stop string; up to the first stop string, which ends the sequence."""
        if last and self._decoder is not None:
            self._held += self._decoder.flush()
        found = [(i, s) for s in self._stops if (i := self._held.find(s)) >= 0]
        if found:
            index, stop = min(found)
            self.finish_reason, self.stop_sequence = "stop", stop
            text, self._held = self._held[:index], ""
            return text
        keep = 0 if last else partial_marker_len(self._held, self._stops)
        cut = len(self._held) - keep
        text, self._held = self._held[:cut], self._held[cut:]
        if last:
            self.finish_reason = finish_reason
        return text
