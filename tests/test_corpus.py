"""The generated chat corpus: determinism, the Kimi tool-call format, held-out split, tokenizer, loss mask."""

import functools
import itertools
import json

import numpy as np
import pytest

from kimi_jax.text.chat_template import render_chat
from kimi_jax.text.tokenizer import KIMI_SPECIAL_TOKEN_OFFSETS, SentencePieceTokenizer, load_tokenizer
from kimi_jax.text.tool_calls import parse_tool_calls
from kimi_jax.train import corpus

pytestmark = pytest.mark.unit


@functools.cache
def _conversations(n=600, seed=0):
    return corpus.generate_conversations(n, seed)


@functools.cache
def _tokenizer():
    return SentencePieceTokenizer(corpus.train_tokenizer(_conversations(), vocab_size=700))


def test_corpus_is_deterministic_from_its_seed():
    assert corpus.generate_conversations(40, seed=7) == corpus.generate_conversations(40, seed=7)
    assert corpus.generate_conversations(40, seed=7) != corpus.generate_conversations(40, seed=8)
    assert corpus.heldout_weather_cases(seed=3) == corpus.heldout_weather_cases(seed=3)


def test_corpus_mixes_tool_use_and_plain_chat():
    convs = _conversations()
    with_calls = [c for c in convs if any(m.get("tool_calls") for m in c["messages"])]
    assert 0.5 < len(with_calls) / len(convs) < 0.7
    names = {t["function"]["name"] for c in convs if c["tools"] for t in c["tools"]}
    assert names == {"get_weather", "get_time", "search_web", "convert_currency"}
    assert any(c["tools"] and not any(m.get("tool_calls") for m in c["messages"]) for c in convs)  # tools unused
    assert any(sum(len(m.get("tool_calls") or ()) for m in c["messages"]) == 2 for c in convs)  # two calls


def test_weather_turns_render_as_kimi_tool_calls():
    import random

    messages = corpus.weather_turns(random.Random(0), "What's the weather in {city}?", "Paris", 0)
    text = render_chat(messages, [corpus.WEATHER_TOOL], add_generation_prompt=False)
    call = ('<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|><|tool_call_begin|>'
            'functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
            '<|tool_calls_section_end|><|im_end|>')
    assert call in text
    assert "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\n    {\"city\": \"Paris\"" in text
    content, calls = parse_tool_calls(call.split("<|im_middle|>")[1].removesuffix("<|im_end|>"))
    assert content is None and calls[0]["function"]["name"] == "get_weather"
    result = json.loads(messages[2]["content"])
    assert f"{result['temperature_c']}°C" in messages[3]["content"] and result["condition"] in messages[3]["content"]


def test_heldout_cities_and_phrasings_never_occur_in_training():
    convs = corpus.generate_conversations(3000, seed=0)
    corpus.check_heldout_unseen(convs)
    assert not set(corpus.HELDOUT_CITIES) & set(corpus.TRAIN_CITIES)
    leaked = convs + [{"messages": [{"role": "user", "content": "Weather in Lisbon?"}], "tools": None}]
    with pytest.raises(ValueError, match="Lisbon"):
        corpus.check_heldout_unseen(leaked)
    cases = corpus.heldout_weather_cases()
    assert [c.weather.city for c in cases] == list(corpus.HELDOUT_CITIES)
    assert all(c.messages[-1]["content"].replace(c.weather.city, "{city}") in corpus.HELDOUT_WEATHER_ASKS
               for c in cases)


def test_tokenizer_is_lossless_with_kimi_specials(tmp_path):
    tok = _tokenizer()
    assert set(KIMI_SPECIAL_TOKEN_OFFSETS) <= set(tok.special_ids)
    for c in _conversations()[:50]:
        text = render_chat(c["messages"], c["tools"])
        assert tok.decode(tok.encode_with_special(text)) == text
        assert tok.encode_with_special(text) == tok.apply_chat_template(c["messages"], c["tools"])
    odd = "  two  spaces\tand a tab, Zürich and 北京 ✓\n"
    assert tok.decode(tok.encode(odd)) == odd  # byte fallback, no whitespace folding
    assert tok.encode("<|im_end|>") != [tok.im_end_id]  # typed specials stay text
    (tmp_path / "tokenizer.model").write_bytes(corpus.train_tokenizer(_conversations(), vocab_size=700))
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)


def test_loss_mask_covers_exactly_the_assistant_turns():
    tok = _tokenizer()
    for c in _conversations()[:80]:
        ids, mask = corpus.encode_conversation(tok, c)
        assert ids.tolist() == tok.apply_chat_template(c["messages"], c["tools"], add_generation_prompt=False) + [
            tok.im_end_id]
        # The masked tokens decode to each assistant body followed by its <|im_end|>, in order.
        want = ""
        for m in c["messages"]:
            if m["role"] == "assistant":
                body = render_chat([m], add_generation_prompt=False).split("<|im_middle|>", 2)[2]
                want += body + "<|im_end|>"
        assert tok.decode(ids[mask]) == want
        # Every masked run starts right after an assistant header.
        starts = np.flatnonzero(mask & ~np.roll(mask, 1))
        assert all(ids[s - 1] == tok.special_ids["<|im_middle|>"] and ids[s - 3] == tok.special_ids["<|im_assistant|>"]
                   for s in starts)


