"""Kimi-K2 tokenizers: the release's tiktoken BPE, or a sentencepiece model, behind one interface.

Two rules hold for both backends:
- `encode(text)` is for untrusted text and never yields a special id: a user typing
  `<|im_end|>` gets ordinary tokens that decode back to those characters. Only
  `encode_with_special` (used for the rendered chat template) maps special-token names to ids.
- Decoding works on bytes: `decode(ids)` is the UTF-8 decoding of the tokens' concatenated
  bytes, and `StreamDecoder` decodes the same bytes incrementally, so streamed pieces never
  hold half a character and join to exactly `decode(ids)`.

The release's special tokens are the 256 ids after the BPE ranks; `KIMI_SPECIAL_TOKEN_OFFSETS`
gives their offsets from `num_base_tokens`, so a small test vocabulary gets the same layout.
"""

from __future__ import annotations

import abc
import base64
import codecs
import heapq
import itertools
import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import regex

from kimi_jax.text.chat_template import ChatTemplate, default_template

# Kimi-K2's pre-tokenizer split pattern (tiktoken `pat_str`); `&&` is class intersection.
_KIMI_PAT_PIECES = (
    r"[\p{Han}]+",
    (
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
        r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    ),
    (
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
        r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    ),
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
)
KIMI_PAT_STR = "|".join(_KIMI_PAT_PIECES)

NUM_RESERVED_SPECIAL_TOKENS = 256
# Offsets from num_base_tokens (163584 in the release); the other reserved ids are named
# `<|reserved_token_{id}|>`.
KIMI_SPECIAL_TOKEN_OFFSETS: dict[str, int] = {
    "[BOS]": 0,
    "[EOS]": 1,
    "<|im_end|>": 2,
    "<|im_user|>": 3,
    "<|im_assistant|>": 4,
    "<|start_header_id|>": 6,
    "<|end_header_id|>": 7,
    "[EOT]": 9,
    "<|im_system|>": 10,
    "<|tool_calls_section_begin|>": 11,
    "<|tool_calls_section_end|>": 12,
    "<|tool_call_begin|>": 13,
    "<|tool_call_argument_begin|>": 14,
    "<|tool_call_end|>": 15,
    "<|im_middle|>": 17,
    "[UNK]": 254,
    "[PAD]": 255,
}
# What chat formatting and stopping cannot do without.
REQUIRED_SPECIAL_TOKENS = (
    "[BOS]",
    "[EOS]",
    "<|im_end|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|im_system|>",
    "<|im_middle|>",
)

# tiktoken's regex overflows its stack on very long runs of whitespace (a panic at 1M spaces;
# worker threads have smaller stacks), so runs longer than this are cut before encoding.
_MAX_RUN_CHARS = 25_000


