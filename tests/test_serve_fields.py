"""Every request field is implemented or refused by name (issue 16), on both APIs, with a real uvicorn
server in process (the embedded model; weather prompts scripted as in tests/test_serve.py).

Each case of the tables is one defect a hostile client found, or one field of the APIs: a body that
used to be accepted and silently ignored must now be a 400 whose message and `param` name the field;
a value that asks for nothing (OpenAI's default, such as `presence_penalty: 0`) is accepted.
"""

from __future__ import annotations

import json
import threading
import time

import httpx  # noqa: E402  (test extra: missing is an install error, not a skip)
import openai  # noqa: E402
import pytest
from serve_util import TOOLS, TWO_CITIES, LiveServer, ScriptedGenerator, weather_script

pytestmark = pytest.mark.serve

MODEL = "kimi-k2-instruct"
USER = [{"role": "user", "content": "hi"}]
CHAT = {"model": MODEL, "messages": USER, "max_tokens": 2, "temperature": 0}
COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
MESSAGES = {"model": MODEL, "messages": USER, "max_tokens": 2, "temperature": 0}
ATOOL = {"name": "get_weather", "description": "Weather", "input_schema": TOOLS[0]["function"]["parameters"]}
CALL = {"id": "functions.get_weather:0", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
SCHEMA = TOOLS[0]["function"]["parameters"]


def _tool(parameters=SCHEMA, name="get_weather", **more):
    return {"type": "function", "function": {"name": name, "parameters": parameters, **more}}


# (route, body, the field the 400 must name)
REFUSED_OPENAI = [
    ("/v1/chat/completions", {**CHAT, "logprobs": "yes"}, "logprobs"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "n": 0}, "n"),
    ("/v1/chat/completions", {**CHAT, "n": 5}, "n"),  # more than the server's 4 slots
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "yaml"}}, "response_format.type"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object", "schema": {}}},
     "response_format.schema"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "a b", "schema": SCHEMA}}}, "response_format.json_schema.name"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "strang"}}}}, "response_format.json_schema.schema.type"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {  # valid, but
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}},  # beyond the grammar compiler
     "response_format.json_schema.schema"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}, "tools": TOOLS},
     "response_format"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, "tool_choice"),  # no tools to call
    ("/v1/chat/completions", {**CHAT, "tools": [_tool({"type": "object", "properties": {"a": {"not": {}}}},
                                                      strict=True)]}, "tools[0]"),  # strict, not enforceable
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"abc": 10}}, "logit_bias.abc"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"99999": 10}}, "logit_bias.99999"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"5": 101}}, "logit_bias.5"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"5": True}}, "logit_bias.5"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": [5]}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/chat/completions", {**CHAT, "frequency_penalty": "1"}, "frequency_penalty"),
    ("/v1/chat/completions", {**CHAT, "store": True}, "store"),
    ("/v1/chat/completions", {**CHAT, "modalities": ["text", "audio"]}, "modalities"),
    ("/v1/chat/completions", {**CHAT, "functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {**CHAT, "reasoning_effort": "high"}, "reasoning_effort"),
    ("/v1/chat/completions", {**CHAT, "tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ("/v1/chat/completions", {**CHAT, "tools": [_tool(strict="yes")]}, "tools[0].function.strict"),
    # unknown fields, at the top and inside
    ("/v1/chat/completions", {**CHAT, "temprature": 0.5}, "temprature"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "hi", "contnet": "x"}]},
     "messages[0].contnet"),
    ("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True, "x": 1}},
     "stream_options.x"),
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    # strict JSON types: a string is not a boolean, a boolean is not a number
    ("/v1/chat/completions", {**CHAT, "stream": "false"}, "stream"),
    ("/v1/chat/completions", {**CHAT, "parallel_tool_calls": "false"}, "parallel_tool_calls"),
    ("/v1/chat/completions", {**CHAT, "n": True}, "n"),
    ("/v1/chat/completions", {**CHAT, "seed": True}, "seed"),
    ("/v1/chat/completions", {**CHAT, "top_k": 1.5}, "top_k"),
    ("/v1/chat/completions", {**CHAT, "temperature": "0"}, "temperature"),
    ("/v1/chat/completions", {**CHAT, "user": 5}, "user"),
    ("/v1/chat/completions", {**CHAT, "metadata": {"k": 1}}, "metadata.k"),
    # images and audio: the model is text-only
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, "messages[0].content[0].type"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]}, "messages[0].content[0].type"),
    # tool declarations are JSON Schemas (checked by jsonschema) of objects, names distinct and well formed
    ("/v1/chat/completions", {**CHAT, "tools": [_tool({"type": "objekt"})]}, "tools[0].function.parameters.type"),
    ("/v1/chat/completions", {**CHAT, "tools": [_tool({"type": "object", "properties": {"a": {"type": 5}}})]},
     "tools[0].function.parameters.properties.a.type"),
    ("/v1/chat/completions", {**CHAT, "tools": [_tool({"type": "object", "required": "city"})]},
     "tools[0].function.parameters.required"),
    ("/v1/chat/completions", {**CHAT, "tools": [_tool({"type": "string"})]}, "tools[0].function.parameters.type"),
    ("/v1/chat/completions", {**CHAT, "tools": [_tool(), _tool()]}, "tools[1].function.name"),
    ("/v1/chat/completions", {**CHAT, "tools": [_tool(name="get weather:0")]}, "tools[0].function.name"),
    ("/v1/chat/completions", {**CHAT, "tools": [_tool(), {"type": "function", "function": {
        "name": "f", "paramters": {}}}]}, "tools[1].function.paramters"),
    # an assistant's tool call in the history: arguments are a JSON object
    ("/v1/chat/completions", {**CHAT, "messages": USER + [{"role": "assistant", "tool_calls": [
        {**CALL, "function": {"name": "get_weather", "arguments": "notjson"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ("/v1/chat/completions", {**CHAT, "messages": USER + [{"role": "assistant", "content": "x",
                                                           "function_call": {"name": "f"}}]},
     "messages[1].function_call"),
    ("/v1/completions", {**COMPLETION, "logprobs": True}, "logprobs"),
    ("/v1/completions", {**COMPLETION, "logprobs": 21}, "logprobs"),
    ("/v1/completions", {**COMPLETION, "logprobs": 2, "echo": True}, "echo"),
    ("/v1/completions", {**COMPLETION, "best_of": 3}, "best_of"),
    ("/v1/completions", {**COMPLETION, "suffix": "and so on"}, "suffix"),
    ("/v1/completions", {**COMPLETION, "echo": "true"}, "echo"),
    ("/v1/completions", {**COMPLETION, "messages": USER}, "messages"),
    ("/v1/completions", {**COMPLETION, "presence_penalty": -3}, "presence_penalty"),
]
REFUSED_ANTHROPIC = [
    ("/v1/messages", {**MESSAGES, "temprature": 0.5}, "temprature"),
    ("/v1/messages", {**MESSAGES, "stream": "false"}, "stream"),
    ("/v1/messages", {**MESSAGES, "top_k": True}, "top_k"),
    ("/v1/messages", {**MESSAGES, "container": "c1"}, "container"),
    ("/v1/messages", {**MESSAGES, "mcp_servers": [{"url": "http://x"}]}, "mcp_servers"),
    ("/v1/messages", {**MESSAGES, "metadata": {"user_id": 5}}, "metadata.user_id"),
    ("/v1/messages", {**MESSAGES, "tool_choice": {"type": "any"}}, "tool_choice.type"),  # no tools to call
    ("/v1/messages", {**MESSAGES, "tools": [ATOOL], "tool_choice": {"type": "tool", "name": "nope"}},
     "tool_choice.name"),
    ("/v1/messages", {**MESSAGES, "tools": [ATOOL], "tool_choice": {"type": "auto",
                                                                   "disable_parallel_tool_use": "yes"}},
     "tool_choice.disable_parallel_tool_use"),
    ("/v1/messages", {**MESSAGES, "tools": [{**ATOOL, "input_schema": {"type": "object", "properties": 5}}]},
     "tools[0].input_schema.properties"),
    ("/v1/messages", {**MESSAGES, "tools": [{**ATOOL, "input_schema": {"properties": {}}}]},
     "tools[0].input_schema.type"),
    ("/v1/messages", {**MESSAGES, "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
     "tools[0].type"),
    ("/v1/messages", {**MESSAGES, "tools": [ATOOL, ATOOL]}, "tools[1].name"),
    ("/v1/messages", {**MESSAGES, "thinking": {"type": "enabled", "budget_tokens": "lots"}},
     "thinking.budget_tokens"),
    ("/v1/messages", {**MESSAGES, "messages": [{"role": "user", "content": "hi", "name": "bob"}]},
     "messages[0].name"),
    ("/v1/messages", {**MESSAGES, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]},
     "messages[0].content[0].type"),
    ("/v1/messages", {**MESSAGES, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "functions.get_weather:0", "content": [
            {"type": "image", "source": {}}]}]}]}, "messages[0].content[0].content[0].type"),
    ("/v1/messages", {**MESSAGES, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "content": "sunny"}]}]}, "messages[0].content[0].tool_use_id"),
    ("/v1/messages", {**MESSAGES, "messages": USER + [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "functions.get_weather:0", "name": "get_weather", "input": "notjson"}]}]},
     "messages[1].content[0].input"),
    ("/v1/messages", {**MESSAGES, "messages": USER + [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "functions.get_weather:0", "name": "get_weather"}]}]},
     "messages[1].content[0].input"),
    ("/v1/messages", {**MESSAGES, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi",
                                                                              "colour": "red"}]}]},
     "messages[0].content[0].colour"),
]


