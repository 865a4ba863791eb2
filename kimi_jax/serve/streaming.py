"""What every generating route does, once: the handler skeleton, the generation seen from the event
loop, tool-call parsing of its text, and server-sent events.

    handle   body (at most `Server.max_body_bytes`, else 413) -> in a worker thread, so that a big
             body never stalls the event loop: JSON parse, model check, the route's `prepare`
             (validation, chat template, tokenization, a Request) -> submit and
             wait for the first tokens (errors such as 429 surface before a response starts)
             -> the route's `whole` (a JSON reply) or `stream` (SSE chunks)
    Reply    one scheduler job: tokens arrive on a per-request asyncio queue from the model
             thread, become text through text/detokenize.Detokenizer (stop tokens, stop strings,
             flush), are split into reasoning and reply for a thinking model
             (text/reasoning.ReasoningStreamParser), and the reply is read as tool-call events
             (text/tool_calls.ToolCallStreamParser)
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from kimi_jax.runtime.jobs import QueueFull, SchedulerStopped
from kimi_jax.runtime.requests import Request
from kimi_jax.serve.errors import APIError, error_body, is_anthropic
from kimi_jax.serve.server import Server
from kimi_jax.serve.validation import parse_body
from kimi_jax.text.detokenize import Detokenizer, Piece
from kimi_jax.text.reasoning import ReasoningDelta, ReasoningStreamParser
from kimi_jax.text.tool_calls import ContentDelta, ToolCallEnd, ToolCallEvent, ToolCallStreamParser

log = logging.getLogger("kimi_jax.serve")
DISCONNECT_POLL_S = 0.25


@dataclasses.dataclass
class Prepared:
    """What a route made of a checked body: the generation to run and how to answer."""

    request: Request
    stops: list[str]
    stream: bool
    use_tools: bool = False  # parse Kimi's tool-call section out of the reply
    include_usage: bool = False  # OpenAI stream_options.include_usage
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # route-specific (ids, …)
    reasoning: bool = False  # a thinking model's reasoning comes apart from the reply (ReasoningDelta)
    parallel_tool_calls: bool = True  # False: the reply ends after its first tool call
    echo: str = ""  # /v1/completions `echo`: the prompt's text, which the reply's text follows
    n: int = 1  # choices, sampled from one prefill of the prompt (`choices`)
    top_logprobs: int | None = None  # None: no log probabilities; k: each token's and its top k
    token_ids: bool = False  # log probabilities name tokens `token_id:ID` (vLLM's return_tokens_as_token_ids)

    def choices(self) -> list[Request]:
        """The request of each of the `n` choices: choice i samples with seed (seed + i) mod 2**32, so
        that `n` choices with seed s are the single requests with seeds s, s + 1, …, s + n − 1."""
        sampling = self.request.sampling
        return [dataclasses.replace(self.request, logprobs=self.top_logprobs is not None,
                                    sampling=dataclasses.replace(sampling, seed=(sampling.seed + i) % 2**32))
                for i in range(self.n)]


Prepare = Callable[[dict[str, Any], Server], Prepared]
Whole = Callable[[list["Reply"], Prepared], Awaitable[dict[str, Any]]]
Stream = Callable[[list["Reply"], Prepared], AsyncIterator[str]]


async def handle(http: HTTPRequest, server: Server, prepare: Prepare, whole: Whole, stream: Stream) -> Response:
    """The one route skeleton: parse the body, check the model, let the route validate and build its
    request, start generating (one Reply per choice, all submitted before any is awaited, so that
    they share one prefill), then answer whole or as a stream."""
    raw = await read_body(http, server.max_body_bytes)
    job = await run_in_threadpool(_prepare, raw, server, prepare)
    replies = [Reply(server, job, request) for request in job.choices()]
    try:
        for reply in replies:
            reply.submit()
        for reply in replies:
            await reply.wait_first(http)
    except BaseException:
        for reply in replies:
            reply.close()
        raise
    if job.stream:
        return StreamingResponse(_guarded(stream(replies, job), http.url.path), media_type="text/event-stream")
    return JSONResponse(await unless_disconnected(http, whole(replies, job)))


def _prepare(raw: bytes, server: Server, prepare: Prepare) -> Prepared:
    """Everything between the bytes and the scheduler; CPU-bound, so it runs in a worker thread."""
    body = parse_body(raw)
    server.check_model(body)
    return prepare(body, server)


async def read_body(http: HTTPRequest, limit: int) -> bytes:
    """The raw request body, at most `limit` bytes: a larger one is answered 413 as soon as its
    Content-Length (or the bytes received) say so, before it is read whole. A client gone while
    sending it is answered 499, read by nobody."""
    too_big = APIError(413, f"the request body is larger than this server's limit of {limit} bytes "
                            "(--max-body-bytes)", code="request_too_large")
    length = http.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    try:
        async for chunk in http.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(499, "client closed the request") from None
    return b"".join(chunks)


async def unless_disconnected(http: HTTPRequest, awaitable: Awaitable[Any], poll_s: float = DISCONNECT_POLL_S):
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


class Reply:
    """One request's generation, read from the event loop.

    `submit` queues the job and `wait_first` waits for its first tokens, so that a full queue (429), a
    stopped model thread (503) or a failed generation (500) is answered before any response starts
    (`handle` submits every choice before it waits for any); `events` then yields the reply as
    tool-call events (only ContentDelta without tools), and `collect` gathers them whole. Leaving
    early (client gone, task cancelled, a stop string seen) cancels the job, which frees its slot
    before the next decode call. After the last event: `finish_reason` ("stop" | "length"),
    `stop_sequence` (the stop string that ended the text, if one did), the token counts and
    `tool_calls` (accepted calls seen).
    """

    def __init__(self, server: Server, job: Prepared, request: Request | None = None):
        self.scheduler, self.job = server.scheduler, job
        self.request = request or job.request  # this choice's
        self.text = Detokenizer(server.tokenizer, self.request.stop_ids, job.stops)
        self.prompt_tokens, self.completion_tokens, self.tool_calls = len(self.request.prompt), 0, 0
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pieces: list[Piece] = []  # read but not yet handed out
        # (token id, text offset, TokenLogProb) of each token whose text is the reply's (the final stop
        # token excluded), when the request asks for log probabilities; `_sent` of them handed out.
        self.logprobs: list[tuple[int, int, Any]] = []
        self._sent, self._offset = 0, 0
        self._handle = None  # the scheduler's Job
        self._ended = False  # the scheduler will send nothing more

    @property
    def finish_reason(self) -> str | None:
        return self.text.finish_reason

    @property
    def stop_sequence(self) -> str | None:
        return self.text.stop_sequence

    def usage(self) -> dict[str, int]:
        """OpenAI's `usage` (the generated tokens include a final stop token)."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def take_logprobs(self) -> list[tuple[int, int, Any]]:
        """The log-probability entries not handed out yet (streaming: those since the last call)."""
        new, self._sent = self.logprobs[self._sent:], len(self.logprobs)
        return new

    def submit(self) -> None:
        """Queue the job with the scheduler (429 when the queue is full, 503 when the model thread is gone)."""
        loop = asyncio.get_running_loop()

        def sink(tokens, reason, logprobs=None):  # on the model thread
            loop.call_soon_threadsafe(self._queue.put_nowait, (tokens, reason, logprobs))

        try:
            self._handle = self.scheduler.submit(self.request, sink)
        except QueueFull as e:
            raise APIError(429, f"server overloaded: {e}; retry later") from None
        except SchedulerStopped as e:
            raise APIError(503, str(e)) from None
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def wait_first(self, http: HTTPRequest) -> None:
        """Wait for the job's first tokens (a failed generation is a 500 before any response starts)."""
        try:
            await unless_disconnected(http, self._read())
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Cancel the job unless it has finished (idempotent)."""
        if not self._ended and self._handle is not None:
            self._ended = True
            self.scheduler.cancel(self._handle)

    async def _read(self) -> None:
        """Wait for the model thread's next delivery and turn it into pieces."""
        tokens, reason, logprobs = await self._queue.get()
        if reason is not None and reason.startswith("error"):
            self._ended = True
            raise APIError(500, f"generation failed: {reason}")
        if reason is not None:
            self._ended = True
        for i, token in enumerate(tokens):
            piece = self.text.push(token, last=reason is not None and i == len(tokens) - 1)
            self._pieces.append(piece)
            self.completion_tokens += 1
            if logprobs is not None and token not in self.request.stop_ids:
                self.logprobs.append((token, self._offset, logprobs[i]))
            self._offset += len(piece.text)
            if self.text.done:
                break
        if reason is not None and not self.text.done:  # ended without a final token (never expected)
            self._pieces.append(Piece(-1, self.text.finish(reason)))
        if self.text.done:
            self.close()  # a stop string: nothing after it is wanted

    async def _deliveries(self) -> AsyncIterator[str]:
        """The reply's text, one string per delivery from the model thread (up to a decode call's
        tokens), so that a stream sends a few larger chunks rather than one per token."""
        try:
            while True:
                if self._pieces:
                    text = "".join(p.text for p in self._pieces)
                    self._pieces.clear()
                    yield text
                if self.text.done:
                    return
                await self._read()
        finally:
            self.close()

    async def events(self, incremental: bool = False) -> AsyncIterator[ReasoningDelta | ToolCallEvent]:
        """The reply as events: the one driver of the reasoning and tool-call parsers for every route.

        ReasoningDelta only with `job.reasoning`, tool-call events only with `job.use_tools` (else the
        reply is ContentDelta alone). `incremental`: a tool call's arguments come as they are generated
        (text/tool_calls.py), not whole at its end."""
        thoughts = ReasoningStreamParser() if self.job.reasoning else None
        calls = ToolCallStreamParser(incremental) if self.job.use_tools else None
        async for text in self._deliveries():
            for event in _parse(thoughts, calls, text, final=False):
                self.tool_calls += isinstance(event, ToolCallEnd)
                yield event
                if isinstance(event, ToolCallEnd) and not self.job.parallel_tool_calls:
                    self.close()  # one call is all the client takes: stop generating (frees the slot)
                    return
        for event in _parse(thoughts, calls, "", final=True):
            self.tool_calls += isinstance(event, ToolCallEnd)
            yield event
            if isinstance(event, ToolCallEnd) and not self.job.parallel_tool_calls:
                return

    async def collect(self) -> tuple[str, str, list[ToolCallEnd]]:
        """The whole reply: its reasoning text, its content text and its accepted tool calls."""
        reasoning, content, calls = [], [], []
        async for event in self.events():
            if isinstance(event, ReasoningDelta):
                reasoning.append(event.text)
            elif isinstance(event, ContentDelta):
                content.append(event.text)
            elif isinstance(event, ToolCallEnd):
                calls.append(event)
        return "".join(reasoning), "".join(content), calls


