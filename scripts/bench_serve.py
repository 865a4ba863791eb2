"""Serving benchmark: throughput and time to first token vs concurrent streaming clients.

    python scripts/bench_serve.py                        # starts the embedded default in-process
    python scripts/bench_serve.py --url http://127.0.0.1:8000 --model kimi-k2-instruct

See kimi_jax/bench/serve.py for what is measured; results go to docs/serving_bench.md.
"""

from __future__ import annotations

import argparse

from kimi_jax.bench.serve import bench, markdown_table
from kimi_jax.serve.app import create_app
from kimi_jax.serve.cli import LiveServer, build_server, parse_args


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server; default: start the embedded default model in-process")
    p.add_argument("--model", default="kimi-k2-instruct", help="model name to send (default kimi-k2-instruct)")
    p.add_argument("--clients", default="1,4,16,64", help="concurrency levels (default 1,4,16,64)")
    p.add_argument("--rounds", type=int, default=2, help="requests per client per level (default 2)")
    p.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (default 32)")
    p.add_argument("--max-batch", type=int, default=64, help="decode slots of the in-process server (default 64)")
    p.add_argument("--max-context", type=int, default=256, help="context of the in-process server (default 256)")
    args = p.parse_args()

    live = None
    url = args.url
    if url is None:
        server = build_server(parse_args(["--max-batch", str(args.max_batch), "--max-context", str(args.max_context),
                                          "--served-model-name", args.model]))
        live = LiveServer(create_app(server))
        url = live.url
    try:
        rows = bench(url, args.model, [int(c) for c in args.clients.split(",")], args.rounds, args.max_tokens)
    finally:
        if live is not None:
            live.close()
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
