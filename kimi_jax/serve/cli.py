"""Command line: `python -m kimi_jax.serve` serves OpenAI- and Anthropic-compatible HTTP APIs.

Requests are batched continuously by kimi_jax/runtime/scheduler.py: one model thread owns JAX and
keeps `--max-batch` decode slots busy; the asyncio side talks to it through per-request queues.
A bad flag is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time

import uvicorn

from kimi_jax.runtime import distributed, flags
from kimi_jax.runtime.default_model import load_checkpoint_or_default
from kimi_jax.runtime.engine import DTYPES
from kimi_jax.runtime.scheduler import Scheduler
from kimi_jax.serve.app import create_app
from kimi_jax.serve.server import MAX_BODY_BYTES, Server

EPILOG = """\
examples:
  python -m kimi_jax.serve                                   # embedded tiny chat model on 127.0.0.1:8000
  python -m kimi_jax.serve --checkpoint /ckpt/Kimi-K2-Instruct --mesh data=1,expert=8 --port 8000
  python -m kimi_jax.serve --api-key sk-local --max-batch 32 --max-context 8192
"""


def parse_args(argv=None) -> argparse.Namespace:
    """The server's flags, each range-checked (a bad one exits 2 with argparse's one-line error)."""
    p = argparse.ArgumentParser(prog="python -m kimi_jax.serve", description=__doc__.split("\n\n")[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", metavar="PATH", type=flags.directory("checkpoint directory"),
                   help="Hugging Face checkpoint directory; default: the embedded tiny chat model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=flags.PORT, default=8000, help="port (default 8000)")
    p.add_argument("--mesh", metavar="SPEC", help="device mesh to shard over, e.g. 'data=1,expert=8'")
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="compute dtype: bfloat16 (the default with --checkpoint) or float32 (the default for the "
                        "embedded model)")
    p.add_argument("--served-model-name", default="kimi-k2-instruct", metavar="NAME",
                   help="the model name clients must send (default kimi-k2-instruct)")
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' (or x-api-key); "
                                                    "default: no auth")
    p.add_argument("--max-batch", type=flags.integer(1), default=16, metavar="N", help="decode slots (default 16)")
    p.add_argument("--max-context", type=flags.integer(2), default=4096, metavar="T",
                   help="tokens per slot, prompt + output (default 4096, capped by the model's context)")
    p.add_argument("--max-body-bytes", type=flags.integer(1), default=MAX_BODY_BYTES, metavar="N",
                   help=f"largest request body, in bytes; a larger one is answered 413 (default {MAX_BODY_BYTES})")
    p.add_argument("--max-queue", type=flags.integer(0), default=256, metavar="N",
                   help="waiting requests before answering 429 (default 256)")
    p.add_argument("--max-prefill", type=flags.integer(1), default=4, metavar="N",
                   help="requests prefilled together when several wait (default 4)")
    p.add_argument("--steps-per-call", type=flags.integer(1), default=None, metavar="K",
                   help="decode steps per compiled call (default: the generator's)")
    distributed.add_arguments(p)
    return p.parse_args(argv)


def build_server(args: argparse.Namespace, model=None, generator=None) -> Server:
    """A Server over `model` (default: what --checkpoint names, or the embedded tiny chat model) with
    its scheduler's thread started.

    generator: what the scheduler runs (default the model's own; tests/serve_util.py passes one
    that rewrites the replies to scripted prompts)."""
    if model is None:
        model = load_checkpoint_or_default(args.checkpoint, args.dtype, mesh=args.mesh)
    scheduler = Scheduler(generator if generator is not None else model.generator, max_batch=args.max_batch,
                          max_context=args.max_context, max_queue=args.max_queue, max_prefill=args.max_prefill,
                          steps_per_call=args.steps_per_call).start()
    return Server(model, scheduler, args.served_model_name, args.api_key, args.max_body_bytes)


def main(argv=None) -> int:
    """`python -m kimi_jax.serve`: parse the flags, load the model, serve until interrupted."""
    args = parse_args(argv)
    try:
        info = distributed.initialize(args)  # before any device is touched; a no-op for one process
    except distributed.DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if info.num_processes > 1:
        # Every process would have to run the same decode steps, so process 0 would need to
        # broadcast each admitted request to the others: not built yet.
        print("error: serving across several processes is not supported yet; serve from one host "
              "(all of its devices via --mesh), or use `python -m kimi_jax.generate` for multi-host runs",
              file=sys.stderr)
        return 1
    try:
        sock = listen(args.host, args.port)  # before the model loads: a bad address fails at once
    except OSError as e:
        print(f"error: --host {args.host} --port {args.port}: cannot listen there: {e}", file=sys.stderr)
        return 1
    try:
        server = build_server(args)
    except (OSError, ValueError) as e:  # a missing checkpoint, a mesh that does not fit, a bad config
        print(f"error: {e}", file=sys.stderr)
        sock.close()
        return 1
    if not args.checkpoint:
        print("[kimi_jax] embedded tiny chat model: it introduces itself, answers a few facts and sums and calls "
              "a get_weather tool, nothing more; pass --checkpoint for a real model", file=sys.stderr)
    host, port = sock.getsockname()[:2]
    print(f"[kimi_jax] serving {args.served_model_name!r} on http://{host}:{port}", file=sys.stderr)
    try:
        uvicorn.Server(uvicorn.Config(create_app(server), log_level="info")).run(sockets=[sock])
    finally:
        server.scheduler.stop()
    return 0


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), as uvicorn binds one (SO_REUSEADDR); OSError if it cannot be."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class LiveServer:
    """uvicorn serving `app` on a free 127.0.0.1 port in a daemon thread (tests, benchmarks)."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("uvicorn did not start within 30 s")
            time.sleep(0.02)

    def close(self):
        """Ask uvicorn to exit and wait for its thread."""
        self.server.should_exit = True
        self.thread.join(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
