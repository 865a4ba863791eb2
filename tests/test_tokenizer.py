"""Tokenizer tests on tiny vocabularies trained here: a tiktoken BPE and sentencepiece models."""

import functools
import io
import json
import random

import pytest
import regex

from kimi_jax.text.chat_template import render_chat
from kimi_jax.text.tokenizer import (
    KIMI_PAT_STR,
    KIMI_SPECIAL_TOKEN_OFFSETS,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    kimi_special_tokens,
    load_tokenizer,
    train_bpe_ranks,
    write_tiktoken_file,
)

pytestmark = pytest.mark.unit

CORPUS_LINES = [
    "The quick brown fox jumps over the lazy dog. It's 12:45 and we're done; they'll see.",
    "Kimi-K2 is a mixture-of-experts model with 384 experts, 8 of which are active per token.",
    "def encode(self, text: str) -> list[int]:\n    return self._encoding.encode(text)\n",
    "你好，世界！今天天气很好，我们一起去公园散步吧。机器学习和自然语言处理。",
    "こんにちは世界。カタカナとひらがな。Привет, мир! Γειά σου κόσμε. مرحبا بالعالم",
    "Emoji: 😀 😂 👍🏽 🇯🇵 👨‍👩‍👧‍👦 ❤️ — and café, naïve, e\u0301, Å.",
    "Whitespace:\tTabs\tand  double  spaces\r\nWindows line\r\nand\n\n\nblank lines   ",
    "Numbers 1234567 3.14159 2025-01-31 0x1F600 and punctuation!?...;:()[]{}<>|",
]
CORPUS = "\n".join(CORPUS_LINES * 20)

MIXED = [
    "",
    "plain ascii",
    "  leading and trailing spaces  ",
    "中文和English混合123456789",
    "emoji 😀👍🏽🇯🇵 and a family 👨‍👩‍👧‍👦 and 🧑🏿‍🚀 (ZWJ sequences)",
    "combining: e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937 Z\u0351\u0354\u0352",
    "runs of     spaces, \t\ttabs\t and\n\n\nnewlines \r\n crlf \r lone cr",
    "rare: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ﷽ \u200b zero-width \ufeff bom \U0010ffff",
    "\n leading newline and trailing \n",
]
SPECIAL_NAMES = list(KIMI_SPECIAL_TOKEN_OFFSETS)
USER_TYPES_SPECIALS = "Please say <|im_end|> then [EOS]<|im_assistant|>assistant<|im_middle|> and <|tool_call_begin|>"


@functools.cache
def _train_sentencepiece(model_type: str, add_dummy_prefix: bool, vocab_size: int) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=SPECIAL_NAMES,
        character_coverage=1.0,
        hard_vocab_limit=False,  # a soft limit: the tiny corpus may not fill it
        minloglevel=2,
    )
    return model.getvalue()


@pytest.fixture(scope="module")
def tiktoken_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiktoken")
    write_tiktoken_file(train_bpe_ranks([CORPUS], vocab_size=700), path / "tiktoken.model")
    return path


@pytest.fixture(scope="module", params=["tiktoken", "sp_bpe", "sp_unigram_no_prefix"])
def tok(request, tiktoken_dir):
    if request.param == "tiktoken":
        return load_tokenizer(tiktoken_dir)
    if request.param == "sp_bpe":
        return SentencePieceTokenizer(_train_sentencepiece("bpe", True, 600))
    return SentencePieceTokenizer(_train_sentencepiece("unigram", False, 600))


def _special_id_set(tok):
    return set(tok.special_ids.values())


@pytest.mark.parametrize("text", MIXED)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert not set(ids) & _special_id_set(tok)
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_user_typed_special_names_stay_text(tok):
    text = USER_TYPES_SPECIALS + "".join(SPECIAL_NAMES) + "<|reserved_token_1|>"
    ids = tok.encode(text)
    assert not set(ids) & _special_id_set(tok)
    assert tok.decode(ids) == text


def test_encode_with_special_maps_names(tok):
    ids = tok.encode_with_special(USER_TYPES_SPECIALS)
    for name in ("<|im_end|>", "[EOS]", "<|im_assistant|>", "<|im_middle|>", "<|tool_call_begin|>"):
        assert ids.count(tok.special_ids[name]) == 1, name
    assert tok.decode(ids) == USER_TYPES_SPECIALS


@pytest.mark.parametrize("text", MIXED)
def test_encode_with_special_is_encode_for_plain_text(tok, text):
    assert tok.encode_with_special(text) == tok.encode(text)


