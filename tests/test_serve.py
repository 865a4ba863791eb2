"""The HTTP server with real clients (openai, anthropic, httpx) against uvicorn on 127.0.0.1.

One server for the module: the embedded tiny chat model behind a 16-slot scheduler. Replies to
prompts that declare `get_weather` are scripted by the generator the scheduler runs
(`ScriptedGenerator` in tests/serve_util.py), so that the exact tool-call handling can be checked (see
its docstring); tests/test_serve_cli.py runs the same loop on the model's own replies.
"""

from __future__ import annotations

import json
import threading

# The clients are in the test extra: a missing one is an install error, never a skip.
import anthropic  # noqa: E402
import httpx  # noqa: E402
import openai  # noqa: E402
import pytest
from serve_util import (  # noqa: E402
    LONG_TALK,
    TOOLS,
    WEATHER_ANSWER,
    LiveServer,
    ScriptedGenerator,
    get_weather,
    metrics,
    tool_call_with_client,
    weather_script,
)

pytestmark = pytest.mark.serve

MODEL = "kimi-k2-instruct"
SLOTS = 16

@pytest.fixture(scope="module")
def server():
    from kimi_jax.runtime.default_model import load_default
    from kimi_jax.serve.app import create_app
    from kimi_jax.serve.cli import build_server, parse_args

    model = load_default()
    scripted = ScriptedGenerator(model.generator, weather_script(model.tokenizer))
    srv = build_server(parse_args(["--max-batch", str(SLOTS), "--max-context", "512", "--max-prefill", "4"]), model,
                       scripted)
    assert srv.scheduler.ready.wait(600)  # the decode programs are built (warm-up)
    live = LiveServer(create_app(srv))
    live.srv = srv
    yield live
    live.close()
    srv.scheduler.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_and_simple_chat(server, client):
    """The model card's simple_chat, as written (content parts, temperature 0.6, max_tokens 256 → 40 here)."""
    assert [m.id for m in client.models.list().data] == [MODEL]
    messages = [{"role": "system", "content": "You are Kimi, an AI assistant created by Moonshot AI."},
                {"role": "user", "content": [{"type": "text", "text": "Please give a brief self-introduction."}]}]
    response = client.chat.completions.create(model=MODEL, messages=messages, stream=False, temperature=0.6,
                                              max_tokens=40)
    choice = response.choices[0]
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    assert response.usage.completion_tokens >= 1 and response.usage.prompt_tokens > 10

    stream = client.chat.completions.create(model=MODEL, messages=messages, stream=True, temperature=0,
                                            max_tokens=12, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-2].choices[0].finish_reason == "length"
    again = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12)
    assert again.choices[0].message.content == text  # greedy: streamed text equals the whole reply
    seeded = [client.chat.completions.create(model=MODEL, messages=messages, temperature=1.0, seed=7,
                                             max_completion_tokens=6) for _ in range(2)]
    assert seeded[0].choices[0].message.content == seeded[1].choices[0].message.content
    assert seeded[0].usage.completion_tokens == seeded[1].usage.completion_tokens <= 6


def test_tool_call_loop_model_card(client):
    """The model card's tool_call_with_client loop, unchanged (tool_choice auto, role: tool results)."""
    rounds, choice = tool_call_with_client(client, MODEL)
    assert [[c.id for c in calls] for calls in rounds] == [["functions.get_weather:0"]]
    assert choice.message.content == WEATHER_ANSWER and choice.finish_reason == "stop"


def test_tool_call_streaming(client):
    messages = [{"role": "user", "content": "What's the weather like in Beijing today?"}]
    calls, finish = {}, None
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, stream=True):
        delta = chunk.choices[0].delta
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": call.id, "name": call.function.name, "arguments": ""})
            entry["arguments"] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert calls == {0: {"id": "functions.get_weather:0", "name": "get_weather", "arguments": '{"city": "Beijing"}'}}
    # tool_choice "none": no tools declared, nothing parsed (the script keys on the declaration)
    plain = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none",
                                           max_tokens=4)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason == "length"


