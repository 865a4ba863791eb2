"""Kimi-K2 chat formatting in plain Python.

`render_chat` produces exactly the string that Hugging Face renders from the release's
`chat_template_0905.jinja` (jinja2 with `trim_blocks=True, lstrip_blocks=True` and HF's `tojson`,
i.e. `json.dumps(x, ensure_ascii=False)`), so no jinja is needed at serving time. The rendered
layout of one turn is

    <|im_{role}|>{name or role}<|im_middle|>{body}<|im_end|>

preceded by a default system turn when the conversation does not open with one, and by a
`tool_declare` turn when tools are given. tests/test_chat_template.py checks the equality
against the jinja template on many conversations.

`render_chat_segments` returns the same text split into template pieces and caller-supplied
pieces, so that a tokenizer can refuse to turn a `<|im_end|>` typed by a user into the real
token (rendering the string and encoding it with specials, as HF does, would).

Deliberate differences from the template, for inputs it renders badly:
- invalid messages (unknown role, no content and no tool_calls, tool result without
  `tool_call_id`, tool call without `id`/`arguments`) raise ChatFormatError (a ValueError)
  naming the message index instead of rendering empty strings or Python reprs;
- list content on an assistant-with-tool-calls or a tool message is flattened like user list
  content (the template would print the Python repr of the list).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."

# The role marker each role's header opens with; any other role is rejected by validation.
_ROLE_MARKERS = {
    "system": "<|im_system|>",
    "user": "<|im_user|>",
    "assistant": "<|im_assistant|>",
    "tool": "<|im_system|>",
}
# What the template renders for an image content part (the trailing newline is the template's).
IMAGE_PLACEHOLDER = "<|media_start|>image<|media_content|><|media_pad|><|media_end|>\n"

Message = Mapping[str, Any]


class ChatFormatError(ValueError):
    """A message cannot be rendered; the text names the message (and part) index."""


def _tojson(value: Any) -> str:
    """Serialise like HF's chat-template `tojson` filter (default separators, no ASCII escaping)."""
    return json.dumps(value, ensure_ascii=False)


