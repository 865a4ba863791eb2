"""OpenAI-compatible routes: `POST /v1/chat/completions` and `POST /v1/completions`.

Chat prompts go through the Kimi chat template (tools in its `tool_declare` block, `role: tool`
results as `## Return of {id}`); client-made tool-call ids such as `call_abc` are rewritten to
Kimi's `functions.NAME:IDX` first (`normalize_tool_call_ids`). Replies are parsed for Kimi's
native tool-call section: `message.tool_calls` carries ids `functions.NAME:IDX` with the
arguments as a JSON string, and `finish_reason` is "tool_calls" when there are any.
Supported: temperature (default 0.6), top_p, max_tokens / max_completion_tokens, stop, seed,
n = 1, stream (+ stream_options.include_usage), tools with tool_choice "auto" or "none".
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from kimi_jax.runtime.sampling import DEFAULT_TEMPERATURE
from fastapi import Request  # module level: FastAPI resolves handler annotations here
from fastapi.responses import StreamingResponse

from kimi_jax.serve.app import APIError, Server, json_body, number, sse, stop_strings, unless_disconnected
from kimi_jax.text.tool_calls import (ContentDelta, ToolCallArgumentsDelta, ToolCallStart, ToolCallStreamParser,
                                 collect_events)


def sampling_args(body: dict[str, Any], server: Server) -> dict[str, Any]:
    """temperature, top_p, seed, max_tokens and n from an OpenAI body, checked."""
    if number(body, "n", 1, 1, 1, integer=True) != 1:
        raise APIError(400, "only n = 1 is supported", param="n")
    max_tokens = number(body, "max_completion_tokens", None, 1, server.max_context, integer=True)
    max_tokens = number(body, "max_tokens", max_tokens, 1, server.max_context, integer=True)
    return {"temperature": number(body, "temperature", DEFAULT_TEMPERATURE, 0, 2),
            "top_p": number(body, "top_p", 1.0, 1e-9, 1), "seed": number(body, "seed", None, 0, 2**32 - 1, True),
            "max_tokens": max_tokens}


def chat_prompt(body: dict[str, Any], server: Server) -> tuple[list[int], bool]:
    """Token ids of the conversation, and whether tool calls are parsed from the reply."""
    from kimi_jax.text.chat_template import ChatFormatError, normalize_tool_call_ids

    messages, tools = body.get("messages"), body.get("tools")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise APIError(400, "'tools' must be a list of tool objects", param="tools")
    choice = body.get("tool_choice", "auto")
    if choice not in ("auto", "none"):
        raise APIError(400, f"tool_choice {choice!r} is not supported; use 'auto' or 'none'", param="tool_choice")
    use_tools = bool(tools) and choice == "auto"
    try:
        prompt = server.tokenizer.apply_chat_template(normalize_tool_call_ids(messages), tools if use_tools else None)
    except (ChatFormatError, TypeError, KeyError, AttributeError) as e:
        raise APIError(400, f"invalid messages: {e}", param="messages") from None
    return prompt, use_tools


def add_routes(app, server: Server) -> None:

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        body = await json_body(http)
        server.check_model(body)
        args = sampling_args(body, server)
        stops = stop_strings(body.get("stop"))
        prompt, use_tools = chat_prompt(body, server)
        request = server.request(prompt, args["max_tokens"], args["temperature"], args["top_p"], seed=args["seed"])
        meta = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()),
                "model": server.served_model_name}
        pieces = server.generate(request, stops)
        first = await unless_disconnected(http, anext(pieces))  # errors (429, …) surface before a response starts
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_chat_stream(first, pieces, request, use_tools, usage, meta),
                                     media_type="text/event-stream")
        return await unless_disconnected(http, _chat_reply(first, pieces, request, use_tools, meta))

    @app.post("/v1/completions")
    async def completions(http: Request):
        body = await json_body(http)
        server.check_model(body)
        args = sampling_args(body, server)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            ids = server.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         and 0 <= t < server.model.config.vocab_size for t in prompt):
            ids = prompt
        else:
            raise APIError(400, "'prompt' must be a non-empty string or a list of token ids in the vocabulary",
                           param="prompt")
        max_tokens = 16 if args["max_tokens"] is None else args["max_tokens"]  # OpenAI's default
        request = server.request(ids, max_tokens, args["temperature"], args["top_p"], seed=args["seed"])
        meta = {"id": f"cmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": server.served_model_name}
        pieces = server.generate(request, stop_strings(body.get("stop")))
        first = await unless_disconnected(http, anext(pieces))
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_completion_stream(first, pieces, request, usage, meta),
                                     media_type="text/event-stream")
        return await unless_disconnected(http, _completion_reply(first, pieces, request, meta))


class Tally:
    """Generated tokens counted as pieces go by (for `usage`)."""

    def __init__(self, request):
        self.prompt, self.completion = len(request.prompt), 0

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "total_tokens": self.prompt + self.completion}


async def _all(first, pieces, tally: Tally):
    """The first piece and the rest, counted; closing early cancels the generation."""
    try:
        tally.completion += first.tokens
        yield first
        async for piece in pieces:
            tally.completion += piece.tokens
            yield piece
    finally:
        await pieces.aclose()


def _finish(reason: str, any_call: bool) -> str:
    return "tool_calls" if any_call and reason != "length" else reason


async def _completion_reply(first, pieces, request, meta: dict) -> dict:
    text, reason, tally = "", None, Tally(request)
    async for piece in _all(first, pieces, tally):
        text, reason = text + piece.text, piece.finish_reason
    return {**meta, "object": "text_completion",
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
            "usage": tally.usage()}


async def _chat_reply(first, pieces, request, use_tools: bool, meta: dict) -> dict:
    text, reason, tally = "", None, Tally(request)
    async for piece in _all(first, pieces, tally):
        text, reason = text + piece.text, piece.finish_reason
    if use_tools:
        parser = ToolCallStreamParser()
        content, calls = collect_events(parser.feed(text) + parser.finish())
    else:
        content, calls = text, []
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return {**meta, "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": _finish(reason, calls)}],
            "usage": tally.usage()}


async def _chat_stream(first, pieces, request, use_tools: bool, include_usage: bool, meta: dict):
    def chunk(delta, finish=None):
        return sse({**meta, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    yield chunk({"role": "assistant", "content": ""})
    parser = ToolCallStreamParser() if use_tools else None
    any_call, reason, tally = False, None, Tally(request)
    async for piece in _all(first, pieces, tally):
        reason = piece.finish_reason
        if parser is None:
            events = [ContentDelta(piece.text)] if piece.text else []
        else:
            events = parser.feed(piece.text) + (parser.finish() if reason else [])
        for event in events:
            if isinstance(event, ContentDelta):
                yield chunk({"content": event.text})
            elif isinstance(event, ToolCallStart):
                any_call = True
                yield chunk({"tool_calls": [{"index": event.index, "id": event.id, "type": "function",
                                             "function": {"name": event.name, "arguments": ""}}]})
            elif isinstance(event, ToolCallArgumentsDelta):
                yield chunk({"tool_calls": [{"index": event.index, "function": {"arguments": event.delta}}]})
    yield chunk({}, _finish(reason, any_call))
    if include_usage:
        yield sse({**meta, "object": "chat.completion.chunk", "choices": [], "usage": tally.usage()})
    yield sse("[DONE]")


async def _completion_stream(first, pieces, request, include_usage: bool, meta: dict):
    tally = Tally(request)
    async for piece in _all(first, pieces, tally):
        if piece.text or piece.finish_reason:
            yield sse({**meta, "object": "text_completion", "choices": [
                {"index": 0, "text": piece.text, "logprobs": None, "finish_reason": piece.finish_reason}]})
    if include_usage:
        yield sse({**meta, "object": "text_completion", "choices": [], "usage": tally.usage()})
    yield sse("[DONE]")
