"""Which grammar library to mask tokens with: llguidance, xgrammar and outlines-core side by side.

Each compiles the same nested JSON Schema for a tokenizer and then walks the tokens of one valid
reply, computing the allowed-token set before each token as a constrained decode step would.
Measured on the embedded model's tokenizer (1,024 tokens) and on a synthetic one the size of
Kimi-K2's (163,840: the release's 163,584 byte-level pieces — here real words of the embedded
corpus and random letter runs — plus 256 special tokens), since mask cost grows with the vocabulary.
xgrammar and outlines-core are not dependencies of kimi_jax: `pip install xgrammar outlines-core`
to run this; a library that is missing is reported as such.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import kimi_jax
from kimi_jax.runtime.default_model import load_default
from kimi_jax.text.grammar import json_grammar

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["id", "kind", "tags", "address"],
          "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9999},
                         "kind": {"enum": ["user", "admin", "guest"]},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
                         "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                                     "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "zip": {"type": "integer", "minimum": 0, "maximum": 99999}}}}}
REPLY = json.dumps({"id": 42, "kind": "admin", "tags": ["a", "c"], "address": {"city": "Paris", "zip": 75001}})
KIMI_VOCAB, KIMI_PIECES = 163_840, 163_584


def synthetic_vocab(pieces: int = KIMI_PIECES, seed: int = 0) -> list[bytes]:
    """`pieces` distinct byte strings: the 256 bytes, the embedded corpus's words (with and without a
    leading space), then random runs of 2-9 letters, digits and JSON punctuation."""
    rng = random.Random(seed)
    vocab = [bytes([i]) for i in range(256)]
    seen = set(vocab)
    corpus = (Path(kimi_jax.__file__).parent / "assets" / "default_corpus.txt").read_text(encoding="utf-8")
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.,:;\"{}[]"

    def add(piece: bytes):
        if piece not in seen and len(vocab) < pieces:
            seen.add(piece)
            vocab.append(piece)

    for word in corpus.split():
        add(word.encode())
        add((" " + word).encode())
    while len(vocab) < pieces:
        add((rng.choice(["", " "]) + "".join(rng.choice(letters) for _ in range(rng.randint(2, 9)))).encode())
    return vocab


def _time(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def _row(setup_s: float, compile_s: float, walk_start: float, tokens: int) -> dict:
    return {"tokenizer_s": setup_s, "compile_ms": 1e3 * compile_s,
            "mask_us": 1e6 * (time.perf_counter() - walk_start) / tokens}


def llguidance_cost(pieces: list[bytes], n_vocab: int, eos: int, reply: list[int]) -> dict:
    import llguidance as llg
    import llguidance.numpy as lln

    class View:  # llguidance's TokenizerWrapper protocol
        eos_token_id, bos_token_id = eos, None
        tokens = pieces + [b"\xff<|special_%d|>" % i for i in range(n_vocab - len(pieces))]
        special_token_ids = list(range(len(pieces), n_vocab))

        def __call__(self, text):
            return tokenizer.greedy_tokenize(text if isinstance(text, str) else text.decode())

    tokenizer, setup = _time(lambda: llg.LLTokenizer(llg.TokenizerWrapper(View())))
    matcher, compile_s = _time(lambda: llg.LLMatcher(tokenizer, json_grammar(SCHEMA)))
    mask = lln.allocate_token_bitmask(1, n_vocab)
    start = time.perf_counter()
    for t in reply:
        lln.fill_next_token_bitmask(matcher, mask)
        assert matcher.consume_token(t), matcher.get_error()
    return _row(setup, compile_s, start, len(reply))


def xgrammar_cost(pieces: list[bytes], n_vocab: int, eos: int, reply: list[int]) -> dict:
    import xgrammar as xgr

    tokens = pieces + [b"<|special_%d|>" % i for i in range(n_vocab - len(pieces))]
    compiler, setup = _time(lambda: xgr.GrammarCompiler(xgr.TokenizerInfo(tokens, vocab_type=xgr.VocabType.RAW,
                                                                          stop_token_ids=[eos])))
    compiled, compile_s = _time(lambda: compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                                                     separators=(", ", ": ")))
    matcher, mask = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, n_vocab)
    start = time.perf_counter()
    for t in reply:
        matcher.fill_next_token_bitmask(mask)
        assert matcher.accept_token(t), t
    return _row(setup, compile_s, start, len(reply))


def outlines_cost(pieces: list[bytes], n_vocab: int, eos: int, reply: list[int]) -> dict:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    by_text: dict[str, list[int]] = {}
    for i, piece in enumerate(pieces):
        if i != eos:
            try:
                by_text.setdefault(piece.decode(), []).append(i)
            except UnicodeDecodeError:  # outlines-core's vocabulary takes text pieces only
                pass
    vocabulary, setup = _time(lambda: Vocabulary(eos, by_text))
    regex = build_regex_from_schema(json.dumps(SCHEMA), r"[ ]?")
    index, compile_s = _time(lambda: Index(regex, vocabulary))
    guide = Guide(index)
    start = time.perf_counter()
    for t in reply:
        guide.get_tokens()
        guide.advance(t)
    return _row(setup, compile_s, start, len(reply))


LIBRARIES = {"llguidance": llguidance_cost, "xgrammar": xgrammar_cost, "outlines-core": outlines_cost}


def run(log=print) -> list[dict]:
    """Every library on the embedded tokenizer and on a Kimi-sized synthetic one -> rows."""
    tok = load_default().tokenizer
    small = [tok.token_bytes(i) if i not in tok.special_ids.values() else b"\xff" for i in range(tok.vocab_size)]
    big = synthetic_vocab()
    rows = []
    for name, (pieces, n_vocab, eos, reply) in {
            "embedded (1,024)": (small, tok.vocab_size, tok.im_end_id, tok.encode(REPLY)),
            "Kimi-sized (163,840)": (big, KIMI_VOCAB, KIMI_PIECES + 2, None)}.items():
        if reply is None:  # greedy longest-match over the synthetic pieces
            index = {p: i for i, p in enumerate(pieces)}
            reply, data = [], REPLY.encode()
            while data:
                n = next(n for n in range(min(9, len(data)), 0, -1) if data[:n] in index)
                reply.append(index[data[:n]])
                data = data[n:]
        for lib, cost in LIBRARIES.items():
            try:
                row = {"vocabulary": name, "library": lib, **cost(pieces, n_vocab, eos, reply)}
            except ImportError as e:
                row = {"vocabulary": name, "library": lib, "error": f"not installed ({e.name})"}
            log(json.dumps(row))
            rows.append(row)
    return rows


def markdown(rows: list[dict], command: str, machine: str) -> str:
    lines = [f"`{command}` — {machine}", "", "| vocabulary | library | tokenizer setup s | schema compile ms | "
             "mask per token µs |", "|---|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['vocabulary']} | {r['library']} | {r['error']} | | |")
        else:
            lines.append(f"| {r['vocabulary']} | {r['library']} | {r['tokenizer_s']:.2f} | {r['compile_ms']:.1f} | "
                         f"{r['mask_us']:.0f} |")
    return "\n".join(lines)
