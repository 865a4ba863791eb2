"""The OpenAI- and Anthropic-compatible HTTP server; `python -m kimi_jax.serve` starts it.

Imports point down this list (a module imports only those below it):

    __main__, cli   flags, model loading, uvicorn (LiveServer: uvicorn in a thread)
    app             create_app: routes, the API-key check, error handlers
    openapi         the OpenAPI document: each route's body as a JSON Schema
    openai          /v1/chat/completions, /v1/completions
    anthropic       /v1/messages
    streaming       the handler skeleton, Reply (one generation: text, tool-call events), SSE
    server          Server: the model's name and context, prompt and request building
    metrics         Prometheus text of the scheduler's metrics
    validation      the body's JSON, field types and ranges, message shapes
    errors          APIError and the two error-body styles
"""
