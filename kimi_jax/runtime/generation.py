"""Text generation over the latent KV cache: bucketed prefill, multi-step decode, per-request sampling.

    prefill  tokens [B, T] (right-padded, position −1 = pad) -> expanded MLA over the prompt;
             writes the prompt's latents into a T-slot cache and samples each row's first token.
    place    copies that cache into an S-slot decode cache (S ≥ every prompt + its new tokens).
    decode   up to `steps_per_call` absorbed-MLA steps in one compiled call (a `lax.while_loop`
             that exits once every row is done), sampling on device; the host blocks on each
             call's tokens, streams them, and calls again.

Per layer and token the cache holds the normalised latent and the roped shared key
(kv_lora_rank + qk_rope_head_dim = 576 values for Kimi-K2, in the compute dtype): decode attends
in the latent space, so per-head keys and values are never built for cached tokens.

Shapes are bucketed (batch to a power of two, prompt and cache lengths to 2^k or 1.5·2^k), so a
new prompt length reuses a compiled program; the persistent compile cache (runtime/compile_cache.py)
carries programs across runs. Each row is one sequence in slots 0..len−1, so rows of different
lengths never interact: batched greedy tokens equal unbatched ones.

The scheduler's path (`prefill_paged`) prefills straight into a pool of pages through page tables
(model/paged.py) from each row's prefix-cache hit on, and its decode calls read the pool the same
way; the absorbed and expanded attention are the same code over either cache.
"""

from __future__ import annotations

import collections
import functools
import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.config import Config
from kimi_jax.model.attention import LatentCache
from kimi_jax.model.backend import REFERENCE, Backend
from kimi_jax.model.decoder import Transformer, init_cache, vocab_logits
from kimi_jax.model.layout import UNSHARDED, Layout
from kimi_jax.model.paged import PagedCache, pool_axes, with_table
from kimi_jax.runtime.compile_cache import enable_compile_cache
from kimi_jax.runtime.host_call import host_call
from kimi_jax.runtime.requests import Completion, Request, batch_bucket, chunk_bucket, length_bucket, make_requests
from kimi_jax.runtime.sampling import (
    MAX_LOGIT_BIAS,
    TOP_LOGPROBS,
    LogProbs,
    adjust_logits,
    mask_logits,
    sample,
    token_logprobs,
)
from kimi_jax.text.detokenize import Detokenizer, Piece
from kimi_jax.text.reasoning import split_reasoning
from kimi_jax.text.tool_calls import parse_tool_calls

STEPS_PER_CALL = 8  # decode steps per compiled call; see BENCHMARKS.md (Generation)
MAX_STOP_IDS = 8  # stop-id columns of the scheduler's rows (default stops are 2, + 1 for a constraint's trigger)


# Device-side state ------------------------------------------------------------------------------
class Rows(NamedTuple):
    """Per-row settings on device, each [B] (stop_ids and bias_ids [B, n], −1 = unused)."""

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    seed: jax.Array
    max_new: jax.Array
    stop_ids: jax.Array
    presence: jax.Array  # presence penalty
    frequency: jax.Array  # frequency penalty
    bias_ids: jax.Array  # logit_bias token ids [B, n]
    bias: jax.Array  # and what is added to their logits [B, n]


class DecodeState(NamedTuple):
    """Per-row decode state, each [B]: the last token (next input) and the position it takes."""

    tokens: jax.Array
    positions: jax.Array
    generated: jax.Array  # tokens generated so far (the sampling step counter)
    done: jax.Array
    counts: jax.Array  # [B, V] int32: times each token was generated (the penalties' c[j])


def request_rows(requests: list[Request], batch: int, n_stop: int | None = None, n_bias: int | None = None) -> Rows:
    """Host arrays of the requests' settings, padded to `batch` rows (padding rows are inert).
    The stop-id and logit-bias columns are bucketed (few programs) unless given."""
    n_stop = n_stop or batch_bucket(max(4, *(len(r.stop_ids) for r in requests)))
    n_bias = n_bias or batch_bucket(max(4, *(len(r.sampling.logit_bias) for r in requests)))
    stop = np.full((batch, n_stop), -1, np.int32)
    bias_ids, bias = np.full((batch, n_bias), -1, np.int32), np.zeros((batch, n_bias), np.float32)
    for i, r in enumerate(requests):
        stop[i, :len(r.stop_ids)] = r.stop_ids
        for j, (token, value) in enumerate(r.sampling.logit_bias):
            bias_ids[i, j], bias[i, j] = token, value

    def col(f, dtype, fill):
        return np.array([f(r) for r in requests] + [fill] * (batch - len(requests)), dtype)

    return Rows(col(lambda r: r.sampling.temperature, np.float32, 0.0),
                col(lambda r: r.sampling.top_p, np.float32, 1.0), col(lambda r: r.sampling.top_k, np.int32, 0),
                col(lambda r: r.sampling.seed, np.uint32, 0), col(lambda r: r.max_new_tokens, np.int32, 1), stop,
                col(lambda r: r.sampling.presence_penalty, np.float32, 0.0),
                col(lambda r: r.sampling.frequency_penalty, np.float32, 0.0), bias_ids, bias)