def test_batches_pad_by_bucket():
    tok = _tokenizer()
    examples = corpus.encode_corpus(tok, _conversations()[:200], max_len=512)
    it = corpus.batches(examples, tokens_per_batch=1024, buckets=(128, 256, 512), pad_id=tok.pad_id, seed=0)
    seen = set()
    for _ in range(12):
        b = next(it)
        rows, length = b.tokens.shape
        seen.add(length)
        assert length in (128, 256, 512) and rows == 1024 // length
        lengths = (b.positions >= 0).sum(1)
        for r in range(rows):  # positions count 0.. on the tokens, −1 on the padding
            np.testing.assert_array_equal(b.positions[r, : lengths[r]], np.arange(lengths[r]))
            assert np.all(b.tokens[r, lengths[r]:] == tok.pad_id) and not b.mask[r, lengths[r]:].any()
    assert len(seen) > 1
    again = corpus.batches(examples, 1024, (128, 256, 512), tok.pad_id, seed=0)
    first = next(corpus.batches(examples, 1024, (128, 256, 512), tok.pad_id, seed=0))
    np.testing.assert_array_equal(next(again).tokens, first.tokens)


def test_loss_weights_assistant_context_and_padding():
    tok = _tokenizer()
    examples = corpus.encode_corpus(tok, _conversations()[:3], max_len=512)
    b = corpus.pad_batch(examples, 512, tok.pad_id, context_weight=0.3)
    assert b.mask.dtype == np.float32
    for row, (ids, m) in enumerate(examples):
        np.testing.assert_array_equal(b.mask[row, : len(ids)], np.where(m, 1.0, np.float32(0.3)))
        assert not b.mask[row, len(ids):].any()
    default = corpus.pad_batch(examples, 512, tok.pad_id)  # context_weight 0: assistant tokens only
    for row, (ids, m) in enumerate(examples):
        np.testing.assert_array_equal(default.mask[row, : len(ids)], m.astype(np.float32))


def test_copy_conversations_are_multi_turn_copies():
    convs = corpus.generate_copy_conversations(50, seed=4)
    assert convs == corpus.generate_copy_conversations(50, seed=4)
    for c in convs:
        turns = c["messages"]
        assert 6 <= len(turns) <= 10 and [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2)
    echoes = [(q["content"], a["content"]) for c in convs for q, a in zip(c["messages"][::2], c["messages"][1::2])
              if any(q["content"] == ask.format(text=a["content"]) for ask in corpus.ECHO_ASKS)]
    assert len(echoes) > 60  # half the turns echo their text exactly
    frames = [ask.split("{sentence}") for ask in corpus.SPOT_ASKS]
    spots = [(q["content"], a["content"]) for c in convs for q, a in zip(c["messages"][::2], c["messages"][1::2])
             if any(q["content"].startswith(head) and q["content"].endswith(tail) for head, tail in frames)]
    assert len(spots) > 30  # others pick the city out of a sentence
    for question, city in spots:  # lowercase words follow the city: the answer stops where the name does
        after = question.split(city, 1)[1]
        assert after[0] == " " and after[1].islower()
    corpus.check_heldout_unseen(convs)


def test_interleave_puts_every_nth_batch_from_the_extra_stream():
    from kimi_jax.train.trainer import _interleave

    out = list(itertools.islice(_interleave(iter(range(100)), iter("abcdef"), 3), 9))
    assert out == [0, 1, "a", 2, 3, "b", 4, 5, "c"]
    assert list(itertools.islice(_interleave(iter(range(5)), iter("x"), 0), 5)) == [0, 1, 2, 3, 4]


def test_synthetic_cities_look_like_real_names_and_never_a_heldout_one():
    import random

    rng = random.Random(0)
    names = [corpus.synthetic_city(rng) for _ in range(3000)]
    assert len(set(names)) > 2500  # made up, not drawn from a short list
    assert not any(city in name for name in names for city in corpus.HELDOUT_CITIES)
    assert not set(names) & set(corpus.TRAIN_CITIES)
    assert all(name[0].isupper() and name.replace(" ", "").isalpha() for name in names)
    # The shapes of the held-out names occur: accented letters, two words, opening consonant clusters.
    assert sum(any(ch in corpus._ACCENTED for ch in name) for name in names) > 50
    assert sum(" " in name for name in names) > 300
    assert sum(name[:2].lower() in corpus._CLUSTERS for name in names) > 300


def test_weather_asks_vary_the_words_around_the_city():
    import random

    rng = random.Random(0)
    asks = {corpus.weather_ask(rng) for _ in range(2000)}
    assert len(asks) > 500 and all(ask.count("{city}") == 1 for ask in asks)
    assert sum(not ask.split("{city}")[1].strip(" ?.!") == "" for ask in asks) > 200  # words after the city
    heldout_prefixes = [a.split("{city}")[0] for a in corpus.HELDOUT_WEATHER_ASKS]
    assert not any(ask.startswith(prefix) for ask in asks for prefix in heldout_prefixes)


def test_tool_conversations_use_the_model_card_tool_and_result_shape():
    convs = _conversations()
    tools = [t for c in convs if c["tools"] for t in c["tools"]]
    assert corpus.CARD_WEATHER_TOOL in tools and corpus.WEATHER_TOOL in tools
    brief = [(c["messages"][i]["content"], c["messages"][i + 1]["content"]) for c in convs
             for i, m in enumerate(c["messages"]) if m["role"] == "tool" and '"weather"' in m["content"]]
    assert len(brief) > 20
    for result, answer in brief:
        assert json.loads(result)["weather"].lower() in answer
