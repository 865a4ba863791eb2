"""What a caller asks the engine for (`Request`, built and checked by `make_requests`) and the
buckets the engine pads a call's shapes to, so that a new prompt length or batch size reuses a
compiled program instead of building one (runtime/programs.py lists the scheduler's).

Plain Python and numpy: the host-side bookkeeping (runtime/pages.py, the server) imports it
without the engine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from kimi_jax.config import Config
from kimi_jax.runtime.sampling import DEFAULT_TEMPERATURE, SamplingParams

PREFILL_MIN_TOKENS = 32  # the fewest token columns of a paged prefill call (`chunk_bucket`)


# Buckets ----------------------------------------------------------------------------------------
def length_bucket(n: int, minimum: int = 16) -> int:
    """Smallest of {2^k, 3·2^(k−1)} ≥ max(n, minimum): at most a third of a bucket is padding."""
    b = minimum
    while b < n:
        b = b * 3 // 2 if b & (b - 1) == 0 and b >= 4 else 1 << b.bit_length()
    return b


def batch_bucket(n: int, multiple: int = 1) -> int:
    """Next power of two ≥ n, rounded up to a multiple of `multiple` (the mesh's batch shards)."""
    b = 1 << max(n - 1, 0).bit_length()
    return -(-b // multiple) * multiple


def chunk_bucket(n: int) -> int:
    """Token columns of a paged prefill call whose longest chunk is `n` tokens: a power of two of at
    least PREFILL_MIN_TOKENS (few programs, at most half of a call padding; runtime/programs.py)."""
    return max(PREFILL_MIN_TOKENS, batch_bucket(n))


# Requests ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Constraint:
    """A grammar the generated tokens must follow (llguidance's text form, see text/grammar.py): from
    the first generated token, or with `after` from the token after the model generates token `after`
    (tool_choice auto: a tool call's arguments are constrained once the model opens the call section)."""

    grammar: str
    after: int | None = None


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt and how to continue it."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams
    stop_ids: tuple[int, ...]
    logprobs: bool = False  # report each token's log probability (and the top TOP_LOGPROBS)
    constraint: Constraint | None = None  # constrained decoding (the scheduler runs it)


@dataclasses.dataclass
class Completion:
    """New tokens (a final stop token included) and why generation ended: "stop" or "length"."""

    token_ids: list[int]
    finish_reason: str | None = None


def _per_request(name: str, value: Any, n: int) -> list:
    """One value per prompt from a scalar or a list (numpy scalars become Python numbers)."""
    values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} prompts; give one value or one per prompt")
    return [v.item() if isinstance(v, np.generic) else v for v in values]


def make_requests(cfg: Config, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int] = 64,
                  temperature: float | Sequence[float] = DEFAULT_TEMPERATURE, top_p: float | Sequence[float] = 1.0,
                  top_k: int | Sequence[int] = 0, seed: int | Sequence[int] = 0,
                  stop_token_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
                  default_stop_ids: Sequence[int] = ()) -> list[Request]:
    """Validate prompts and broadcast settings (one value for all, or a list with one per prompt).

    stop_token_ids: None -> `default_stop_ids`; a list of ids -> those for every prompt; a list of
    lists -> per prompt. Raises ValueError naming the prompt and the limit.
    """
    if isinstance(prompts, (str, bytes)):
        raise ValueError("prompts must be a list of token-id lists (tokenize text first, or use Model.stream/chat)")
    checked = []
    for p in prompts:
        if isinstance(p, (int, np.integer, str, bytes)):
            raise ValueError("prompts must be a list of token-id lists; wrap a single prompt as [ids]")
        checked.append([t.item() if isinstance(t, np.generic) else t for t in p])
    prompts, n = checked, len(checked)
    if n == 0:
        raise ValueError("no prompts given")
    news = _per_request("max_new_tokens", max_new_tokens, n)
    temps = _per_request("temperature", temperature, n)
    top_ps = _per_request("top_p", top_p, n)
    top_ks = _per_request("top_k", top_k, n)
    seeds = _per_request("seed", seed, n)
    if stop_token_ids is None:
        stops = [tuple(default_stop_ids)] * n
    elif any(isinstance(s, (list, tuple)) for s in stop_token_ids):
        stops = [tuple(s) for s in _per_request("stop_token_ids", list(stop_token_ids), n)]
    else:
        stops = [tuple(stop_token_ids)] * n
    limit = cfg.max_position_embeddings
    out = []
    for i, (p, new, stop) in enumerate(zip(prompts, news, stops)):
        if not p:
            raise ValueError(f"prompt {i} is empty; generation needs at least one token")
        bad = [t for t in p if not (isinstance(t, (int, np.integer)) and 0 <= t < cfg.vocab_size)]
        if bad:
            raise ValueError(f"prompt {i}: token id {bad[0]!r} is outside the vocabulary [0, {cfg.vocab_size})")
        if not (isinstance(new, (int, np.integer)) and new >= 1):
            raise ValueError(f"max_new_tokens must be an integer ≥ 1, got {new!r}")
        if len(p) + new > limit:
            raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={new} that is {len(p) + new}, "
                             f"over the model's context of {limit} (max_position_embeddings): shorten the prompt "
                             "or lower max_new_tokens")
        bad_stop = [s for s in stop if not (isinstance(s, (int, np.integer)) and 0 <= s < cfg.vocab_size)]
        if bad_stop:
            raise ValueError(f"stop token id {bad_stop[0]!r} is outside the vocabulary [0, {cfg.vocab_size})")
        params = SamplingParams(temps[i], top_ps[i], top_ks[i], seeds[i])
        out.append(Request(tuple(int(t) for t in p), int(new), params, tuple(int(s) for s in stop)))
    return out
