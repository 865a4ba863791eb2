"""`GET /openapi.json`: the server's OpenAPI 3.1 document, the request bodies as JSON Schemas.

Each body schema lists exactly the fields its route knows (`openai.CHAT_FIELDS`,
`openai.COMPLETION_FIELDS`, `anthropic.MESSAGES_FIELDS`; a test checks they agree), with
`additionalProperties: false` since the routes refuse any other. Fields a route refuses unless
they ask for nothing (README, Serving) are typed loosely: the document says what may be sent, and
the route answers what it does with it. The schemas drive the fuzzing test
(tests/test_serve_fuzz.py).
"""

from __future__ import annotations

from typing import Any

from kimi_jax.runtime.sampling import MAX_LOGIT_BIAS, TOP_LOGPROBS
from kimi_jax.serve.anthropic import MESSAGES_FIELDS
from kimi_jax.serve.openai import CHAT_FIELDS, COMPLETION_FIELDS

STRING = {"type": "string"}
BOOLEAN = {"type": "boolean"}
OBJECT = {"type": "object"}
ANY = {}


def _number(lo: float, hi: float) -> dict[str, Any]:
    return {"type": "number", "minimum": lo, "maximum": hi}


def _integer(lo: int, hi: int | None = None) -> dict[str, Any]:
    return {"type": "integer", "minimum": lo, **({} if hi is None else {"maximum": hi})}


