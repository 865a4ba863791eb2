"""Kimi chat formatting: the checkpoint's own chat template, rendered with jinja2 as Hugging Face does.

`ChatTemplate.for_checkpoint(directory)` finds the template a release ships (`chat_template.jinja`,
or `chat_template` in `tokenizer_config.json`); a directory without one (the embedded tiny model,
test checkpoints) gets Kimi-K2-Instruct-0905's template, shipped in the package
(`assets/chat_template_0905.jinja`). `render` gives exactly the string jinja2 renders in Hugging
Face's environment (`trim_blocks`, `lstrip_blocks`, loop controls, `tojson` as `json.dumps(x,
ensure_ascii=False)`); tests/test_chat_template.py checks it on the 0711, 0905 and Thinking
templates.

User text never becomes control tokens. Rendering the string and encoding it with specials, as
HF does, would turn a `<|im_end|>` typed by a user into the real token; `segments` instead marks
what the caller supplied. Before rendering, every caller string (content, names, ids, arguments,
tool JSON, reasoning) that contains a special-token name, or that could join its neighbour into
one (it ends with the start of a name, or starts with the end of one), gets an invisible marker
character inside the name and at those edges; the marker is a private-use character that occurs
in no input. A special-token name in the rendered text is then the template's own (a name made
of template text around caller text is not guarded: no Kimi template writes half a name). The
markers are removed from the text, so the characters are exactly jinja's, and only the template's
names become special ids. Other strings are passed unchanged, so the template's own tests on them
(`role == 'user'`, `type == 'image'`) behave as in plain rendering.

Deliberate differences from plain rendering, for inputs the templates render badly:
- invalid messages (unknown role, no content and no tool_calls, tool result without
  `tool_call_id`, tool call without `id`/`arguments`) raise ChatFormatError (a ValueError)
  naming the message index instead of rendering empty strings or Python reprs;
- content given as a list of text parts is joined into one string first (the templates that
  accept lists concatenate them the same way; 0905 would print the list's Python repr for a tool
  result or an assistant turn with tool calls);
- keys whose value is None are dropped, as Hugging Face does.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."
DEFAULT_TEMPLATE = Path(__file__).resolve().parents[1] / "assets" / "chat_template_0905.jinja"

# The roles the templates know; any other role is rejected by validation.
_ROLES = ("system", "user", "assistant", "tool")
# Private-use code points the guarding marker is drawn from (the first one that no input contains).
_MARKERS = (range(0xE000, 0xF900), range(0xF0000, 0xFFFFE), range(0x100000, 0x10FFFE))

Message = Mapping[str, Any]


class ChatFormatError(ValueError):
    """A message cannot be rendered; the text names the message (and part) index."""


def _tojson(value: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """Hugging Face's chat-template `tojson` (jinja's own would HTML-escape and sort keys)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    """The template compiled in Hugging Face's sandboxed environment (cached per source)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(source)


class ChatTemplate:
    """A jinja chat template and the two ways to render it: `render` (text) and `segments` (for a tokenizer)."""

    def __init__(self, source: str, origin: str = "<string>"):
        import jinja2

        self.source, self.origin = source, origin
        try:
            _compile(source)  # a template that does not parse fails here, at load, not at the first request
        except jinja2.TemplateSyntaxError as e:
            raise ChatFormatError(f"the chat template {origin} is not valid jinja "
                                  f"(line {e.lineno}: {e.message})") from None

    @classmethod
    def for_checkpoint(cls, directory: str | Path) -> ChatTemplate:
        """The template a checkpoint directory ships: `chat_template.jinja`, else `chat_template` in
        `tokenizer_config.json` (a string, or a list of named templates: "default"), else the packaged 0905."""
        directory = Path(directory)
        if (directory / "chat_template.jinja").is_file():
            return cls((directory / "chat_template.jinja").read_text(encoding="utf-8"),
                       str(directory / "chat_template.jinja"))
        config = directory / "tokenizer_config.json"
        if config.is_file():
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
            if isinstance(template, list):
                template = {t.get("name"): t.get("template") for t in template}.get("default")
            if isinstance(template, str):
                return cls(template, f"{config} (chat_template)")
        return default_template()

    @property
    def thinks(self) -> bool:
        """Whether the model writes its reasoning in <think>…</think> (the Thinking template's turns)."""
        return "</think>" in self.source

    def render(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None = None,
               add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt text, exactly as jinja2 renders the template (special tokens as their names).

        Args:
          messages: OpenAI-style messages (`role` system, user, assistant or tool; `content` a
            string or a list of text (or image) parts; assistant `tool_calls` and, for the
            Thinking template, `reasoning_content`; tool messages `tool_call_id`; optional `name`).
          tools: tool declarations (OpenAI function schemas); None or empty declares nothing.
          add_generation_prompt: open an assistant turn at the end.
          kwargs: further template variables (`chat_template_kwargs`).

        Raises:
          ChatFormatError (a ValueError): a message is malformed (naming its index), or the
          template itself failed on these messages.
        """
        return self._render(_prepare(messages), tools, add_generation_prompt, kwargs)

    def segments(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None = None,
                 add_generation_prompt: bool = True, specials: Iterable[str] = (),
                 **kwargs: Any) -> list[tuple[str, bool]]:
        """`render`'s text as `(text, trusted)` pieces: each special-token name the template wrote is a
        trusted piece of its own; all other text (template text and caller text alike) is not, so a
        name typed by a caller stays text (module docstring). `specials`: the tokenizer's names."""
        names = sorted(set(specials), key=len, reverse=True)
        if not names:
            return [(self.render(messages, tools, add_generation_prompt, **kwargs), False)]
        pattern = re.compile("|".join(map(re.escape, names)))
        messages = _prepare(messages)
        marker = _free_marker((messages, tools, kwargs, self.source))
        guard = _Guard(names, pattern, marker)
        text = self._render(guard(messages), guard(tools), add_generation_prompt, guard(kwargs))
        out: list[tuple[str, bool]] = []
        pos = 0
        for match in pattern.finditer(text):
            if match.start() > pos:
                out.append((text[pos:match.start()].replace(marker, ""), False))
            out.append((match.group(), True))
            pos = match.end()
        if pos < len(text):
            out.append((text[pos:].replace(marker, ""), False))
        return [(t, trusted) for t, trusted in out if t]

    def _render(self, messages, tools, add_generation_prompt, kwargs) -> str:
        import jinja2

        try:
            return _compile(self.source).render(messages=messages, tools=tools,
                                                add_generation_prompt=add_generation_prompt, **kwargs)
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
            raise ChatFormatError(f"the chat template ({self.origin}) cannot render these messages: "
                                  f"{type(e).__name__}: {e}") from None

    def __repr__(self) -> str:
        return f"ChatTemplate({self.origin})"


@functools.cache
def default_template() -> ChatTemplate:
    """Kimi-K2-Instruct-0905's template, shipped in the package: for checkpoints that bring none."""
    return ChatTemplate(DEFAULT_TEMPLATE.read_text(encoding="utf-8"), f"{DEFAULT_TEMPLATE} (packaged default)")


class _Guard:
    """Marks caller strings so that no special-token name can appear in them or across their edges."""

    def __init__(self, names: Sequence[str], pattern: re.Pattern, marker: str):
        self.pattern, self.marker = pattern, marker
        self.prefixes = {n[:k] for n in names for k in range(1, len(n))}  # proper prefixes of the names
        self.suffixes = {n[k:] for n in names for k in range(1, len(n))}
        self.longest = max(map(len, names))

    def __call__(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.string(value)
        if isinstance(value, Mapping):
            return {self(k): self(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self(v) for v in value]
        return value

    def string(self, s: str) -> str:
        m = self.marker
        out = self.pattern.sub(lambda match: match.group()[0] + m + match.group()[1:], s)
        if any(out[-k:] in self.prefixes for k in range(1, min(self.longest, len(out)) + 1)):
            out += m
        if any(out[:k] in self.suffixes for k in range(1, min(self.longest, len(out)) + 1)):
            out = m + out
        return out


def _free_marker(values: Any) -> str:
    """A private-use character that occurs in none of `values` (strings anywhere inside them)."""
    used: set[str] = set()
    stack = [values]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            used.update(v)
        elif isinstance(v, Mapping):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    for block in _MARKERS:
        for code in block:
            if chr(code) not in used:
                return chr(code)
    raise ChatFormatError("the messages use every private-use character; none is left to guard special tokens")


def _prepare(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Validated messages without None-valued keys, text-part lists joined (module docstring)."""
    out = []
    for i, message in enumerate(messages):
        message = _validate_message(message, i)
        content = message.get("content")
        if isinstance(content, Sequence) and not isinstance(content, str) and all(
                not _is_image(part) for part in content):
            message["content"] = "".join(part["text"] for part in content)
        out.append(message)
    return out


def _is_image(part: Mapping[str, Any]) -> bool:
    """The templates' test for an image part."""
    return part.get("type") == "image" or "image" in part or "image_url" in part


def render_chat(messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None = None,
                add_generation_prompt: bool = True) -> str:
    """`ChatTemplate.render` with the packaged 0905 template (what the embedded model was trained on)."""
    return default_template().render(messages, tools, add_generation_prompt)


def _validate_message(message: Any, index: int) -> dict[str, Any]:
    """Check one message and return it as a dict without None-valued keys (as HF does)."""
    where = f"message {index}"
    if not isinstance(message, Mapping):
        raise ChatFormatError(f"{where}: expected a mapping with 'role', got {type(message).__name__}")
    message = {k: v for k, v in message.items() if v is not None}
    role = message.get("role")
    if role not in _ROLES:
        raise ChatFormatError(f"{where}: unknown role {role!r}; expected one of {sorted(_ROLES)}")
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
    if not isinstance(message.get("reasoning_content", ""), str):
        raise ChatFormatError(f"{where}: 'reasoning_content' must be a string")
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
        if not _is_image(part) and not isinstance(part.get("text"), str):
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