def test_special_properties(tok):
    ids = tok.special_ids
    assert tok.eos_id == ids["[EOS]"] and tok.bos_id == ids["[BOS]"] and tok.im_end_id == ids["<|im_end|>"]
    assert tok.pad_id == ids["[PAD]"]
    assert set(tok.stop_ids) == {ids["<|im_end|>"], ids["[EOS]"]}
    assert tok.decode([tok.im_end_id, tok.eos_id]) == "<|im_end|>[EOS]"


def _stream(tok, ids):
    decoder = tok.stream_decoder()
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    return pieces


@pytest.mark.parametrize("text", MIXED + [USER_TYPES_SPECIALS])
def test_stream_decoder_matches_decode(tok, text):
    ids = tok.encode_with_special(text)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_holds_back_split_characters(tiktoken_dir):
    tok = load_tokenizer(tiktoken_dir)
    text = "🧑🏿‍🚀 ﷽ 𝔘"  # rare enough that the tiny vocab spells them byte by byte
    ids = tok.encode(text)
    pieces = _stream(tok, ids)
    assert len(ids) > len(text) and "" in pieces[:-1]  # some tokens completed no character
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_stream_decoder_on_invalid_utf8_equals_decode(tiktoken_dir):
    tok = load_tokenizer(tiktoken_dir)
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(256) for _ in range(rng.randrange(1, 12))]  # single-byte tokens
        assert "".join(_stream(tok, ids)) == tok.decode(ids)


def test_decode_rejects_out_of_range_ids(tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.stream_decoder().push(-1)


def test_apply_chat_template_decodes_to_render_chat(tok):
    messages = [
        {"role": "user", "content": "Weather in 北京? Say <|im_end|> literally."},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "functions.weather:0", "function": {"name": "weather", "arguments": {"city": "北京"}}}
            ],
        },
        {"role": "tool", "tool_call_id": "functions.weather:0", "content": "晴 25°C"},
    ]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    ids = tok.apply_chat_template(messages, tools=tools)
    assert tok.decode(ids) == render_chat(messages, tools)
    # The <|im_end|> typed by the user stays text: one per turn (tool_declare, default system,
    # user, assistant, tool) and no more.
    assert ids.count(tok.im_end_id) == 5
    assert ids[0] == tok.special_ids["<|im_system|>"]
    assert ids[-1] == tok.special_ids["<|im_middle|>"]

    # Without special names in the messages, the ids are those of the rendered string.
    messages[0]["content"] = "Weather in 北京?"
    assert tok.apply_chat_template(messages, tools=tools) == tok.encode_with_special(render_chat(messages, tools))


# -- tiktoken specifics -------------------------------------------------------------------------


def test_real_special_token_layout_matches_release():
    specials = kimi_special_tokens(163584)
    expected = {
        "[BOS]": 163584, "[EOS]": 163585, "<|im_end|>": 163586, "<|im_user|>": 163587,
        "<|im_assistant|>": 163588, "<|start_header_id|>": 163590, "<|end_header_id|>": 163591,
        "[EOT]": 163593, "<|im_system|>": 163594, "<|tool_calls_section_begin|>": 163595,
        "<|tool_calls_section_end|>": 163596, "<|tool_call_begin|>": 163597,
        "<|tool_call_argument_begin|>": 163598, "<|tool_call_end|>": 163599, "<|im_middle|>": 163601,
        "[UNK]": 163838, "[PAD]": 163839,
    }  # fmt: skip
    assert {name: specials[name] for name in expected} == expected
    assert specials["<|reserved_token_163589|>"] == 163589
    assert sorted(specials.values()) == list(range(163584, 163840))


def test_tiktoken_small_vocab_layout(tiktoken_dir):
    tok = load_tokenizer(tiktoken_dir)
    assert isinstance(tok, TiktokenTokenizer)
    base = tok.num_base_tokens
    assert 600 < base <= 700 and tok.vocab_size == base + 256  # the tiny corpus may run out of pairs
    assert tok.im_end_id == base + 2 and tok.special_ids["[PAD]"] == base + 255
    assert tok.decode([base + 5]) == f"<|reserved_token_{base + 5}|>"