def test_scripted_reply_is_cut_at_max_tokens(client):
    """A scripted reply is bounded by max_tokens like the model's own: cut short, the call is text."""
    messages = [{"role": "user", "content": "What's the weather like in Beijing today?"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=3)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3
    assert out.choices[0].message.tool_calls is None and "<|tool_call_begin|>" in out.choices[0].message.content


def test_anthropic_messages(server):
    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
    greedy = {"temperature": 0}  # this anthropic client (2.x) has no `temperature` argument: sent as extra body
    reply = client.messages.create(model=MODEL, max_tokens=8, system="Be brief.", extra_body=greedy,
                                   messages=[{"role": "user", "content": "Hello"}])
    assert reply.stop_reason == "max_tokens" and reply.usage.output_tokens == 8 and reply.content[0].type == "text"
    with client.messages.stream(model=MODEL, max_tokens=8, extra_body=greedy,
                                messages=[{"role": "user", "content": "Hello"}], system="Be brief.") as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == reply.content[0].text and final.stop_reason == "max_tokens"

    tools = [{"name": "get_weather", "description": "Weather", "input_schema": TOOLS[0]["function"]["parameters"]}]
    ask = [{"role": "user", "content": "Weather in Beijing?"}]
    call = client.messages.create(model=MODEL, max_tokens=64, tools=tools, messages=ask)
    use = [b for b in call.content if b.type == "tool_use"]
    assert call.stop_reason == "tool_use" and use[0].name == "get_weather" and use[0].input == {"city": "Beijing"}
    follow = ask + [{"role": "assistant", "content": call.content},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use[0].id,
                                                  "content": json.dumps(get_weather("Beijing"))}]}]
    answer = client.messages.create(model=MODEL, max_tokens=64, tools=tools, messages=follow)
    assert answer.stop_reason == "end_turn" and answer.content[0].text == WEATHER_ANSWER
    with client.messages.stream(model=MODEL, max_tokens=64, tools=tools, messages=ask) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[-1].input == {"city": "Beijing"}


def test_completions_and_stop_strings(client):
    prompt = "The capital of France is"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
    text = out.choices[0].text
    assert "Paris" in text  # the model ends its sentence itself (<|im_end|>, not in the text)
    assert out.choices[0].finish_reason == "stop" and 2 < out.usage.completion_tokens < 10
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stream=True) if c.choices)
    assert streamed == text
    short = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    assert text.startswith(short.choices[0].text)
    stop = text[3:5]
    assert stop.strip()
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[:text.index(stop)]


def _stream_tokens(url: str, prompt: str, out: list, i: int, barrier=None):
    if barrier is not None:
        barrier.wait()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    chunks = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                            temperature=0, max_tokens=24, stream=True)
    out[i] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_concurrent_streams_equal_alone(server):
    """16 simultaneous greedy streams give exactly their alone-run text, and shared decode calls."""
    prompts = [f"Question {i}: tell me about the number {i * 7}." for i in range(SLOTS)]
    alone = [None] * SLOTS
    for i, p in enumerate(prompts):  # alone: one at a time
        _stream_tokens(server.url, p, alone, i)
    before = metrics(server.url)
    together, barrier = [None] * SLOTS, threading.Barrier(SLOTS)
    threads = [threading.Thread(target=_stream_tokens, args=(server.url, p, together, i, barrier))
               for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    after = metrics(server.url)
    assert together == alone and len(set(alone)) > 1
    model = server.srv.model  # the scheduler is idle now: a direct generate() is the unbatched reference
    ids = model.generate([model.tokenizer.apply_chat_template([{"role": "user", "content": prompts[3]}])],
                         max_new_tokens=24, temperature=0)[0]
    assert alone[3] == model.tokenizer.decode(ids[:-1] if ids[-1] in model.stop_ids else ids)
    steps = after["decode_steps_total"] - before["decode_steps_total"]
    occupied = after["batch_occupancy_slot_steps_total"] - before["batch_occupancy_slot_steps_total"]
    assert after["batch_occupancy_max"] >= 8 and occupied / steps > 4, (occupied, steps)
    # Same prompt alone later, after the batch: still the same text
    again = [None]
    _stream_tokens(server.url, prompts[9], again, 0)
    assert again[0] == together[9]


def test_bad_requests_then_healthy(server, client):
    url = f"{server.url}/v1/chat/completions"
    ok = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [(b"{not json", 400), (json.dumps({**ok, "model": "gpt-4"}), 404),
             (json.dumps({**ok, "temperature": -1}), 400), (json.dumps({**ok, "n": SLOTS + 1}), 400),
             (json.dumps({**ok, "max_tokens": 0}), 400), (json.dumps({**ok, "messages": []}), 400),
             (json.dumps({**ok, "messages": [{"role": "wizard", "content": "x"}]}), 400),
             (json.dumps({**ok, "messages": [{"role": "user", "content": "word " * 600}]}), 400),
             (json.dumps({**ok, "max_tokens": 510}), 400), (json.dumps({**ok, "tool_choice": "required"}), 400)]
    for body, status in cases:
        r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == status, (body, r.text)
        assert isinstance(r.json()["error"]["message"], str)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 600}])
    r = httpx.post(f"{server.url}/v1/messages", json={"model": MODEL, "messages": []}, timeout=30)
    assert r.status_code == 400 and r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{server.url}/health", timeout=10).json()["status"] == "ok"
    assert client.chat.completions.create(model=MODEL, messages=ok["messages"], max_tokens=2).choices[0].message


