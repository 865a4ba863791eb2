"""OpenAI-compatible routes: `POST /v1/chat/completions` and `POST /v1/completions`.

Chat prompts go through the Kimi chat template (`Server.chat_prompt`: tools in its
`tool_declare` block, `role: tool` results as `## Return of {id}`, client-made tool-call ids such
as `call_abc` rewritten to Kimi's `functions.NAME:IDX`). Replies are parsed for Kimi's native
tool-call section: `message.tool_calls` carries ids `functions.NAME:IDX` with the arguments as a
JSON string, and `finish_reason` is "tool_calls" when there are any. A thinking model's reasoning
(Kimi-K2-Thinking: before `</think>`) is `message.reasoning_content` (streamed as `reasoning_content`
deltas), never part of `content`; `chat_template_kwargs: {"thinking": false}` turns that off.
Implemented: temperature (default 0.6), top_p, top_k, max_tokens / max_completion_tokens, stop, seed,
n (choice i samples with seed + i; all share one prefill), stream (+ stream_options), tools with
tool_choice "auto", "none", "required" or a named function, response_format json_object / json_schema
(both by constrained decoding: `Server.json_constraint`, `Server.tool_constraint`), parallel_tool_calls,
logprobs / top_logprobs (chat) and logprobs
(completions: log-softmax of the model's fp32 logits), logit_bias and presence / frequency penalties
(applied on device), echo (completions), chat_template_kwargs, return_tokens_as_token_ids (vLLM's).
Every other field is refused by name (the tables below), unless its value asks for nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from functools import partial
from typing import Any

from fastapi import Request  # module level: FastAPI resolves handler annotations here

from kimi_jax.runtime.sampling import DEFAULT_TEMPERATURE, MAX_LOGIT_BIAS, TOP_LOGPROBS
from kimi_jax.serve.errors import show
from kimi_jax.serve.server import Server
from kimi_jax.serve.streaming import Prepared, Reply, handle, merge, sse
from kimi_jax.serve.validation import (
    bad,
    boolean,
    check_fields,
    check_schema,
    check_tools,
    got,
    mapping,
    number,
    path_of,
    refuse,
    stop_strings,
    string,
    tool_name,
)
from kimi_jax.text.reasoning import ReasoningDelta
from kimi_jax.text.tool_calls import ContentDelta, ToolCallArgumentsDelta, ToolCallStart, tool_call_dict

COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def add_routes(app, server: Server) -> None:
    """Register the OpenAI routes on `app`."""

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        return await handle(http, server, prepare_chat, partial(chat_reply, tokenizer=server.tokenizer),
                            partial(chat_stream, tokenizer=server.tokenizer))

    @app.post("/v1/completions")
    async def completions(http: Request):
        return await handle(http, server, prepare_completion, partial(completion_reply, tokenizer=server.tokenizer),
                            partial(completion_stream, tokenizer=server.tokenizer))


# Requests -------------------------------------------------------------------------------------
# Every field each route knows; any other is a 400 naming it (validation.check_fields). Those in
# INFORMATIONAL are checked for type and change nothing in the reply (as on OpenAI: they label the
# request); those in REFUSED are a 400 unless their value asks for nothing (OpenAI's default).
SAMPLING_FIELDS = ("model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n", "stream",
                   "stream_options", "user", "logprobs", "logit_bias", "presence_penalty", "frequency_penalty",
                   "return_tokens_as_token_ids")
CHAT_FIELDS = SAMPLING_FIELDS + (
    "messages", "max_completion_tokens", "tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs",
    "top_logprobs", "response_format", "metadata", "store", "service_tier", "safety_identifier",
    "prompt_cache_key", "modalities", "audio", "prediction", "web_search_options", "functions", "function_call",
    "reasoning_effort", "verbosity")
COMPLETION_FIELDS = SAMPLING_FIELDS + ("prompt", "echo", "best_of", "suffix")
INFORMATIONAL = ("user", "safety_identifier", "prompt_cache_key")  # strings that label the request
REFUSED: dict[str, tuple[str, object]] = {  # field -> (why, which values ask for nothing)
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


def _logit_bias(body: dict[str, Any], vocab: int) -> tuple[tuple[int, float], ...]:
    """`logit_bias` {"token id": bias in [−100, 100]}, at most MAX_LOGIT_BIAS entries."""
    bias = mapping(body, "logit_bias") or {}
    if len(bias) > MAX_LOGIT_BIAS:
        raise bad("logit_bias", f"at most {MAX_LOGIT_BIAS} entries, got {len(bias)}")
    for key in bias:
        if not (key.isascii() and key.isdigit() and int(key) < vocab):
            raise bad(path_of("logit_bias", key), f"keys must be token ids in [0, {vocab}), got {show(key)}")
        number(bias, key, None, -100, 100, at="logit_bias")
    return tuple((int(key), float(value)) for key, value in bias.items())


def _prepared(body: dict[str, Any], server: Server, prompt: list[int], default_max_tokens: int | None,
              use_tools: bool, prefix: str) -> Prepared:
    """The sampling fields both OpenAI routes share, checked, around `prompt`."""
    n = number(body, "n", 1, 1, server.scheduler.max_batch, integer=True)
    max_tokens = number(body, "max_completion_tokens", default_max_tokens, 1, server.max_context, integer=True)
    max_tokens = number(body, "max_tokens", max_tokens, 1, server.max_context, integer=True)
    request = server.request(prompt, max_tokens, number(body, "temperature", DEFAULT_TEMPERATURE, 0, 2),
                             number(body, "top_p", 1.0, 1e-9, 1), number(body, "top_k", 0, 0, 2**31 - 1, integer=True),
                             seed=number(body, "seed", None, 0, 2**32 - 1, integer=True),
                             presence_penalty=number(body, "presence_penalty", 0.0, -2, 2),
                             frequency_penalty=number(body, "frequency_penalty", 0.0, -2, 2),
                             logit_bias=_logit_bias(body, server.model.config.vocab_size))
    options = mapping(body, "stream_options") or {}
    check_fields(options, ("include_usage", "include_obfuscation"), at="stream_options")
    usage = boolean(options, "include_usage", at="stream_options")
    boolean(options, "include_obfuscation", at="stream_options")  # no padding is added either way
    stream = boolean(body, "stream")
    if options and not stream:
        raise bad("stream_options", "only applies with stream: true")
    info = {"id": f"{prefix}-{secrets.token_hex(12)}", "created": int(time.time()), "model": server.served_model_name}
    job = Prepared(request, stop_strings(body, "stop"), stream, use_tools, usage, info, n=n)
    job.token_ids = boolean(body, "return_tokens_as_token_ids")  # vLLM's: logprobs name tokens "token_id:ID"
    return job


def _tool_choice(body: dict[str, Any], names: list[str]) -> tuple[str, str | None]:
    """`tool_choice` checked -> (choice, name): "auto" (the default with tools), "none" (the default
    without), "required", or ("named", the function's name)."""
    choice = body.get("tool_choice")
    if choice is None:
        return ("auto" if names else "none"), None
    if isinstance(choice, dict):
        check_fields(choice, ("type", "function"), at="tool_choice")
        string(choice, "type", at="tool_choice", required=True, choices=("function",))
        function = mapping(choice, "function", at="tool_choice", required=True)
        name = string(function, "name", at="tool_choice.function", required=True)
        if name not in names:
            raise bad("tool_choice.function.name", f"{show(name)} is not one of the declared tools "
                                                   f"({', '.join(names) or 'none declared'})")
        return "named", name
    if choice not in ("auto", "none", "required"):
        raise bad("tool_choice", f"must be 'auto', 'none', 'required' or {{type: 'function', function: {{name}}}}, "
                                 f"got {got(choice)}")
    if choice == "required" and not names:
        raise bad("tool_choice", "'required' needs tools to call: declare them in `tools`")
    return choice, None


def _response_format(body: dict[str, Any]) -> tuple[bool, dict[str, Any] | None]:
    """`response_format` checked -> (the reply is JSON, its schema or None for any JSON object)."""
    fmt = mapping(body, "response_format")
    kind = string(fmt or {}, "type", "text", at="response_format", choices=("text", "json_object", "json_schema"))
    check_fields(fmt or {}, ("type", "json_schema") if kind == "json_schema" else ("type",), at="response_format")
    if kind != "json_schema":
        return kind == "json_object", None
    spec = mapping(fmt, "json_schema", at="response_format", required=True)
    at = "response_format.json_schema"
    check_fields(spec, ("name", "description", "schema", "strict"), at=at)
    tool_name(spec, at)  # OpenAI's rule for the name: the tools' one
    string(spec, "description", at=at)
    boolean(spec, "strict", at=at)  # strict or not, the schema is enforced
    schema = mapping(spec, "schema", at=at) or {}
    check_schema(schema, path_of(at, "schema"), object_only=False)
    return True, schema


def prepare_chat(body: dict[str, Any], server: Server) -> Prepared:
    """A checked chat completion request: messages, tools and tool_choice, and the sampling fields."""
    _check_fields(body, CHAT_FIELDS)
    tools = body.get("tools")
    names = check_tools(tools)
    choice, name = _tool_choice(body, names)
    use_tools = choice != "none"
    parallel = boolean(body, "parallel_tool_calls", True)
    json_reply, schema = _response_format(body)
    if json_reply and use_tools:
        raise bad("response_format", "a JSON reply with tools is not supported: set tool_choice 'none', or leave "
                                     "response_format out")
    kwargs = mapping(body, "chat_template_kwargs") or {}
    thinking = boolean(kwargs, "thinking", True, at="chat_template_kwargs")
    prompt = server.chat_prompt(body.get("messages"), tools, declare=use_tools, template_kwargs=kwargs)
    job = _prepared(body, server, prompt, None, use_tools, "chatcmpl")
    job.reasoning = server.thinks and thinking
    job.parallel_tool_calls = parallel
    at = "response_format" if schema is None else "response_format.json_schema.schema"
    constraint = (server.json_constraint(schema, at, job.reasoning) if json_reply else
                  server.tool_constraint(tools, choice, name, parallel, job.reasoning))
    job.request = dataclasses.replace(job.request, constraint=constraint)
    top = number(body, "top_logprobs", None, 0, TOP_LOGPROBS, integer=True)
    if boolean(body, "logprobs"):
        job.top_logprobs = top or 0
    elif top is not None:
        raise bad("top_logprobs", "needs logprobs: true")
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
    best_of = number(body, "best_of", None, 1, 2**31 - 1, integer=True)
    if best_of not in (None, job.n):
        raise bad("best_of", f"not supported: choosing the best of {best_of} candidates; leave it unset or "
                             f"equal to n ({job.n})")
    job.top_logprobs = number(body, "logprobs", None, 0, TOP_LOGPROBS, integer=True)
    if boolean(body, "echo"):  # the prompt's text comes first in the reply, as OpenAI writes it
        if job.top_logprobs is not None:
            raise bad("echo", "not supported with logprobs: the prompt's log probabilities are not computed")
        job.echo = prompt if isinstance(prompt, str) else server.tokenizer.decode(ids)
    return job


# Replies --------------------------------------------------------------------------------------
def _finish(reply: Reply) -> str:
    return "tool_calls" if reply.tool_calls and reply.finish_reason != "length" else reply.finish_reason


def _usage(replies: list[Reply]) -> dict[str, int]:
    """`usage` of all choices: the prompt once (its prefill is shared), every choice's tokens."""
    prompt, made = replies[0].prompt_tokens, sum(r.completion_tokens for r in replies)
    return {"prompt_tokens": prompt, "completion_tokens": made, "total_tokens": prompt + made}


def _token(tokenizer, token_id: int, as_id: bool = False) -> tuple[str, list[int]]:
    """A token as log probabilities list it: its text (or `token_id:ID` with `as_id`) and its bytes."""
    data = tokenizer.token_bytes(token_id)
    return f"token_id:{token_id}" if as_id else data.decode("utf-8", errors="replace"), list(data)


def chat_logprobs(tokenizer, entries: list, k: int, as_id: bool = False) -> dict[str, Any]:
    """OpenAI's chat `logprobs`: {content: [{token, logprob, bytes, top_logprobs: [k of them]}], refusal}."""
    content = []
    for token_id, _, (logprob, top) in entries:
        text, data = _token(tokenizer, token_id, as_id)
        alternatives = [dict(zip(("token", "bytes"), _token(tokenizer, i, as_id)), logprob=v) for i, v in top[:k]]
        content.append({"token": text, "logprob": logprob, "bytes": data, "top_logprobs": alternatives})
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer, entries: list, k: int, as_id: bool = False) -> dict[str, Any]:
    """OpenAI's legacy completion `logprobs`: tokens, token_logprobs, top_logprobs ({token: logprob}), text_offset."""
    return {"tokens": [_token(tokenizer, t, as_id)[0] for t, _, _ in entries],
            "token_logprobs": [lp for _, _, (lp, _) in entries],
            "top_logprobs": [{_token(tokenizer, i, as_id)[0]: v for i, v in top[:k]} for _, _, (_, top) in entries],
            "text_offset": [offset for _, offset, _ in entries]}


