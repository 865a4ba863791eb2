"""Anthropic-compatible route: `POST /v1/messages`.

The request is mapped onto the same chat template as the OpenAI route: `system` becomes the
system turn, `tool_use` blocks become assistant tool calls, `tool_result` blocks become
`role: tool` messages, and `tools` ({name, description, input_schema}) become OpenAI-style
function declarations. As the release's own Anthropic endpoint does, the temperature used is
`request temperature × 0.6` (Anthropic's default of 1.0 gives the recommended 0.6).
Replies carry `text` and `tool_use` blocks (ids are Kimi's `functions.NAME:IDX`, input parsed from
the JSON arguments); `stream: true` sends Anthropic's events (message_start,
content_block_start/delta/stop, message_delta, message_stop).
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from fastapi import Request  # module level: FastAPI resolves handler annotations here
from fastapi.responses import StreamingResponse

from kimi_jax.serve.app import APIError, Server, json_body, number, sse, stop_strings, unless_disconnected
from kimi_jax.text.tool_calls import ContentDelta, ToolCallEnd, ToolCallStreamParser

TEMPERATURE_SCALE = 0.6  # temperature_used = request temperature × 0.6, as the release maps it
STOP_REASONS = {"length": "max_tokens", "stop": "end_turn"}


def _text(content: Any, where: str) -> str:
    """A string, or the text of a list of text blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(b, dict) and b.get("type") == "text"
                                         and isinstance(b.get("text"), str) for b in content):
        return "".join(b["text"] for b in content)
    raise APIError(400, f"{where}: expected a string or a list of text blocks")


