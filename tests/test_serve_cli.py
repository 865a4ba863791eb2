"""`python -m kimi_jax.serve` as a user starts it: a subprocess on a free port, with an API key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx  # noqa: E402  (test extra: missing is an install error, not a skip)
import pytest
from serve_util import serve_subprocess, tool_call_with_client  # noqa: E402

pytestmark = pytest.mark.serve

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`python -m kimi_jax.serve` with an API key, on a free port, serving the embedded tiny chat model."""
    with serve_subprocess(["--api-key", "sk-cli", "--max-batch", "2", "--max-context", "512",
                           "--served-model-name", "kimi-test"], tmp_path_factory.mktemp("serve-cli")) as url:
        yield url


def test_cli_serves_with_key(served):
    url = served
    assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
    models = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer sk-cli"}, timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["kimi-test"]
    r = httpx.post(f"{url}/v1/completions", headers={"Authorization": "Bearer sk-cli"}, timeout=120,
                   json={"model": "kimi-test", "prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_model_card_tool_loop_with_the_embedded_model(served):
    """The trained tiny model, not a script: it calls get_weather for Beijing, then answers from the result."""
    import openai

    client = openai.OpenAI(base_url=f"{served}/v1", api_key="sk-cli", max_retries=0, timeout=120)
    rounds, choice = tool_call_with_client(client, "kimi-test")
    assert [[(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls] for calls in rounds] == [
        [("functions.get_weather:0", "get_weather", {"city": "Beijing"})]]
    assert choice.finish_reason == "stop" and "sunny" in choice.message.content.lower()


def test_cli_help_lists_flags():
    from kimi_jax.serve.cli import parse_args

    args = parse_args([])
    assert (args.host, args.port, args.served_model_name, args.api_key) == ("127.0.0.1", 8000, "kimi-k2-instruct", None)
    with pytest.raises(SystemExit):
        parse_args(["--port", "not-a-port"])


def test_serve_takes_the_multi_host_flags_and_fails_clearly_without_a_coordinator():

    res = subprocess.run([sys.executable, "-m", "kimi_jax.serve", "--num-processes", "2", "--process-id", "1",
                          "--coordinator-address", "127.0.0.1:1", "--init-timeout", "2"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "could not reach coordinator 127.0.0.1:1" in res.stderr and "Traceback" not in res.stderr