def render_chat(
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """Render a conversation into Kimi-K2's prompt text (special tokens appear as their names).

    Args:
      messages: OpenAI-style messages. `role` is system, user, assistant or tool; `content` is a
        string or a list of `{"type": "text", "text": ...}` (or image) parts; assistant messages
        may carry `tool_calls` (`{"id", "function": {"name", "arguments"}}`, arguments a JSON
        string or a JSON-serialisable object); tool messages need `tool_call_id`; an optional
        `name` replaces the role in the turn header. Keys whose value is None count as absent.
      tools: tool declarations (OpenAI function schemas), rendered as JSON in a first
        `tool_declare` system turn; None or empty declares nothing.
      add_generation_prompt: close the last turn and open an assistant turn. When False the
        last message is left open (no `<|im_end|>`), as the template does.

    Returns:
      The prompt string. To tokenize it, prefer `Tokenizer.apply_chat_template`, which keeps
      special-token names typed inside messages as plain text (see `render_chat_segments`).

    Raises:
      ChatFormatError (a ValueError): a message is malformed; names the message index.
    """
    return "".join(text for text, _ in render_chat_segments(messages, tools, add_generation_prompt))


def render_chat_segments(
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
) -> list[tuple[str, bool]]:
    """`render_chat`'s output as `(text, from_template)` pieces, in order.

    `from_template` is True for the template's own text (role markers, `<|im_end|>`, ...) and
    False for anything the caller supplied (content, names, ids, arguments, tool JSON). A
    tokenizer turns special-token names into special ids only inside template pieces, so a
    user who types `<|im_end|>` cannot end their turn. Arguments as in `render_chat`.
    """
    checked = [_validate_message(m, i) for i, m in enumerate(messages)]
    out: list[tuple[str, bool]] = []
    if tools:
        # The indentation is the template's own text (it sits inside an `{%- if -%}` block whose
        # inner lines are not block tags, so lstrip_blocks leaves it).
        out += [
            ("<|im_system|>tool_declare<|im_middle|>\n  # Tools\n  ", True),
            (_tojson(list(tools)), False),
            ("<|im_end|>", True),
        ]
    for i, message in enumerate(checked):
        role = message["role"]
        if i == 0 and role != "system":
            out.append((f"<|im_system|>system<|im_middle|>{DEFAULT_SYSTEM_PROMPT}<|im_end|>", True))
        name = message.get("name")
        out += [(_ROLE_MARKERS[role], True), (name or role, not name), ("<|im_middle|>", True)]
        out += _body_segments(message)
        if add_generation_prompt or i < len(checked) - 1:
            out.append(("<|im_end|>", True))
    if add_generation_prompt:
        out.append(("<|im_assistant|>assistant<|im_middle|>", True))
    return out


def _body_segments(message: Message) -> list[tuple[str, bool]]:
    """The pieces between a turn's `<|im_middle|>` and its `<|im_end|>`."""
    role, content = message["role"], message.get("content")
    if role == "assistant" and message.get("tool_calls"):
        out = _content_segments(content) if content else []
        out.append(("<|tool_calls_section_begin|>", True))
        for call in message["tool_calls"]:
            out += [
                ("<|tool_call_begin|>", True),
                (call["id"], False),
                ("<|tool_call_argument_begin|>", True),
                (_render_arguments(call["function"]["arguments"]), False),
                ("<|tool_call_end|>", True),
            ]
        out.append(("<|tool_calls_section_end|>", True))
        return out
    if role == "tool":
        return [
            ("## Return of ", True),
            (message["tool_call_id"], False),
            ("\n    ", True),
            *_content_segments(content),
        ]
    return _content_segments(content)


def _render_arguments(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else _tojson(arguments)


def _content_segments(content: Any) -> list[tuple[str, bool]]:
    if isinstance(content, str):
        return [(content, False)]
    # A list of parts: text parts are concatenated with nothing between them; image parts
    # become the media placeholder (the template's test: type image, or an image/image_url key).
    out = []
    for part in content:
        if part.get("type") == "image" or "image" in part or "image_url" in part:
            out.append((IMAGE_PLACEHOLDER, True))
        else:
            out.append((part["text"], False))
    return out


def _validate_message(message: Any, index: int) -> dict[str, Any]:
    """Check one message and return it as a dict without None-valued keys (as HF does)."""
    where = f"message {index}"
    if not isinstance(message, Mapping):
        raise ChatFormatError(f"{where}: expected a mapping with 'role', got {type(message).__name__}")
    message = {k: v for k, v in message.items() if v is not None}
    role = message.get("role")
    if role not in _ROLE_MARKERS:
        raise ChatFormatError(f"{where}: unknown role {role!r}; expected one of {sorted(_ROLE_MARKERS)}")
    name = message.get("name")
    if name is not None and not isinstance(name, str):
        raise ChatFormatError(f"{where}: 'name' must be a string, got {type(name).__name__}")
    content = message.get("content")
    tool_calls = message.get("tool_calls")
    if tool_calls and role != "assistant":
        raise ChatFormatError(f"{where}: only assistant messages may carry tool_calls (role {role!r})")
    if content is None and not tool_calls:
        raise ChatFormatError(f"{where} (role {role!r}) has neither 'content' nor 'tool_calls'")
    if content is not None:
        _validate_content(content, where)
    if tool_calls:
        _validate_tool_calls(tool_calls, where)
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise ChatFormatError(f"{where}: a tool result needs a string 'tool_call_id' naming its call")
    return message


def _validate_content(content: Any, where: str) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, Sequence):
        raise ChatFormatError(
            f"{where}: 'content' must be a string or a list of parts, got {type(content).__name__}"
        )
    for j, part in enumerate(content):
        if not isinstance(part, Mapping):
            raise ChatFormatError(f"{where}, content part {j}: expected a mapping, got {part!r}")
        is_image = part.get("type") == "image" or "image" in part or "image_url" in part
        if not is_image and not isinstance(part.get("text"), str):
            raise ChatFormatError(f"{where}, content part {j}: a text part needs a string 'text'")


def _validate_tool_calls(tool_calls: Any, where: str) -> None:
    if not isinstance(tool_calls, Sequence) or isinstance(tool_calls, str):
        raise ChatFormatError(f"{where}: 'tool_calls' must be a list")
    for j, call in enumerate(tool_calls):
        if not isinstance(call, Mapping) or not isinstance(call.get("id"), str):
            raise ChatFormatError(f"{where}, tool call {j}: needs a string 'id' (functions.NAME:IDX)")
        function = call.get("function")
        if not isinstance(function, Mapping) or function.get("arguments") is None:
            raise ChatFormatError(f"{where}, tool call {j}: needs 'function' with 'arguments'")
        if not isinstance(function["arguments"], str):
            try:
                _tojson(function["arguments"])
            except (TypeError, ValueError) as e:
                raise ChatFormatError(f"{where}, tool call {j}: arguments are not JSON-serialisable: {e}") from e


_KIMI_CALL_ID = re.compile(r"functions\.\S+:\d+")


def normalize_tool_call_ids(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Rewrite tool-call ids that are not in Kimi's `functions.NAME:IDX` form.

    OpenAI clients send ids such as `call_abc123`, but the model expects the ids of earlier
    calls to keep its own `functions.NAME:IDX` form. Each non-conforming
    assistant call id becomes `functions.{name}:{k}` (k = the call's position among all calls
    so far) and tool results that referred to it are updated. Conforming ids are kept. Returns
    new message dicts; the input is not modified.
    """
    renamed: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    count = 0
    for message in messages:
        message = dict(message)
        if message.get("role") == "assistant" and message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                call = dict(call)
                old = call.get("id")
                if not (isinstance(old, str) and _KIMI_CALL_ID.fullmatch(old)):
                    name = (call.get("function") or {}).get("name", "unknown")
                    call["id"] = f"functions.{name}:{count}"
                    if isinstance(old, str):
                        renamed[old] = call["id"]
                calls.append(call)
                count += 1
            message["tool_calls"] = calls
        elif message.get("role") == "tool" and message.get("tool_call_id") in renamed:
            message["tool_call_id"] = renamed[message["tool_call_id"]]
        out.append(message)
    return out