@pytest.fixture(scope="module")
def server():
    from kimi_jax.runtime.default_model import load_default
    from kimi_jax.serve.app import create_app
    from kimi_jax.serve.cli import build_server, parse_args

    model = load_default()
    scripted = ScriptedGenerator(model.generator, weather_script(model.tokenizer))
    flags = ["--max-batch", "4", "--max-context", "512", "--max-body-bytes", str(4 << 20), "--no-warm-up"]
    srv = build_server(parse_args(flags), model, scripted)
    live = LiveServer(create_app(srv))
    live.srv = srv
    yield live
    live.close()
    srv.scheduler.stop()


def _message(route: str, r: httpx.Response) -> str:
    body = r.json()
    if route == "/v1/messages":
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
        return body["error"]["message"]
    return body["error"]["message"]


@pytest.mark.parametrize("route, body, field", REFUSED_OPENAI + REFUSED_ANTHROPIC,
                         ids=[f"{r[0].rsplit('/', 1)[1]}:{r[2]}" for r in REFUSED_OPENAI + REFUSED_ANTHROPIC])
def test_refused_fields_are_400_naming_them(server, route, body, field):
    r = httpx.post(server.url + route, json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert _message(route, r).startswith(f"{field}:"), r.text
    if route != "/v1/messages":
        assert r.json()["error"]["param"] == field


NOOPS_OPENAI = [{"logprobs": False}, {"presence_penalty": 0, "frequency_penalty": 0.0}, {"logit_bias": {}},
                {"response_format": {"type": "text"}}, {"store": False}, {"modalities": ["text"]},
                {"user": "u-1", "metadata": {"k": "v"}, "safety_identifier": "s", "prompt_cache_key": "p"},
                {"parallel_tool_calls": True}, {"service_tier": "auto"}, {"top_k": 5},
                {"n": 1, "stream_options": None}, {"tool_choice": "none"}, {"return_tokens_as_token_ids": False},
                {"tools": [_tool(strict=True)], "tool_choice": "none"},
                {"tools": [_tool({"type": "object", "properties": {"a": {"not": {}}}})]}]  # unconstrained calls


@pytest.mark.parametrize("extra", NOOPS_OPENAI, ids=[",".join(e) for e in NOOPS_OPENAI])
def test_fields_that_ask_for_nothing_are_accepted(server, extra):
    r = httpx.post(server.url + "/v1/chat/completions", json={**CHAT, **extra}, timeout=60)
    assert r.status_code == 200, r.text


def test_anthropic_accepted_fields(server):
    """metadata.user_id, cache_control, a thinking budget and disable_parallel_tool_use are accepted; a
    tool_result with is_error reaches the template marked as an error."""
    body = {**MESSAGES, "metadata": {"user_id": "u"}, "service_tier": "auto",
            "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            "thinking": {"type": "enabled", "budget_tokens": 1}, "max_tokens": 3,
            "tools": [{**ATOOL, "cache_control": {"type": "ephemeral"}}],
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": False}}
    r = httpx.post(server.url + "/v1/messages", json=body, timeout=60)
    assert r.status_code == 200, r.text
    from kimi_jax.serve.anthropic import IS_ERROR_PREFIX, to_openai_messages

    failed = to_openai_messages({"messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "functions.f:0", "content": "boom", "is_error": True}]}]})
    assert failed == [{"role": "tool", "tool_call_id": "functions.f:0", "content": IS_ERROR_PREFIX + "boom"}]


def test_echo(server):
    """/v1/completions `echo`: the prompt's text, then the completion, whole and streamed."""
    plain = httpx.post(server.url + "/v1/completions", json=COMPLETION, timeout=60).json()["choices"][0]["text"]
    echoed = httpx.post(server.url + "/v1/completions", json={**COMPLETION, "echo": True}, timeout=60).json()
    assert echoed["choices"][0]["text"] == "Hello" + plain
    ids = httpx.post(server.url + "/v1/completions", json={**COMPLETION, "echo": True,
                                                           "prompt": server.srv.tokenizer.encode("Hello")},
                     timeout=60).json()
    assert ids["choices"][0]["text"] == "Hello" + plain
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    chunks = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0, echo=True,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hello" + plain


def test_parallel_tool_calls_false(server):
    """With parallel_tool_calls false (Anthropic: disable_parallel_tool_use) the reply ends after its first
    call, which the scripted reply follows with a second one."""
    ask = [{"role": "user", "content": f"What's the weather in {TWO_CITIES}?"}]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    both = client.chat.completions.create(model=MODEL, messages=ask, tools=TOOLS)
    assert [json.loads(c.function.arguments)["city"] for c in both.choices[0].message.tool_calls] == \
        ["Beijing", "Paris"]
    one = client.chat.completions.create(model=MODEL, messages=ask, tools=TOOLS, parallel_tool_calls=False)
    assert [c.function.arguments for c in one.choices[0].message.tool_calls] == ['{"city": "Beijing"}']
    assert one.choices[0].finish_reason == "tool_calls" and one.usage.completion_tokens < both.usage.completion_tokens
    streamed = client.chat.completions.create(model=MODEL, messages=ask, tools=TOOLS, parallel_tool_calls=False,
                                              stream=True)
    indexes = {c.index for chunk in streamed if chunk.choices for c in chunk.choices[0].delta.tool_calls or ()}
    assert indexes == {0}
    body = {**MESSAGES, "max_tokens": 100, "messages": ask, "tools": [ATOOL],
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}}
    reply = httpx.post(server.url + "/v1/messages", json=body, timeout=60).json()
    assert [b["input"] for b in reply["content"] if b["type"] == "tool_use"] == [{"city": "Beijing"}]
    assert reply["stop_reason"] == "tool_use"


def test_error_bodies_never_echo_unbounded_input(server):
    """A 1 MB model name, field name or path comes back cut to a few dozen characters."""
    huge = "x" * 1_000_000
    cases = [("/v1/chat/completions", {**CHAT, "model": huge}, 404),
             ("/v1/messages", {**MESSAGES, "model": huge}, 404),
             ("/v1/chat/completions", {**CHAT, huge: 1}, 400),
             ("/v1/messages", {**MESSAGES, huge: 1}, 400),
             ("/v1/chat/completions", {**CHAT, "tool_choice": huge}, 400),
             ("/v1/messages", {**MESSAGES, "messages": [{"role": "user", "content": [{"type": huge}]}]}, 400)]
    for route, body, status in cases:
        r = httpx.post(server.url + route, json=body, timeout=60)
        assert r.status_code == status and len(r.content) < 2000, (route, status, r.status_code, r.content[:300])
    r = httpx.get(server.url + "/v1/" + "y" * 8000, timeout=60)
    assert r.status_code == 404 and len(r.content) < 2000


def test_body_size_limit_is_413(server):
    """A body over --max-body-bytes is 413 in each API's style, told by Content-Length or by the bytes sent
    (a chunked upload has no Content-Length); one under it is served."""
    from kimi_jax.serve.app import create_app
    from kimi_jax.serve.server import Server

    srv = server.srv
    small = LiveServer(create_app(Server(srv.model, srv.scheduler, MODEL, max_body_bytes=2000)))
    try:
        padded = {**CHAT, "messages": [{"role": "user", "content": "hi" + " " * 3000}]}
        r = httpx.post(small.url + "/v1/chat/completions", json=padded, timeout=60)
        assert r.status_code == 413 and "2000 bytes" in r.json()["error"]["message"], r.text
        r = httpx.post(small.url + "/v1/messages", json={**padded, "model": MODEL}, timeout=60)
        assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large", r.text
        data = json.dumps(padded).encode()
        r = httpx.post(small.url + "/v1/chat/completions", timeout=60,
                       content=(data[i:i + 500] for i in range(0, len(data), 500)))  # chunked
        assert r.status_code == 413, r.text
        assert httpx.post(small.url + "/v1/chat/completions", json=CHAT, timeout=60).status_code == 200
    finally:
        small.close()


def test_big_body_is_tokenized_off_the_event_loop(server):
    """A 3 MB prompt is parsed, rendered and tokenized in a worker thread: /health keeps answering
    meanwhile (on the event loop it would answer once, after the request)."""
    body = {**CHAT, "messages": [{"role": "user", "content": "hello world, this is text. " * 110_000}]}
    answered, done = [], threading.Event()

    def big():
        try:
            r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
            answered.append(r.status_code)
        finally:
            done.set()

    worker = threading.Thread(target=big)
    worker.start()
    time.sleep(0.3)  # the body is sent and being handled
    during = 0
    while not done.is_set():
        if httpx.get(server.url + "/health", timeout=30).status_code == 200 and not done.is_set():
            during += 1
        time.sleep(0.05)
    worker.join()
    assert answered == [400]  # longer than the context: it was tokenized whole
    assert during >= 3, during


# Structured outputs and forced tool calls (constrained decoding, kimi_jax/text/grammar.py) ----------
USER_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "role", "level"],
               "properties": {"name": {"type": "string", "maxLength": 10}, "role": {"enum": ["admin", "guest"]},
                              "level": {"type": "integer", "minimum": 1, "maximum": 9}}}
ADD = _tool({"type": "object", "additionalProperties": False, "required": ["a", "b"],
             "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                            "b": {"type": "integer", "minimum": 0, "maximum": 99}}}, name="add")
CITY = _tool({"type": "object", "additionalProperties": False, "required": ["city"],
              "properties": {"city": {"enum": ["Paris", "Rome"]}}}, name="city_facts")


def test_json_schema_replies_validate_whole_and_streamed(server):
    import jsonschema

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    fmt = {"type": "json_schema", "json_schema": {"name": "user", "schema": USER_SCHEMA, "strict": True}}
    messages = [{"role": "user", "content": "Make up a user."}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, response_format=fmt, n=3, seed=7,
                                           temperature=1.0, max_tokens=80)
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), USER_SCHEMA)
    chunks = client.chat.completions.create(model=MODEL, messages=messages, response_format=fmt, seed=8,
                                            temperature=1.0, max_tokens=80, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), USER_SCHEMA)
    anything = client.chat.completions.create(model=MODEL, messages=messages, response_format={"type": "json_object"},
                                              seed=9, temperature=0.0, max_tokens=60)
    if anything.choices[0].finish_reason == "stop":  # an unbounded object may run past max_tokens
        assert isinstance(json.loads(anything.choices[0].message.content), dict)
    else:
        assert anything.choices[0].message.content.startswith("{")


