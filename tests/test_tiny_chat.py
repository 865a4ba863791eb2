"""The shipped tiny chat checkpoint (kimi_jax/assets/tiny_chat, made by `make train-tiny`): it loads
through `kimi_jax.load`, follows a conversation, and calls `get_weather` for cities it never saw."""

import json
from pathlib import Path

import numpy as np
import pytest

import kimi_jax
from kimi_jax.tokenizer import SentencePieceTokenizer
from kimi_jax.train import corpus, evaluate

TINY_CHAT = Path(kimi_jax.__file__).resolve().parent / "assets" / "tiny_chat"
pytestmark = pytest.mark.skipif(not (TINY_CHAT / "config.json").is_file(),
                                reason="no shipped checkpoint: run `make train-tiny`")
EVAL_CASES = 24  # of the 44 held-out cities, to keep the test short


@pytest.fixture(scope="module")
def model():
    return kimi_jax.load(TINY_CHAT, dtype="float32")


def test_checkpoint_layout_and_size(model):
    files = {p.name for p in TINY_CHAT.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "model-1-of-2.safetensors",
            "model-2-of-2.safetensors", "tokenizer.model"} <= files
    assert sum(p.stat().st_size for p in TINY_CHAT.iterdir()) < 20e6
    assert model.config.weight_block_size == (128, 128)
    assert json.loads((TINY_CHAT / "config.json").read_text())["model_type"] == "kimi_k2"
    assert isinstance(model.tokenizer, SentencePieceTokenizer)
    assert model.config.vocab_size == model.tokenizer.vocab_size
    assert model.config.eos_token_id == model.tokenizer.eos_id


def _greedy_with_logits(model, prompt, max_new_tokens=40, width=160):
    """Greedy decoding by full forward passes (`Model.logits`), padded to one width (one compile).

    Padding after the last token does not change its logits: attention is causal."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        padded = np.full(width, model.tokenizer.pad_id, np.int32)
        padded[: len(ids)] = ids
        nxt = int(np.argmax(model.logits(padded)[len(ids) - 1]))
        ids.append(nxt)
        if nxt in model.tokenizer.stop_ids:
            break
    return ids[len(prompt):]


@pytest.mark.parametrize("question, expected", [("Who are you?", "Kimi"),
                                                ("What is the capital of France?", "Paris")])
def test_greedy_logits_follow_the_conversation(model, question, expected):
    tok = model.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": question}])
    out = _greedy_with_logits(model, prompt)
    assert out[-1] == tok.im_end_id
    assert expected in tok.decode(out[:-1])
    # The engine's cached decode gives the same greedy tokens.
    assert model.generate([prompt], max_new_tokens=40, temperature=0.0)[0] == out


def test_chat_calls_the_weather_tool_then_answers(model):
    case = corpus.heldout_weather_cases(1)[0]
    reply = model.chat(list(case.messages), tools=[corpus.WEATHER_TOOL], temperature=0.0, max_new_tokens=40)
    assert reply["tool_calls"][0]["function"]["name"] == "get_weather"
    assert json.loads(reply["tool_calls"][0]["function"]["arguments"]) == {"city": case.weather.city}
    answer = model.chat(case.with_result(), tools=[corpus.WEATHER_TOOL], temperature=0.0, max_new_tokens=48)
    assert not answer["tool_calls"] and str(case.weather.temp) in answer["content"]


def test_heldout_tool_use_accuracy(model):
    report = evaluate.evaluate(model, model.tokenizer, corpus.heldout_weather_cases(EVAL_CASES))
    figures = {k: v for k, v in report.items() if k != "failures"}
    for key in ("tool_call_greedy", "tool_call_sampled", "answer_greedy", "answer_sampled"):
        assert report[key] >= 0.9, (figures, report["failures"][key])