def _next(logits: jax.Array, state: DecodeState, rows: Rows, adjust: bool, allowed: jax.Array | None = None
          ) -> jax.Array:
    """The next token of each row [B]: its logits adjusted (bias, penalties) if `adjust` (static: some
    request in the batch has them), restricted to the `allowed` bitmask [B, ceil(V / 32)] of each row's
    grammar when given (None: no row is constrained; the program then has no mask at all), then sampled."""
    if adjust:
        logits = adjust_logits(logits, rows.presence, rows.frequency, rows.bias_ids, rows.bias, state.counts)
    if allowed is not None:
        logits = mask_logits(logits, allowed)
    return sample(logits, rows.temperature, rows.top_p, rows.top_k, rows.seed, state.generated)


def _next_rich(logits: jax.Array, state: DecodeState, rows: Rows, masks: Callable[[], jax.Array], masked: jax.Array,
               adjusted: jax.Array, wanted: jax.Array, top: int) -> tuple[jax.Array, LogProbs]:
    """`_next` with masks, adjustments and logprobs chosen at run time (the rich decode program): one
    `lax.switch` over the 8 cases, whose branches return only the tokens [B] and this step's LogProbs
    (zeros unless `wanted`), never the [B, V] logits (a cond's output copy, BENCHMARKS.md "Sampling
    extras"). `masks()` traces the host call for the rows' grammar masks, in the masked branches."""
    def branch(case: int):
        def run():
            nxt = _next(logits, state, rows, bool(case & 1), masks() if case & 2 else None)
            if case & 4:
                return nxt, token_logprobs(logits, nxt, top)
            return nxt, LogProbs(jnp.zeros(nxt.shape, jnp.float32), jnp.zeros((*nxt.shape, top), jnp.int32),
                                 jnp.zeros((*nxt.shape, top), jnp.float32))
        return run

    case = adjusted.astype(jnp.int32) + 2 * masked.astype(jnp.int32) + 4 * wanted.astype(jnp.int32)
    return jax.lax.switch(case, [branch(c) for c in range(8)])


def adjusts(requests: Sequence[Request]) -> bool:
    """Whether any of `requests` has a logit_bias or a penalty (the `adjust` flag of prefill and decode)."""
    return any(r.sampling.adjusts for r in requests)


def _advance(state: DecodeState, nxt: jax.Array, rows: Rows) -> tuple[DecodeState, jax.Array]:
    """Take sampled tokens [B] into the state; returns (state, emitted tokens with −1 for done rows)."""
    live = ~state.done
    generated = state.generated + live
    is_stop = jnp.any(nxt[:, None] == rows.stop_ids, axis=-1)
    done = state.done | is_stop | (generated >= rows.max_new)
    counts = state.counts.at[jnp.arange(nxt.shape[0]), nxt].add(live.astype(state.counts.dtype))
    new = DecodeState(jnp.where(live, nxt, state.tokens), state.positions + live, generated, done, counts)
    return new, jnp.where(live, nxt, -1)