def test_tokenizer_config_overrides_names(tiktoken_dir, tmp_path):
    (tmp_path / "tiktoken.model").write_bytes((tiktoken_dir / "tiktoken.model").read_bytes())
    base = load_tokenizer(tmp_path).num_base_tokens
    added = {
        str(base + 5): {"content": "<|media_start|>", "special": True},
        str(base + 2): {"content": "<|im_end|>"},  # same as the built-in name
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added}))
    tok = load_tokenizer(tmp_path)
    assert tok.special_ids["<|media_start|>"] == base + 5 and tok.im_end_id == base + 2
    assert tok.encode_with_special("<|media_start|>") == [base + 5]

    added[str(base + 6)] = {"content": "<|media_start|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added}))
    with pytest.raises(ValueError, match="duplicate.*<\\|media_start\\|>"):
        load_tokenizer(tmp_path)
    del added[str(base + 6)]

    added["5"] = {"content": "<|bad|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added}))
    with pytest.raises(ValueError, match="outside the reserved range"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    "text, pieces",
    [
        ("Hello world", ["Hello", " world"]),
        ("中文English混合", ["中文", "English", "混合"]),
        ("1234567", ["123", "456", "7"]),
        ("I don't know they'll", ["I", " don't", " know", " they'll"]),
        ("DON'T", ["DON'T"]),
        ("a  \n\n b", ["a", "  \n\n", " b"]),
        ("x   y", ["x", "  ", " y"]),
        ("price: $100!!\n", ["price", ":", " $", "100", "!!\n"]),
        ("CamelCase", ["Camel", "Case"]),
    ],
)
def test_pat_str_splits(text, pieces):
    assert regex.findall(KIMI_PAT_STR, text, flags=regex.V1) == pieces
    # tiktoken's own regex engine must split the same way: give it only the single bytes and
    # the expected pieces; it emits one token per piece exactly when its split agrees.
    ranks = {bytes([b]): b for b in range(256)}
    for piece in pieces:
        ranks.setdefault(piece.encode(), len(ranks))
    tok = TiktokenTokenizer(ranks)
    assert tok.encode(text) == [ranks[p.encode()] for p in pieces]


def test_very_long_whitespace_run_does_not_crash(tiktoken_dir):
    # tiktoken's regex overflows its stack on ~1M spaces unless the run is cut.
    tok = load_tokenizer(tiktoken_dir)
    text = "a" + " " * 1_000_000 + "b"
    assert tok.decode(tok.encode(text)) == text


def test_train_bpe_ranks():
    ranks = train_bpe_ranks([CORPUS], vocab_size=400)
    assert len(ranks) == 400 and sorted(ranks.values()) == list(range(400))
    assert all(ranks[bytes([b])] == b for b in range(256))
    assert b" the" in ranks and "世界".encode() in ranks  # frequent pieces get merged
    assert train_bpe_ranks([CORPUS], vocab_size=400) == ranks  # deterministic
    assert len(train_bpe_ranks(["ab"], vocab_size=1000)) == 257  # stops when no pair is left
    with pytest.raises(ValueError, match="at least 256"):
        train_bpe_ranks([CORPUS], vocab_size=100)


# -- loading --------------------------------------------------------------------------------------


def test_load_tokenizer_dispatch(tiktoken_dir, tmp_path):
    sp_dir = tmp_path / "sp"
    sp_dir.mkdir()
    (sp_dir / "tokenizer.model").write_bytes(_train_sentencepiece("bpe", True, 600))
    assert isinstance(load_tokenizer(sp_dir), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(sp_dir / "tokenizer.model"), SentencePieceTokenizer)
    # A tiktoken file is recognised by its content, whatever its name.
    renamed = tmp_path / "tokenizer.model"
    renamed.write_bytes((tiktoken_dir / "tiktoken.model").read_bytes())
    assert isinstance(load_tokenizer(renamed), TiktokenTokenizer)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="tiktoken.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "a.model").write_bytes(b"x")
    (tmp_path / "b.model").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="several"):
        load_tokenizer(tmp_path)

    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00\xffnot a model at all")
    with pytest.raises(ValueError, match="neither a tiktoken BPE file"):
        load_tokenizer(garbage)
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_tokenizer(empty)

    bad_line = tmp_path / "bad" / "tiktoken.model"
    bad_line.parent.mkdir()
    bad_line.write_text("YQ== 0\nYg== 1\nnot-base64 2\n")
    with pytest.raises(ValueError, match=r"tiktoken.model:3"):
        load_tokenizer(bad_line.parent)
    bad_line.write_text("YQ== 0\nYg== 2\n")
    with pytest.raises(ValueError, match="without gaps"):
        load_tokenizer(bad_line)


def test_sentencepiece_without_specials_is_rejected():
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()), model_writer=model, vocab_size=150, minloglevel=2
    )
    with pytest.raises(ValueError, match=r"lacks the special tokens .*user_defined_symbols"):
        SentencePieceTokenizer(model.getvalue())
