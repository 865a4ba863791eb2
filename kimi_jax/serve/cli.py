"""Command line: `python -m kimi_jax.serve` serves OpenAI- and Anthropic-compatible HTTP APIs.

Requests are batched continuously by kimi_jax/runtime/scheduler.py: one model thread owns JAX and
keeps `--max-batch` decode slots busy; the asyncio side talks to it through per-request queues.
A bad flag is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time

import uvicorn

from kimi_jax.runtime import distributed, flags, lockstep
from kimi_jax.runtime.default_model import load_checkpoint_or_default
from kimi_jax.runtime.engine import DTYPES
from kimi_jax.runtime.scheduler import LONG_PREFILL_CHUNK, PAGE_SIZE, PREFILL_CHUNK, Scheduler
from kimi_jax.serve.app import create_app
from kimi_jax.serve.server import MAX_BODY_BYTES, Server
from kimi_jax.text.grammar import Grammars
from sharding.rules import RULE_TABLES

EPILOG = """\
examples:
  python -m kimi_jax.serve                                   # embedded tiny chat model on 127.0.0.1:8000
  python -m kimi_jax.serve --checkpoint /ckpt/Kimi-K2-Instruct --mesh data=1,expert=8 --port 8000
  python -m kimi_jax.serve --api-key sk-local --max-batch 32 --max-context 8192
  # across hosts: the same command on every process; process 0 serves HTTP (scripts/launch_*.sh)
  python -m kimi_jax.serve --checkpoint /ckpt/Kimi-K2-Instruct --mesh data=1,expert=16,tensor=4 --rules dp_attention \
      --coordinator-address 10.0.0.1:8476 --num-processes 16 --process-id $I
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
    p.add_argument("--rules", choices=sorted(RULE_TABLES), default="default",
                   help="sharding rules table (sharding/DESIGN.md); dp_attention also splits the decode batch, and "
                        "with it the KV cache, over the expert axis (default: default)")
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
    p.add_argument("--prefill-chunk", type=flags.integer(1), default=PREFILL_CHUNK, metavar="N",
                   help="prompt tokens prefilled per scheduler iteration, between decode calls: a longer prompt "
                        "is prefilled in chunks, so running streams keep their pace while it is admitted "
                        f"(default {PREFILL_CHUNK})")
    p.add_argument("--long-prefill-chunk", type=flags.integer(1), default=LONG_PREFILL_CHUNK, metavar="N",
                   help="of those, the most that prompts longer than --prefill-chunk take per iteration, so that "
                        "admitting one costs the running streams less per token while short prompts still come in "
                        f"whole (default {LONG_PREFILL_CHUNK}; BENCHMARKS.md \"Paged cache\")")
    p.add_argument("--page-size", type=flags.integer(1), default=PAGE_SIZE, metavar="N",
                   help=f"KV-cache positions per page: the unit of allocation and of prefix sharing "
                        f"(default {PAGE_SIZE})")
    p.add_argument("--kv-pages", type=flags.integer(1), default=None, metavar="N",
                   help="KV-cache pages in the pool (its memory); requests wait for pages, and the youngest "
                        "running one is preempted and recomputed when they run out (default: enough for every "
                        "slot to reach --max-context)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="do not reuse the cached pages of a prompt prefix seen before (automatic prefix caching "
                        "is on by default)")
    p.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                   help="take requests at once instead of first building every program a call can need "
                        "(then a request may wait for a compile)")
    p.add_argument("--steps-per-call", type=flags.integer(1), default=None, metavar="K",
                   help="decode steps per compiled call (default: the generator's)")
    distributed.add_arguments(p)
    p.add_argument("--worker-timeout", type=flags.real(1), default=lockstep.DEFAULT_TIMEOUT_S, metavar="S",
                   help="multi-host: a process silent this long fails the in-flight requests, turns /health 503 and "
                        f"stops the server (default {lockstep.DEFAULT_TIMEOUT_S:g})")
    return p.parse_args(argv)


def build_server(args: argparse.Namespace, model=None, generator=None, lockstep_=None) -> Server:
    """A Server over `model` (default: what --checkpoint names, or the embedded tiny chat model) with
    its scheduler's thread started.

    generator: what the scheduler runs (default the model's own; tests/serve_util.py passes one
    that rewrites the replies to scripted prompts). lockstep_: process 0's side of a multi-host run."""
    if model is None:
        model = load_model(args)
    scheduler = make_scheduler(args, generator if generator is not None else model.generator, model.tokenizer,
                               lockstep_).start()
    return Server(model, scheduler, args.served_model_name, args.api_key, args.max_body_bytes)


def load_model(args: argparse.Namespace):
    return load_checkpoint_or_default(args.checkpoint, args.dtype, mesh=args.mesh,
                                      rules=args.rules if args.mesh else None)


def make_scheduler(args: argparse.Namespace, generator, tokenizer=None, lockstep_=None) -> Scheduler:
    """The scheduler every process builds alike (the same slots, context, pages and batching, and the
    same grammars: every process keeps the same constrained-decoding state)."""
    grammars = Grammars(tokenizer, generator.cfg.padded_vocab_size) if tokenizer is not None else None
    return Scheduler(generator, max_batch=args.max_batch, max_context=args.max_context, max_queue=args.max_queue,
                     max_prefill=args.max_prefill, steps_per_call=args.steps_per_call, lockstep_=lockstep_,
                     page_size=args.page_size, num_pages=args.kv_pages, prefix_cache=args.prefix_cache,
                     grammars=grammars, prefill_chunk=args.prefill_chunk,
                     long_prefill_chunk=args.long_prefill_chunk, warm_up=args.warm_up)


