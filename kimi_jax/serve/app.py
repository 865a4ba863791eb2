"""Command line and app: `python -m kimi_jax.serve` serves OpenAI- and Anthropic-compatible HTTP APIs.

    GET  /health                 liveness (never needs the key)
    GET  /metrics                Prometheus text: requests, tokens, queue depth, occupancy, TTFT, tokens/s
    GET  /v1/models              the served model name
    POST /v1/chat/completions    OpenAI chat (tools, streaming)           kimi_jax/api_openai.py
    POST /v1/completions         OpenAI raw-prompt completions            kimi_jax/api_openai.py
    POST /v1/messages            Anthropic messages (tools, streaming)    kimi_jax/api_anthropic.py

Requests are batched continuously by kimi_jax/scheduler.py: one model thread owns JAX and keeps
`--max-batch` decode slots busy; the asyncio side talks to it through per-request queues.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import secrets
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from kimi_jax.runtime import distributed
from kimi_jax.text.tool_calls import partial_marker_len

EPILOG = """\
examples:
  python -m kimi_jax.serve                                   # embedded tiny chat model on 127.0.0.1:8000
  python -m kimi_jax.serve --checkpoint /ckpt/Kimi-K2-Instruct --mesh data=1,expert=8 --port 8000
  python -m kimi_jax.serve --api-key sk-local --max-batch 32 --max-context 8192
"""


class APIError(Exception):
    """An error answered with `status` and an OpenAI- or Anthropic-style body (chosen by route)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


# Parameter checks shared by both APIs ----------------------------------------------------------
def number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    """body[name] (or default) checked to lie in [lo, hi]; a bad value is a 400 naming it."""
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"'{name}' must be {kind} in [{lo}, {hi}], got {value!r}", param=name)
    return value


def stop_strings(value: Any, name: str = "stop") -> list[str]:
    """A stop string or list of them (at most 4, non-empty)."""
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise APIError(400, f"'{name}' must be a non-empty string or a list of at most 4 of them", param=name)
    return stops


# Generation shared by both APIs ----------------------------------------------------------------
@dataclasses.dataclass
class Piece:
    """New text of one generation; the last piece has `finish_reason` ("stop" | "length") and, if a
    stop string ended it, `stop_sequence`."""

    text: str
    finish_reason: str | None = None
    stop_sequence: str | None = None
    tokens: int = 0  # generated tokens this piece accounts for (its text may lag behind them)


