"""The serving layer without a model: the streaming detokenizer, error paths that need a failure on
cue (a fake scheduler, FastAPI's TestClient). (serve's import order is an import-linter contract:
tests/test_architecture.py.)"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from kimi_jax.runtime.default_model import default_checkpoint
from kimi_jax.runtime.jobs import Metrics
from kimi_jax.runtime.lockstep import Solo
from kimi_jax.runtime.pages import PagePool
from kimi_jax.serve.app import create_app
from kimi_jax.serve.server import Server
from kimi_jax.text.chat_template import ChatTemplate
from kimi_jax.text.detokenize import Detokenizer, Piece
from kimi_jax.text.tokenizer import load_tokenizer

pytestmark = pytest.mark.serve

MODEL = "kimi-k2-instruct"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_checkpoint())


# The detokenizer ------------------------------------------------------------------------------
def test_detokenizer_joins_to_the_text_and_drops_the_stop_token(tok):
    text = "Grüße, 世界!"
    ids = tok.encode(text) + [tok.im_end_id]
    det = Detokenizer(tok, tok.stop_ids)
    pieces = [det.push(t) for t in ids]
    assert "".join(p.text for p in pieces) == text and pieces[-1] == Piece(tok.im_end_id, "")
    assert all("\ufffd" not in p.text for p in pieces) and det.finish_reason == "stop"
    with pytest.raises(RuntimeError, match="after the sequence ended"):
        det.push(ids[0])
    cut = Detokenizer(tok, tok.stop_ids)  # the last token by length flushes a truncated character
    head = tok.encode("世")[:-1]  # 2 of its 3 bytes
    assert [cut.push(t, last=i == len(head) - 1).text for i, t in enumerate(head)] == ["", "\ufffd"]
    assert cut.finish_reason == "length"


def test_detokenizer_holds_back_a_partial_stop_string(tok):
    text = "one two three four"
    ids = tok.encode(text)
    det = Detokenizer(tok, tok.stop_ids, ["three", "thr!"])
    out = ""
    for t in ids:
        piece = det.push(t)
        out += piece.text
        assert not out.endswith("thr"), out  # a possible start of a stop string is not sent yet
        if det.done:
            break
    assert out == "one two " and det.finish_reason == "stop" and det.stop_sequence == "three"
    held = Detokenizer(tok, tok.stop_ids, ["two!"])  # a held prefix comes out when the sequence ends
    ids = tok.encode("one two")
    assert "".join(held.push(t).text for t in ids) + held.finish() == "one two" and held.stop_sequence is None


# The app around a fake scheduler --------------------------------------------------------------
class FakeScheduler:
    """Stands in for the model thread: every request gets `tokens` (cut at max_tokens), three at a
    time; with `fail`, the second delivery is an error instead."""

    max_context, max_batch, queue_depth, active, alive = 256, 1, 0, 0, True

    def __init__(self, tokens, stop_ids, fail=False):
        self.tokens, self.stop_ids, self.fail = list(tokens), set(stop_ids), fail
        self.metrics, self.cancelled, self.lockstep = Metrics(), [], Solo()
        self.pages = PagePool(16, 16)  # /metrics reports the page pool

    def submit(self, request, sink):
        tokens = self.tokens[:request.max_new_tokens]
        chunks = [tokens[i:i + 3] for i in range(0, len(tokens), 3)]
        for i, chunk in enumerate(chunks):
            if self.fail and i == 1:
                sink([], "error: RuntimeError: boom")
                break
            last = i == len(chunks) - 1
            sink(chunk, ("stop" if chunk[-1] in self.stop_ids else "length") if last else None)
        return request

    def cancel(self, job):
        self.cancelled.append(job)


def _client(tok, text="It is sunny in Beijing today.", fail=False):
    # What a model writes: special tokens (a tool-call section's markers) as their ids.
    scheduler = FakeScheduler(tok.encode_with_special(text) + [tok.im_end_id], tok.stop_ids, fail)
    model = SimpleNamespace(tokenizer=tok, config=SimpleNamespace(vocab_size=tok.vocab_size))
    server = Server(model, scheduler, MODEL)
    return TestClient(create_app(server), raise_server_exceptions=False), server


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Weather?"}], "max_tokens": 64}
MESSAGES = {**CHAT}


def test_stop_strings_end_the_reply_and_cancel_the_job(tok):
    client, server = _client(tok)
    r = client.post("/v1/chat/completions", json={**CHAT, "stop": ["Beijing"]})
    assert r.json()["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": "It is sunny in "},
                                      "logprobs": None, "finish_reason": "stop"}
    assert len(server.scheduler.cancelled) == 1
    r = client.post("/v1/messages", json={**MESSAGES, "stop_sequences": ["sunny"]})
    assert (r.json()["stop_reason"], r.json()["stop_sequence"], r.json()["content"]) == (
        "stop_sequence", "sunny", [{"type": "text", "text": "It is "}])
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 64})
    choice = r.json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == ("It is sunny in Beijing today.", "stop")


def test_an_unexpected_exception_is_a_generic_500_logged_once(tok, caplog, monkeypatch):
    client, server = _client(tok)

    def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(server, "chat_prompt", broken)
    with caplog.at_level(logging.ERROR, logger="kimi_jax.serve"):
        r = client.post("/v1/chat/completions", json=CHAT)
        a = client.post("/v1/messages", json=MESSAGES)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert a.status_code == 500 and a.json()["type"] == "error" and a.json()["error"]["type"] == "api_error"
    assert "secret" not in r.text + a.text
    logged = [rec for rec in caplog.records if rec.exc_info]
    assert len(logged) == 2 and all("secret internals" in str(rec.exc_info[1]) for rec in logged)


def test_a_generation_error_mid_stream_ends_the_stream_with_an_error_event(tok):
    client, _ = _client(tok, fail=True)
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 500  # not streaming: a 500
    with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and "generation failed" in events[-1]["error"]["message"]
    with client.stream("POST", "/v1/messages", json={**MESSAGES, "stream": True}) as r:
        lines = list(r.iter_lines())
    assert "event: error" in lines and json.loads(lines[-2][6:])["error"]["type"] == "api_error"


def test_fastapi_validation_errors_take_the_api_style(tok):
    client, _ = _client(tok)
    app = client.app

    @app.get("/v1/messages/probe")
    async def probe(n: int):  # a typed parameter: FastAPI validates it itself
        return {"n": n}

    r = client.get("/v1/messages/probe", params={"n": "x"})
    assert r.status_code == 400 and r.json()["type"] == "error" and r.json()["error"]["message"].startswith("query.n:")


# A thinking model's reasoning -------------------------------------------------------------------
THINKING_TEMPLATE = Path(__file__).resolve().parent / "data" / "chat_template_thinking.jinja"
REASONED = "<think>The user wants the weather.</think>It is sunny."
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
CALL = ('<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>'
        '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>')


@pytest.fixture
def thinking_tok(tok):
    """The embedded model's tokenizer with Kimi-K2-Thinking's chat template (so the server parses reasoning)."""
    saved = tok.chat_template
    tok.chat_template = ChatTemplate(THINKING_TEMPLATE.read_text(encoding="utf-8"), "thinking")
    yield tok
    tok.chat_template = saved


def _sse(lines) -> list[dict]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


def test_reasoning_is_reasoning_content_never_content(thinking_tok):
    client, _ = _client(thinking_tok, REASONED)
    message = client.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "It is sunny.",
                       "reasoning_content": "The user wants the weather."}
    with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        deltas = [e["choices"][0]["delta"] for e in _sse(r.iter_lines()) if e["choices"]]
    # Three tokens per delivery: "</think>" arrives split over several deltas, and nothing of it leaks.
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "The user wants the weather."
    assert "".join(d.get("content", "") for d in deltas) == "It is sunny."
    assert sum("reasoning_content" in d for d in deltas) > 1  # streamed as deltas, not at the end


def test_tool_calls_after_the_reasoning(thinking_tok):
    for text in ("<think>I need the tool.</think>" + CALL, "<think>I need the tool." + CALL):
        client, _ = _client(thinking_tok, text)
        body = {**CHAT, "tools": TOOLS}
        choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        assert choice["message"]["reasoning_content"] == "I need the tool."
        assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_weather",
                                                                  "arguments": '{"city": "Paris"}'}
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            deltas = [e["choices"][0]["delta"] for e in _sse(r.iter_lines()) if e["choices"]]
        assert "".join(d.get("reasoning_content", "") for d in deltas) == "I need the tool."
        assert [d["tool_calls"][0]["function"].get("name") for d in deltas if "tool_calls" in d][0] == "get_weather"


def test_thinking_off_and_non_thinking_templates_leave_the_text_alone(tok, thinking_tok):
    client, _ = _client(thinking_tok, REASONED)
    body = {**CHAT, "chat_template_kwargs": {"thinking": False}}
    assert client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"] == {
        "role": "assistant", "content": REASONED}
    r = client.post("/v1/chat/completions", json={**CHAT, "chat_template_kwargs": {"thinking": "no"}})
    assert r.status_code == 400 and "chat_template_kwargs.thinking: must be a boolean" in r.json()["error"]["message"]


def test_non_thinking_template_has_no_reasoning(tok):
    client, _ = _client(tok, REASONED)  # the 0905 template: Kimi-K2-Instruct writes no reasoning
    assert client.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["message"] == {
        "role": "assistant", "content": REASONED}


def test_anthropic_thinking_blocks(thinking_tok):
    client, _ = _client(thinking_tok, REASONED)
    r = client.post("/v1/messages", json=MESSAGES).json()
    assert r["content"] == [{"type": "thinking", "thinking": "The user wants the weather.", "signature": ""},
                            {"type": "text", "text": "It is sunny."}]
    with client.stream("POST", "/v1/messages", json={**MESSAGES, "stream": True}) as s:
        events = _sse(s.iter_lines())
    starts = [(e["index"], e["content_block"]["type"]) for e in events if e["type"] == "content_block_start"]
    stops = [e["index"] for e in events if e["type"] == "content_block_stop"]
    assert starts == [(0, "thinking"), (1, "text")] and stops == [0, 1]
    deltas = [e["delta"] for e in events if e["type"] == "content_block_delta"]
    assert "".join(d["thinking"] for d in deltas if d["type"] == "thinking_delta") == "The user wants the weather."
    assert "".join(d["text"] for d in deltas if d["type"] == "text_delta") == "It is sunny."
    off = client.post("/v1/messages", json={**MESSAGES, "thinking": {"type": "disabled"}}).json()
    assert off["content"] == [{"type": "text", "text": REASONED}]


def test_earlier_reasoning_is_given_back_to_the_template(thinking_tok):
    """An assistant turn's reasoning (OpenAI reasoning_content, Anthropic thinking blocks) reaches the
    Thinking template, which keeps it for the turns after the last plain answer."""
    _, server = _client(thinking_tok)
    turn = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "reasoning_content": "call it", "content": "",
             "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
                             "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"}]
    assert "<think>call it</think>" in thinking_tok.decode(server.chat_prompt(turn, TOOLS))
    client, _ = _client(thinking_tok)
    body = {**MESSAGES, "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "call it", "signature": "x"},
                                          {"type": "tool_use", "id": "functions.get_weather:0", "name": "get_weather",
                                           "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "functions.get_weather:0",
                                      "content": "sunny"}]}]}
    assert client.post("/v1/messages", json=body).status_code == 200
    bad = {**CHAT, "messages": [{"role": "assistant", "content": "x", "reasoning_content": 5}]}
    r = client.post("/v1/chat/completions", json=bad)
    assert r.status_code == 400 and "messages[0].reasoning_content: must be a string" in r.json()["error"]["message"]


def test_tool_call_arguments_stream_as_generated(tok):
    """Streamed chat: a call's arguments arrive in several deltas (the fake scheduler delivers 3 tokens at
    a time), before its end marker; they join to the arguments of the whole reply."""
    args = '{"city": "Beijing", "unit": "celsius", "days": 3}'
    text = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
            + args + "<|tool_call_end|><|tool_calls_section_end|>")
    client, _ = _client(tok, text)
    body = {**CHAT, "tools": TOOLS}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert whole["message"]["tool_calls"][0]["function"]["arguments"] == args
    r = client.post("/v1/chat/completions", json={**body, "stream": True})
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    deltas = [c["function"].get("arguments", "") for chunk in chunks for c in chunk["choices"][0]["delta"].get(
        "tool_calls") or ()]
    assert deltas[0] == "" and len([d for d in deltas if d]) > 3 and "".join(deltas) == args
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_anthropic_stream_sends_a_calls_input_as_it_is_generated():
    """A tool_use block opens with the call, each arguments delta is an input_json_delta, and the block
    stops with the call (before issue 16 the whole input came in one delta at the call's end)."""
    import asyncio

    from kimi_jax.serve.anthropic import reply_stream
    from kimi_jax.text.tool_calls import ContentDelta, ToolCallArgumentsDelta, ToolCallEnd, ToolCallStart

    pieces = ['{"city": ', '"Bei', 'jing"}']
    events = [ContentDelta("Let me check."), ToolCallStart(0, "functions.get_weather:0", "get_weather"),
              *(ToolCallArgumentsDelta(0, p) for p in pieces),
              ToolCallEnd(0, "functions.get_weather:0", "get_weather", "".join(pieces))]

    class Reply:
        prompt_tokens, completion_tokens, stop_sequence, tool_calls, finish_reason = 5, 9, None, 1, "stop"

        async def events(self, incremental=False):
            assert incremental  # the stream asks for the arguments as they come
            for e in events:
                yield e

    async def run():
        return [chunk async for chunk in reply_stream([Reply()], SimpleNamespace(info={"id": "msg_1", "model": MODEL}))]

    sent = [json.loads(chunk.split("data: ", 1)[1]) for chunk in asyncio.run(run())]
    kinds = [(e["type"], (e.get("delta") or e.get("content_block") or {}).get("type")) for e in sent]
    assert kinds == [("message_start", None), ("content_block_start", "text"), ("content_block_delta", "text_delta"),
                     ("content_block_stop", None), ("content_block_start", "tool_use"),
                     *[("content_block_delta", "input_json_delta")] * 3, ("content_block_stop", None),
                     ("message_delta", None), ("message_stop", None)]
    assert [e["delta"]["partial_json"] for e in sent if e.get("delta", {}).get("type") == "input_json_delta"] == pieces
    assert sent[4]["index"] == 1 and sent[4]["content_block"]["name"] == "get_weather"
    assert sent[-2]["delta"]["stop_reason"] == "tool_use"