@pytest.mark.parametrize("choice, names", [({"type": "function", "function": {"name": "add"}}, {"add"}),
                                           ("required", {"add", "city_facts"})])
def test_forced_tool_calls_are_valid_calls(server, choice, names):
    import jsonschema

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (ADD, CITY)}
    for seed, parallel in ((1, True), (2, False), (3, True)):
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hello there!"}], tools=[ADD, CITY],
            tool_choice=choice, parallel_tool_calls=parallel, seed=seed, temperature=1.0, max_tokens=120)
        message = reply.choices[0].message
        assert reply.choices[0].finish_reason == "tool_calls" and message.tool_calls, message
        assert len(message.tool_calls) == 1 or parallel
        for call in message.tool_calls:
            assert call.function.name in names
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_anthropic_forced_tool_use(server):
    import anthropic
    import jsonschema

    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
    tools = [{"name": t["function"]["name"], "description": "", "input_schema": t["function"]["parameters"]}
             for t in (ADD, CITY)]
    schemas = {t["name"]: t["input_schema"] for t in tools}
    for choice in ({"type": "any"}, {"type": "tool", "name": "city_facts", "disable_parallel_tool_use": True}):
        reply = client.messages.create(model=MODEL, max_tokens=120, tools=tools, tool_choice=choice,
                                       messages=[{"role": "user", "content": "Hi!"}], extra_body={"temperature": 1})
        uses = [b for b in reply.content if b.type == "tool_use"]
        assert reply.stop_reason == "tool_use" and uses, reply
        for use in uses:
            assert choice["type"] == "any" or use.name == "city_facts"
            jsonschema.validate(use.input, schemas[use.name])
