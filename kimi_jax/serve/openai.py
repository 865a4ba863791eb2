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
from kimi_jax.serve.errors import show
from kimi_jax.serve.server import Server
from kimi_jax.serve.streaming import Prepared, Reply, handle, sse
from kimi_jax.serve.validation import (
    bad,
    boolean,
    check_fields,
    check_tools,
    got,
    mapping,
    number,
    refuse,
    stop_strings,
    string,
)
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
# Every field each route knows; any other is a 400 naming it (validation.check_fields). Those in
# INFORMATIONAL are checked for type and change nothing in the reply (as on OpenAI: they label the
# request); those in REFUSED are a 400 unless their value asks for nothing (OpenAI's default).
SAMPLING_FIELDS = ("model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n", "stream",
                   "stream_options", "user", "logprobs", "logit_bias", "presence_penalty", "frequency_penalty")
CHAT_FIELDS = SAMPLING_FIELDS + (
    "messages", "max_completion_tokens", "tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs",
    "top_logprobs", "response_format", "metadata", "store", "service_tier", "safety_identifier",
    "prompt_cache_key", "modalities", "audio", "prediction", "web_search_options", "functions", "function_call",
    "reasoning_effort", "verbosity")
COMPLETION_FIELDS = SAMPLING_FIELDS + ("prompt", "echo", "best_of", "suffix")
INFORMATIONAL = ("user", "safety_identifier", "prompt_cache_key")  # strings that label the request
_ZERO = lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0)  # noqa: E731
REFUSED: dict[str, tuple[str, object]] = {  # field -> (why, which values ask for nothing)
    "logprobs": ("log probabilities are not returned yet", lambda v: v is None or v is False),
    "top_logprobs": ("log probabilities are not returned yet", lambda v: v is None),
    "logit_bias": ("logit_bias is not applied yet", lambda v: v is None or v == {}),
    "presence_penalty": ("penalties are not applied yet", _ZERO),
    "frequency_penalty": ("penalties are not applied yet", _ZERO),
    "response_format": ("structured outputs (json_object / json_schema) need constrained decoding, not built yet",
                        lambda v: v is None or v == {"type": "text"}),
    "store": ("this server stores no completions", lambda v: v is None or v is False),
    "service_tier": ("this server has one tier", lambda v: v in (None, "auto", "default")),
    "modalities": ("this model writes text only", lambda v: v is None or v == ["text"]),
    "audio": ("this model writes text only", lambda v: v is None),
    "prediction": ("predicted outputs are not supported", lambda v: v is None),
    "web_search_options": ("this server has no web search", lambda v: v is None),
    "functions": ("the deprecated `functions` form; declare `tools`", lambda v: v is None),
    "function_call": ("the deprecated `function_call` form; use `tool_choice`", lambda v: v is None),
    "reasoning_effort": ("Kimi's reasoning has no effort setting", lambda v: v is None),
    "verbosity": ("Kimi has no verbosity setting", lambda v: v is None),
    "best_of": ("best_of > n (choosing among candidates) is not supported", lambda v: v is None or v == 1),
    "suffix": ("insertion after a suffix (fill-in-the-middle) is not supported", lambda v: v is None or v == ""),
}


def _check_fields(body: dict[str, Any], fields: tuple[str, ...]) -> None:
    """Unknown fields, informational ones' types, and refused ones' values (see the tables above)."""
    check_fields(body, fields, where="this request")
    for name in INFORMATIONAL:
        if name in fields:
            string(body, name)
    for name, (why, noop) in REFUSED.items():
        if name in fields:
            refuse(body, name, why, noop)
    metadata = mapping(body, "metadata") or {}
    for key in metadata:
        string(metadata, key, at="metadata")


