"""Anthropic-compatible route: `POST /v1/messages`.

The request is mapped onto the OpenAI message shape and rendered by the same prompt builder
(`Server.chat_prompt`): `system` becomes the system turn, `tool_use` blocks become assistant tool
calls, `tool_result` blocks become `role: tool` messages, and `tools` ({name, description,
input_schema}) become OpenAI-style function declarations. Blocks are checked as they are mapped,
so errors name Anthropic's own paths (`messages[1].content[0].tool_use_id`). As the release's own
Anthropic endpoint does, the temperature used is `request temperature × 0.6` (Anthropic's default
of 1.0 gives the recommended 0.6).

Replies carry `text` and `tool_use` blocks (ids are Kimi's `functions.NAME:IDX`, input parsed from
the JSON arguments), and a thinking model's reasoning as a `thinking` block before them (its
`signature` is empty: nothing signs it); `stream: true` sends Anthropic's events (message_start,
content_block_start/delta/stop with `thinking_delta` / `text_delta` / `input_json_delta`,
message_delta, message_stop). `thinking: {"type": "disabled"}` leaves the reasoning in the text, and
`thinking` blocks an assistant turn sends back become its `reasoning_content` for the template.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from typing import Any

from fastapi import Request  # module level: FastAPI resolves handler annotations here

from kimi_jax.serve.errors import show
from kimi_jax.serve.server import Server
from kimi_jax.serve.streaming import Prepared, Reply, handle, sse
from kimi_jax.serve.validation import (
    TEXT_ONLY,
    array,
    bad,
    boolean,
    check_fields,
    check_schema,
    get,
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
from kimi_jax.text.tool_calls import ContentDelta, ToolCallArgumentsDelta, ToolCallEnd, ToolCallStart

TEMPERATURE_SCALE = 0.6  # temperature_used = request temperature × 0.6, as the release maps it
STOP_REASONS = {"length": "max_tokens", "stop": "end_turn"}


def add_routes(app, server: Server) -> None:
    """Register the Anthropic route on `app`."""

    @app.post("/v1/messages")
    async def messages(http: Request):
        return await handle(http, server, prepare, reply_whole, reply_stream)


# Requests -------------------------------------------------------------------------------------
MESSAGES_FIELDS = ("model", "messages", "max_tokens", "system", "stop_sequences", "stream", "temperature", "top_p",
                   "top_k", "tools", "tool_choice", "thinking", "metadata", "service_tier", "container",
                   "mcp_servers", "context_management")
REFUSED = {"container": "this server runs no code containers", "mcp_servers": "this server connects to no MCP servers",
           "context_management": "this server edits no context"}


def prepare(body: dict[str, Any], server: Server) -> Prepared:
    """A checked Messages request: the conversation, tools and tool_choice, and the sampling fields."""
    check_fields(body, MESSAGES_FIELDS, where="a Messages request")
    for name, why in REFUSED.items():
        refuse(body, name, why)
    metadata = mapping(body, "metadata") or {}
    check_fields(metadata, ("user_id",), at="metadata")
    string(metadata, "user_id", at="metadata")  # labels the request; changes nothing
    string(body, "service_tier", choices=("auto", "standard_only"))  # one tier here: both mean it
    max_tokens = number(body, "max_tokens", None, 1, server.max_context, integer=True, required=True)
    temperature = number(body, "temperature", 1.0, 0, 1) * TEMPERATURE_SCALE
    top_p = number(body, "top_p", 1.0, 1e-9, 1)
    top_k = number(body, "top_k", 0, 0, 2**31 - 1, integer=True)
    tools = to_openai_tools(body)
    kind, name, parallel = _tool_choice(body, [t["function"]["name"] for t in tools or ()])
    use_tools = bool(tools) and kind != "none"
    thinking = mapping(body, "thinking") or {"type": "enabled"}
    thinks = _thinking(thinking, max_tokens)
    prompt = server.chat_prompt(to_openai_messages(body), tools, declare=use_tools,
                                template_kwargs=None if thinks else {"thinking": False})
    reasoning = server.thinks and thinks
    choice = {"any": "required", "tool": "named"}.get(kind, kind)  # OpenAI's names (Server.tool_constraint)
    request = dataclasses.replace(server.request(prompt, max_tokens, temperature, top_p, top_k),
                                  constraint=server.tool_constraint(tools, choice, name, parallel, reasoning))
    info = {"id": f"msg_{secrets.token_hex(12)}", "model": server.served_model_name}
    return Prepared(request, stop_strings(body, "stop_sequences"), boolean(body, "stream"), use_tools,
                    reasoning=reasoning, parallel_tool_calls=parallel, info=info)


def _tool_choice(body: dict[str, Any], names: list[str]) -> tuple[str, str | None, bool]:
    """`tool_choice` {type: auto | none | any | tool, name, disable_parallel_tool_use} -> (type, name,
    parallel). `any` and `tool` force a call (constrained decoding)."""
    choice = mapping(body, "tool_choice") or {"type": "auto"}
    check_fields(choice, ("type", "name", "disable_parallel_tool_use"), at="tool_choice")
    kind = string(choice, "type", at="tool_choice", required=True, choices=("auto", "none", "any", "tool"))
    parallel = not boolean(choice, "disable_parallel_tool_use", at="tool_choice")
    name = None
    if kind == "tool":
        name = string(choice, "name", at="tool_choice", required=True)
        if name not in names:
            raise bad("tool_choice.name", f"{show(name)} is not one of the declared tools "
                                          f"({', '.join(names) or 'none declared'})")
    elif choice.get("name") is not None:
        raise bad("tool_choice.name", f"only tool_choice type 'tool' takes a name, not {kind!r}")
    if kind in ("any", "tool") and not names:
        raise bad("tool_choice.type", f"{kind!r} forces a tool call: declare the tools in `tools`")
    return kind, name, parallel


def _thinking(thinking: dict[str, Any], max_tokens: int) -> bool:
    """`thinking` {type: enabled | disabled, budget_tokens}: whether the model reasons apart. Kimi's
    reasoning length has no budget: `budget_tokens` (required with enabled by Anthropic's API, and
    ≥ 1024, < max_tokens) is checked and documented as not enforced; max_tokens bounds it all."""
    check_fields(thinking, ("type", "budget_tokens"), at="thinking")
    thinks = string(thinking, "type", at="thinking", required=True, choices=("enabled", "disabled")) == "enabled"
    if thinking.get("budget_tokens") is not None:
        if not thinks:
            raise bad("thinking.budget_tokens", "only applies with thinking type 'enabled'")
        number(thinking, "budget_tokens", None, 1, max(max_tokens - 1, 1), integer=True, at="thinking")
    return thinks


BLOCK_FIELDS = {"text": ("type", "text", "cache_control", "citations"),
                "thinking": ("type", "thinking", "signature", "cache_control"),
                "redacted_thinking": ("type", "data", "cache_control"),
                "tool_use": ("type", "id", "name", "input", "cache_control"),
                "tool_result": ("type", "tool_use_id", "content", "is_error", "cache_control")}
IS_ERROR_PREFIX = "Error: "  # how a tool_result with is_error: true reaches the template (it has no flag)


def _block(block: Any, at: str, kinds: tuple[str, ...]) -> str:
    """A content block's `type`, one of `kinds`, with its fields checked; image and document blocks are
    refused (the model is text-only). `cache_control` is checked and has no effect: nothing is cached."""
    if not isinstance(block, dict):
        raise bad(at, f"must be a content block object with a 'type', got {got(block)}")
    kind = string(block, "type", at=at, required=True)
    if kind in ("image", "document", "search_result"):
        raise bad(path_of(at, "type"), f"{show(kind)}: {TEXT_ONLY}")
    if kind not in kinds:
        raise bad(path_of(at, "type"), f"block type {show(kind)} is not supported here (supported: "
                                       f"{', '.join(kinds)})")
    check_fields(block, BLOCK_FIELDS[kind], at=at, where=f"a {kind} block")
    mapping(block, "cache_control", at=at)
    refuse(block, "citations", "citations in a request have no form in Kimi's template",
           noop=lambda v: v is None or v == [], at=at)
    return kind


def _text(content: Any, at: str) -> str:
    """A string, or the text of an array of text blocks."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(at, f"must be a string or an array of text blocks, got {got(content)}")
    texts = []
    for j, block in enumerate(content):
        _block(block, path_of(at, j), ("text",))
        texts.append(string(block, "text", at=path_of(at, j), required=True))
    return "".join(texts)