def _listing(style, tokenizer, entries: list, job: Prepared) -> dict[str, Any] | None:
    """`entries` in `style` (chat_logprobs, completion_logprobs), or None when the request asks for none."""
    return None if job.top_logprobs is None else style(tokenizer, entries, job.top_logprobs, job.token_ids)


async def chat_reply(replies: list[Reply], job: Prepared, tokenizer) -> dict[str, Any]:
    """A whole `chat.completion`, one choice per reply."""
    results = await asyncio.gather(*(reply.collect() for reply in replies))
    choices = []
    for index, (reply, (reasoning, content, calls)) in enumerate(zip(replies, results)):
        message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else "")}
        if job.reasoning:
            message["reasoning_content"] = reasoning or None
        if calls:
            message["tool_calls"] = [tool_call_dict(c.id, c.name, c.arguments) for c in calls]
        logprobs = _listing(chat_logprobs, tokenizer, reply.logprobs, job)
        choices.append({"index": index, "message": message, "logprobs": logprobs, "finish_reason": _finish(reply)})
    return {**job.info, "object": "chat.completion", "choices": choices, "usage": _usage(replies)}


async def _chat_choice(reply: Reply, job: Prepared, index: int, tokenizer):
    """One choice's `chat.completion.chunk` choices: its deltas (with the log probabilities of the
    tokens read since the previous chunk), then its finish."""
    def choice(delta, finish=None):
        logprobs = _listing(chat_logprobs, tokenizer, reply.take_logprobs(), job)
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    yield choice({"role": "assistant", "content": ""})
    async for event in reply.events(incremental=True):  # arguments streamed as generated, as vLLM does
        if isinstance(event, ReasoningDelta):
            yield choice({"reasoning_content": event.text})
        elif isinstance(event, ContentDelta):
            yield choice({"content": event.text})
        elif isinstance(event, ToolCallStart):
            yield choice({"tool_calls": [{"index": event.index, "id": event.id, "type": "function",
                                          "function": {"name": event.name, "arguments": ""}}]})
        elif isinstance(event, ToolCallArgumentsDelta):
            yield choice({"tool_calls": [{"index": event.index, "function": {"arguments": event.delta}}]})
    yield choice({}, _finish(reply))