def _prepared(body: dict[str, Any], server: Server, prompt: list[int], default_max_tokens: int | None,
              use_tools: bool, prefix: str) -> Prepared:
    """The sampling fields both OpenAI routes share, checked, around `prompt`."""
    if number(body, "n", 1, 1, 1, integer=True) != 1:
        raise bad("n", "only n = 1 is supported")
    max_tokens = number(body, "max_completion_tokens", default_max_tokens, 1, server.max_context, integer=True)
    max_tokens = number(body, "max_tokens", max_tokens, 1, server.max_context, integer=True)
    request = server.request(prompt, max_tokens, number(body, "temperature", DEFAULT_TEMPERATURE, 0, 2),
                             number(body, "top_p", 1.0, 1e-9, 1), number(body, "top_k", 0, 0, 2**31 - 1, integer=True),
                             seed=number(body, "seed", None, 0, 2**32 - 1, integer=True))
    options = mapping(body, "stream_options") or {}
    check_fields(options, ("include_usage", "include_obfuscation"), at="stream_options")
    usage = boolean(options, "include_usage", at="stream_options")
    boolean(options, "include_obfuscation", at="stream_options")  # no padding is added either way
    stream = boolean(body, "stream")
    if options and not stream:
        raise bad("stream_options", "only applies with stream: true")
    info = {"id": f"{prefix}-{secrets.token_hex(12)}", "created": int(time.time()), "model": server.served_model_name}
    return Prepared(request, stop_strings(body, "stop"), stream, use_tools, usage, info)


def _tool_choice(body: dict[str, Any], names: list[str]) -> str:
    """`tool_choice` checked: "auto" (the default with tools), "none" (the default without);
    "required" and a named function are refused (they need constrained decoding)."""
    choice = body.get("tool_choice")
    if choice is None:
        return "auto" if names else "none"
    if isinstance(choice, dict):
        check_fields(choice, ("type", "function"), at="tool_choice")
        string(choice, "type", at="tool_choice", required=True, choices=("function",))
        function = mapping(choice, "function", at="tool_choice", required=True)
        name = string(function, "name", at="tool_choice.function", required=True)
        if name not in names:
            raise bad("tool_choice.function.name", f"{show(name)} is not one of the declared tools "
                                                   f"({', '.join(names) or 'none declared'})")
        raise bad("tool_choice", "not supported: forcing a named function needs constrained decoding, not built "
                                 "yet; use 'auto'")
    if choice == "required":
        raise bad("tool_choice", "not supported: 'required' needs constrained decoding, not built yet; use 'auto'")
    if choice not in ("auto", "none"):
        raise bad("tool_choice", f"must be 'auto', 'none', 'required' or {{type: 'function', function: {{name}}}}, "
                                 f"got {got(choice)}")
    return choice


def prepare_chat(body: dict[str, Any], server: Server) -> Prepared:
    """A checked chat completion request: messages, tools and tool_choice, and the sampling fields."""
    _check_fields(body, CHAT_FIELDS)
    tools = body.get("tools")
    names = check_tools(tools)
    use_tools = _tool_choice(body, names) != "none"
    parallel = boolean(body, "parallel_tool_calls", True)
    kwargs = mapping(body, "chat_template_kwargs") or {}
    thinking = boolean(kwargs, "thinking", True, at="chat_template_kwargs")
    prompt = server.chat_prompt(body.get("messages"), tools, declare=use_tools, template_kwargs=kwargs)
    job = _prepared(body, server, prompt, None, use_tools, "chatcmpl")
    job.reasoning = server.thinks and thinking
    job.parallel_tool_calls = parallel
    return job


def prepare_completion(body: dict[str, Any], server: Server) -> Prepared:
    """A checked raw completion request: `prompt` (a string, token ids, or a list of one of them)."""
    _check_fields(body, COMPLETION_FIELDS)
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
    job = _prepared(body, server, ids, COMPLETIONS_MAX_TOKENS, False, "cmpl")
    if boolean(body, "echo"):  # the prompt's text comes first in the reply, as OpenAI writes it
        job.echo = prompt if isinstance(prompt, str) else server.tokenizer.decode(ids)
    return job


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
    """A whole `text_completion` (after the prompt's text with `echo`)."""
    _, text, _ = await reply.collect()
    return {**job.info, "object": "text_completion",
            "choices": [{"index": 0, "text": job.echo + text, "logprobs": None, "finish_reason": reply.finish_reason}],
            "usage": reply.usage()}


async def completion_stream(reply: Reply, job: Prepared):
    """`text_completion` events: text, then the finish reason, usage, [DONE]."""
    def chunk(text, finish=None):
        return sse({**job.info, "object": "text_completion",
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]})

    if job.echo:
        yield chunk(job.echo)
    async for event in reply.events():
        yield chunk(event.text)
    yield chunk("", reply.finish_reason)
    if job.include_usage:
        yield sse({**job.info, "object": "text_completion", "choices": [], "usage": reply.usage()})
    yield sse("[DONE]")
