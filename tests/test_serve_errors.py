"""Bad requests against `python -m kimi_jax.serve` as a user starts it (a subprocess): each is a 4xx
in its API's style naming the field, on one HTTP connection that stays usable, and the server logs
no traceback. Bad launch flags are one line on stderr and a non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx  # noqa: E402  (test extra: missing is an install error, not a skip)
import pytest
from serve_util import serve_subprocess

pytestmark = pytest.mark.serve

ROOT = Path(__file__).resolve().parents[1]
MODEL = "kimi-k2-instruct"
DEEP = b"[" * 100_000 + b"]" * 100_000
USER = [{"role": "user", "content": "hi"}]
CALL = {"id": "functions.get_weather:0", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CHAT = {"model": MODEL, "messages": USER, "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
MESSAGES = {"model": MODEL, "messages": USER, "max_tokens": 2}


def _raw(body: dict) -> bytes:
    """JSON as a client writes it; json.dumps escapes a lone surrogate as \\ud800, which parses back to one."""
    return json.dumps(body).encode()


# (route, body, expected status, the field the error must name; None: the body as a whole)
SHARED = [(b"{not json", 400, None), (DEEP, 400, None), (b"[1, 2]", 400, None),
          (b'{"model": "kimi-k2-instruct", "temperature": NaN}', 400, None)]
OPENAI_CASES = [
    *[("/v1/chat/completions", body, status, field) for body, status, field in SHARED],
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "\ud800"}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {**CHAT, "messages": ["hi"]}, 400, "messages[0]"),
    ("/v1/chat/completions", {**CHAT, "messages": USER + [{"role": "assistant", "tool_calls": "abc"}]}, 400,
     "messages[1].tool_calls"),
    ("/v1/chat/completions", {**CHAT, "stream_options": "yes"}, 400, "stream_options"),
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": "yes"}}, 400,
     "stream_options.include_usage"),
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": True}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "top_p": 2}, 400, "top_p"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": USER + [{"role": "assistant", "tool_calls": [CALL]},
                                                          {"role": "tool", "content": "sunny"}]}, 400,
     "messages[2].tool_call_id"),
    ("/v1/chat/completions", {**CHAT, "stream": "false"}, 400, "stream"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, 400, "tools[0].function"),
    ("/v1/chat/completions", {**CHAT, "model": "gpt-4"}, 404, "model"),
    *[("/v1/completions", body, status, field) for body, status, field in SHARED],
    ("/v1/completions", {**COMPLETION, "prompt": "\ud800"}, 400, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [True]}, 400, "prompt"),
    ("/v1/completions", {**COMPLETION, "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {**COMPLETION, "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "top_p": 2}, 400, "top_p"),
    ("/v1/completions", {**COMPLETION, "stream": "false"}, 400, "stream"),
    ("/v1/completions", {**COMPLETION, "stream_options": "yes"}, 400, "stream_options"),
]
ANTHROPIC_CASES = [
    *[("/v1/messages", body, status, field) for body, status, field in SHARED],
    ("/v1/messages", {"model": MODEL, "messages": USER}, 400, "max_tokens"),
    ("/v1/messages", {**MESSAGES, "messages": [{"role": "user", "content": "\ud800"}]}, 400, "messages[0].content"),
    ("/v1/messages", {**MESSAGES, "messages": ["hi"]}, 400, "messages[0]"),
    ("/v1/messages", {**MESSAGES, "messages": []}, 400, "messages"),
    ("/v1/messages", {**MESSAGES, "temperature": "hot"}, 400, "temperature"),
    ("/v1/messages", {**MESSAGES, "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/messages", {**MESSAGES, "top_p": 2}, 400, "top_p"),
    ("/v1/messages", {**MESSAGES, "stream": "false"}, 400, "stream"),
    ("/v1/messages", {**MESSAGES, "messages": [{"role": "user", "content": [{"type": "tool_result",
                                                                              "content": "sunny"}]}]}, 400,
     "messages[0].content[0].tool_use_id"),
    ("/v1/messages", {**MESSAGES, "messages": USER + [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "functions.get_weather:0", "name": "get_weather", "input": "notjson"}]}]}, 400,
     "messages[1].content[0].input"),
    ("/v1/messages", {**MESSAGES, "messages": [{"role": "user", "content": [{"type": "image"}]}]}, 400,
     "messages[0].content[0].type"),
    ("/v1/messages", {**MESSAGES, "model": "claude-3"}, 404, "model"),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`python -m kimi_jax.serve` on a free port (embedded model, 2 slots); yields (url, stderr path)."""
    logs = tmp_path_factory.mktemp("serve-errors")
    with serve_subprocess(["--max-batch", "2", "--max-context", "256", "--no-warm-up"], logs) as url:
        yield url, logs / "stderr"


