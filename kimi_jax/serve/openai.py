"""OpenAI-compatible routes: `POST /v1/chat/completions` and `POST /v1/completions`.

Chat prompts go through the Kimi chat template (`Server.chat_prompt`: tools in its
`tool_declare` block, `role: tool` results as `## Return of {id}`, client-made tool-call ids such
as `call_abc` rewritten to Kimi's `functions.NAME:IDX`). Replies are parsed for Kimi's native
tool-call section: `message.tool_calls` carries ids `functions.NAME:IDX` with the arguments as a
JSON string, and `finish_reason` is "tool_calls" when there are any. A thinking model's reasoning
(Kimi-K2-Thinking: before `</think>`) is `message.reasoning_content` (streamed as `reasoning_content`
deltas), never part of `content`; `chat_template_kwargs: {"thinking": false}` turns that off.
Supported: temperature (default 0.6), top_p, max_tokens / max_completion_tokens, stop, seed,
n = 1, stream (+ stream_options.include_usage), tools with tool_choice "auto" or "none",
chat_template_kwargs (variables for the chat template).
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from fastapi import Request  # module level: FastAPI resolves handler annotations here

from kimi_jax.runtime.sampling import DEFAULT_TEMPERATURE
from kimi_jax.serve.server import Server
from kimi_jax.serve.streaming import Prepared, Reply, handle, sse
from kimi_jax.serve.validation import bad, boolean, got, mapping, number, stop_strings
from kimi_jax.text.reasoning import ReasoningDelta
from kimi_jax.text.tool_calls import ContentDelta, ToolCallArgumentsDelta, ToolCallStart, tool_call_dict

COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def add_routes(app, server: Server) -> None:
    """Register the OpenAI routes on `app`."""

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        return await handle(http, server, prepare_chat, chat_reply, chat_stream)

    @app.post("/v1/completions")
    async def completions(http: Request):
        return await handle(http, server, prepare_completion, completion_reply, completion_stream)


# Requests -------------------------------------------------------------------------------------
def _prepared(body: dict[str, Any], server: Server, prompt: list[int], default_max_tokens: int | None,
              use_tools: bool, prefix: str) -> Prepared:
    """The sampling fields both OpenAI routes share, checked, around `prompt`."""
    if number(body, "n", 1, 1, 1, integer=True) != 1:
        raise bad("n", "only n = 1 is supported")
    max_tokens = number(body, "max_completion_tokens", default_max_tokens, 1, server.max_context, integer=True)
    max_tokens = number(body, "max_tokens", max_tokens, 1, server.max_context, integer=True)
    request = server.request(prompt, max_tokens, number(body, "temperature", DEFAULT_TEMPERATURE, 0, 2),
                             number(body, "top_p", 1.0, 1e-9, 1),
                             seed=number(body, "seed", None, 0, 2**32 - 1, integer=True))
    options = mapping(body, "stream_options") or {}
    usage = boolean(options, "include_usage", at="stream_options")
    info = {"id": f"{prefix}-{secrets.token_hex(12)}", "created": int(time.time()), "model": server.served_model_name}
    return Prepared(request, stop_strings(body, "stop"), boolean(body, "stream"), use_tools, usage, info)


def prepare_chat(body: dict[str, Any], server: Server) -> Prepared:
    """A checked chat completion request: messages, tools and tool_choice, and the sampling fields."""
    choice = body.get("tool_choice")
    if choice is not None and choice not in ("auto", "none"):  # "required" and named functions: not built
        raise bad("tool_choice", f"only 'auto' and 'none' are supported, got {got(choice)}")
    tools = body.get("tools")
    use_tools = bool(tools) and choice != "none"
    kwargs = mapping(body, "chat_template_kwargs") or {}
    thinking = boolean(kwargs, "thinking", True, at="chat_template_kwargs")
    prompt = server.chat_prompt(body.get("messages"), tools, declare=use_tools, template_kwargs=kwargs)
    job = _prepared(body, server, prompt, None, use_tools, "chatcmpl")
    job.reasoning = server.thinks and thinking
    return job


def prepare_completion(body: dict[str, Any], server: Server) -> Prepared:
    """A checked raw completion request: `prompt` (a string, token ids, or a list of one of them)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    vocab = server.model.config.vocab_size
    if isinstance(prompt, str) and prompt:
        ids = server.tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                     and 0 <= t < vocab for t in prompt):
        ids = prompt
    else:
        raise bad("prompt", f"must be a non-empty string or an array of token ids in [0, {vocab}), got {got(prompt)}")
    return _prepared(body, server, ids, COMPLETIONS_MAX_TOKENS, False, "cmpl")


# Replies --------------------------------------------------------------------------------------
def _finish(reply: Reply) -> str:
    return "tool_calls" if reply.tool_calls and reply.finish_reason != "length" else reply.finish_reason


async def chat_reply(reply: Reply, job: Prepared) -> dict[str, Any]:
    """A whole `chat.completion`."""
    reasoning, content, calls = await reply.collect()
    message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else "")}
    if job.reasoning:
        message["reasoning_content"] = reasoning or None
    if calls:
        message["tool_calls"] = [tool_call_dict(c.id, c.name, c.arguments) for c in calls]
    return {**job.info, "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": _finish(reply)}],
            "usage": reply.usage()}


async def chat_stream(reply: Reply, job: Prepared):
    """`chat.completion.chunk` events: content deltas, tool-call deltas, the finish, usage, [DONE]."""
    def chunk(delta, finish=None):
        return sse({**job.info, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    yield chunk({"role": "assistant", "content": ""})
    async for event in reply.events():
        if isinstance(event, ReasoningDelta):
            yield chunk({"reasoning_content": event.text})
        elif isinstance(event, ContentDelta):
            yield chunk({"content": event.text})
        elif isinstance(event, ToolCallStart):
            yield chunk({"tool_calls": [{"index": event.index, "id": event.id, "type": "function",
                                         "function": {"name": event.name, "arguments": ""}}]})
        elif isinstance(event, ToolCallArgumentsDelta):
            yield chunk({"tool_calls": [{"index": event.index, "function": {"arguments": event.delta}}]})
    yield chunk({}, _finish(reply))
    if job.include_usage:
        yield sse({**job.info, "object": "chat.completion.chunk", "choices": [], "usage": reply.usage()})
    yield sse("[DONE]")


async def completion_reply(reply: Reply, job: Prepared) -> dict[str, Any]:
    """A whole `text_completion`."""
    _, text, _ = await reply.collect()
    return {**job.info, "object": "text_completion",
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reply.finish_reason}],
            "usage": reply.usage()}


async def completion_stream(reply: Reply, job: Prepared):
    """`text_completion` events: text, then the finish reason, usage, [DONE]."""
    def chunk(text, finish=None):
        return sse({**job.info, "object": "text_completion",
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]})

    async for event in reply.events():
        yield chunk(event.text)
    yield chunk("", reply.finish_reason)
    if job.include_usage:
        yield sse({**job.info, "object": "text_completion", "choices": [], "usage": reply.usage()})
    yield sse("[DONE]")