def _follower_before_joining(args: argparse.Namespace) -> tuple[int, int, str] | None:
    """(process id, processes, coordinator) of a process other than 0 whose flags or environment say so
    (a TPU pod's process ids are known only once joined: those run unsupervised); None otherwise."""
    try:
        pid, num = distributed.setting(args, "process_id"), distributed.setting(args, "num_processes")
        address = distributed.setting(args, "coordinator_address", str)
    except distributed.DistributedError:
        return None  # initialize reports it
    return (pid, num, address) if pid and num and num > 1 and address else None


def follow(args: argparse.Namespace, info: distributed.ProcessInfo, lock: lockstep.Lockstep) -> int:
    """A process other than 0: load the same model and run process 0's scheduler iterations until it
    stops (runtime/lockstep.py). It binds no port and answers no one."""
    print(lockstep.follower_notice(info.process_id, info.num_processes, args.coordinator_address),
          file=sys.stderr, flush=True)
    lock.start()  # the heartbeat, while the model loads too
    try:
        model = load_model(args)
        make_scheduler(args, model.generator, model.tokenizer, lock).follow()
    except lockstep.CoordinatorLost:
        print(lockstep.lost_coordinator(info.process_id, info.num_processes, args.coordinator_address),
              file=sys.stderr, flush=True)
        os._exit(1)
    except (OSError, ValueError) as e:
        print(f"error: process {info.process_id}: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # not the distributed runtime's shutdown barrier: process 0 may never reach it
    except Exception as e:  # a failed step: process 0 sees it as a lost process
        print(f"error: process {info.process_id}: the scheduler stopped: {type(e).__name__}: {e}",
              file=sys.stderr, flush=True)
        os._exit(1)
    print(f"[kimi_jax] process {info.process_id}: process 0 stopped serving; exiting", file=sys.stderr, flush=True)
    return 0


def main(argv=None) -> int:
    """`python -m kimi_jax.serve`: parse the flags, load the model, serve until interrupted."""
    args = parse_args(argv)
    follower = _follower_before_joining(args)
    if follower is not None and os.environ.get(lockstep.SUPERVISED) != "1":
        return lockstep.supervise(sys.argv[1:] if argv is None else list(argv), *follower)
    lockstep.die_with_parent()
    try:
        info = distributed.initialize(args)  # before any device is touched; a no-op for one process
    except distributed.DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    lock = None
    if info.num_processes > 1:
        if not args.mesh:
            print(f"error: a {info.num_processes}-process server shards the model over every process's devices: "
                  "pass --mesh, e.g. --mesh expert=8 for 8 devices in all", file=sys.stderr)
            return 1
        distributed.python_only_stdout()  # gloo's native logs
        lock = lockstep.Lockstep.from_jax(args.worker_timeout)
        if not info.is_main:
            return follow(args, info, lock)
        lost = threading.Event()
        lock.on_lost.append(lambda why: lost.set())
        lock.start()  # the watchdog, while the model loads too
    try:
        sock = listen(args.host, args.port)  # before the model loads: a bad address fails at once
    except OSError as e:
        print(f"error: --host {args.host} --port {args.port}: cannot listen there: {e}", file=sys.stderr)
        return _exit(1, lock)
    try:
        server = build_server(args, lockstep_=lock)
    except (OSError, ValueError) as e:  # a missing checkpoint, a mesh that does not fit, a bad config
        print(f"error: {e}", file=sys.stderr)
        sock.close()
        return _exit(1, lock)
    if not args.checkpoint:
        print("[kimi_jax] embedded tiny chat model: it introduces itself, answers a few facts and sums and calls "
              "a get_weather tool, nothing more; pass --checkpoint for a real model", file=sys.stderr)
    host, port = sock.getsockname()[:2]
    across = f" across {info.num_processes} processes" if lock else ""
    print(f"[kimi_jax] serving {args.served_model_name!r} on http://{host}:{port}{across}", file=sys.stderr)
    web = uvicorn.Server(uvicorn.Config(create_app(server), log_level="info", timeout_graceful_shutdown=30))
    if lock is not None:  # a lost process: the jobs have failed (scheduler.fail); let their replies go, then stop
        threading.Thread(target=_stop_when, args=(lost, web), daemon=True).start()
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again under the handler that was
    # there before it: this one, so that the scheduler is stopped (on every process) and the exit is 0.
    signal.signal(signal.SIGTERM, _terminated)
    try:
        web.run(sockets=[sock])
    except (Terminated, KeyboardInterrupt):
        pass
    finally:
        server.scheduler.stop()
    return _exit(1 if lock is not None and lost.is_set() else 0, lock)


class Terminated(Exception):
    """SIGTERM, once uvicorn has finished the requests in flight."""


def _terminated(sig, frame) -> None:
    raise Terminated


def _stop_when(lost: threading.Event, web: uvicorn.Server, grace_s: float = 2.0) -> None:
    lost.wait()
    time.sleep(grace_s)  # the failed streams' last events reach their clients; /health answers 503 meanwhile
    web.should_exit = True


def _exit(code: int, lock) -> int:
    """The exit status; after a lost process, exit at once: the distributed runtime's shutdown would wait
    for the lost process (minutes), and the model thread may be stuck in a collective with it."""
    if lock is not None and code:
        sys.stderr.flush()
        os._exit(code)
    return code


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