def _parse(thoughts: ReasoningStreamParser | None, calls: ToolCallStreamParser | None, text: str,
           final: bool) -> list[ReasoningDelta | ToolCallEvent]:
    """One delivery's text through the reasoning split, then the reply part through the tool-call parser."""
    events: list[ReasoningDelta | ToolCallEvent] = []
    if thoughts is not None:
        reasoning, text = thoughts.feed(text)
        if final:
            more_reasoning, more_text = thoughts.finish()
            reasoning, text = reasoning + more_reasoning, text + more_text
        if reasoning:
            events.append(ReasoningDelta(reasoning))
    if calls is not None:
        events += calls.feed(text) + (calls.finish() if final else [])
    elif text:
        events.append(ContentDelta(text))
    return events


async def merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[Any]:
    """The items of several async iterators (the `n` choices' chunks) as each comes; an error in one
    ends them all."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream):
        try:
            async for item in stream:
                await queue.put((item, None))
        except Exception as e:  # handed to the reader, which raises it
            await queue.put((None, e))
        finally:
            await queue.put((done, None))

    tasks = [asyncio.ensure_future(pump(stream)) for stream in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item, error = await queue.get()
            if error is not None:
                raise error
            if item is done:
                remaining -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


def sse(data: Any, event: str | None = None) -> str:
    """One server-sent event."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _guarded(chunks: AsyncIterator[str], path: str) -> AsyncIterator[str]:
    """A route's SSE chunks; a failure once the stream has begun ends it with an error event in the
    API's style (a status can no longer be sent), logged once."""
    try:
        async for chunk in chunks:
            yield chunk
    except APIError as e:
        log.error("%s: stream ended by an error: %s", path, e.message)
        yield sse(error_body(path, e), "error" if is_anthropic(path) else None)
    except Exception:
        log.exception("%s: stream failed", path)
        err = APIError(500, "internal server error")
        yield sse(error_body(path, err), "error" if is_anthropic(path) else None)
