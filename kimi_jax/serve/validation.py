"""Request checks shared by both APIs: the body's JSON, field types and ranges, message shapes.

Types are JSON's, strictly: a boolean is not a number, a number is not a string, a string is not
a boolean (`"stream": "false"` is an error, not a truthy string). A field that is absent or null
takes its default. Every failure is APIError(400) whose `param` and message name the field by its
path in the body, e.g. `messages[0].content` or `stream_options.include_usage`.

The chat checks here are the OpenAI message shape; the Anthropic route maps its blocks onto that
shape first (kimi_jax/serve/anthropic.py) and both render through `Server.chat_prompt`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import jsonschema

from kimi_jax.serve.errors import APIError, clip, show

MAX_DEPTH = 64  # nesting a body may have; deeper bodies are refused before anything walks them
MAX_STOPS = 4
ROLES = ("system", "user", "assistant", "tool")
MAX_PATH_CHARS = 200  # a field path in an error (it holds the client's keys, which may be huge)
TEXT_ONLY = "this model reads text only: send text parts (images, audio and files are not supported)"


def bad(path: str, message: str) -> APIError:
    """The 400 for field `path`: '`path`: `message`' (a path longer than MAX_PATH_CHARS is cut)."""
    path = clip(path, MAX_PATH_CHARS)
    return APIError(400, f"{path}: {message}", param=path)


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, with its article ("a string", "an array", …)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def got(value: Any) -> str:
    """What a message says the client sent: its JSON type and (cut) value."""
    if isinstance(value, (dict, list)) and not value:
        return f"an empty {'object' if isinstance(value, dict) else 'array'}"
    kind = json_type(value)
    return kind if isinstance(value, (dict, list)) or value is None else f"{kind} ({show(value)})"


# The body -------------------------------------------------------------------------------------
def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; anything else is a 400 saying what is wrong with it.

    Refused: text that is not JSON (or not UTF-8), NaN / Infinity (not JSON), nesting deeper than
    MAX_DEPTH (Python's parser would otherwise hit its recursion limit), and strings holding lone
    UTF-16 surrogates (`"\\ud800"` parses, but is not text and cannot be encoded).
    """

    def no_constants(name: str):
        raise ValueError(f"{name} is not a JSON value")

    try:
        body = json.loads(raw, parse_constant=no_constants)
    except RecursionError:
        raise APIError(400, f"the request body is nested too deeply (more than {MAX_DEPTH} levels)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {json_type(body)}")
    _check_tree(body)
    return body


def _check_tree(body: dict[str, Any]) -> None:
    """Depth and text checks over the whole body, iteratively (no recursion to exhaust)."""
    todo: list[tuple[Any, str, int]] = [(body, "", 0)]
    while todo:
        value, path, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise bad(path, f"nested too deeply (more than {MAX_DEPTH} levels)")
        if isinstance(value, str):
            _check_text(value, path or "the request body")
        elif isinstance(value, dict):
            for key, item in value.items():
                child = f"{path}.{key}" if path else key
                _check_text(key, child)
                todo.append((item, child, depth + 1))
        elif isinstance(value, list):
            todo.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad(path, f"holds a lone UTF-16 surrogate ({text[e.start]!r} at character {e.start}); "
                        "send valid Unicode text") from None


# Fields ---------------------------------------------------------------------------------------
def path_of(at: str, name: str | int) -> str:
    """`name` under `at`: `at.name`, `at[i]`, or `name` at the top."""
    if isinstance(name, int):
        return f"{at}[{name}]"
    return f"{at}.{name}" if at else name


def get(obj: dict[str, Any], name: str, at: str = "", required: bool = False) -> Any:
    """obj[name], with null meaning absent; a required field that is absent is a 400."""
    value = obj.get(name)
    if value is None and required:
        raise bad(path_of(at, name), "this field is required")
    return value


def number(obj: dict[str, Any], name: str, default: Any, lo: float, hi: float, integer: bool = False,
           at: str = "", required: bool = False) -> Any:
    """obj[name] (or `default`), a JSON number (an integer if `integer`) in [lo, hi]."""
    value = get(obj, name, at, required)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise bad(path_of(at, name), f"must be {kind} in [{lo}, {hi}], got {got(value)}")
    return value


def boolean(obj: dict[str, Any], name: str, default: bool = False, at: str = "") -> bool:
    """obj[name] (or `default`), a JSON boolean."""
    value = get(obj, name, at)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(path_of(at, name), f"must be a boolean (true or false), got {got(value)}")
    return value


