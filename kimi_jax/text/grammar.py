"""Grammars for constrained decoding (structured outputs, forced tool calls), and their token masks.

A grammar is llguidance's text form (a JSON document of Lark and JSON-Schema grammars); a `Matcher`
follows one sequence through it and says, before each token, which tokens may come next, as a
bitmask: bit j of word w allows token 32·w + j. The engine applies the mask to the logits before
sampling (runtime/sampling.py `mask_logits`), so greedy and sampled decoding both stay inside the
grammar, and it feeds every generated token back (`Matcher.advance`).

Why llguidance (measured on this machine, BENCHMARKS.md "Constrained decoding"): it computes each
mask lazily from the grammar and the tokenizer's trie (≈ 0.6 ms a token at Kimi-K2's vocabulary size,
0.05 ms on the embedded model's) and compiles a JSON Schema in a few milliseconds whatever the
vocabulary; outlines-core builds a state × vocabulary index per schema (9 s at Kimi-K2's size),
xgrammar pulls in torch, triton and transformers; and its Lark grammars name special tokens by id,
which Kimi's tool-call markers need.

What the grammars here produce:
  * `json_grammar(schema)`: one JSON value of the schema (any JSON object without one), written
    with `, ` and `: ` separators and no other whitespace (json.dumps' style; free whitespace lets a
    small model wander off into blank lines);
  * `tool_call_grammar(...)`: Kimi's tool-call section, each call's arguments the JSON of its
    tool's declared schema — the section whole (tool_choice required / a named tool), or what
    follows its opening marker (tool_choice auto: the constraint starts when the model opens one).
After the grammar's end only the end-of-turn tokens are allowed, so a constrained reply stops there.
User text never becomes a control token: schemas are passed as JSON-Schema grammars, never spliced
into Lark text, and the only tokens a grammar names by id are the tool-call markers.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from kimi_jax.text.tokenizer import Tokenizer
from kimi_jax.text.tool_calls import ARGUMENT_BEGIN, CALL_BEGIN, CALL_END, SECTION_BEGIN, SECTION_END

# json.dumps' separators; whitespace elsewhere is not allowed (see the module docstring).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_CALL_INDEX_DIGITS = 4  # `functions.NAME:IDX`: Kimi numbers calls across the conversation


class GrammarError(ValueError):
    """A schema or grammar the constraint compiler cannot use; the message says what and where."""


def _llguidance():
    import llguidance

    return llguidance


THINK_END = "</think>"
# Text up to and including the first `</think>`: runs that cannot start it, then `</think>` (a `<`
# right before the `</think>` is not allowed; a small price for a regex the lexer keeps exact).
_UNTIL_THINK_END = (r"([^<]|<[^\/]|<\/[^t]|<\/t[^h]|<\/th[^i]|<\/thi[^n]|<\/thin[^k]|<\/think[^>])*"
                    r"<\/think>")


def json_grammar(schema: dict[str, Any] | None = None, tokenizer: Tokenizer | None = None,
                 reasoning: bool = False) -> str:
    """A grammar for one JSON value of `schema` (None: any JSON object, OpenAI's json_object).
    `reasoning`: a thinking model's reasoning (anything up to `</think>`) comes first."""
    reply = _json_part(schema if schema is not None else {"type": "object"}, "reply")
    return json.dumps({"grammars": [{"name": "root", "lark_grammar": _start("@reply", tokenizer, reasoning)}, reply]})


def _start(body: str, tokenizer: Tokenizer | None, reasoning: bool) -> str:
    """The `start` rule: `body`, after the reasoning of a thinking model when `reasoning`."""
    if not reasoning:
        return f"start: {body}"
    end = tokenizer.special_ids.get(THINK_END) if tokenizer is not None else None
    if end is None:  # `</think>` is text: the reasoning is one lexeme, ending at the first one
        return f"start: REASONING {body}\nREASONING: /{_UNTIL_THINK_END}/"
    return f"start: THOUGHT <[{end}]> {body}\nTHOUGHT: /(?s:.*)/"  # one special token, named by id


def _json_part(schema: dict[str, Any], name: str) -> dict[str, Any]:
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    # `x-guidance` in a user's schema would change the compiler's options: ours win.
    return {"name": name, "json_schema": {**schema, "x-guidance": JSON_OPTIONS}}


def tool_call_grammar(tokenizer: Tokenizer, tools: Sequence[tuple[str, dict[str, Any]]], parallel: bool = True,
                      opened: bool = False, reasoning: bool = False) -> str:
    """Kimi's tool-call section over `tools` [(name, parameters schema)], each call's arguments its
    schema's JSON. `parallel`: one or more calls (else exactly one). `opened`: the grammar starts after
    `<|tool_calls_section_begin|>` (the model opened the section itself; tool_choice auto).
    `reasoning`: a thinking model reasons first (not with `opened`: it has already)."""
    if not tools:
        raise GrammarError("a tool-call grammar needs at least one tool")
    ids = {marker: tokenizer.special_ids.get(marker) for marker in
           (SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARGUMENT_BEGIN, CALL_END)}
    missing = [m for m, i in ids.items() if i is None]
    if missing:
        raise GrammarError(f"the tokenizer ({tokenizer.source}) lacks the tool-call tokens {missing}")
    tok = {m: f"<[{i}]>" for m, i in ids.items()}
    calls = []
    for k, (name, _) in enumerate(tools):
        if not (isinstance(name, str) and name.replace("_", "").replace("-", "").isalnum() and name.isascii()):
            raise GrammarError(f"tool name {name!r:.80} must match [A-Za-z0-9_-]+")
        calls.append(f'call{k}: {tok[CALL_BEGIN]} "functions.{name}:" INDEX {tok[ARGUMENT_BEGIN]} @args{k} '
                     f'{tok[CALL_END]}')
    lark = "\n".join([
        _start(f"{'' if opened else tok[SECTION_BEGIN] + ' '}calls {tok[SECTION_END]}", tokenizer,
               reasoning and not opened),
        f"calls: call{' calls?' if parallel else ''}",
        "call: " + " | ".join(f"call{k}" for k in range(len(tools))),
        *calls,
        f"INDEX: /[0-9]{{1,{MAX_CALL_INDEX_DIGITS}}}/",
    ])
    parts = [{"name": "root", "lark_grammar": lark}]
    parts += [_json_part(schema, f"args{k}") for k, (_, schema) in enumerate(tools)]
    return json.dumps({"grammars": parts})


class Matcher:
    """One sequence's position in a grammar: the mask of the next token, then the token taken."""

    def __init__(self, matcher, words: int, ll_words: int):
        self._m, self.words, self._ll_words = matcher, words, ll_words
        self._row = np.zeros(ll_words, np.int32)

    def fill(self, row: np.ndarray) -> None:
        """Write the allowed next tokens into `row` (int32 [words]) as a bitmask; ids the grammar's
        tokenizer does not have (padding) are never allowed."""
        import llguidance.numpy as lln

        lln.fill_next_token_bitmask(self._m, self._row[None], 0)
        row[:self._ll_words] = self._row
        row[self._ll_words:] = 0

    def advance(self, token: int) -> None:
        """Take the token generated after the last `fill`; a token outside the mask is an error."""
        if not self._m.consume_token(int(token)):
            raise GrammarError(f"token {token} does not continue the grammar: {self._m.get_error()}")

    @property
    def finished(self) -> bool:
        """The grammar is complete: only end-of-turn tokens are allowed now."""
        return self._m.is_stopped()


class Grammars:
    """Constrained decoding for one tokenizer and model vocabulary: grammars checked and matched.

    The llguidance tokenizer (each token's bytes; special tokens by name, never matched by text) is
    built once, on first use (~1 s for a 160K vocabulary), and shared by every matcher; `matcher` is
    thread-safe (the server checks grammars on worker threads, the model thread matches).
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.words = -(-vocab_size // 32)  # int32 words of one row's mask
        self._ll = None
        self._lock = threading.Lock()

    @property
    def llguidance_tokenizer(self):
        with self._lock:
            if self._ll is None:
                self._ll = _build_tokenizer(self.tokenizer)
            return self._ll

    def check(self, grammar: str) -> None:
        """Raise GrammarError naming what is wrong with `grammar` (an unsupported schema feature, …)."""
        llg = _llguidance()
        try:
            is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.llguidance_tokenizer)
        except (ValueError, RuntimeError, TypeError) as e:  # what llguidance raises for a malformed document
            raise GrammarError(str(e)) from None
        if is_error:
            raise GrammarError(messages[0] if messages else "the grammar is invalid")

    def matcher(self, grammar: str) -> Matcher:
        """A fresh matcher at the start of `grammar` (GrammarError if it does not compile)."""
        llg = _llguidance()
        ll = self.llguidance_tokenizer
        m = llg.LLMatcher(ll, grammar, log_level=0)
        if m.is_error():
            raise GrammarError(m.get_error())
        return Matcher(m, self.words, -(-ll.vocab_size // 32))


class _TokenizerView:
    """What llguidance's TokenizerWrapper reads: each id's bytes, the end-of-turn ids, an encoder."""

    def __init__(self, tokenizer: Tokenizer):
        specials = tokenizer.special_ids
        self.special_token_ids = sorted(specials.values())
        names = {i: name for name, i in specials.items()}
        # A special token's bytes are 0xFF + its name: no text can spell it (0xFF is never UTF-8).
        self.tokens = [b"\xff" + names[i].encode() if i in names else tokenizer.token_bytes(i)
                       for i in range(tokenizer.vocab_size)]
        self.eos_token_id = tokenizer.im_end_id
        self.bos_token_id = tokenizer.bos_id
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text)


def _build_tokenizer(tokenizer: Tokenizer):
    llg = _llguidance()
    return llg.LLTokenizer(llg.TokenizerWrapper(_TokenizerView(tokenizer)), eos_token=list(tokenizer.stop_ids))
