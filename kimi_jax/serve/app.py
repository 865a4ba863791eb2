"""The FastAPI app: routes, the API-key check, and every error answered in its API's style.

    GET  /health                 liveness (never needs the key)
    GET  /metrics                Prometheus text: requests, tokens, queue depth, occupancy, TTFT, tokens/s
    GET  /v1/models              the served model name
    GET  /openapi.json           the OpenAPI 3.1 document: each body's fields as a JSON Schema
    POST /v1/chat/completions    OpenAI chat (tools, streaming)           kimi_jax/serve/openai.py
    POST /v1/completions         OpenAI raw-prompt completions            kimi_jax/serve/openai.py
    POST /v1/messages            Anthropic messages (tools, streaming)    kimi_jax/serve/anthropic.py

Errors: an APIError (raised by validation, the routes or the generation) is answered with its
status; FastAPI's own errors (404 unknown path, 405, request validation) become APIErrors; any
other exception is logged once and answered 500 with a generic body (`ErrorGuard`).
"""

from __future__ import annotations

import logging
import secrets

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from kimi_jax.serve import anthropic, openai, openapi
from kimi_jax.serve.errors import APIError, clip, error_response
from kimi_jax.serve.metrics import MEDIA_TYPE, prometheus_text
from kimi_jax.serve.server import Server

log = logging.getLogger("kimi_jax.serve")


def create_app(server: Server) -> FastAPI:
    """The FastAPI app serving `server`: routes, auth, and error bodies in each API's style."""
    app = FastAPI(title="kimi_jax", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, err: APIError):
        return error_response(request.url.path, err)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, err: HTTPException):
        method, path = clip(request.method, 20), clip(request.url.path, 200)  # as long as the client likes
        message = {404: f"no route {method} {path}",
                   405: f"{method} is not allowed on {path}"}.get(err.status_code, str(err.detail))
        return error_response(request.url.path, APIError(err.status_code, message), headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, err: RequestValidationError):
        first = (err.errors() or [{}])[0]
        path = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = f"{path}: {first.get('msg', 'invalid request')}" if path else first.get("msg", "invalid request")
        return error_response(request.url.path, APIError(400, message, param=path))

    if server.api_key:
        app.add_middleware(KeyCheck, key=server.api_key)
    app.add_middleware(ErrorGuard)  # added last: outermost of ours, so it also guards KeyCheck

    @app.get("/health")
    async def health():
        scheduler = server.scheduler
        if not scheduler.alive:
            return JSONResponse({"status": "model thread stopped"}, 503)
        if not scheduler.ready.is_set():  # requests are queued meanwhile, and served once it is
            return JSONResponse({"status": "warming up"}, 503)
        return JSONResponse({"status": "ok"}, 200)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(server.scheduler), media_type=MEDIA_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.served_model_name, "object": "model",
                                            "created": server.created, "owned_by": "kimi_jax"}]}

    @app.get("/openapi.json")
    async def openapi_document():
        return openapi.document(server.served_model_name)

    openai.add_routes(app, server)
    anthropic.add_routes(app, server)
    return app


class KeyCheck:
    """ASGI middleware: every path but /health needs `Authorization: Bearer KEY` or `x-api-key: KEY`.
    (Plain ASGI, not @app.middleware: that wrapper hides client disconnects from the handlers.)"""

    def __init__(self, app, key: str):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            bearer = headers.get("authorization", "")
            given = bearer[7:] if bearer.lower().startswith("bearer ") else headers.get("x-api-key")
            if not (given and secrets.compare_digest(given.encode(), self.key.encode())):
                err = APIError(401, "invalid or missing API key (Authorization: Bearer KEY or x-api-key: KEY)",
                               code="invalid_api_key")
                await error_response(scope["path"], err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ErrorGuard:
    """ASGI middleware: an exception no handler answered is logged once, with its traceback, and
    answered 500 with a generic body. (Starlette's own 500 handler re-raises the exception after
    answering, so uvicorn would log it a second time and drop the connection.)"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("internal error answering %s %s", scope.get("method"), scope["path"])
            if not started:  # else the response is cut short: the client sees a truncated body
                err = APIError(500, "internal server error; the server log has the details")
                await error_response(scope["path"], err)(scope, receive, send)