def wait_for_cancel(scheduler, what: str) -> None:
    """Until the server has asked `scheduler` to cancel a request (it polls every DISCONNECT_POLL_S)."""
    import time

    deadline = time.time() + 30
    while not any(kind == "cancel" for kind, _ in list(scheduler._inbox)):
        assert time.time() < deadline, f"the server never asked to cancel {what}"
        time.sleep(0.05)


def assert_cancelled_and_freed(server, before: dict, max_tokens: int) -> None:
    """The abandoned request ends as cancelled, short of its max_tokens, and its slot is free again."""
    import time

    key = 'requests_total{finish_reason="cancelled"}'
    deadline = time.time() + 60
    while time.time() < deadline:
        m = metrics(server.url)
        if m.get(key, 0) > before.get(key, 0) and m["active_slots"] == 0:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"slot not freed after disconnect: {m}")
    assert m["generation_tokens_total"] - before["generation_tokens_total"] < max_tokens


def test_disconnect_frees_slot(server):
    """A streaming client that hangs up mid-reply frees its slot. Decoding is held from the request
    until the server has asked to cancel it, so the reply cannot end first on a fast machine."""
    scheduler = server.srv.scheduler
    before = metrics(server.url)
    body = {"model": MODEL, "messages": [{"role": "user", "content": LONG_TALK}], "max_tokens": 200,
            "temperature": 0, "stream": True}
    scheduler.generator.running.clear()
    try:
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
            next(line for line in r.iter_lines() if line.startswith("data:"))
        wait_for_cancel(scheduler, "the abandoned stream")
    finally:
        scheduler.generator.running.set()
    assert_cancelled_and_freed(server, before, max_tokens=200)


def test_disconnect_non_streaming_frees_slot(server):
    """A non-streaming client that gives up (read timeout) also frees its slot.

    Decoding is held until the server has asked the scheduler to cancel, so the reply cannot finish
    inside the client's timeout however fast the machine (CI once produced all 400 tokens in 1 s)."""
    scheduler = server.srv.scheduler
    before = metrics(server.url)
    body = {"model": MODEL, "messages": [{"role": "user", "content": LONG_TALK}], "max_tokens": 400,
            "temperature": 0}
    scheduler.generator.running.clear()
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
        wait_for_cancel(scheduler, "the abandoned request")
    finally:
        scheduler.generator.running.set()
    assert_cancelled_and_freed(server, before, max_tokens=400)


def test_api_key_and_overload(server):
    """Auth (only /health open) and 429 on a full queue, on extra apps sharing the loaded model."""
    from kimi_jax.runtime.scheduler import Scheduler
    from kimi_jax.serve.app import create_app
    from kimi_jax.serve.server import Server

    srv = server.srv
    keyed = LiveServer(create_app(Server(srv.model, srv.scheduler, MODEL, api_key="sk-test")))
    stalled = Scheduler(srv.model.generator, max_batch=1, max_context=64, max_queue=0)  # never started: full
    full = LiveServer(create_app(Server(srv.model, stalled, MODEL)))
    try:
        assert httpx.get(f"{keyed.url}/health", timeout=10).status_code == 200
        assert httpx.get(f"{keyed.url}/v1/models", timeout=10).status_code == 401
        assert httpx.get(f"{keyed.url}/metrics", timeout=10).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="sk-test", max_retries=0)
        assert good.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=2).usage.completion_tokens == 2
        reply = anthropic.Anthropic(base_url=keyed.url, api_key="sk-test", max_retries=0).messages.create(
            model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
        assert reply.usage.output_tokens == 2
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=f"{full.url}/v1", api_key="x", max_retries=0).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    finally:
        keyed.close()
        full.close()
