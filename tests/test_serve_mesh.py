"""Serving a model sharded over the fake 8-device mesh: continuous batching gives what
`Model.generate` gives for each prompt alone on the same mesh (greedy)."""

from __future__ import annotations

import threading

import httpx  # noqa: E402  (test extra: missing is an install error, not a skip)
import pytest

pytestmark = pytest.mark.serve


@pytest.mark.slow
def test_sharded_server_equals_generate():
    from kimi_jax.serve.app import create_app
    from kimi_jax.serve.cli import LiveServer, build_server, parse_args

    mesh = "data=2,expert=2,tensor=2"
    # float32: in bfloat16 the sharded model's rounding depends on the batch and cache shapes (which differ
    # between the server's slots and generate's buckets), enough to flip near-tied greedy picks.
    srv = build_server(parse_args(["--max-batch", "3", "--max-context", "128", "--mesh", mesh, "--dtype", "float32",
                                   "--no-warm-up"]))
    assert srv.scheduler.max_batch == 4  # rounded up to the data shards
    live = LiveServer(create_app(srv))
    prompts = [f"Hello {i}, the capital of France is" for i in range(3)]
    outs = {}

    def go(i):
        r = httpx.post(f"{live.url}/v1/completions", timeout=300, json={
            "model": "kimi-k2-instruct", "prompt": prompts[i], "max_tokens": 10, "temperature": 0})
        outs[i] = r.json()["choices"][0]["text"]

    try:
        threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        model = srv.model
        for i, prompt in enumerate(prompts):
            ids = model.generate([model.tokenizer.encode(prompt)], max_new_tokens=10, temperature=0)[0]
            assert outs[i] == model.tokenizer.decode(ids[:-1] if ids[-1] in model.stop_ids else ids)
    finally:
        live.close()
        srv.scheduler.stop()
