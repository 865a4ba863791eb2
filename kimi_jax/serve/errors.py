"""Errors as each API writes them: one exception type, two body styles chosen by route.

    OpenAI     {"error": {"message", "type", "param", "code"}}     every route but /v1/messages
    Anthropic  {"type": "error", "error": {"type", "message"}}     /v1/messages

Everything that answers an error goes through `error_response`: route handlers (APIError), FastAPI's
own 404 / 405 / validation errors, the API-key check and the guard for unexpected exceptions
(kimi_jax/serve/app.py).
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

# The `type` each status gets when the raiser does not name one.
OPENAI_KINDS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                429: "rate_limit_error", 500: "server_error", 503: "server_error"}
ANTHROPIC_KINDS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                   413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 503: "api_error"}
SHOWN_CHARS = 60  # how much of a client's value an error message repeats
MAX_MESSAGE_CHARS = 1000  # no error message is longer, whatever the client sent


class APIError(Exception):
    """An error answered with `status` and an OpenAI- or Anthropic-style body (chosen by route).

    kind: the OpenAI `type` (default: by status); param: the field at fault, as a path such as
    `messages[0].content` (the message names it too, since Anthropic bodies have no `param`).
    """

    def __init__(self, status: int, message: str, kind: str | None = None, param: str | None = None,
                 code: str | None = None):
        message, param = clip(message, MAX_MESSAGE_CHARS), param if param is None else clip(param, 200)
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or OPENAI_KINDS.get(status, "invalid_request_error")


def clip(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, saying how long it was."""
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


def show(value: Any) -> str:
    """`repr(value)` cut to SHOWN_CHARS, for messages that repeat what a client sent."""
    return clip(repr(value), SHOWN_CHARS)


def is_anthropic(path: str) -> bool:
    """Whether `path` belongs to the Anthropic API (and its errors take Anthropic's style)."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def error_body(path: str, err: APIError) -> dict[str, Any]:
    """The JSON body of `err` in the style of the API that `path` belongs to."""
    if is_anthropic(path):
        return {"type": "error", "error": {"type": ANTHROPIC_KINDS.get(err.status, "invalid_request_error"),
                                           "message": err.message}}
    return {"error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.code}}


def error_response(path: str, err: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    """`err` as an HTTP response for a request to `path`."""
    return JSONResponse(error_body(path, err), err.status, headers=headers)
