"""The shipped tiny chat checkpoint (kimi_jax/assets/tiny_chat, made by `make train-tiny`): the release's
layout, transformers parity, a conversation, and `get_weather` calls for cities it never saw."""

import json

import numpy as np
import pytest

import kimi_jax
from kimi_jax.runtime.default_model import TINY_CHAT, default_checkpoint
from kimi_jax.text.tokenizer import SentencePieceTokenizer
from kimi_jax.train import corpus, evaluate

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def model():
    return kimi_jax.load(default_checkpoint(), dtype="float32")


def test_checkpoint_layout_and_size(model):
    files = {p.name for p in TINY_CHAT.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "model-1-of-2.safetensors",
            "model-2-of-2.safetensors", "tokenizer.model", "training.json"} == files
    assert sum(p.stat().st_size for p in TINY_CHAT.iterdir()) < 20e6
    assert model.config.weight_block_size == (128, 128)
    assert json.loads((TINY_CHAT / "config.json").read_text())["model_type"] == "kimi_k2"
    assert isinstance(model.tokenizer, SentencePieceTokenizer)
    assert model.config.vocab_size == model.tokenizer.vocab_size
    assert model.config.eos_token_id == model.tokenizer.eos_id
    summary = json.loads((TINY_CHAT / "training.json").read_text())
    assert summary["train_seconds"] < 30 * 60 and summary["clipped_head_steps"] >= 0
    assert summary["loss_curve"][-1][1] < summary["loss_curve"][0][1]


def test_logits_and_greedy_tokens_match_transformers(model):
    """The trained checkpoint, block-fp8 as shipped, against DeepseekV3ForCausalLM holding the same values."""
    import torch

    from kimi_jax.bench.oracle import hf_logits, hf_model

    case = corpus.heldout_weather_cases(1)[0]
    prompt = model.tokenizer.apply_chat_template(list(case.messages), list(case.tools))
    oracle = hf_model(model.params, model.config)
    want = hf_logits(oracle, np.asarray([prompt]))[0]
    got = model.logits(np.asarray([prompt]))[0]
    assert float(np.abs(got - want).max() / np.abs(want).max()) <= 1e-4
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    new = 24
    ours = model.generate([prompt], max_new_tokens=new, temperature=0.0, stop_token_ids=[])[0]
    theirs = oracle.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                             pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert ours == theirs[0, len(prompt):].tolist()


@pytest.mark.parametrize("question, expected", [("Who are you?", "Kimi"),
                                                ("What is the capital of France?", "Paris"),
                                                ("How many days are in a week?", "7 days")])
def test_chat_answers(model, question, expected):
    reply = model.chat([{"role": "user", "content": question}], temperature=0.0, max_new_tokens=48)
    assert reply["finish_reason"] == "stop" and not reply["tool_calls"]
    assert expected in reply["content"]


def test_chat_calls_the_weather_tool_then_answers(model):
    case = corpus.heldout_weather_cases(1)[0]
    reply = model.chat(list(case.messages), tools=[corpus.WEATHER_TOOL], temperature=0.0, max_new_tokens=40)
    assert reply["tool_calls"][0]["function"]["name"] == "get_weather"
    assert json.loads(reply["tool_calls"][0]["function"]["arguments"]) == {"city": case.weather.city}
    answer = model.chat(case.with_result(), tools=[corpus.WEATHER_TOOL], temperature=0.0, max_new_tokens=48)
    assert not answer["tool_calls"] and str(case.weather.temp) in answer["content"]


@pytest.mark.slow
def test_heldout_tool_use_accuracy(model):
    """All 44 held-out cities and phrasings, greedy and at temperature 0.6 (a fixed seed per case): ≥ 90%."""
    report = evaluate.evaluate(model, model.tokenizer, corpus.heldout_weather_cases())
    assert report["cases"] == len(corpus.HELDOUT_CITIES)
    figures = {k: v for k, v in report.items() if k != "failures"}
    for key in ("tool_call_greedy", "tool_call_sampled", "answer_greedy", "answer_sampled"):
        assert report[key] >= 0.9, (figures, report["failures"][key])


def test_missing_embedded_model_is_a_clear_error(tmp_path, monkeypatch):
    from kimi_jax.runtime import default_model

    monkeypatch.setattr(default_model, "TINY_CHAT", tmp_path / "tiny_chat")
    with pytest.raises(FileNotFoundError, match="make train-tiny.*--checkpoint"):
        default_model.default_checkpoint()