def string(obj: dict[str, Any], name: str, default: str | None = None, at: str = "", required: bool = False,
           choices: Sequence[str] = ()) -> str | None:
    """obj[name] (or `default`), a JSON string; one of `choices` if given."""
    value = get(obj, name, at, required)
    if value is None:
        return default
    if not isinstance(value, str):
        raise bad(path_of(at, name), f"must be a string, got {got(value)}")
    if choices and value not in choices:
        raise bad(path_of(at, name), f"must be one of {', '.join(map(repr, choices))}, got {show(value)}")
    return value


def mapping(obj: dict[str, Any], name: str, at: str = "", required: bool = False) -> dict[str, Any] | None:
    """obj[name], a JSON object (None when absent)."""
    value = get(obj, name, at, required)
    if value is not None and not isinstance(value, dict):
        raise bad(path_of(at, name), f"must be an object, got {got(value)}")
    return value


def array(obj: dict[str, Any], name: str, at: str = "", required: bool = False,
          non_empty: bool = False) -> list[Any] | None:
    """obj[name], a JSON array (None when absent)."""
    value = get(obj, name, at, required)
    if value is not None and not isinstance(value, list):
        raise bad(path_of(at, name), f"must be an array, got {got(value)}")
    if non_empty and not value:
        raise bad(path_of(at, name), "must be a non-empty array")
    return value


def check_fields(obj: dict[str, Any], known: Sequence[str], at: str = "", where: str = "") -> None:
    """Every key of `obj` is one of `known`: an unknown field is a 400 naming it (as OpenAI's and
    Anthropic's own APIs refuse one), never silently ignored. `where`: what `obj` is, for the message."""
    for key in obj:
        if key not in known:
            raise bad(path_of(at, key), f"unknown field{' of ' + where if where else ''}; the fields this server "
                                        f"implements are: {', '.join(known)}")


def refuse(obj: dict[str, Any], name: str, why: str, noop: Any = lambda value: value is None, at: str = "") -> None:
    """A field this server does not implement: a 400 naming it and saying `why`, unless its value
    asks for nothing (`noop(value)`: null, or the API's default such as `presence_penalty: 0`)."""
    value = obj.get(name)
    if not noop(value):
        raise bad(path_of(at, name), f"not supported: {why} (got {got(value)})")


def stop_strings(obj: dict[str, Any], name: str = "stop", limit: int = MAX_STOPS) -> list[str]:
    """A stop string or an array of at most `limit` of them, each non-empty."""
    value = get(obj, name)
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > limit or not all(isinstance(s, str) and s for s in stops):
        raise bad(name, f"must be a non-empty string or an array of at most {limit} of them, got {got(value)}")
    return stops


# Chat messages and tools (OpenAI's shape) -----------------------------------------------------
MESSAGE_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content", "refusal",
                  "function_call", "audio")
MESSAGE_REFUSED = {"function_call": "the deprecated function_call form; send tool_calls",
                   "audio": "this model reads text only", "refusal": "refusal text has no form in Kimi's template"}


def check_messages(messages: Any, at: str = "messages") -> None:
    """OpenAI-style chat messages: a non-empty array of {role, content, …} in the shapes the chat
    template renders (kimi_jax/text/chat_template.py)."""
    if not isinstance(messages, list) or not messages:
        raise bad(at, f"must be a non-empty array of message objects, got {got(messages)}")
    for i, message in enumerate(messages):
        where = path_of(at, i)
        if not isinstance(message, dict):
            raise bad(where, f"must be a message object with 'role' and 'content', got {got(message)}")
        check_fields(message, MESSAGE_FIELDS, at=where, where="a message")
        role = string(message, "role", at=where, required=True, choices=ROLES)
        for name in ("function_call", "audio", "refusal"):
            refuse(message, name, MESSAGE_REFUSED[name], at=where)
        string(message, "name", at=where)
        string(message, "reasoning_content", at=where)  # a thinking model's earlier reasoning
        calls = array(message, "tool_calls", at=where)
        if calls and role != "assistant":
            raise bad(path_of(where, "tool_calls"), f"only assistant messages carry tool calls, not {role!r} ones")
        if calls:
            _check_tool_calls(calls, path_of(where, "tool_calls"))
        content = message.get("content")
        if content is None and not calls:
            raise bad(path_of(where, "content"), f"this field is required (a {role} message needs content)")
        if content is not None:
            _check_content(content, path_of(where, "content"))
        if role == "tool":
            string(message, "tool_call_id", at=where, required=True)