async def chat_stream(replies: list[Reply], job: Prepared, tokenizer):
    """`chat.completion.chunk` events: each choice's deltas as they come, its finish, then usage, [DONE]."""
    async for choice in merge([_chat_choice(r, job, i, tokenizer) for i, r in enumerate(replies)]):
        yield sse({**job.info, "object": "chat.completion.chunk", "choices": [choice]})
    if job.include_usage:
        yield sse({**job.info, "object": "chat.completion.chunk", "choices": [], "usage": _usage(replies)})
    yield sse("[DONE]")


async def completion_reply(replies: list[Reply], job: Prepared, tokenizer) -> dict[str, Any]:
    """A whole `text_completion` (each choice's text after the prompt's with `echo`)."""
    results = await asyncio.gather(*(reply.collect() for reply in replies))
    choices = [{"index": i, "text": job.echo + text, "finish_reason": reply.finish_reason,
                "logprobs": _listing(completion_logprobs, tokenizer, reply.logprobs, job)}
               for i, (reply, (_, text, _)) in enumerate(zip(replies, results))]
    return {**job.info, "object": "text_completion", "choices": choices, "usage": _usage(replies)}


async def _completion_choice(reply: Reply, job: Prepared, index: int, tokenizer):
    def choice(text, finish=None):
        logprobs = _listing(completion_logprobs, tokenizer, reply.take_logprobs(), job)
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    if job.echo:
        yield choice(job.echo)
    async for event in reply.events():
        yield choice(event.text)
    yield choice("", reply.finish_reason)


async def completion_stream(replies: list[Reply], job: Prepared, tokenizer):
    """`text_completion` events: each choice's text as it comes, its finish, then usage, [DONE]."""
    async for choice in merge([_completion_choice(r, job, i, tokenizer) for i, r in enumerate(replies)]):
        yield sse({**job.info, "object": "text_completion", "choices": [choice]})
    if job.include_usage:
        yield sse({**job.info, "object": "text_completion", "choices": [], "usage": _usage(replies)})
    yield sse("[DONE]")