class Server:
    """The loaded model, its scheduler and the serving settings."""

    def __init__(self, model, scheduler, served_model_name: str = "kimi-k2-instruct", api_key: str | None = None):
        if model.tokenizer is None:
            raise ValueError("serving needs a tokenizer: put tiktoken.model next to config.json")
        self.model, self.scheduler, self.tokenizer = model, scheduler, model.tokenizer
        self.served_model_name, self.api_key = served_model_name, api_key
        self.created = int(time.time())

    @property
    def max_context(self) -> int:
        return self.scheduler.max_context

    def check_model(self, body: dict) -> None:
        name = body.get("model")
        if name != self.served_model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.served_model_name!r}",
                           kind="not_found_error", param="model", code="model_not_found")

    def request(self, prompt: Sequence[int], max_tokens: int | None, temperature: float, top_p: float,
                top_k: int = 0, seed: int | None = None):
        """A generation.Request; the prompt + max_tokens must fit the context (else 400)."""
        from kimi_jax.runtime.generation import Request
        from kimi_jax.runtime.sampling import SamplingParams

        room = self.max_context - len(prompt)
        if room < 1:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; this server's context is {self.max_context} "
                                "tokens: shorten the messages", param="messages", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise APIError(400, f"the prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceed this server's "
                                f"context of {self.max_context} tokens; lower max_tokens to at most {room}",
                           param="max_tokens", code="context_length_exceeded")
        if seed is None:
            seed = secrets.randbits(32) if temperature > 0 else 0
        try:
            sampling = SamplingParams(float(temperature), float(top_p), int(top_k), int(seed))
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return Request(tuple(prompt), int(max_tokens), sampling, tuple(self.tokenizer.stop_ids))

    async def generate(self, request, stops: Sequence[str] = ()) -> AsyncIterator[Piece]:
        """Submit to the scheduler and yield text as it is made. Leaving early (client gone, task
        cancelled) cancels the job, which frees its slot before the next decode call."""
        from kimi_jax.runtime.scheduler import QueueFull, SchedulerStopped

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        sink = lambda tokens, reason: loop.call_soon_threadsafe(queue.put_nowait, (tokens, reason))
        try:
            job = self.scheduler.submit(request, sink)
        except QueueFull as e:
            raise APIError(429, f"server overloaded: {e}; retry later", kind="rate_limit_error") from None
        except SchedulerStopped as e:
            raise APIError(503, str(e), kind="server_error") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        decoder, held, finished = self.tokenizer.stream_decoder(), "", False
        try:
            while not finished:
                tokens, reason = await queue.get()
                if reason is not None and reason.startswith("error"):
                    raise APIError(500, f"generation failed: {reason}", kind="server_error")
                finished = reason is not None
                for t in tokens:
                    if not (reason == "stop" and t in request.stop_ids):  # the final stop token is not text
                        held += decoder.push(t)
                if finished:
                    held += decoder.flush()
                hit = _first_stop(held, stops)
                if hit is not None:
                    index, stop = hit
                    yield Piece(held[:index], "stop", stop, len(tokens))
                    return
                keep = 0 if finished else partial_marker_len(held, stops)
                text, held = held[:len(held) - keep], held[len(held) - keep:]
                yield Piece(text, reason, None, len(tokens))
        finally:
            if not finished:
                self.scheduler.cancel(job)

    def metrics_text(self) -> str:
        """Prometheus text exposition of the scheduler's metrics."""
        s, m = self.scheduler, self.scheduler.metrics
        lines = []

        def metric(name, kind, help_, samples):
            lines.append(f"# HELP kimi_jax_{name} {help_}")
            lines.append(f"# TYPE kimi_jax_{name} {kind}")
            for labels, value in samples:
                lines.append(f"kimi_jax_{name}{labels} {value}")

        metric("requests_total", "counter", "Finished generation requests by finish reason.",
               [(f'{{finish_reason="{k}"}}', v) for k, v in sorted(m.requests.items())] or [("", 0)])
        metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", m.prompt_tokens)])
        metric("generation_tokens_total", "counter", "Tokens generated.", [("", m.generation_tokens)])
        metric("queue_depth", "gauge", "Requests waiting for a decode slot.", [("", s.queue_depth)])
        metric("active_slots", "gauge", "Decode slots in use.", [("", s.active)])
        metric("max_batch", "gauge", "Decode slots.", [("", s.max_batch)])
        metric("decode_calls_total", "counter", "Compiled decode calls.", [("", m.decode_calls)])
        metric("decode_steps_total", "counter", "Decode steps run.", [("", m.decode_steps)])
        metric("batch_occupancy_slot_steps_total", "counter",
               "Sum over decode steps of the slots in use (÷ decode_steps_total = mean occupancy).",
               [("", m.occupied_slot_steps)])
        metric("batch_occupancy_max", "gauge", "Most slots in use by one decode call.", [("", m.max_occupancy)])
        metric("prefill_calls_total", "counter", "Prefill calls.", [("", m.prefill_calls)])
        metric("busy_seconds_total", "counter", "Model-thread seconds in prefill and decode.",
               [("", round(m.busy_seconds, 6))])
        rate = m.generation_tokens / m.busy_seconds if m.busy_seconds else 0.0
        metric("tokens_per_second", "gauge", "Generated tokens per busy second, since start.", [("", round(rate, 3))])
        metric("last_decode_tokens_per_second", "gauge", "Tokens per second of the last decode call.",
               [("", round(m.last_tokens_per_s, 3))])
        buckets = []  # observe_ttft already counts cumulatively
        for edge, count in zip(m.TTFT_BUCKETS, m.ttft_buckets):
            buckets.append((f'_bucket{{le="{edge}"}}', count))
        buckets.append(('_bucket{le="+Inf"}', m.ttft_count))
        metric("time_to_first_token_seconds", "histogram", "Seconds from submission to the first token.",
               buckets + [("_sum", round(m.ttft_sum, 6)), ("_count", m.ttft_count)])
        return "\n".join(lines) + "\n"


def _first_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    found = [(i, s) for s in stops if (i := text.find(s)) >= 0]
    return min(found) if found else None


def sse(data: Any, event: str | None = None) -> str:
    """One server-sent event."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


# The app ---------------------------------------------------------------------------------------
def create_app(server: Server):
    """The FastAPI app: routes, auth, and error bodies in each API's style."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse

    from kimi_jax.serve import anthropic as api_anthropic, openai as api_openai

    app = FastAPI(title="kimi_jax", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, err: APIError):
        return error_response(request.url.path, err)

    @app.exception_handler(Exception)
    async def on_error(request: Request, err: Exception):
        return error_response(request.url.path, APIError(500, f"internal error: {type(err).__name__}: {err}",
                                                         "server_error"))

    if server.api_key:
        app.add_middleware(KeyCheck, key=server.api_key)

    @app.get("/health")
    async def health():
        ok = server.scheduler.alive
        return JSONResponse({"status": "ok" if ok else "model thread stopped"}, 200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics_text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.served_model_name, "object": "model",
                                            "created": server.created, "owned_by": "kimi_jax"}]}

    api_openai.add_routes(app, server)
    api_anthropic.add_routes(app, server)
    return app