class Tokenizer(abc.ABC):
    """What the engine needs from a tokenizer; see the module docstring for the rules."""

    def __init__(self, special_ids: Mapping[str, int], source: str) -> None:
        missing = [name for name in REQUIRED_SPECIAL_TOKENS if name not in special_ids]
        if missing:
            raise ValueError(f"tokenizer {source} lacks the special tokens {missing}")
        self.special_ids: dict[str, int] = dict(special_ids)
        self.source = source
        # The checkpoint's chat template (`load_tokenizer` finds it next to the tokenizer file).
        self.chat_template: ChatTemplate = default_template()
        # Longest first, so that a name that is a prefix of another cannot win.
        self._special_names = {i: name for name, i in self.special_ids.items()}
        names = sorted(self.special_ids, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, names)))

    # -- backend hooks ------------------------------------------------------------------------
    @abc.abstractmethod
    def _encode_text(self, text: str, at_start: bool) -> list[int]:
        """Encode text as ordinary tokens only (special-token names in it stay text).

        `at_start`: the text opens the sequence (sentencepiece adds its dummy prefix there).
        """

    @abc.abstractmethod
    def _token_bytes(self, token_id: int, at_start: bool) -> tuple[bytes, bool]:
        """The bytes one token decodes to, and whether the next token still opens the text."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, specials included (the embedding table's height)."""

    # -- shared behaviour ---------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Encode untrusted text: never yields a special id, special-token names stay text."""
        return self._encode_text(text, at_start=True)

    def encode_with_special(self, text: str) -> list[int]:
        """Encode trusted, templated text: special-token names become their ids."""
        return self._encode_segments([(text, True)])

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> list[int]:
        """Token ids of the conversation as `self.chat_template` renders it (`kwargs`: template variables).

        Special-token names become ids only where the template put them: one typed inside a message
        stays text. Without such names this is `encode_with_special(self.chat_template.render(...))`.
        """
        segments = self.chat_template.segments(messages, tools, add_generation_prompt, self.special_ids, **kwargs)
        return self._encode_segments(segments)

    def _encode_segments(self, segments: Iterable[tuple[str, bool]]) -> list[int]:
        """Encode `(text, trusted)` pieces; only names in trusted pieces become special ids.

        Ordinary text is gathered across pieces and encoded in one go between two specials, so
        that the split into pieces never changes the tokens.
        """
        ids: list[int] = []
        text: list[str] = []

        def flush() -> None:
            if any(text):
                ids.extend(self._encode_text("".join(text), at_start=not ids))
            text.clear()

        for piece, trusted in segments:
            pos = 0
            for match in self._special_re.finditer(piece) if trusted else ():
                text.append(piece[pos : match.start()])
                flush()
                ids.append(self.special_ids[match.group()])
                pos = match.end()
            text.append(piece[pos:])
        flush()
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text; specials decode to their names, invalid UTF-8 to U+FFFD."""
        out, at_start = [], True
        for token_id in ids:
            data, at_start = self._token_bytes(self._check_id(token_id), at_start)
            out.append(data)
        return b"".join(out).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for in running text (a special token: its name), as listed in
        log probabilities."""
        name = self._special_names.get(self._check_id(token_id))
        return name.encode() if name is not None else self._token_bytes(token_id, False)[0]

    def stream_decoder(self) -> StreamDecoder:
        """A fresh incremental decoder for one generated sequence."""
        return StreamDecoder(self)

    def _check_id(self, token_id: int) -> int:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
        return int(token_id)

    @property
    def bos_id(self) -> int:
        return self.special_ids["[BOS]"]

    @property
    def eos_id(self) -> int:
        return self.special_ids["[EOS]"]

    @property
    def im_end_id(self) -> int:
        return self.special_ids["<|im_end|>"]

    @property
    def pad_id(self) -> int:
        """`[PAD]`, or `[EOS]` for a vocabulary without one."""
        return self.special_ids.get("[PAD]", self.eos_id)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Generation stops on these: `<|im_end|>` (end of turn) and `[EOS]`."""
        return (self.im_end_id, self.eos_id)


class StreamDecoder:
    """Turns generated ids into text as they arrive, never splitting a UTF-8 character.

    `push(id)` returns the text completed by that token ('' while a character is still
    partial); `flush()` returns what is left at the end (U+FFFD for a truncated character).
    The pieces joined equal `tokenizer.decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = True

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text."""
        data, self._at_start = self._tokenizer._token_bytes(
            self._tokenizer._check_id(token_id), self._at_start
        )
        return self._utf8.decode(data)

    def flush(self) -> str:
        """End of sequence: return any held-back bytes (decoded with replacement)."""
        return self._utf8.decode(b"", final=True)


# ---------------------------------------------------------------------------------------------
# tiktoken backend


def kimi_special_tokens(
    num_base_tokens: int, names_by_id: Mapping[int, str] | None = None
) -> dict[str, int]:
    """Kimi's 256 reserved specials after `num_base_tokens` ranks, as {name: id}.

    `names_by_id` (e.g. from tokenizer_config.json) overrides the built-in names by id.
    """
    default_names = {num_base_tokens + off: name for name, off in KIMI_SPECIAL_TOKEN_OFFSETS.items()}
    default_names.update(names_by_id or {})
    ids = range(num_base_tokens, num_base_tokens + NUM_RESERVED_SPECIAL_TOKENS)
    specials = {default_names.get(i, f"<|reserved_token_{i}|>"): i for i in ids}
    if len(specials) != NUM_RESERVED_SPECIAL_TOKENS:
        counts = Counter(default_names.get(i, f"<|reserved_token_{i}|>") for i in ids)
        duplicates = sorted(name for name, n in counts.items() if n > 1)
        raise ValueError(f"special token names must be unique; duplicates: {duplicates}")
    return specials


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken BPE file (`base64(token_bytes) rank` per line); ranks must be 0..N-1."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: expected 'base64(token) rank', got {line[:80]!r}") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be 0..{len(ranks) - 1} without gaps or duplicates")
    return ranks


def write_tiktoken_file(ranks: Mapping[bytes, int], path: str | os.PathLike) -> None:
    """Write ranks in the tiktoken BPE file format, one `base64(token) rank` line per token."""
    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    with open(path, "w", encoding="ascii") as f:
        f.writelines(f"{base64.b64encode(token).decode('ascii')} {rank}\n" for token, rank in by_rank)


def _added_tokens_from_config(config_path: Path) -> dict[int, str]:
    """{id: name} from a Hugging Face tokenizer_config.json's `added_tokens_decoder`."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        return {int(i): entry["content"] for i, entry in config.get("added_tokens_decoder", {}).items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{config_path}: unreadable added_tokens_decoder ({e})") from e


def _split_long_runs(text: str) -> Iterable[str]:
    """Cut runs of whitespace or of non-whitespace longer than _MAX_RUN_CHARS into slices."""
    if len(text) <= _MAX_RUN_CHARS:
        yield text
        return
    start = 0
    for run in re.finditer(r"\s+|\S+", text):
        for cut in range(run.start() + _MAX_RUN_CHARS, run.end(), _MAX_RUN_CHARS):
            yield text[start:cut]
            start = cut
    yield text[start:]


class TiktokenTokenizer(Tokenizer):
    """The release's tokenizer: byte-level BPE ranks, Kimi's pat_str, 256 reserved specials."""

    def __init__(
        self,
        ranks: Mapping[bytes, int],
        special_tokens: Mapping[str, int] | None = None,
        pat_str: str = KIMI_PAT_STR,
        source: str = "<in-memory tiktoken ranks>",
    ) -> None:
        """`special_tokens` defaults to `kimi_special_tokens(len(ranks))`."""
        import tiktoken  # deferred: only this backend needs it

        specials = dict(kimi_special_tokens(len(ranks)) if special_tokens is None else special_tokens)
        clashes = sorted(i for i in specials.values() if i < len(ranks))
        if clashes:
            raise ValueError(f"{source}: special ids {clashes[:5]} collide with BPE ranks < {len(ranks)}")
        super().__init__(specials, source)
        self.num_base_tokens = len(ranks)
        self._vocab_size = max(len(ranks), max(specials.values()) + 1)
        self._encoding = tiktoken.Encoding(
            name=Path(source).name, pat_str=pat_str, mergeable_ranks=dict(ranks), special_tokens=specials
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike, config_path: str | os.PathLike | None = None) -> TiktokenTokenizer:
        """Load `tiktoken.model`; names of specials come from a `tokenizer_config.json` next to
        it (or `config_path`) when present, else from KIMI_SPECIAL_TOKEN_OFFSETS."""
        path = Path(path)
        ranks = load_tiktoken_ranks(path)
        config = Path(config_path) if config_path else path.with_name("tokenizer_config.json")
        names = _added_tokens_from_config(config) if config.is_file() else {}
        outside = [i for i in names if not len(ranks) <= i < len(ranks) + NUM_RESERVED_SPECIAL_TOKENS]
        if outside:
            raise ValueError(
                f"{config}: added token ids {outside[:5]} are outside the reserved range "
                f"[{len(ranks)}, {len(ranks) + NUM_RESERVED_SPECIAL_TOKENS}) after the BPE ranks of {path}"
            )
        return cls(ranks, kimi_special_tokens(len(ranks), names), source=str(path))

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def _encode_text(self, text: str, at_start: bool) -> list[int]:
        # tiktoken's ordinary path never matches special tokens.
        ids: list[int] = []
        for chunk in _split_long_runs(text):
            ids += self._encoding.encode_ordinary(chunk)
        return ids

    def _token_bytes(self, token_id: int, at_start: bool) -> tuple[bytes, bool]:
        return self._encoding.decode_single_token_bytes(token_id), False

    def decode(self, ids: Iterable[int]) -> str:
        # Same result as the base class, in one call into tiktoken.
        ids = [self._check_id(i) for i in ids]
        return self._encoding.decode_bytes(ids).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# sentencepiece backend

# User-defined pieces with these shapes are specials (`<|im_end|>`, `[EOS]`, ...); other
# user-defined pieces (say, "\n\n") are ordinary text.
_SPECIAL_PIECE = re.compile(r"<\|[^<>|]+\|>|\[[A-Z_]+\]")


class NotASentencePieceModel(ValueError):
    """The bytes given to SentencePieceTokenizer do not parse as a model."""


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model whose user-defined pieces include Kimi's special-token names.

    sentencepiece matches user-defined pieces anywhere in raw text, so `encode` splits the text
    at special-token names and spells each name with byte-fallback pieces. Segments after the
    first are encoded without the dummy-prefix space, so that splitting never adds spaces.
    """

    def __init__(self, model: str | os.PathLike | bytes) -> None:
        """`model`: a `.model` file path, or the serialized model proto."""
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb

        source = "<in-memory sentencepiece model>" if isinstance(model, bytes) else str(model)
        proto_bytes = model if isinstance(model, bytes) else Path(model).read_bytes()
        proto = pb.ModelProto()
        try:
            proto.ParseFromString(proto_bytes)
            self._sp = spm.SentencePieceProcessor(model_proto=proto_bytes)
        except Exception as e:  # protobuf and sentencepiece raise assorted types on bad input
            raise NotASentencePieceModel(f"{source} is not a sentencepiece model: {e}") from e
        types = [piece.type for piece in proto.pieces]
        piece_type = pb.ModelProto.SentencePiece.Type
        specials = {
            piece.piece: i
            for i, piece in enumerate(proto.pieces)
            if piece.type == piece_type.USER_DEFINED and _SPECIAL_PIECE.fullmatch(piece.piece)
        }
        try:
            super().__init__(specials, source)
        except ValueError as e:
            raise ValueError(
                f"{e}; train the model with user_defined_symbols={list(REQUIRED_SPECIAL_TOKENS)}"
            ) from None

        # A second processor without the dummy-prefix space, for segments after the first.
        self._add_dummy_prefix = proto.normalizer_spec.add_dummy_prefix
        proto.normalizer_spec.add_dummy_prefix = False
        self._sp_cont = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

        byte_ids = {piece.piece: i for i, piece in enumerate(proto.pieces) if piece.type == piece_type.BYTE}
        self._byte_ids = [byte_ids.get(f"<0x{b:02X}>") for b in range(256)]
        self._piece_bytes: list[bytes] = []
        for piece, kind in zip(proto.pieces, types):
            if kind in (piece_type.CONTROL, piece_type.UNUSED):
                self._piece_bytes.append(b"")
            elif kind == piece_type.UNKNOWN:
                self._piece_bytes.append(" \u2047 ".encode())  # what sentencepiece prints for <unk>
            elif kind == piece_type.BYTE:
                self._piece_bytes.append(bytes([int(piece.piece[3:5], 16)]))  # "<0xAB>"
            else:
                self._piece_bytes.append(piece.piece.replace("\u2581", " ").encode())
        self._is_control = [kind == piece_type.CONTROL for kind in types]
        # Pieces whose leading space sentencepiece drops when they open the text (dummy prefix).
        self._strips_prefix = [
            kind in (piece_type.NORMAL, piece_type.USER_DEFINED) and data.startswith(b" ")
            for kind, data in zip(types, self._piece_bytes)
        ]

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def _encode_text(self, text: str, at_start: bool) -> list[int]:
        # sentencepiece itself would match the user-defined special pieces, so cut them out
        # and spell them with bytes; later segments must not get the dummy-prefix space.
        ids: list[int] = []
        pos = 0
        for match in self._special_re.finditer(text):
            if match.start() > pos:
                ids += self._encode_plain(text[pos : match.start()], at_start and not ids)
            ids += self._spell_with_bytes(match.group())
            pos = match.end()
        if pos < len(text):
            ids += self._encode_plain(text[pos:], at_start and not ids)
        return ids

    def _spell_with_bytes(self, literal: str) -> list[int]:
        ids = [self._byte_ids[b] for b in literal.encode()]
        if None in ids:
            raise ValueError(
                f"{self.source} has no byte-fallback pieces, so the text {literal!r} cannot be "
                "encoded without becoming a special token; train with byte_fallback=True"
            )
        return ids

    def _encode_plain(self, text: str, at_start: bool) -> list[int]:
        """Encode text that holds no special-token name."""
        return (self._sp if at_start else self._sp_cont).encode(text)

    def _token_bytes(self, token_id: int, at_start: bool) -> tuple[bytes, bool]:
        if self._is_control[token_id]:
            return b"", at_start  # invisible; the text has not started yet
        data = self._piece_bytes[token_id]
        if at_start and self._add_dummy_prefix and self._strips_prefix[token_id]:
            data = data[1:]
        return data, False


# ---------------------------------------------------------------------------------------------
# Loading and training


def _looks_like_tiktoken(head: bytes) -> bool:
    first_line = head.split(b"\n", 1)[0].strip()
    return re.fullmatch(rb"[A-Za-z0-9+/]+={0,2}\s+\d+", first_line) is not None


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a file or a directory.

    A directory is searched for `tiktoken.model`, then `tokenizer.model`, then a single
    `*.model`. A file is recognised by its content: tiktoken BPE text
    (`base64(token) rank` lines) or a sentencepiece model proto. The chat template is the one
    next to it (`ChatTemplate.for_checkpoint`: the packaged 0905 template if there is none).

    Raises:
      FileNotFoundError: nothing usable at `path`.
      ValueError: the file is neither format, or is malformed.
    """
    path = Path(path)
    tokenizer = _load(path)
    tokenizer.chat_template = ChatTemplate.for_checkpoint(path if path.is_dir() else path.parent)
    return tokenizer


def _load(path: Path) -> Tokenizer:
    expected = "'tiktoken.model' (tiktoken BPE ranks) or 'tokenizer.model' (sentencepiece)"
    if path.is_dir():
        for name in ("tiktoken.model", "tokenizer.model"):
            if (path / name).is_file():
                return _load_file(path / name)
        candidates = sorted(path.glob("*.model"))
        if len(candidates) == 1:
            return _load_file(candidates[0])
        found = f"; found several: {[c.name for c in candidates]}" if candidates else ""
        raise FileNotFoundError(f"no tokenizer in directory {path}: expected {expected}{found}")
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path {path} does not exist; expected {expected} or a directory holding one")
    return _load_file(path)


def _load_file(path: Path) -> Tokenizer:
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        raise ValueError(f"tokenizer file {path} is empty")
    if _looks_like_tiktoken(head):
        return TiktokenTokenizer.from_file(path)
    try:
        return SentencePieceTokenizer(path)
    except NotASentencePieceModel as e:
        raise ValueError(
            f"{path} is neither a tiktoken BPE file ('base64(token) rank' per line) "
            f"nor a sentencepiece model ({e.__cause__})"
        ) from e


def _merge_pair(word: list[int], a: int, b: int, new: int) -> list[int]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_bpe_ranks(texts: Iterable[str], vocab_size: int, pat_str: str = KIMI_PAT_STR) -> dict[bytes, int]:
    """Train a small byte-level BPE vocabulary in tiktoken's format, for tests and tiny models.

    Ranks 0..255 are the single bytes; each further rank is the most frequent adjacent pair
    within the pre-tokenized pieces (ties broken by the smaller pair of ids). Stops at
    `vocab_size` ranks or when no pair is left. Meant for corpora of up to a few hundred KB.
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least 256 (the byte tokens), got {vocab_size}")
    # regex.V1 understands the `&&` class intersection of tiktoken's pattern syntax.
    splitter = regex.compile(pat_str, regex.V1)
    piece_counts = Counter(p.encode() for text in texts for p in splitter.findall(text))
    words = [list(piece) for piece in piece_counts]
    freqs = list(piece_counts.values())

    vocab = [bytes([b]) for b in range(256)]
    ranks = {token: i for i, token in enumerate(vocab)}
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> words that may hold it
    for wi, word in enumerate(words):
        for pair in itertools.pairwise(word):
            pair_counts[pair] += freqs[wi]
            where[pair].add(wi)
    # Max-heap of (−count, pair) with lazy deletion: stale entries are skipped when popped.
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    while len(vocab) < vocab_size and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count or neg_count == 0:
            continue
        merged = vocab[pair[0]] + vocab[pair[1]]
        if merged not in ranks:  # the same bytes may already exist via another split
            ranks[merged] = len(vocab)
            vocab.append(merged)
        new_id = ranks[merged]
        touched = set()
        for wi in where.pop(pair, ()):
            old = words[wi]
            new = _merge_pair(old, pair[0], pair[1], new_id)
            if new == old:
                continue
            for p in itertools.pairwise(old):
                pair_counts[p] -= freqs[wi]
                touched.add(p)
            for p in itertools.pairwise(new):
                pair_counts[p] += freqs[wi]
                where[p].add(wi)
                touched.add(p)
            words[wi] = new
        for p in touched:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
    return ranks
