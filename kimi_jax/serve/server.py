"""What both APIs share about the served model: its name, its context, and how a checked request
becomes token ids and a `generation.Request`."""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from typing import Any

from kimi_jax.runtime.generation import Request
from kimi_jax.runtime.sampling import SamplingParams
from kimi_jax.serve.errors import APIError, show
from kimi_jax.serve.validation import bad, check_messages, check_tools, got
from kimi_jax.text.chat_template import ChatFormatError, normalize_tool_call_ids

MAX_BODY_BYTES = 8 << 20  # a request body over 8 MiB is answered 413 (--max-body-bytes)


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

    def request(self, prompt: Sequence[int], max_tokens: int | None, temperature: float, top_p: float,
                top_k: int = 0, seed: int | None = None, presence_penalty: float = 0.0,
                frequency_penalty: float = 0.0, logit_bias: tuple[tuple[int, float], ...] = ()) -> Request:
        """A generation.Request; the prompt + max_tokens must fit the context (else 400).
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
