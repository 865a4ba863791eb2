"""Serving across processes: 2 local processes x 4 CPU devices (jax.distributed on 127.0.0.1, gloo)
serve the embedded model on one 8-device mesh, process 0 answering HTTP. The official `openai`
client gets the same replies as from one process with 8 devices on the same mesh and as
`Model.chat`; a disconnect frees the slot on both processes; SIGKILL of process 1 fails the stream
and turns /health non-200 within --worker-timeout, leaving no process; SIGKILL of process 0 ends process 1
with a line naming the coordinator; SIGTERM of process 0 ends both."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import signal
import time
from pathlib import Path

import httpx  # noqa: E402  (test extra: missing is an install error, not a skip)
import openai  # noqa: E402
import pytest
from serve_util import TOOLS, LiveServer, metrics  # noqa: E402

from kimi_jax.bench.multihost import ServeProcesses, endless

pytestmark = [pytest.mark.sharded, pytest.mark.slow]

MESH = "expert=4,tensor=2"
MODEL = "kimi-k2-instruct"
SERVE = ["--mesh", MESH, "--max-batch", "4", "--max-context", "512", "--max-prefill", "4"]
WORKER_TIMEOUT = 6


class TwoProcesses(ServeProcesses):
    """Processes 0 and 1 of 2, 4 CPU devices each, as scripts/launch_local.sh starts them."""

    def __init__(self, logs: Path, *extra: str):
        super().__init__(2, 4, [*SERVE, "--worker-timeout", str(WORKER_TIMEOUT), *extra], logs)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    server = TwoProcesses(tmp_path_factory.mktemp("two-process-serve"))
    yield server
    server.kill()


@pytest.fixture(scope="module")
def one():
    """One process, 8 devices, the same mesh: the server in this test process."""
    from kimi_jax.runtime.default_model import load_default
    from kimi_jax.serve.app import create_app
    from kimi_jax.serve.cli import build_server, parse_args

    srv = build_server(parse_args([*SERVE, "--no-warm-up"]), load_default(mesh=MESH))
    live = LiveServer(create_app(srv))
    yield live
    live.close()
    srv.scheduler.stop()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


ASKS = [  # (messages, tools, stream)
    ([{"role": "user", "content": "Who are you?"}], None, False),
    ([{"role": "system", "content": "You are Kimi, an AI assistant created by Moonshot AI."},
      {"role": "user", "content": [{"type": "text", "text": "Please give a brief self-introduction."}]}], None, True),
    ([{"role": "user", "content": "What is the capital of France?"}], None, True),
    ([{"role": "user", "content": "What's the weather like in Beijing today? Let's check using the tool."}], TOOLS,
     False),
]


def _ask(client: openai.OpenAI, messages, tools, stream: bool):
    """(content, tool calls as (name, arguments), finish reason) of one greedy chat completion."""
    kwargs = dict(model=MODEL, messages=messages, temperature=0, max_tokens=48, **({"tools": tools} if tools else {}))
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        return choice.message.content, calls, choice.finish_reason
    text, finish = "", None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, [], finish


def _concurrently(url: str) -> list:
    client = _client(url)
    with concurrent.futures.ThreadPoolExecutor(len(ASKS)) as pool:
        return list(pool.map(lambda a: _ask(client, *a), ASKS))


def test_two_processes_answer_as_one_process_and_model_chat(two, one):
    from kimi_jax.runtime.default_model import load_default

    alone = [_ask(_client(two.url), *a) for a in ASKS]  # one at a time, then all four at once
    together = _concurrently(two.url)
    on_one = _concurrently(one.url)
    model = load_default()
    direct = [model.chat(m, tools=t, temperature=0, max_new_tokens=48) for m, t, _ in ASKS]
    for (messages, _, stream), a, b, c, d in zip(ASKS, alone, together, on_one, direct):
        assert a == b == c, (messages, a, b, c)
        calls = [(x["function"]["name"], x["function"]["arguments"]) for x in d["tool_calls"]]
        assert a[0] == d["content"] or (not a[0] and not d["content"]), (a, d)
        if not stream:
            assert a[1] == calls, (a, d)
    assert alone[3][1] and alone[3][1][0][0] == "get_weather"  # the tool call came back as a call
    assert "Kimi" in alone[0][0]


def test_structured_output_across_processes(two, one):
    """A json_schema reply (the grammar's masks come from process 0's host, mid-loop) validates and
    equals the one-process server's, sampled with the same seed."""
    import jsonschema

    schema = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
              "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                             "days": {"type": "integer", "minimum": 1, "maximum": 9}}}
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Plan a trip."}], temperature=1.0, seed=3,
                  max_tokens=40, response_format={"type": "json_schema", "json_schema": {"name": "trip",
                                                                                         "schema": schema}})
    replies = [_client(url).chat.completions.create(**kwargs).choices[0].message.content for url in (two.url, one.url)]
    jsonschema.validate(json.loads(replies[0]), schema)
    assert replies[0] == replies[1]
    assert metrics(two.url)["constrained_tokens_total"] > 0