def _check_content(content: Any, at: str) -> None:
    """A string, or an array of text parts {type: "text", text}. Image, audio and file parts are
    refused: the model is text-only, and a placeholder in their place would answer about nothing."""
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise bad(at, f"must be a string or an array of content parts, got {got(content)}")
    for j, part in enumerate(content):
        where = path_of(at, j)
        if not isinstance(part, dict):
            raise bad(where, f"must be a content part object such as {{\"type\": \"text\", \"text\": …}}, "
                             f"got {got(part)}")
        kind = string(part, "type", at=where, required=True)
        if kind != "text":
            raise bad(path_of(where, "type"), f"{show(kind)}: {TEXT_ONLY}")
        check_fields(part, ("type", "text"), at=where, where="a text part")
        string(part, "text", at=where, required=True)


def _check_tool_calls(calls: list[Any], at: str) -> None:
    for j, call in enumerate(calls):
        where = path_of(at, j)
        if not isinstance(call, dict):
            raise bad(where, f"must be a tool call object {{id, type, function}}, got {got(call)}")
        check_fields(call, ("id", "type", "function"), at=where, where="a tool call")
        string(call, "id", at=where, required=True)
        string(call, "type", at=where, choices=("function",))
        function = mapping(call, "function", at=where, required=True)
        check_fields(function, ("name", "arguments"), at=path_of(where, "function"), where="a tool call's function")
        string(function, "name", at=path_of(where, "function"), required=True)
        arguments = get(function, "arguments", path_of(where, "function"), required=True)
        if isinstance(arguments, str):  # the template writes it into the prompt as the model's own JSON
            try:
                arguments = json.loads(arguments)
            except ValueError:
                raise bad(path_of(where, "function.arguments"),
                          f"must be a JSON object encoded as a string, got {got(arguments)}") from None
        if not isinstance(arguments, dict):
            raise bad(path_of(where, "function.arguments"), f"must be a JSON object encoded as a string, got "
                                                            f"{got(arguments)}")


TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule; also keeps Kimi's ids `functions.NAME:IDX` parseable


def check_schema(schema: Any, at: str, object_only: bool = True) -> None:
    """`schema` is a valid JSON Schema (checked against its metaschema by `jsonschema`, draft 2020-12
    unless `$schema` names another); with `object_only` it describes an object (tool arguments are
    JSON objects: any other type could never be met)."""
    if not isinstance(schema, dict):
        raise bad(at, f"must be a JSON Schema object, got {got(schema)}")
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = at + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.path)
        raise bad(where, f"is not a valid JSON Schema: {clip(e.message, 200)}") from None
    except (RecursionError, ValueError) as e:  # a $ref cycle, or a regex `re` cannot compile
        raise bad(at, f"is not a valid JSON Schema: {clip(str(e), 200)}") from None
    kind = schema.get("type")
    if object_only and kind is not None and kind != "object":
        raise bad(path_of(at, "type"), f"must be 'object' (tool arguments are a JSON object), got {got(kind)}")


def tool_name(obj: dict[str, Any], at: str) -> str:
    """A tool's `name`: 1–64 letters, digits, '_' or '-'."""
    name = string(obj, "name", at=at, required=True)
    if not TOOL_NAME.fullmatch(name):
        raise bad(path_of(at, "name"), f"must be 1 to 64 letters, digits, '_' or '-', got {show(name)}")
    return name


def check_tools(tools: Any, at: str = "tools") -> list[str]:
    """OpenAI tool declarations: [{type: "function", function: {name, description?, parameters?}}],
    each `parameters` a valid JSON Schema of an object, names distinct. Returns the names."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise bad(at, f"must be an array of tool objects, got {got(tools)}")
    names: list[str] = []
    for i, tool in enumerate(tools):
        where = path_of(at, i)
        if not isinstance(tool, dict):
            raise bad(where, f"must be a tool object {{type: 'function', function: {{name, parameters}}}}, got "
                             f"{got(tool)}")
        check_fields(tool, ("type", "function"), at=where, where="a tool")
        string(tool, "type", at=where, required=True, choices=("function",))
        function = mapping(tool, "function", at=where, required=True)
        inner = path_of(where, "function")
        check_fields(function, ("name", "description", "parameters", "strict"), at=inner, where="a function")
        name = tool_name(function, inner)
        if name in names:
            raise bad(path_of(inner, "name"), f"{name!r} is declared twice (tools[{names.index(name)}] has it)")
        names.append(name)
        string(function, "description", at=inner)
        if function.get("parameters") is not None:
            check_schema(function["parameters"], path_of(inner, "parameters"))
        boolean(function, "strict", at=inner)  # calls follow the schema either way (Server.tool_constraint)
    return names