def error_response(path: str, err: APIError):
    """An error body in the style of the API that `path` belongs to."""
    from fastapi.responses import JSONResponse

    if path.startswith("/v1/messages"):
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
                500: "api_error"}.get(err.status, "invalid_request_error")
        return JSONResponse({"type": "error", "error": {"type": kind, "message": err.message}}, err.status)
    return JSONResponse({"error": {"message": err.message, "type": err.kind, "param": err.param,
                                   "code": err.code}}, err.status)


class KeyCheck:
    """ASGI middleware: every path but /health needs `Authorization: Bearer KEY` or `x-api-key: KEY`.
    (Plain ASGI, not @app.middleware: that wrapper hides client disconnects from the handlers.)"""

    def __init__(self, app, key: str):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            bearer = headers.get("authorization", "")
            given = bearer[7:] if bearer.lower().startswith("bearer ") else headers.get("x-api-key")
            if not (given and secrets.compare_digest(given.encode(), self.key.encode())):
                err = APIError(401, "invalid or missing API key (Authorization: Bearer KEY or x-api-key: KEY)",
                               "authentication_error", code="invalid_api_key")
                await error_response(scope["path"], err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def unless_disconnected(http, awaitable, poll_s: float = 0.25):
    """Await `awaitable`, cancelling it if the client disconnects first (a generation it runs then
    frees its slot); the abandoned request is answered 499, which nobody reads."""
    task = asyncio.ensure_future(awaitable)
    try:
        while not (await asyncio.wait({task}, timeout=poll_s))[0]:
            if await http.is_disconnected():
                task.cancel()
                raise APIError(499, "client closed the request")
        return task.result()
    finally:
        if not task.done():  # this handler itself was cancelled
            task.cancel()


async def json_body(request) -> dict:
    """The request's JSON object, or a 400 saying what is wrong with it."""
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


class LiveServer:
    """uvicorn serving `app` on a free 127.0.0.1 port in a daemon thread (tests, benchmarks)."""

    def __init__(self, app):
        import socket
        import threading

        import uvicorn

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
        self.server.should_exit = True
        self.thread.join(timeout=10)


# Command line ----------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kimi_jax.serve", description=__doc__.split("\n\n")[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", metavar="PATH",
                   help="Hugging Face checkpoint directory; default: the embedded tiny chat model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--mesh", metavar="SPEC", help="device mesh to shard over, e.g. 'data=1,expert=8'")
    p.add_argument("--dtype", help="compute dtype: bfloat16 (the default with --checkpoint) or float32 (the "
                                   "default for the embedded model)")
    p.add_argument("--served-model-name", default="kimi-k2-instruct", metavar="NAME",
                   help="the model name clients must send (default kimi-k2-instruct)")
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' (or x-api-key); "
                                                    "default: no auth")
    p.add_argument("--max-batch", type=int, default=16, metavar="N", help="decode slots (default 16)")
    p.add_argument("--max-context", type=int, default=4096, metavar="T",
                   help="tokens per slot, prompt + output (default 4096, capped by the model's context)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="waiting requests before answering 429 (default 256)")
    p.add_argument("--max-prefill", type=int, default=4, metavar="N",
                   help="requests prefilled together when several wait (default 4)")
    p.add_argument("--steps-per-call", type=int, default=None, metavar="K",
                   help="decode steps per compiled call (default: the generator's)")
    distributed.add_arguments(p)
    return p.parse_args(argv)


def build_server(args: argparse.Namespace, script=None) -> Server:
    """Load the model and start the scheduler's thread."""
    import kimi_jax
    from kimi_jax.runtime.default_model import load_default
    from kimi_jax.runtime.scheduler import Scheduler

    if args.max_batch < 1 or args.max_context < 2:
        raise ValueError("--max-batch must be ≥ 1 and --max-context ≥ 2")
    if args.checkpoint:
        model = kimi_jax.load(args.checkpoint, dtype=args.dtype or "bfloat16", mesh=args.mesh)
    else:
        model = load_default(dtype=args.dtype or "float32", mesh=args.mesh)
    scheduler = Scheduler(model.generator, max_batch=args.max_batch, max_context=args.max_context,
                          max_queue=args.max_queue, max_prefill=args.max_prefill,
                          steps_per_call=args.steps_per_call, script=script).start()
    return Server(model, scheduler, args.served_model_name, args.api_key)


def main(argv=None) -> int:
    import uvicorn

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
    server = build_server(args)
    if not args.checkpoint:
        print("[kimi_jax] embedded tiny chat model: it introduces itself, answers a few facts and sums and calls "
              "a get_weather tool, nothing more; pass --checkpoint for a real model", file=sys.stderr)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="info")
    server.scheduler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