def _object(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


TEXT_PART = _object({"type": {"const": "text"}, "text": STRING}, ("type", "text"))
TOOL_CALL = _object({"id": STRING, "type": {"const": "function"},
                     "function": _object({"name": STRING, "arguments": STRING}, ("name", "arguments"))},
                    ("id", "function"))
MESSAGE = _object({"role": {"enum": ["system", "user", "assistant", "tool"]},
                   "content": {"anyOf": [STRING, {"type": "array", "items": TEXT_PART}, {"type": "null"}]},
                   "name": STRING, "tool_calls": {"type": "array", "items": TOOL_CALL}, "tool_call_id": STRING,
                   "reasoning_content": STRING, "refusal": {"type": "null"}, "function_call": {"type": "null"},
                   "audio": {"type": "null"}}, ("role",))
TOOL = _object({"type": {"const": "function"},
                "function": _object({"name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                                     "description": STRING, "parameters": OBJECT, "strict": BOOLEAN}, ("name",))},
               ("type", "function"))
STOP = {"anyOf": [STRING, {"type": "array", "items": STRING, "maxItems": 4}]}

SAMPLING = {
    "model": STRING, "max_tokens": _integer(1), "temperature": _number(0, 2),
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}, "top_k": _integer(0), "stop": STOP,
    "seed": _integer(0, 2**32 - 1), "n": _integer(1), "stream": BOOLEAN,
    "stream_options": _object({"include_usage": BOOLEAN, "include_obfuscation": BOOLEAN}),
    "user": STRING, "logit_bias": {"type": "object", "maxProperties": MAX_LOGIT_BIAS,
                                   "additionalProperties": _number(-100, 100)},
    "presence_penalty": _number(-2, 2), "frequency_penalty": _number(-2, 2), "return_tokens_as_token_ids": BOOLEAN,
}
CHAT = _object({
    **SAMPLING, "messages": {"type": "array", "items": MESSAGE, "minItems": 1},
    "max_completion_tokens": _integer(1), "logprobs": BOOLEAN, "top_logprobs": _integer(0, TOP_LOGPROBS),
    "tools": {"type": "array", "items": TOOL},
    "tool_choice": {"anyOf": [{"enum": ["auto", "none", "required"]},
                              _object({"type": {"const": "function"}, "function": _object({"name": STRING})})]},
    "parallel_tool_calls": BOOLEAN, "chat_template_kwargs": OBJECT,
    "response_format": _object({"type": {"enum": ["text", "json_object", "json_schema"]},
                                "json_schema": _object({"name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                                                        "description": STRING, "schema": OBJECT, "strict": BOOLEAN},
                                                       ("name",))}, ("type",)),
    "metadata": {"type": "object", "additionalProperties": STRING}, "store": BOOLEAN, "service_tier": STRING,
    "safety_identifier": STRING, "prompt_cache_key": STRING, "modalities": {"type": "array", "items": STRING},
    **{name: ANY for name in ("audio", "prediction", "web_search_options", "functions", "function_call",
                              "reasoning_effort", "verbosity")},
}, ("model", "messages"))
COMPLETION = _object({
    **SAMPLING, "prompt": {"anyOf": [STRING, {"type": "array", "items": _integer(0)},
                                     {"type": "array", "items": STRING, "maxItems": 1}]},
    "logprobs": _integer(0, TOP_LOGPROBS), "echo": BOOLEAN, "best_of": _integer(1), "suffix": STRING,
}, ("model", "prompt"))

A_TEXT = _object({"type": {"const": "text"}, "text": STRING, "cache_control": OBJECT}, ("type", "text"))
A_BLOCK = {"anyOf": [
    A_TEXT,
    _object({"type": {"const": "tool_use"}, "id": STRING, "name": STRING, "input": OBJECT},
            ("type", "id", "name", "input")),
    _object({"type": {"const": "tool_result"}, "tool_use_id": STRING, "is_error": BOOLEAN,
             "content": {"anyOf": [STRING, {"type": "array", "items": A_TEXT}]}}, ("type", "tool_use_id")),
    _object({"type": {"const": "thinking"}, "thinking": STRING, "signature": STRING}, ("type", "thinking")),
]}
MESSAGES = _object({
    "model": STRING, "max_tokens": _integer(1),
    "messages": {"type": "array", "minItems": 1, "items": _object({
        "role": {"enum": ["user", "assistant"]},
        "content": {"anyOf": [STRING, {"type": "array", "items": A_BLOCK}]}}, ("role", "content"))},
    "system": {"anyOf": [STRING, {"type": "array", "items": A_TEXT}]}, "stop_sequences": {"type": "array",
                                                                                          "items": STRING},
    "stream": BOOLEAN, "temperature": _number(0, 1), "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": _integer(0),
    "tools": {"type": "array", "items": _object({"type": {"const": "custom"}, "name": STRING, "description": STRING,
                                                 "input_schema": OBJECT, "cache_control": OBJECT},
                                                ("name", "input_schema"))},
    "tool_choice": _object({"type": {"enum": ["auto", "none", "any", "tool"]}, "name": STRING,
                            "disable_parallel_tool_use": BOOLEAN}, ("type",)),
    "thinking": _object({"type": {"enum": ["enabled", "disabled"]}, "budget_tokens": _integer(1)}, ("type",)),
    "metadata": _object({"user_id": STRING}), "service_tier": {"enum": ["auto", "standard_only"]},
    **{name: ANY for name in ("container", "mcp_servers", "context_management")},
}, ("model", "max_tokens", "messages"))

BODIES = {"/v1/chat/completions": (CHAT, CHAT_FIELDS), "/v1/completions": (COMPLETION, COMPLETION_FIELDS),
          "/v1/messages": (MESSAGES, MESSAGES_FIELDS)}


def document(model_name: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document; `model` is the served model's name in every body."""
    paths: dict[str, Any] = {
        "/health": {"get": {"responses": {"200": {"description": "the model thread runs"},
                                          "503": {"description": "it has stopped"}}}},
        "/v1/models": {"get": {"responses": {"200": {"description": "the served model"}}}},
        "/metrics": {"get": {"responses": {"200": {"description": "Prometheus text"}}}},
    }
    for path, (schema, _) in BODIES.items():
        schema = {**schema, "properties": {**schema["properties"], "model": {"const": model_name}}}
        paths[path] = {"post": {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
                                "responses": {"200": {"description": "the reply (JSON, or SSE with stream)"},
                                              "4XX": {"description": "the request's fault, naming the field"}}}}
    return {"openapi": "3.1.0", "info": {"title": "kimi_jax", "version": "1"}, "paths": paths}
