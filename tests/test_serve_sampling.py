"""Log probabilities, n, logit_bias and penalties through the server (issue 16), checked against the
model's own logits: a real uvicorn server in process over the embedded model (float32).

Token ids come back with vLLM's `return_tokens_as_token_ids` (tokens named `token_id:ID`), so every
returned token can be fed to `Model.logits`, the cache-free forward pass, as the oracle.
"""

from __future__ import annotations

import json

import httpx  # noqa: E402  (test extra: missing is an install error, not a skip)
import numpy as np
import openai  # noqa: E402
import pytest
from serve_util import LiveServer, metrics

pytestmark = pytest.mark.serve

MODEL = "kimi-k2-instruct"
ASK = [{"role": "user", "content": "Please give a brief self-introduction."}]


@pytest.fixture(scope="module")
def server():
    from kimi_jax.runtime.default_model import load_default
    from kimi_jax.serve.app import create_app
    from kimi_jax.serve.cli import build_server, parse_args

    model = load_default()
    srv = build_server(parse_args(["--max-batch", "8", "--max-context", "256", "--no-warm-up"]), model)
    live = LiveServer(create_app(srv))
    live.srv = srv
    yield live
    live.close()
    srv.scheduler.stop()


def _chat(server, **body) -> dict:
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120,
                   json={"model": MODEL, "messages": ASK, "return_tokens_as_token_ids": True, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _ids(entries) -> list[int]:
    return [int(e["token"].removeprefix("token_id:")) for e in entries]


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    return z - z.max() - np.log(np.exp(z - z.max()).sum())


def test_logprobs_are_the_log_softmax_of_the_models_logits(server):
    """Sampled at temperature 1: each token's logprob and its top 5 equal log_softmax of the fp32 logits
    of a cache-free forward over prompt + tokens (the raw logits, before temperature)."""
    reply = _chat(server, temperature=1.0, seed=11, max_tokens=10, logprobs=True, top_logprobs=5)
    entries = reply["choices"][0]["logprobs"]["content"]
    ids = _ids(entries)
    assert len(ids) >= 3
    prompt = server.srv.chat_prompt(ASK)
    full = server.srv.model.logits(prompt + ids)  # (T, V) float32
    for i, entry in enumerate(entries):
        want = _log_softmax(full[len(prompt) - 1 + i])
        assert abs(entry["logprob"] - want[ids[i]]) < 1e-4, (i, entry["logprob"], want[ids[i]])
        top = _ids(entry["top_logprobs"])
        assert len(top) == 5 and top == list(np.argsort(-want, kind="stable")[:5])
        assert np.allclose([t["logprob"] for t in entry["top_logprobs"]], want[top], atol=1e-4)
        assert entry["bytes"] == list(server.srv.tokenizer.token_bytes(ids[i]))


def test_logprobs_streamed_equal_whole_and_completions_format(server):
    whole = _chat(server, temperature=0, max_tokens=8, logprobs=True, top_logprobs=2)
    stream = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": ASK, "return_tokens_as_token_ids": True, "temperature": 0, "max_tokens": 8,
        "logprobs": True, "top_logprobs": 2, "stream": True})
    chunks = [json.loads(line[6:]) for line in stream.text.splitlines() if line.startswith("data: {")]
    streamed = [e for c in chunks for e in ((c["choices"][0]["logprobs"] or {}).get("content") or [])]
    assert streamed == whole["choices"][0]["logprobs"]["content"]
    # greedy: the chosen token is the most likely one
    assert all(e["token"] == e["top_logprobs"][0]["token"] for e in streamed)

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    out = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0,
                                    logprobs=3)
    choice = out.choices[0]
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.token_logprobs) == len(lp.tokens)
    assert all(len(top) == 3 and max(top.values()) >= chosen - 1e-6
               for top, chosen in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_n_shares_one_prefill_and_equals_single_requests_with_derived_seeds(server):
    """n = 4 with seed s: one prefill, and choice i is the single request with seed s + i (the documented
    derivation), tokens and log probabilities alike."""
    settings = {"temperature": 1.5, "max_tokens": 8, "logprobs": True}
    before = metrics(server.url)
    together = _chat(server, n=4, seed=5, **settings)
    after = metrics(server.url)
    assert after["prefill_calls_total"] - before["prefill_calls_total"] == 1
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == 4 * together["usage"]["prompt_tokens"]
    assert [c["index"] for c in together["choices"]] == [0, 1, 2, 3]
    alone = [_chat(server, seed=5 + i, **settings)["choices"][0] for i in range(4)]
    for i, (a, b) in enumerate(zip(together["choices"], alone)):
        assert a["message"] == b["message"] and a["logprobs"] == b["logprobs"], i
    assert len({c["message"]["content"] for c in alone}) > 1  # the seeds differ, and so do the samples
    assert together["usage"]["completion_tokens"] == sum(len(c["logprobs"]["content"]) + (
        c["finish_reason"] == "stop") for c in alone)
    # streamed: each choice's chunks carry its index, and join to its whole text
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    texts = {}
    for chunk in client.chat.completions.create(model=MODEL, messages=ASK, n=2, seed=5, stream=True,
                                                temperature=1.5, max_tokens=8):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert texts == {i: alone[i]["message"]["content"] for i in range(2)}


def _reference_greedy(model, prompt, steps, presence=0.0, frequency=0.0, bias=None):
    """Greedy tokens with OpenAI's logit_bias and penalties applied to cache-free forward logits, in numpy."""
    ids = []
    for _ in range(steps):  # one padded length for every step (causal: the padding changes nothing), one compile
        padded = prompt + ids + [0] * (steps - len(ids))
        z = model.logits(padded)[len(prompt) + len(ids) - 1].astype(np.float64)
        for token, value in (bias or {}).items():
            z[token] += value
        counts = np.bincount(ids, minlength=z.shape[0])
        z -= frequency * counts + presence * (counts > 0)
        ids.append(int(np.argmax(z)))
    return ids


def test_logit_bias_and_penalties_are_applied_on_device(server):
    """Greedy tokens with logit_bias and presence / frequency penalties equal the numpy reference; a +100
    bias forces its token, a −100 bias bans the greedy choice."""
    model, prompt = server.srv.model, server.srv.chat_prompt(ASK)
    plain = _ids(_chat(server, temperature=0, max_tokens=6, logprobs=True)["choices"][0]["logprobs"]["content"])
    banned = _ids(_chat(server, temperature=0, max_tokens=1, logprobs=True, logit_bias={str(plain[0]): -100})[
        "choices"][0]["logprobs"]["content"])
    assert banned and banned[0] != plain[0]
    forced = _chat(server, temperature=0, max_tokens=4, logprobs=True, logit_bias={"300": 100})
    assert _ids(forced["choices"][0]["logprobs"]["content"]) == [300] * 4
    settings = {"presence_penalty": 0.7, "frequency_penalty": 1.3, "logit_bias": {str(plain[1]): 3.0}}
    steps = 8
    got = _ids(_chat(server, temperature=0, max_tokens=steps, logprobs=True, **settings)[
        "choices"][0]["logprobs"]["content"])
    want = _reference_greedy(model, prompt, steps, 0.7, 1.3, {plain[1]: 3.0})
    assert got == want[:len(got)] and len(got) >= 3
    assert got != plain[:len(got)]  # the settings change the reply (else the test would prove nothing)