def to_openai_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Anthropic `system` + `messages` -> OpenAI-style messages for the chat template."""
    out = []
    if body.get("system") is not None:
        out.append({"role": "system", "content": _text(body["system"], "system")})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise APIError(400, f"{where}: expected an object with role 'user' or 'assistant'")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise APIError(400, f"{where}.content: expected a string or a list of blocks")
        text, calls = [], []
        for j, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                text.append(block["text"])
            elif kind == "tool_use" and m["role"] == "assistant":
                calls.append({"id": str(block.get("id")), "type": "function",
                              "function": {"name": str(block.get("name")),
                                           "arguments": json.dumps(block.get("input") or {}, ensure_ascii=False)}})
            elif kind == "tool_result" and m["role"] == "user":
                result = block.get("content", "")
                result = _text(result, f"{where}.content.{j}.content") if result else ""
                out.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id")), "content": result})
            else:
                raise APIError(400, f"{where}.content.{j}: unsupported block type {kind!r} for role {m['role']!r} "
                                    "(supported: text, tool_use from the assistant, tool_result from the user)")
        if calls:
            out.append({"role": "assistant", "content": "".join(text) or None, "tool_calls": calls})
        elif text:
            out.append({"role": m["role"], "content": "".join(text)})
    return out


def to_openai_tools(tools: Any) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools):
        raise APIError(400, "'tools' must be a list of {name, description, input_schema} objects")
    return [{"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                              "parameters": t.get("input_schema", {"type": "object"})}}
            for t in tools]


def _prompt(body: dict[str, Any], server: Server) -> tuple[list[int], bool]:
    from kimi_jax.text.chat_template import ChatFormatError, normalize_tool_call_ids

    tools = to_openai_tools(body.get("tools"))
    choice = (body.get("tool_choice") or {"type": "auto"})
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in ("auto", "none"):
        raise APIError(400, f"tool_choice {choice!r} is not supported; use {{'type': 'auto'}} or {{'type': 'none'}}")
    use_tools = bool(tools) and kind == "auto"
    try:
        messages = normalize_tool_call_ids(to_openai_messages(body))
        return server.tokenizer.apply_chat_template(messages, tools if use_tools else None), use_tools
    except (ChatFormatError, TypeError, KeyError, AttributeError) as e:
        raise APIError(400, f"invalid messages: {e}") from None


def add_routes(app, server: Server) -> None:

    @app.post("/v1/messages")
    async def messages(http: Request):
        body = await json_body(http)
        server.check_model(body)
        if body.get("max_tokens") is None:
            raise APIError(400, "max_tokens: field required")
        max_tokens = number(body, "max_tokens", None, 1, server.max_context, integer=True)
        temperature = number(body, "temperature", 1.0, 0, 1) * TEMPERATURE_SCALE
        top_p = number(body, "top_p", 1.0, 1e-9, 1)
        top_k = number(body, "top_k", 0, 0, 2**31 - 1, integer=True)
        stops = stop_strings(body.get("stop_sequences"), "stop_sequences")
        prompt, use_tools = _prompt(body, server)
        request = server.request(prompt, max_tokens, temperature, top_p, top_k)
        pieces = server.generate(request, stops)
        first = await unless_disconnected(http, anext(pieces))  # errors surface before the response starts
        msg_id = f"msg_{secrets.token_hex(12)}"
        if body.get("stream"):
            return StreamingResponse(_stream(first, pieces, request, use_tools, msg_id, server.served_model_name),
                                     media_type="text/event-stream")
        return await unless_disconnected(http, _reply(first, pieces, request, use_tools, msg_id,
                                                      server.served_model_name))


async def _reply(first, pieces, request, use_tools: bool, msg_id: str, model: str) -> dict:
    text, last, count = "", first, 0
    async for piece in _prepend(first, pieces):
        text, last, count = text + piece.text, piece, count + piece.tokens
    blocks = _blocks(text, use_tools)
    return {"id": msg_id, "type": "message", "role": "assistant", "model": model, "content": blocks,
            "stop_reason": _stop_reason(last, blocks), "stop_sequence": last.stop_sequence,
            "usage": {"input_tokens": len(request.prompt), "output_tokens": count}}


async def _prepend(first, pieces):
    try:
        yield first
        async for piece in pieces:
            yield piece
    finally:
        await pieces.aclose()


def _stop_reason(last, blocks) -> str:
    if last.stop_sequence is not None:
        return "stop_sequence"
    if last.finish_reason != "length" and any(b["type"] == "tool_use" for b in blocks):
        return "tool_use"
    return STOP_REASONS[last.finish_reason]


def _tool_use(event: ToolCallEnd) -> dict[str, Any]:
    return {"type": "tool_use", "id": event.id, "name": event.name, "input": json.loads(event.arguments)}


def _blocks(text: str, use_tools: bool) -> list[dict[str, Any]]:
    if not use_tools:
        return [{"type": "text", "text": text}]
    parser = ToolCallStreamParser()
    events = parser.feed(text) + parser.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    blocks = [{"type": "text", "text": content}] if content else []
    return blocks + [_tool_use(e) for e in events if isinstance(e, ToolCallEnd)]


async def _stream(first, pieces, request, use_tools: bool, msg_id: str, model: str):
    yield sse({"type": "message_start", "message": {
        "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": None,
        "stop_sequence": None, "usage": {"input_tokens": len(request.prompt), "output_tokens": 0}}}, "message_start")
    parser = ToolCallStreamParser() if use_tools else None
    index, text_open, count, last, any_call = 0, False, 0, first, False
    async for piece in _prepend(first, pieces):
        count, last = count + piece.tokens, piece
        events = (parser.feed(piece.text) + (parser.finish() if piece.finish_reason else [])) if parser else \
            [ContentDelta(piece.text)] if piece.text else []
        for event in events:
            if isinstance(event, ContentDelta):
                if not text_open:
                    yield sse({"type": "content_block_start", "index": index,
                               "content_block": {"type": "text", "text": ""}}, "content_block_start")
                    text_open = True
                yield sse({"type": "content_block_delta", "index": index,
                           "delta": {"type": "text_delta", "text": event.text}}, "content_block_delta")
            elif isinstance(event, ToolCallEnd):  # a call arrives whole: start, one input delta, stop
                if text_open:
                    yield sse({"type": "content_block_stop", "index": index}, "content_block_stop")
                    index, text_open = index + 1, False
                any_call = True
                yield sse({"type": "content_block_start", "index": index, "content_block": {
                    "type": "tool_use", "id": event.id, "name": event.name, "input": {}}}, "content_block_start")
                yield sse({"type": "content_block_delta", "index": index,
                           "delta": {"type": "input_json_delta", "partial_json": event.arguments}},
                          "content_block_delta")
                yield sse({"type": "content_block_stop", "index": index}, "content_block_stop")
                index += 1
    if text_open:
        yield sse({"type": "content_block_stop", "index": index}, "content_block_stop")
    reason = _stop_reason(last, [{"type": "tool_use"}] if any_call else [])
    yield sse({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": last.stop_sequence},
               "usage": {"output_tokens": count}}, "message_delta")
    yield sse({"type": "message_stop"}, "message_stop")
