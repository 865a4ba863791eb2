"""Next-token sampling on device: greedy, temperature, top-k, top-p, with per-request seeds.

For one request with logits z [V], temperature t, top_k k and top_p p the distribution is

    q = softmax(z / t) restricted to the k most likely tokens (all when k = 0), renormalised;
    keep the smallest prefix of q (sorted, most likely first) whose mass reaches p; renormalise.

This is the order vLLM and Hugging Face apply them in (top-k, then top-p on what top-k kept). A
token tied with the last kept one is kept too (ties have measure zero for real-valued logits).
t = 0 is greedy: argmax z, no randomness.

Draws use the Gumbel-max trick in vocabulary order: token = argmax over the kept set of
z / t + g, with g [V] standard Gumbel noise from `fold_in(key(seed), step)`, where `step` counts the
tokens the request has generated so far. The noise therefore depends only on (seed, step), never
on the batch a request shares or on other requests' settings: the same seed gives the same
tokens whatever the batch composition (as long as the logits themselves agree).

Before any of that, `adjust_logits` applies a request's logit_bias and its presence / frequency
penalties, as OpenAI defines them: z[j] += bias[j]; z[j] −= c[j]·frequency + (c[j] > 0)·presence,
with c[j] the times token j was generated so far (the prompt does not count). Greedy decoding sees
the adjusted logits too. Log probabilities (`token_logprobs`) are of the model's own logits,
log-softmax in float32, before any adjustment (vLLM's "raw" logprobs). A grammar's token mask
(`mask_logits`, constrained decoding) comes after the adjustments: a disallowed token's logit is −∞.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

DEFAULT_TEMPERATURE = 0.6  # the Kimi-K2 model card's recommendation
TOP_LOGPROBS = 20  # the most alternatives a request's log probabilities list (OpenAI's limit)
MAX_LOGIT_BIAS = 300  # entries of one request's logit_bias (OpenAI's limit)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings; `temperature=0` is greedy."""

    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int = 0
    presence_penalty: float = 0.0  # in [−2, 2]
    frequency_penalty: float = 0.0  # in [−2, 2]
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [−100, 100]) pairs

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature must be a number ≥ 0 (0 = greedy), got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be an integer ≥ 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**32):
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and -2 <= value <= 2):
                raise ValueError(f"{name} must be a number in [-2, 2], got {value!r}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS or not all(
                isinstance(t, int) and t >= 0 and isinstance(b, (int, float)) and -100 <= b <= 100
                for t, b in self.logit_bias):
            raise ValueError(f"logit_bias must be at most {MAX_LOGIT_BIAS} (token id ≥ 0, bias in [-100, 100]) "
                             f"pairs, got {self.logit_bias!r:.200}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def adjusts(self) -> bool:
        """Whether `adjust_logits` changes this request's logits (a logit_bias or a penalty)."""
        return bool(self.logit_bias) or self.presence_penalty != 0 or self.frequency_penalty != 0


def keep_threshold(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """The smallest kept value of `scaled` [B, V] per row under top-k then top-p -> [B].

    Kept tokens form a prefix of the descending sort, so the cut is one value per row.
    """
    v = scaled.shape[-1]
    desc = -jnp.sort(-scaled, axis=-1)  # (B, V), most likely first
    rank = jnp.arange(v)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)[:, None]  # (B, 1)
    in_top_k = rank < k
    probs = jax.nn.softmax(jnp.where(in_top_k, desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # Rank 0 is always kept (its mass_before is 0 < p).
    n_keep = jnp.sum(in_top_k & (mass_before < top_p[:, None]), axis=-1)
    return jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)[:, 0]


class LogProbs(NamedTuple):
    """Log probabilities of sampled tokens (each with leading dims [..., B]): the chosen token's, and
    the `k` most likely tokens' ids and values, most likely first."""

    chosen: jax.Array  # [..., B] float32
    top_ids: jax.Array  # [..., B, k] int32
    top: jax.Array  # [..., B, k] float32


def token_logprobs(logits: jax.Array, tokens: jax.Array, k: int = TOP_LOGPROBS) -> LogProbs:
    """log-softmax (float32) of the model's logits [B, V] at `tokens` [B], and its top `k`."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, jnp.maximum(tokens, 0)[:, None], axis=-1)[:, 0]
    top, ids = jax.lax.top_k(logp, k)
    return LogProbs(chosen, ids.astype(jnp.int32), top)


def adjust_logits(logits: jax.Array, presence: jax.Array, frequency: jax.Array, bias_ids: jax.Array,
                  bias: jax.Array, counts: jax.Array) -> jax.Array:
    """Logits [B, V] (float32) with each row's logit_bias and penalties applied (module docstring).

    presence, frequency [B]; bias_ids [B, n] (−1 = unused) and bias [B, n]; counts [B, V] int32.
    The caller decides, from the batch's requests, whether to call it at all (`SamplingParams.adjusts`):
    a batch with no bias and no penalty skips it at trace time, which a runtime `lax.cond` would not
    do for free (BENCHMARKS.md, Sampling extras).
    """
    logits = logits.astype(jnp.float32)
    b, v = logits.shape
    ids = jnp.where(bias_ids >= 0, bias_ids, v)  # out of range: dropped by the scatter
    logits = logits.at[jnp.arange(b)[:, None], ids].add(bias, mode="drop")
    c = counts.astype(jnp.float32)
    return logits - frequency[:, None] * c - presence[:, None] * (c > 0)


def mask_logits(logits: jax.Array, allowed: jax.Array) -> jax.Array:
    """Logits [B, V] (float32) with the tokens a row's bitmask does not allow at −∞.

    allowed [B, ceil(V / 32)] int32: bit j of word w allows token 32·w + j (llguidance's layout; an
    unconstrained row is all ones). The unpacking is a shift and an and per logit, no gather of V.
    """
    v = logits.shape[-1]
    bits = jnp.arange(32, dtype=jnp.int32)
    unpacked = (allowed[:, :, None] >> bits) & 1  # (B, W, 32): token 32·w + j
    keep = unpacked.reshape(allowed.shape[0], -1)[:, :v].astype(bool)
    return jnp.where(keep, logits.astype(jnp.float32), -jnp.inf)


def request_keys(seeds: jax.Array, steps: jax.Array) -> jax.Array:
    """Per-request PRNG keys [B] for seeds [B] at generation steps [B]."""
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, steps)


def sample(logits: jax.Array, temperature: jax.Array, top_p: jax.Array, top_k: jax.Array,
           seeds: jax.Array, steps: jax.Array) -> jax.Array:
    """Next tokens [B] int32 for logits [B, V] with per-request settings (each [B]).

    temperature/top_p float32, top_k int32 (0 = off), seeds uint32, steps int32 (tokens the
    request has generated so far). The sort top-k/top-p needs runs only when a row asks for it, and
    the noise only when a row samples; neither changes any row's result (see the module docstring).
    """
    logits = logits.astype(jnp.float32)
    greedy_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampling = temperature > 0

    def draw(_):
        scaled = logits / jnp.where(sampling, temperature, 1.0)[:, None]
        needs_cut = jnp.any(sampling & ((top_k > 0) | (top_p < 1)))
        cut = jax.lax.cond(needs_cut, lambda: keep_threshold(scaled, top_k, top_p),
                           lambda: jnp.full(scaled.shape[:1], -jnp.inf, scaled.dtype))
        noise = jax.vmap(lambda key: jax.random.gumbel(key, scaled.shape[-1:], jnp.float32))(
            request_keys(seeds, steps))  # (B, V)
        drawn = jnp.argmax(jnp.where(scaled >= cut[:, None], scaled + noise, -jnp.inf), axis=-1)
        return jnp.where(sampling, drawn.astype(jnp.int32), greedy_tokens)

    return jax.lax.cond(jnp.any(sampling), draw, lambda _: greedy_tokens, None)


def reference_distribution(logits, temperature: float, top_p: float = 1.0, top_k: int = 0):
    """The distribution `sample` draws from, for one row of logits, in numpy (the tests' oracle)."""
    import numpy as np

    z = np.asarray(logits, np.float64)
    if temperature == 0:
        out = np.zeros_like(z)
        out[np.argmax(z)] = 1.0
        return out
    z = z / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(len(z), bool)
    keep[order[: top_k or len(z)]] = True
    q = np.where(keep, np.exp(z - z.max()), 0.0)
    q /= q.sum()
    sorted_q = q[order]
    mass_before = np.cumsum(sorted_q) - sorted_q
    final = np.zeros(len(z), bool)
    final[order[(mass_before < top_p) & keep[order]]] = True
    p = np.where(final, q, 0.0)
    return p / p.sum()