def _one_call_at_a_time(method):
    """Run a Generator method under the generator's lock until its results are ready: threads that
    share one generator (in-process lockstep tests, `Model.chat` beside a server) take turns instead
    of running its programs concurrently on the same devices, where XLA CPU interleaves them (and
    their host callbacks and collectives) in no fixed order. Uncontended, as with one scheduler per
    process, it costs nothing: every caller blocks on the results anyway."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self._turn:
            return jax.block_until_ready(method(self, *args, **kwargs))
    return run


# The engine -------------------------------------------------------------------------------------
class Generator:
    """Compiled prefill and decode for one model; `stream` runs a batch of requests.

    On a mesh (`layout` a sharding.MeshLayout) the cache follows the rules table's `batch` and
    `cache_seq` axes (sharding.rules.CACHE_AXES): by default the batch is split over `data` and the
    rest replicated. MLA's latent is shared by all heads, so there is no head axis to split over
    `tensor`: each tensor-parallel device needs the whole latent for its heads. Splitting the
    sequence instead would need a cross-device softmax (flash-decoding style) and pays only at
    contexts far beyond those tested here. Batches are padded to a multiple of the batch shards.
    """

    def __init__(self, cfg: Config, params: Any, dtype=jnp.bfloat16, backend: Backend = REFERENCE,
                 layout: Layout = UNSHARDED, steps_per_call: int = STEPS_PER_CALL):
        enable_compile_cache()
        self.cfg, self.params, self.dtype, self.layout = cfg, params, jnp.dtype(dtype), layout
        self.backend = backend  # chosen by the Model for its devices
        self.mesh = getattr(layout, "mesh", None)
        self.batch_shards = getattr(layout, "batch_shards", 1)
        self.steps_per_call = steps_per_call
        self._expanded = Transformer(cfg, absorb=False, backend=backend, dtype=self.dtype, layout=layout)
        self._absorbed = Transformer(cfg, absorb=True, backend=backend, dtype=self.dtype, layout=layout)
        self.traces: collections.Counter = collections.Counter()  # programs built per function (tests, /metrics)
        self._turn = threading.RLock()  # one prefill or decode call at a time (`_one_call_at_a_time`)
        self._prefill = jax.jit(self._prefill_impl, static_argnums=(7,))
        self._prefill_paged = jax.jit(self._prefill_paged_impl, donate_argnums=(1,))
        self._copy_pages = jax.jit(self._copy_pages_impl, donate_argnums=(0,))
        self._set_counts = jax.jit(self._set_counts_impl, donate_argnums=(0,))
        self._first_tokens = jax.jit(self._first_tokens_impl, donate_argnums=(1,))
        self._unmasked: dict[int, jax.Array] = {}  # batch -> its all-allowed grammar masks, on device
        self._place = jax.jit(self._place_impl, static_argnums=(1,))
        self._decode = jax.jit(self._decode_impl, static_argnums=(4, 5, 6, 7), donate_argnums=(1,))
        self._mask_sources: dict[int, Callable] = {}  # constrained decoding: see `register_masks`
        self.first_logprobs = jax.jit(self._first_logprobs_impl, static_argnums=(2,))  # of prefill's logits, tokens
        self.step_logits = jax.jit(self._step_logits_impl, donate_argnums=(1,))

    # Compiled pieces (run under jit; Python here runs once per shape bucket) -------------------
    def _place_cache(self, cache: dict[str, LatentCache | PagedCache]) -> dict[str, LatentCache | PagedCache]:
        """Pin the cache (slot rows or a page pool) to its mesh sharding (a no-op on one device)."""
        if self.mesh is None:
            return cache
        if isinstance(next(iter(cache.values())), PagedCache):
            return jax.lax.with_sharding_constraint(cache, self.pool_shardings(cache))
        _, batch, length, _ = next(iter(cache.values())).latent.shape
        return jax.lax.with_sharding_constraint(cache, self.layout.cache_shardings(self.cfg, batch, length))

    def _prefill_impl(self, params, tokens, lengths, gather, row_lengths, rows: Rows, allowed, adjust: bool):
        """tokens [U, T] right-padded, lengths [U] -> (last logits [B, V], T-slot cache [B rows], state,
        first tokens [B]). Row i of the batch continues prompt gather[i] (None: row i, U = B): requests
        with the same prompt share its prefill and sample their first tokens each with its own settings
        (and, with `allowed` [B, W], each within its grammar's mask)."""
        self.traces["prefill"] += 1
        u, t = tokens.shape
        positions = jnp.where(jnp.arange(t) < lengths[:, None], jnp.arange(t), -1)  # (U, T)
        cache = self._place_cache(init_cache(self.cfg, u, t, self.dtype))
        hidden, cache = self._expanded.apply({"params": params}, tokens, positions, cache, return_hidden=True)
        last = hidden[jnp.arange(u), jnp.maximum(lengths - 1, 0)]  # (U, D): only these need logits
        logits = vocab_logits(self.cfg, self.backend, last, params["lm_head"], self.dtype)
        if gather is not None:  # (U, …) -> (B, …)
            logits = logits[gather]
            cache = self._place_cache(jax.tree.map(lambda c: jnp.take(c, gather, axis=1), cache))
        b = row_lengths.shape[0]
        # The last prompt token sits at lengths − 1; `_advance` moves each live row on to `first`.
        start = DecodeState(jnp.zeros(b, jnp.int32), row_lengths - 1, jnp.zeros(b, jnp.int32), row_lengths == 0,
                            jnp.zeros((b, self.cfg.padded_vocab_size), jnp.int32))
        first = _next(logits, start, rows, adjust, allowed)
        state, emitted = _advance(start._replace(tokens=first), first, rows)
        return logits, cache, state, emitted

    def _prefill_paged_impl(self, params, pool, tokens, positions, table):
        """Prefill into the page pool: tokens, positions [U, T], each distinct sequence's chunk (−1 = pad),
        written through table [U, n] while attending to the sequence's cached pages too. -> (last logits
        [U, V] float32, pool). The model's program: its shapes are (U, T, n) alone (runtime/programs.py)."""
        self.traces["prefill_paged"] += 1
        u = tokens.shape[0]
        cache = self._place_cache(with_table(pool, table))
        hidden, cache = self._expanded.apply({"params": params}, tokens, positions, cache, return_hidden=True)
        lengths = (positions >= 0).sum(1)
        last = hidden[jnp.arange(u), jnp.maximum(lengths - 1, 0)]  # (U, D): only these need logits
        logits = vocab_logits(self.cfg, self.backend, last, params["lm_head"], self.dtype)
        return logits, self._place_cache(with_table(cache, None))

    def _copy_pages_impl(self, pool, copy):
        """copy [2, m] (src, dst page ids; dst out of range: dropped): the rows that share a sequence get
        their own copy of its computed pages."""
        self.traces["copy_pages"] += 1
        src, dst = copy
        pool = {g: c._replace(latent=c.latent.at[:, dst].set(c.latent[:, src], mode="drop"),
                              k_rope=c.k_rope.at[:, dst].set(c.k_rope[:, src], mode="drop")) for g, c in pool.items()}
        return self._place_cache(pool)

    def _set_counts_impl(self, counts, slot, row):
        """A resumed row's token counts [V] (what it generated before it was preempted) into its slot."""
        self.traces["set_counts"] += 1
        return counts.at[slot].set(row, mode="drop")

    def _first_tokens_impl(self, logits, counts, gather, last_pos, empty, generated, slots, resumed, rows: Rows,
                           allowed, masked, adjusted):
        """Sample each row's first token from its sequence's logits [U, V]: row i continues sequence
        gather[i], its last prompt token at last_pos[i] (`empty`: a padding row), `generated` tokens made
        before (a resumed row: its counts are already in counts[slots[i]]), bound for slot slots[i] of
        the decode slots' counts [S, V] (out of range: dropped). `allowed` [B, W] grammar masks, used when
        `masked`; logit adjustments when `adjusted` (both chosen at run time: one program per (U, B)).
        -> (logits [B, V], counts, state without counts, first tokens [B])."""
        self.traces["first_tokens"] += 1
        logits = logits[gather]  # (B, V)
        seen = jnp.where(resumed[:, None], counts[jnp.minimum(slots, counts.shape[0] - 1)], 0)  # (B, V)
        start = DecodeState(jnp.zeros_like(last_pos), last_pos, generated, empty, seen)
        first, _ = _next_rich(logits, start, rows, lambda: allowed, masked, adjusted, jnp.bool_(False), 1)
        state, emitted = _advance(start._replace(tokens=first), first, rows)
        counts = counts.at[slots].set(state.counts, mode="drop")
        return logits, counts, state._replace(counts=None), emitted

    def _first_logprobs_impl(self, logits, tokens, top: int):
        self.traces["first_logprobs"] += 1
        return token_logprobs(logits, tokens, top)

    def _place_impl(self, small: dict[str, LatentCache], length: int):
        """Copy a prefill cache into the first slots of an empty `length`-slot cache."""
        self.traces["place"] += 1
        batch = next(iter(small.values())).latent.shape[1]
        big = init_cache(self.cfg, batch, length, self.dtype)
        out = jax.tree.map(lambda z, s: jax.lax.dynamic_update_slice_in_dim(z, s, 0, axis=2), big, small)
        return self._place_cache(out)

    def _step_logits_impl(self, params, cache, tokens, positions):
        """One absorbed decode step: tokens, positions [B] (−1: skip) -> (logits [B, V] f32, cache)."""
        self.traces["step_logits"] += 1
        logits, cache = self._absorbed.apply({"params": params}, tokens[:, None], positions[:, None], cache)
        return logits[:, 0], cache

    def _decode_impl(self, params, cache, state: DecodeState, rows: Rows, steps: int, top: int, adjust: bool,
                     rich: bool, want_logprobs, source, adjust_rows):
        """Up to `steps` decode steps -> (cache, state, tokens [steps, B] (−1 where nothing was made),
        log probabilities [steps, B] with the `top` most likely tokens (None unless `rich`; zeros unless
        `want_logprobs`)). `source`: the mask source (`register_masks`) each step asks for the rows'
        grammar masks (−1: none). `adjust_rows` (int32 0 or 1): the rich program's `adjust`.

        A plain program (`rich` False) samples alone, with the logit adjustments traced in or not
        (`adjust`). The rich one takes logprobs, masks and adjustments as runtime operands, each step's
        work for them chosen by one `lax.switch` a step, so that one program serves every request
        with logprobs, a grammar or both, and the scheduler's warm-up can build it: such a request
        never waits for a compile. The switch costs XLA CPU ~0.1 ms a step (BENCHMARKS.md,
        "Constrained decoding"), so batches without either keep the plain programs."""
        self.traces["decode"] += 1
        b = state.tokens.shape[0]

        def body(carry):
            i, cache, state, out, lps = carry
            # Tie the weights to the step so that XLA cannot hoist their conversions out of the loop:
            # hoisted, each call would materialise converted copies of the weights (fp8 dequantized,
            # and on CPU every bf16 weight upcast to f32, embedding table included). Measured on the
            # CPU bench config: 61 vs 78 ms per step at 8 steps per call (BENCHMARKS.md (Generation)).
            params_ = jax.lax.optimization_barrier((params, i))[0]
            positions = jnp.where(state.done, -1, state.positions)  # done rows write nothing
            logits, cache = self._absorbed.apply({"params": params_}, state.tokens[:, None], positions[:, None],
                                                 cache)
            if not rich:
                nxt = _next(logits[:, 0], state, rows, adjust)
            else:
                masks = lambda: self._step_masks(source, state)  # noqa: E731 - called in the masked branches only
                nxt, step = _next_rich(logits[:, 0], state, rows, masks, source >= 0, adjust_rows, want_logprobs, top)
                lps = jax.tree.map(lambda all_, one: all_.at[i].set(one), lps, step)
            state, emitted = _advance(state, nxt, rows)
            return i + 1, cache, state, out.at[i].set(emitted), lps

        def more(carry):
            i, _, state, _, _ = carry
            return (i < steps) & ~jnp.all(state.done)

        out = jnp.full((steps, b), -1, jnp.int32)
        lps = None if not rich else LogProbs(jnp.zeros((steps, b), jnp.float32), jnp.zeros((steps, b, top), jnp.int32),
                                             jnp.zeros((steps, b, top), jnp.float32))
        _, cache, state, out, lps = jax.lax.while_loop(more, body, (0, cache, state, out, lps))
        return self._place_cache(cache), state, out, lps

    def _step_masks(self, source: jax.Array, state: DecodeState) -> jax.Array:
        """The rows' grammar masks [B, W] for this step, from the host (runtime/constrained.py): a callback
        inside the decode loop, so that a constrained row costs the batch a host round trip per step
        rather than a compiled call per token (BENCHMARKS.md, "Constrained decoding")."""
        b, words = state.tokens.shape[0], -(-self.cfg.padded_vocab_size // 32)
        rows = jnp.stack([state.tokens, state.generated, state.done.astype(jnp.int32)])  # one operand: (3, B)
        return host_call(self._host_masks, jax.ShapeDtypeStruct((b, words), jnp.int32), source, rows)

    def _host_masks(self, source, rows) -> np.ndarray:
        tokens, generated, done = rows
        return self._mask_sources[int(source)](tokens, generated, done.astype(bool))

    def register_masks(self, fn: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]) -> int:
        """Register a mask source: fn(last tokens [B], generated [B], done [B]) -> int32 masks [B, W], called
        by every decode step of a `decode(..., masks=id)` call before it samples. Returns the id."""
        self._mask_sources[len(self._mask_sources)] = fn
        return len(self._mask_sources) - 1

    # Host side ----------------------------------------------------------------------------------
    @_one_call_at_a_time
    def prefill_prompts(self, requests: list[Request], allowed: np.ndarray | None = None):
        """Prefill alone: (last logits, T-slot prompt cache, state, rows, first tokens) on device, batch bucketed,
        one row per request. Requests with the same prompt share one prefill (the `n` samples of a request).
        `allowed` [len(requests), W]: each request's grammar mask for its first token (all ones: none)."""
        prompts = list(dict.fromkeys(r.prompt for r in requests))  # distinct, in order
        u, b = batch_bucket(len(prompts), self.batch_shards), batch_bucket(len(requests), self.batch_shards)
        t = length_bucket(max(len(p) for p in prompts))
        tokens = np.zeros((u, t), np.int32)
        lengths = np.zeros(u, np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
            lengths[i] = len(p)
        index = {p: i for i, p in enumerate(prompts)}
        gather = np.array([index[r.prompt] for r in requests] + [0] * (b - len(requests)), np.int32)
        row_lengths = np.array([len(r.prompt) for r in requests] + [0] * (b - len(requests)), np.int32)
        shared = len(prompts) < len(requests)
        rows = jax.device_put(request_rows(requests, b))  # sent once, reused by every decode call
        if allowed is not None:
            allowed = np.concatenate([allowed, np.full((b - len(requests), allowed.shape[1]), -1, np.int32)])
        logits, small, state, first = self._prefill(self.params, tokens, lengths, gather if shared else None,
                                                    row_lengths, rows, allowed, adjusts(requests))
        return logits, small, state, rows, first

    @_one_call_at_a_time
    def prefill_paged(self, pool: dict[str, PagedCache], counts: jax.Array, requests: list[Request],
                      slots: Sequence[int], tables: np.ndarray, starts: Sequence[int],
                      histories: Sequence[Sequence[int]], allowed: np.ndarray | None = None,
                      ends: Sequence[int] | None = None):
        """Prefill requests into a page pool (the scheduler's path; both `pool` and `counts` are donated).

        Row k is requests[k] continued by histories[k] (tokens it generated before it was preempted;
        empty for a new request), bound for decode slot slots[k], reading and writing through the page
        table tables[k] ([n] page ids, −1 = none). Its first starts[k] tokens are already in its pages
        (a prefix hit, or the chunks of a chunked prefill so far) and only the rest is computed, up to
        ends[k] (default: the whole sequence; a chunk that stops short of it samples a token nobody
        takes); rows with the same tokens (the `n` samples of a request) are computed once and the
        pages copied. counts: the
        decode slots' [slots, V] token counts. allowed [len(requests), W]: each row's grammar mask for
        its first token (None: no row is constrained). -> (last logits, pool, counts with the rows' at their
        slots, host state of the rows, device rows, first tokens), the batch bucketed.
        """
        seqs = [r.prompt + tuple(h) for r, h in zip(requests, histories)]
        ends = [len(sq) for sq in seqs] if ends is None else list(ends)
        if any(not 0 <= st < end <= len(sq) for sq, st, end in zip(seqs, starts, ends)):
            raise ValueError(f"prefill ranges {list(zip(starts, ends))} must each compute a token of its row")
        first_of = {}  # distinct (sequence, range) -> its first row
        keys = [(sq, st, end) for sq, st, end in zip(seqs, starts, ends)]
        for k, key in enumerate(keys):
            first_of.setdefault(key, k)
        u, b = batch_bucket(len(first_of), self.batch_shards), batch_bucket(len(requests), self.batch_shards)
        t = chunk_bucket(max(end - st for _, st, end in first_of))
        tokens, positions = np.zeros((u, t), np.int32), np.full((u, t), -1, np.int32)
        table = np.full((u, tables.shape[1]), -1, np.int32)
        for i, ((sq, st, end), k) in enumerate(first_of.items()):
            tokens[i, :end - st], positions[i, :end - st], table[i] = sq[st:end], range(st, end), tables[k]
        logits, pool = self._prefill_paged(self.params, pool, tokens, positions, table)
        some = next(iter(pool.values()))
        page_size, num_pages = some.page_size, some.latent.shape[1]
        src, dst = [], []  # a repeated row's computed pages, copied from its sequence's first row
        for k, key in enumerate(keys):
            first = first_of[key]
            if first != k:
                computed = range(starts[k] // page_size, -(-ends[k] // page_size))
                pairs = [(tables[first][i], tables[k][i]) for i in computed]
                src += [a for a, z in pairs if a >= 0 and z >= 0]
                dst += [z for a, z in pairs if a >= 0 and z >= 0]
        if src:
            m = batch_bucket(len(src))
            pool = self._copy_pages(pool, np.array([src + [0] * (m - len(src)), dst + [num_pages] * (m - len(dst))],
                                                   np.int32))  # padding pairs: dropped
        v = self.cfg.padded_vocab_size
        for slot, h in zip(slots, histories):
            if h:  # a resumed row's penalty counts go on from what it generated
                counts = self._set_counts(counts, np.int32(slot), np.bincount(h, minlength=v).astype(np.int32))
        order = list(first_of)
        gather = np.array([order.index(key) for key in keys] + [0] * (b - len(seqs)), np.int32)
        last_pos, empty = np.zeros(b, np.int32), np.ones(b, bool)
        generated, at = np.zeros(b, np.int32), np.full(b, counts.shape[0], np.int32)  # padding: out of range
        for k, h in enumerate(histories):
            last_pos[k], empty[k], generated[k], at[k] = ends[k] - 1, False, len(h), slots[k]
        n_stop = max(MAX_STOP_IDS, batch_bucket(max(len(r.stop_ids) for r in requests)))
        n_bias = max(MAX_LOGIT_BIAS, batch_bucket(max(len(r.sampling.logit_bias) for r in requests)))
        rows = jax.device_put(request_rows(requests, b, n_stop, n_bias))
        if allowed is None:
            masks = self._all_allowed(b)
        else:
            masks = np.concatenate([allowed, np.full((b - len(requests), allowed.shape[1]), -1, np.int32)])
        logits, counts, state, first = self._first_tokens(logits, counts, gather, last_pos, empty, generated, at,
                                                          generated > 0, rows, masks, np.bool_(allowed is not None),
                                                          np.bool_(adjusts(requests)))
        return logits, pool, counts, jax.tree.map(np.asarray, state), rows, first

    @_one_call_at_a_time
    def warm_up_paged(self, pool: dict[str, PagedCache], counts: jax.Array, chunks: Sequence[tuple[int, int]],
                      widths: Sequence[int], samples: Sequence[tuple[int, int]], copies: Sequence[int],
                      top: int = TOP_LOGPROBS):
        """Build every program `prefill_paged` (and `first_logprobs`) can run for the given shapes
        (runtime/programs.py): the model's per (sequences, tokens) in `chunks` and table width in
        `widths`, the first-token sampling per (sequences, rows) in `samples`, the page copy per count
        in `copies`, and the count restore. Each runs on inert operands: no position, page, slot or
        count is written (pool and counts are donated: use the returned ones)."""
        v, num_pages = self.cfg.padded_vocab_size, next(iter(pool.values())).latent.shape[1]
        for (u, t), n in itertools.product(chunks, widths):
            _, pool = self._prefill_paged(self.params, pool, np.zeros((u, t), np.int32), np.full((u, t), -1, np.int32),
                                          np.full((u, n), -1, np.int32))
        for m in copies:
            pool = self._copy_pages(pool, np.array([[0] * m, [num_pages] * m], np.int32))
        counts = self._set_counts(counts, np.int32(counts.shape[0]), np.zeros(v, np.int32))
        rows: dict[int, Rows] = {}
        for u, b in samples:
            if b not in rows:
                rows[b] = jax.device_put(request_rows([], b, MAX_STOP_IDS, MAX_LOGIT_BIAS))
                np.asarray(self.first_logprobs(jnp.zeros((b, v), jnp.float32), np.zeros(b, np.int32), top).chosen)
            zeros = np.zeros(b, np.int32)
            _, counts, _, first = self._first_tokens(jnp.zeros((u, v), jnp.float32), counts, zeros, zeros,
                                                     np.ones(b, bool), zeros, np.full(b, counts.shape[0], np.int32),
                                                     np.zeros(b, bool), rows[b], self._all_allowed(b), np.bool_(False),
                                                     np.bool_(False))
            np.asarray(first)  # one program at a time
        jax.block_until_ready((pool, counts))
        return pool, counts

    def _all_allowed(self, batch: int) -> jax.Array:
        """Grammar masks [batch, W] that allow every token (a prefill call without constrained rows),
        made once per batch bucket and kept on device."""
        if batch not in self._unmasked:
            self._unmasked[batch] = jnp.full((batch, -(-self.cfg.padded_vocab_size // 32)), -1, jnp.int32)
        return self._unmasked[batch]

    def pool_shardings(self, pool: dict[str, PagedCache]) -> dict[str, PagedCache]:
        """Mesh shardings of a page pool (model/paged.py POOL_AXES: pages split like the batch)."""
        return jax.tree.map(lambda axes, leaf: self.layout.sharding(axes, leaf.shape, "paged KV cache"),
                            pool_axes(pool), pool, is_leaf=lambda x: isinstance(x, tuple) and not hasattr(x, "_fields"))

    def prefill(self, requests: list[Request]):
        """Run prefill for a batch; returns (last logits, decode cache, state, rows, first tokens) on device."""
        logits, small, state, rows, first = self.prefill_prompts(requests)
        t = next(iter(small.values())).latent.shape[2]
        need = max(len(r.prompt) + r.max_new_tokens for r in requests)
        s = min(length_bucket(need, 64), self.cfg.max_position_embeddings)
        return logits, self._place(small, max(s, t)), state, rows, first

    @_one_call_at_a_time
    def decode(self, cache, state: DecodeState, rows: Rows, steps: int | None = None, logprobs: int | None = None,
               adjust: bool = False, masks: int | None = None):
        """One compiled decode call of up to `steps` steps -> (cache, state, tokens [steps, B] (−1 = none),
        LogProbs [steps, B] with the top `logprobs` alternatives, or None when `logprobs` is None).
        `adjust`: apply the rows' logit_bias and penalties (some row has them; a program each way).
        `masks`: a mask source id (`register_masks`) that gives every step the rows' grammar masks.
        A call with logprobs (at the top TOP_LOGPROBS), masks or both runs one program (`_decode_impl`).
        The cache is donated: use the returned one."""
        source = np.int32(-1 if masks is None else masks)
        top, rich = TOP_LOGPROBS if logprobs is None else logprobs, logprobs is not None or masks is not None
        cache, state, out, lps = self._decode(self.params, cache, state, rows, steps or self.steps_per_call, top,
                                              adjust and not rich, rich, np.bool_(logprobs is not None), source,
                                              np.int32(adjust))
        return cache, state, out, None if logprobs is None else lps

    def stream(self, requests: list[Request]) -> Iterator[list[list[int]]]:
        """Yield, per compiled call, each request's new tokens (possibly none); the last one ends with its stop."""
        _, cache, state, rows, first = self.prefill(requests)
        emitted = np.asarray(first)  # blocks: the first tokens are ready (time to first token)
        yield [[int(emitted[i])] for i in range(len(requests))]
        done = np.asarray(state.done)
        while not done[:len(requests)].all():
            cache, state, out, _ = self.decode(cache, state, rows, self.steps_per_call, None, adjusts(requests))
            out = np.asarray(out)  # blocks on each call: never queue work behind pending collectives
            done = np.asarray(state.done)
            yield [[int(x) for x in out[:, i] if x >= 0] for i in range(len(requests))]

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Run a batch to completion."""
        results = [Completion([]) for _ in requests]
        for chunk in self.stream(requests):
            for res, new in zip(results, chunk):
                res.token_ids.extend(new)
        for res, r in zip(results, requests):
            stopped = bool(res.token_ids) and res.token_ids[-1] in r.stop_ids
            res.finish_reason = "stop" if stopped else "length"
        return results


# Text-level helpers (used by Model.stream / Model.chat) ------------------------------------------
def stream_pieces(generator: Generator, request: Request, tokenizer=None) -> Iterator[Piece]:
    """Stream one request as `Piece(token_id, text)`, one per generated token (text/detokenize.py);
    the text joins to the decoded output without its stop token."""
    text = Detokenizer(tokenizer, request.stop_ids)
    count = 0
    for chunk in generator.stream([request]):
        for token in chunk[0]:
            count += 1
            yield text.push(token, last=count == request.max_new_tokens)


def chat(generator: Generator, tokenizer, messages, tools=None, **settings) -> dict[str, Any]:
    """One assistant turn: the chat template, generation to <|im_end|>/[EOS], and tool-call parsing.

    Returns {"content": str | None, "tool_calls": [OpenAI-style calls], "finish_reason": str}, plus
    "reasoning_content" (str | None) for a thinking model (its chat template reasons in <think>).
    """
    if tokenizer is None:
        raise ValueError("chat needs a tokenizer; this checkpoint has none (put tiktoken.model next to config.json)")
    prompt = tokenizer.apply_chat_template(messages, tools, add_generation_prompt=True)
    request, = make_requests(generator.cfg, [prompt], default_stop_ids=tokenizer.stop_ids, **settings)
    result, = generator.generate([request])
    ids = result.token_ids[:-1] if result.finish_reason == "stop" else result.token_ids
    text, thinks = tokenizer.decode(ids), tokenizer.chat_template.thinks
    reasoning, text = split_reasoning(text) if thinks else (None, text)
    content, tool_calls = parse_tool_calls(text)
    reply = {"content": content, "tool_calls": tool_calls, "finish_reason": result.finish_reason}
    return {**reply, "reasoning_content": reasoning} if thinks else reply


def kv_cache_bytes_per_token_per_layer(cfg: Config, dtype=jnp.bfloat16) -> int:
    """Bytes the latent cache holds per token per layer: (kv_lora_rank + qk_rope_head_dim) values."""
    return cfg.kv_cache_width * jnp.dtype(dtype).itemsize


def expanded_cache_bytes_per_token_per_layer(cfg: Config, dtype=jnp.bfloat16) -> int:
    """What a per-head K/V cache would hold instead: heads · (qk_head_dim + v_head_dim) values."""
    return cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * jnp.dtype(dtype).itemsize