def _send(client: httpx.Client, route: str, body) -> httpx.Response:
    content = body if isinstance(body, bytes) else _raw(body)
    return client.post(route, content=content, headers={"content-type": "application/json"})


def _local_port(response: httpx.Response) -> int:
    """The client side's port of the connection that carried `response` (same port: same connection)."""
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def test_bad_requests_are_4xx_naming_the_field_on_one_connection(served):
    url, stderr = served
    with httpx.Client(base_url=url, timeout=120) as client:
        first = client.get("/health")
        port = _local_port(first)
        for route, body, status, field in OPENAI_CASES + ANTHROPIC_CASES:
            r = _send(client, route, body)
            case = (route, body[:60] if isinstance(body, bytes) else body, r.text[:300])
            assert r.status_code == status, case
            if route == "/v1/messages":
                err = r.json()
                assert err["type"] == "error" and isinstance(err["error"]["type"], str), case
                message = err["error"]["message"]
            else:
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["param"] == field, case
                message = err["message"]
            assert field is None or message.startswith(f"{field}:") or f"'{field}'" in message, case
            assert r.headers.get("connection") != "close" and _local_port(r) == port, case
        # FastAPI's own errors, in each API's style
        lost = client.get("/v1/nope")
        assert lost.status_code == 404 and "/v1/nope" in lost.json()["error"]["message"]
        wrong = client.get("/v1/chat/completions")
        assert wrong.status_code == 405 and wrong.json()["error"]["type"] == "invalid_request_error"
        wrong = client.get("/v1/messages")
        assert wrong.status_code == 405 and wrong.json()["type"] == "error"
        lost = client.post("/v1/messages/count_tokens", json=MESSAGES)
        assert lost.status_code == 404 and lost.json()["error"]["type"] == "not_found_error"
        # …and the same connection still serves good requests of each kind
        assert client.get("/health").json() == {"status": "ok"}
        chat = client.post("/v1/chat/completions", json={**CHAT, "temperature": 0})
        assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] >= 1
        completion = client.post("/v1/completions", json={**COMPLETION, "temperature": 0})
        assert completion.status_code == 200 and completion.json()["choices"][0]["finish_reason"] in ("stop", "length")
        message = client.post("/v1/messages", json={**MESSAGES, "temperature": 0})
        assert message.status_code == 200 and message.json()["type"] == "message"
        assert _local_port(message) == port
    log = stderr.read_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


@pytest.mark.parametrize("flags, says", [(["--max-batch", "0"], "--max-batch: must be an integer ≥ 1, got 0"),
                                         (["--max-context", "1"], "--max-context: must be an integer ≥ 2, got 1"),
                                         (["--port", "99999"], "--port: must be an integer in [0, 65535]"),
                                         (["--checkpoint", "/nonexistent"], "/nonexistent does not exist")])
def test_bad_launch_flags_are_one_line(flags, says):
    res = subprocess.run([sys.executable, "-m", "kimi_jax.serve", *flags], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    assert res.returncode in (1, 2) and says in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert len([line for line in res.stderr.splitlines() if "error" in line]) == 1, res.stderr