def to_openai_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Anthropic `system` + `messages` -> OpenAI-style messages for the chat template."""
    out = []
    if get(body, "system") is not None:
        out.append({"role": "system", "content": _text(body["system"], "system")})
    for i, message in enumerate(array(body, "messages", required=True, non_empty=True)):
        where = path_of("messages", i)
        if not isinstance(message, dict):
            raise bad(where, f"must be a message object with 'role' and 'content', got {got(message)}")
        check_fields(message, ("role", "content"), at=where, where="a message")
        role = string(message, "role", at=where, required=True, choices=("user", "assistant"))
        content = get(message, "content", where, required=True)
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise bad(path_of(where, "content"), f"must be a string or an array of content blocks, got {got(content)}")
        kinds = ("text", "thinking", "redacted_thinking", "tool_use") if role == "assistant" else \
            ("text", "tool_result")
        text, calls, thoughts = [], [], []
        for j, block in enumerate(content):
            at = path_of(path_of(where, "content"), j)
            kind = _block(block, at, kinds)
            if kind == "text":
                text.append(string(block, "text", at=at, required=True))
            elif kind == "thinking":
                thoughts.append(string(block, "thinking", at=at, required=True))
                string(block, "signature", at=at)
            elif kind == "redacted_thinking":
                string(block, "data", at=at)  # encrypted by another provider: nothing the template can render
            elif kind == "tool_use":
                calls.append(_tool_call(block, at))
            else:  # tool_result
                result = get(block, "content")
                result = "" if result is None else _text(result, path_of(at, "content"))
                failed = boolean(block, "is_error", at=at)
                out.append({"role": "tool", "tool_call_id": string(block, "tool_use_id", at=at, required=True),
                            "content": IS_ERROR_PREFIX + result if failed else result})
        reasoning = {"reasoning_content": "".join(thoughts)} if thoughts else {}
        if calls:
            out.append({"role": "assistant", "content": "".join(text) or None, "tool_calls": calls, **reasoning})
        elif text or thoughts:
            out.append({"role": role, "content": "".join(text), **reasoning})
    return out


def _tool_call(block: dict[str, Any], at: str) -> dict[str, Any]:
    """A `tool_use` block as an OpenAI tool call."""
    call_id = string(block, "id", at=at, required=True)
    name = string(block, "name", at=at, required=True)
    arguments = mapping(block, "input", at=at, required=True)
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def to_openai_tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Anthropic `tools` ({name, description, input_schema}) -> OpenAI function declarations; each
    input_schema a valid JSON Schema of `type: object`, names distinct. Server tools (web search, code
    execution, …: a `type` other than "custom") are refused: this server runs none."""
    tools = array(body, "tools")
    if tools is None:
        return None
    out, names = [], []
    for i, tool in enumerate(tools):
        where = path_of("tools", i)
        if not isinstance(tool, dict):
            raise bad(where, f"must be a tool object {{name, description, input_schema}}, got {got(tool)}")
        kind = string(tool, "type", "custom", at=where)
        if kind != "custom":
            raise bad(path_of(where, "type"), f"not supported: {show(kind)} is a server tool; this server runs "
                                              "none (declare custom tools: name, description, input_schema)")
        check_fields(tool, ("type", "name", "description", "input_schema", "cache_control"), at=where,
                     where="a tool")
        mapping(tool, "cache_control", at=where)
        name = tool_name(tool, where)
        if name in names:
            raise bad(path_of(where, "name"), f"{name!r} is declared twice (tools[{names.index(name)}] has it)")
        names.append(name)
        schema = mapping(tool, "input_schema", at=where, required=True)
        string(schema, "type", at=path_of(where, "input_schema"), required=True, choices=("object",))
        check_schema(schema, path_of(where, "input_schema"))
        out.append({"type": "function", "function": {
            "name": name, "description": string(tool, "description", "", at=where), "parameters": schema}})
    return out