def test_disconnect_frees_the_slot_on_both_processes(two):
    body = {**endless(MODEL, "Count:", 400, _stop_tokens()), "stream": True}  # runs until cancelled
    with httpx.stream("POST", f"{two.url}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data:")
            if events >= 3:
                break
    deadline = time.time() + 60
    while True:
        m = metrics(two.url)
        if m.get('process_active_slots{process="0"}') == 0 and m.get('process_active_slots{process="1"}') == 0 \
                and m.get('requests_total{finish_reason="cancelled"}', 0) >= 1:
            break
        assert time.time() < deadline, m
        time.sleep(0.5)
    assert m["processes"] == 2
    assert two.healthy()


def _stop_tokens() -> list[int]:
    from kimi_jax.runtime.default_model import default_checkpoint
    from kimi_jax.text.tokenizer import load_tokenizer

    return list(load_tokenizer(default_checkpoint()).stop_ids)


def test_a_vocabulary_tensor_does_not_divide_serves_transformers_tokens(tmp_path):
    """The embedded model with 3 more vocabulary rows (1027: odd, so `tensor=2` splits it only padded),
    served by 2 processes: its greedy reply is transformers' greedy tokens."""
    import dataclasses
    import shutil

    import jax
    import jax.numpy as jnp
    import torch

    from kimi_jax.bench.oracle import hf_model
    from kimi_jax.checkpoint.hf import save_hf_checkpoint
    from kimi_jax.runtime.default_model import default_checkpoint, load_default

    base = load_default()
    cfg = dataclasses.replace(base.config, vocab_size=base.config.vocab_size + 3)
    rows = jax.random.normal(jax.random.key(0), (3, cfg.hidden_size), jnp.float32) * 0.02
    params = {**base.params, **{k: jnp.concatenate([base.params[k], rows.astype(base.params[k].dtype)])
                                for k in ("embed", "lm_head")}}
    ckpt = save_hf_checkpoint(params, cfg, tmp_path / "odd-vocab")
    shutil.copy(default_checkpoint() / "tokenizer.model", ckpt / "tokenizer.model")
    tok = base.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True)
    out = hf_model(params, cfg).generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                         eos_token_id=list(tok.stop_ids), pad_token_id=0,
                                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    ids = out[0, len(prompt):].tolist()
    want = tok.decode(ids[:-1] if ids[-1] in tok.stop_ids else ids)
    assert want.strip(), ids

    logs = tmp_path / "logs"
    logs.mkdir()
    server = TwoProcesses(logs, "--checkpoint", str(ckpt), "--dtype", "float32", "--no-warm-up")
    try:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0}
        reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=300).json()
        assert reply["choices"][0]["text"] == want, (reply, want)
    finally:
        server.kill()


def test_sigterm_of_process_0_ends_both(two):
    two.procs[0].send_signal(signal.SIGTERM)
    codes = two.wait(90)
    assert codes == [0, 0], (codes, two.stderr(0)[-2000:], two.stderr(1)[-2000:])
    assert "process 0 stopped serving" in two.stderr(1)


def test_a_process_that_loses_process_0_exits_naming_the_coordinator(tmp_path):
    server = TwoProcesses(tmp_path, "--no-warm-up")  # warm-up across processes: the `two` fixture
    try:
        server.procs[0].kill()
        codes = server.wait(60)
        assert codes[1] == 1, (codes, server.stderr(1)[-2000:])
        assert f"process 1 of 2 lost process 0 (coordinator {server.coordinator})" in server.stderr(1)
        time.sleep(1)
        assert not server.leftovers()
    finally:
        server.kill()


def test_sigkill_of_process_1_fails_the_stream_and_health(tmp_path):
    server = TwoProcesses(tmp_path, "--no-warm-up")  # warm-up across processes: the `two` fixture
    try:
        body = {**endless(MODEL, "Count:", 480, _stop_tokens()), "stream": True}
        lines = []
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                lines.append(line)
                if sum(x.startswith("data:") for x in lines) == 3:
                    server.procs[1].kill()
                    killed = time.time()
        health = None
        while time.time() - killed < WORKER_TIMEOUT + 20:
            with contextlib.suppress(httpx.HTTPError):
                health = httpx.get(f"{server.url}/health", timeout=2).status_code
            if health != 200:
                break
            time.sleep(0.3)
        assert health != 200 and time.time() - killed < WORKER_TIMEOUT + 20
        text = "\n".join(lines)
        assert "error" in text and "[DONE]" not in text.split("error")[0][-20:], text[-1000:]
        codes = server.wait(60)
        assert None not in codes and not server.leftovers(), "a process is left running"
        assert codes[0] != 0 and "process 1 of 2" in server.stderr(0), server.stderr(0)[-2000:]
    finally:
        server.kill()
