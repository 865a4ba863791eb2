"""What both APIs share about the served model: its name, its context, and how a checked request
becomes token ids and a `Request` (runtime/requests.py)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from typing import Any

from kimi_jax.runtime.requests import Constraint, Request
from kimi_jax.runtime.sampling import SamplingParams
from kimi_jax.serve.errors import APIError, clip, show
from kimi_jax.serve.validation import bad, check_messages, check_tools, got
from kimi_jax.text.chat_template import ChatFormatError, normalize_tool_call_ids
from kimi_jax.text.grammar import GrammarError, Grammars, json_grammar, tool_call_grammar
from kimi_jax.text.tool_calls import SECTION_BEGIN

MAX_BODY_BYTES = 8 << 20  # a request body over 8 MiB is answered 413 (--max-body-bytes)
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}  # a tool without parameters


class Server:
    """The loaded model, its scheduler and the serving settings."""

    def __init__(self, model, scheduler, served_model_name: str = "kimi-k2-instruct", api_key: str | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES):
        if model.tokenizer is None:
            raise ValueError("serving needs a tokenizer: put tiktoken.model next to config.json")
        self.model, self.scheduler, self.tokenizer = model, scheduler, model.tokenizer
        self.served_model_name, self.api_key = served_model_name, api_key
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())

    @property
    def max_context(self) -> int:
        return self.scheduler.max_context

    def check_model(self, body: dict[str, Any]) -> None:
        """`model` must name the served model (a 404 otherwise, as both APIs answer)."""
        name = body.get("model")
        if not isinstance(name, str):
            raise bad("model", f"this field is required: a string naming the model "
                               f"({self.served_model_name!r}), got {got(name)}")
        if name != self.served_model_name:
            raise APIError(404, f"model: {show(name)} does not exist; this server serves {self.served_model_name!r}",
                           param="model", code="model_not_found")

    @property
    def thinks(self) -> bool:
        """Whether the model reasons in <think>…</think> before it answers (its chat template says so:
        Kimi-K2-Thinking); replies then carry the reasoning apart from the content."""
        return self.tokenizer.chat_template.thinks

    def chat_prompt(self, messages: Any, tools: Any = None, declare: bool = True,
                    template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """The one prompt builder of both APIs: OpenAI-style `messages` and tool declarations,
        checked and rendered by the checkpoint's chat template into token ids; the tools are declared
        to the model only if `declare` (tool_choice "none" checks them but declares none).
        `template_kwargs`: further template variables (OpenAI's `chat_template_kwargs`).

        Client-made tool-call ids such as `call_abc` become Kimi's `functions.NAME:IDX` first.
        """
        check_messages(messages)
        check_tools(tools)
        try:
            return self.tokenizer.apply_chat_template(normalize_tool_call_ids(messages),
                                                      tools if declare and tools else None, **(template_kwargs or {}))
        except ChatFormatError as e:  # what the checks above let through, named by the template
            raise bad("messages", str(e)) from None

    # Constrained decoding (text/grammar.py, runtime/constrained.py) ---------------------------------
    @property
    def grammars(self) -> Grammars | None:
        """The scheduler's grammars (None: started without them, constrained requests are refused)."""
        return getattr(self.scheduler, "grammars", None)

    def json_constraint(self, schema: dict[str, Any] | None, at: str, reasoning: bool = False) -> Constraint:
        """The reply is one JSON value of `schema` (None: any JSON object); 400 at `at` if it cannot be
        enforced."""
        grammar = json_grammar(schema, self.tokenizer, reasoning)
        self._check_grammar(grammar, at)
        return Constraint(grammar)

    def tool_constraint(self, tools: list[dict[str, Any]] | None, choice: str, name: str | None = None,
                        parallel: bool = True, reasoning: bool = False) -> Constraint | None:
        """The grammar of a reply's tool calls (OpenAI-shaped `tools`), each call's arguments its tool's
        schema: `choice` "required" (any declared tool) or "named" (`name` alone) makes the reply a
        tool-call section; "auto" constrains the calls the model opens itself, and only if every
        declared schema can be enforced (a tool with `strict: true` must be: else 400; the others then
        go unconstrained, as before); "none": None."""
        if not tools or choice == "none":
            return None
        declared = []
        for i, tool in enumerate(tools):
            function = tool["function"]
            schema = function.get("parameters") or NO_ARGUMENTS
            try:
                self._check_grammar(json_grammar(schema), f"tools[{i}]")
            except APIError:
                if choice != "auto" or function.get("strict"):
                    raise
                return None  # auto, not strict: this schema is beyond the grammar compiler
            if choice != "named" or function["name"] == name:
                declared.append((function["name"], schema))
        opened = choice == "auto"
        grammar = tool_call_grammar(self.tokenizer, declared, parallel, opened=opened, reasoning=reasoning)
        self._check_grammar(grammar, "tools")
        return Constraint(grammar, self.tokenizer.special_ids[SECTION_BEGIN] if opened else None)

    def _check_grammar(self, grammar: str, at: str) -> None:
        if self.grammars is None:
            raise APIError(400, f"{at}: constrained decoding is off on this server (it was started without "
                                "grammars); leave out structured outputs and forced tool calls", param=at)
        try:
            self.grammars.check(grammar)
        except GrammarError as e:
            raise bad(at, f"the schema cannot be enforced by constrained decoding: {clip(str(e), 300)}") from None

    def request(self, prompt: Sequence[int], max_tokens: int | None, temperature: float, top_p: float,
                top_k: int = 0, seed: int | None = None, presence_penalty: float = 0.0,
                frequency_penalty: float = 0.0, logit_bias: tuple[tuple[int, float], ...] = ()) -> Request:
        """A Request; the prompt + max_tokens must fit the context (else 400).
        Without a seed a sampled request draws a fresh one."""
        room = self.max_context - len(prompt)
        if room < 1:
            raise APIError(400, f"messages: the prompt has {len(prompt)} tokens; this server's context is "
                                f"{self.max_context} tokens: shorten the messages", param="messages",
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise APIError(400, f"max_tokens: the prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceed "
                                f"this server's context of {self.max_context} tokens; lower max_tokens to at most "
                                f"{room}", param="max_tokens", code="context_length_exceeded")
        if seed is None:
            seed = secrets.randbits(32) if temperature > 0 else 0
        try:
            sampling = SamplingParams(float(temperature), float(top_p), int(top_k), int(seed), float(presence_penalty),
                                      float(frequency_penalty), logit_bias)
        except ValueError as e:  # the routes' range checks keep this from happening
            raise APIError(400, str(e)) from None
        return Request(tuple(prompt), int(max_tokens), sampling, tuple(self.tokenizer.stop_ids))