# Replies --------------------------------------------------------------------------------------
def _stop_reason(reply: Reply) -> str:
    if reply.stop_sequence is not None:
        return "stop_sequence"
    if reply.tool_calls and reply.finish_reason != "length":
        return "tool_use"
    return STOP_REASONS[reply.finish_reason]


def _tool_use(call: ToolCallEnd) -> dict[str, Any]:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": json.loads(call.arguments)}


async def reply_whole(replies: list[Reply], job: Prepared) -> dict[str, Any]:
    """A whole `message`: a thinking block (a thinking model's reasoning), a text block (unless the reply
    is only tool calls) and tool_use blocks."""
    reply, = replies  # Anthropic's API has one choice
    reasoning, content, calls = await reply.collect()
    blocks = [{"type": "thinking", "thinking": reasoning, "signature": ""}] if reasoning else []
    blocks += ([{"type": "text", "text": content}] if content or not calls else []) + [_tool_use(c) for c in calls]
    return {**job.info, "type": "message", "role": "assistant", "content": blocks,
            "stop_reason": _stop_reason(reply), "stop_sequence": reply.stop_sequence,
            "usage": {"input_tokens": reply.prompt_tokens, "output_tokens": reply.completion_tokens}}


async def reply_stream(replies: list[Reply], job: Prepared):
    """Anthropic's events; a tool call's block starts when the model opens the call, its input comes
    as `input_json_delta`s as the arguments are generated, and the block stops with the call."""
    reply, = replies  # Anthropic's API has one choice
    yield sse({"type": "message_start", "message": {
        **job.info, "type": "message", "role": "assistant", "content": [], "stop_reason": None,
        "stop_sequence": None, "usage": {"input_tokens": reply.prompt_tokens, "output_tokens": 0}}}, "message_start")
    index, open_block = 0, None  # the kind of the block being streamed: "thinking", "text" or None
    deltas = {"thinking": ("thinking_delta", "thinking"), "text": ("text_delta", "text")}
    async for event in reply.events(incremental=True):  # a call's input streamed as generated
        kind = "thinking" if isinstance(event, ReasoningDelta) else "text" if isinstance(event, ContentDelta) else None
        if open_block is not None and kind != open_block:
            yield sse({"type": "content_block_stop", "index": index}, "content_block_stop")
            index, open_block = index + 1, None
        if kind is not None:
            if open_block is None:
                start = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else \
                    {"type": "text", "text": ""}
                yield sse({"type": "content_block_start", "index": index, "content_block": start},
                          "content_block_start")
                open_block = kind
            delta, field = deltas[kind]
            yield sse({"type": "content_block_delta", "index": index,
                       "delta": {"type": delta, field: event.text}}, "content_block_delta")
        elif isinstance(event, ToolCallStart):
            yield sse({"type": "content_block_start", "index": index, "content_block": {
                "type": "tool_use", "id": event.id, "name": event.name, "input": {}}}, "content_block_start")
        elif isinstance(event, ToolCallArgumentsDelta):
            yield sse({"type": "content_block_delta", "index": index,
                       "delta": {"type": "input_json_delta", "partial_json": event.delta}}, "content_block_delta")
        elif isinstance(event, ToolCallEnd):
            yield sse({"type": "content_block_stop", "index": index}, "content_block_stop")
            index += 1
    if open_block is not None:
        yield sse({"type": "content_block_stop", "index": index}, "content_block_stop")
    yield sse({"type": "message_delta", "delta": {"stop_reason": _stop_reason(reply),
                                                  "stop_sequence": reply.stop_sequence},
               "usage": {"output_tokens": reply.completion_tokens}}, "message_delta")
    yield sse({"type": "message_stop"}, "message_stop")
