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
new prompt length reuses a compiled program; the persistent compile cache (`enable_compile_cache`)
carries programs across runs. Each row is one sequence in slots 0..len−1, so rows of different
lengths never interact: batched greedy tokens equal unbatched ones.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.attention import LatentCache
from kimi_jax.config import Config
from kimi_jax.model import Transformer, init_cache
from kimi_jax.sampling import DEFAULT_TEMPERATURE, SamplingParams, sample

STEPS_PER_CALL = 8  # decode steps per compiled call; see docs/generation_bench.md


# Compile cache ----------------------------------------------------------------------------------
CACHE_ENV = "KIMI_JAX_CACHE"  # root of everything kimi_jax caches (default ~/.cache/kimi_jax)
COMPILE_CACHE_ENV = "KIMI_JAX_COMPILE_CACHE"  # compile cache dir, or "off" to disable


def cache_root() -> Path:
    """$KIMI_JAX_CACHE, else $XDG_CACHE_HOME/kimi_jax, else ~/.cache/kimi_jax."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kimi_jax"


def enable_compile_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Turn on JAX's persistent compile cache (idempotent); returns its directory, or None if off.

    Directory: `path`, else $KIMI_JAX_COMPILE_CACHE ("off" disables), else <cache_root>/xla. A
    directory the user already configured (JAX_COMPILATION_CACHE_DIR) is kept. The size and
    compile-time thresholds are dropped so the small programs of tiny models are cached too.
    """
    setting = str(path) if path is not None else os.environ.get(COMPILE_CACHE_ENV, "")
    if setting.lower() in ("off", "0", "false", "none"):
        return None
    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    directory = Path(setting).expanduser() if setting else cache_root() / "xla"
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return directory


# Buckets ----------------------------------------------------------------------------------------
def length_bucket(n: int, minimum: int = 16) -> int:
    """Smallest of {2^k, 3·2^(k−1)} ≥ max(n, minimum): at most a third of a bucket is padding."""
    b = minimum
    while b < n:
        b = b * 3 // 2 if b & (b - 1) == 0 and b >= 4 else 1 << b.bit_length()
    return b


def batch_bucket(n: int) -> int:
    """Next power of two ≥ n."""
    return 1 << max(n - 1, 0).bit_length()


# Requests ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt and how to continue it."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams
    stop_ids: tuple[int, ...]


@dataclasses.dataclass
class Completion:
    """New tokens (a final stop token included) and why generation ended: "stop" or "length"."""

    token_ids: list[int]
    finish_reason: str | None = None


def _per_request(name: str, value: Any, n: int, is_list=lambda v: isinstance(v, (list, tuple))) -> list:
    if is_list(value):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts; give one value or one per prompt")
        return list(value)
    return [value] * n


def make_requests(cfg: Config, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int] = 64,
                  temperature: float | Sequence[float] = DEFAULT_TEMPERATURE, top_p: float | Sequence[float] = 1.0,
                  top_k: int | Sequence[int] = 0, seed: int | Sequence[int] = 0,
                  stop_token_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
                  default_stop_ids: Sequence[int] = ()) -> list[Request]:
    """Validate prompts and broadcast settings (one value for all, or a list with one per prompt).

    stop_token_ids: None -> `default_stop_ids`; a list of ids -> those for every prompt; a list of
    lists -> per prompt. Raises ValueError naming the prompt and the limit.
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) and not hasattr(prompts, "__len__"):
        raise ValueError("prompts must be a list of token-id lists")
    prompts = [list(np.asarray(p).reshape(-1).tolist()) if not isinstance(p, (list, tuple)) else list(p)
               for p in prompts]
    n = len(prompts)
    if n == 0:
        raise ValueError("no prompts given")
    if any(isinstance(p, (int, np.integer)) for p in prompts):
        raise ValueError("prompts must be a list of token-id lists; wrap a single prompt as [ids]")
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
        params = SamplingParams(float(temps[i]), float(top_ps[i]), int(top_ks[i]), int(seeds[i]))
        out.append(Request(tuple(int(t) for t in p), int(new), params, tuple(int(s) for s in stop)))
    return out


# Device-side state ------------------------------------------------------------------------------
class Rows(NamedTuple):
    """Per-row settings on device, each [B] (stop_ids [B, n], −1 = unused)."""

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    seed: jax.Array
    max_new: jax.Array
    stop_ids: jax.Array


class DecodeState(NamedTuple):
    """Per-row decode state, each [B]: the last token (next input) and the position it takes."""

    tokens: jax.Array
    positions: jax.Array
    generated: jax.Array  # tokens generated so far (the sampling step counter)
    done: jax.Array


def _rows(requests: list[Request], batch: int) -> Rows:
    """Host arrays of the requests' settings, padded to `batch` rows (padding rows are inert)."""
    n_stop = batch_bucket(max(4, *(len(r.stop_ids) for r in requests)))  # bucketed: few programs
    stop = np.full((batch, n_stop), -1, np.int32)
    for i, r in enumerate(requests):
        stop[i, :len(r.stop_ids)] = r.stop_ids

    def col(f, dtype, fill):
        return np.array([f(r) for r in requests] + [fill] * (batch - len(requests)), dtype)

    return Rows(col(lambda r: r.sampling.temperature, np.float32, 0.0), col(lambda r: r.sampling.top_p, np.float32, 1.0),
                col(lambda r: r.sampling.top_k, np.int32, 0), col(lambda r: r.sampling.seed, np.uint32, 0),
                col(lambda r: r.max_new_tokens, np.int32, 1), stop)


def _advance(state: DecodeState, nxt: jax.Array, rows: Rows) -> tuple[DecodeState, jax.Array]:
    """Take sampled tokens [B] into the state; returns (state, emitted tokens with −1 for done rows)."""
    live = ~state.done
    generated = state.generated + live
    is_stop = jnp.any(nxt[:, None] == rows.stop_ids, axis=-1)
    done = state.done | is_stop | (generated >= rows.max_new)
    new = DecodeState(jnp.where(live, nxt, state.tokens), state.positions + live, generated, done)
    return new, jnp.where(live, nxt, -1)


def cache_sharding(mesh: jax.sharding.Mesh | None, batch: int) -> jax.sharding.NamedSharding | None:
    """Placement of the latent cache [layers, B, S, width] on `mesh`.

    Batch goes over `data` (when the axis divides it); everything else is replicated. MLA's cache is
    one latent shared by all heads, so there is no head axis for `tensor`, and each tensor-parallel
    device needs the whole latent for its heads; splitting the sequence over `tensor` would need a
    cross-device softmax (flash-decoding) and pays only at contexts far longer than tested here.
    The `expert` axis holds experts, not sequences, so the cache is replicated over it.
    """
    if mesh is None:
        return None
    from jax.sharding import NamedSharding, PartitionSpec

    data = "data" if "data" in mesh.axis_names and batch % mesh.shape["data"] == 0 else None
    return NamedSharding(mesh, PartitionSpec(None, data, None, None))


# The engine -------------------------------------------------------------------------------------
class Generator:
    """Compiled prefill and decode for one model; `stream` runs a batch of requests."""

    def __init__(self, cfg: Config, params: Any, dtype=jnp.bfloat16, backend: str | None = None,
                 mesh: jax.sharding.Mesh | None = None, steps_per_call: int = STEPS_PER_CALL):
        enable_compile_cache()
        self.cfg, self.params, self.dtype, self.mesh = cfg, params, jnp.dtype(dtype), mesh
        self.steps_per_call = steps_per_call
        self._expanded = Transformer(cfg, absorb=False, backend=backend, dtype=self.dtype)
        self._absorbed = Transformer(cfg, absorb=True, backend=backend, dtype=self.dtype)
        self.traces: collections.Counter = collections.Counter()  # compilations per function (tests)
        self._prefill = jax.jit(self._prefill_impl)
        self._place = jax.jit(self._place_impl, static_argnums=(1,))
        self._decode = jax.jit(self._decode_impl, static_argnums=(4,), donate_argnums=(1,))
        self.step_logits = jax.jit(self._step_logits_impl, donate_argnums=(1,))

    # Compiled pieces (run under jit; Python here runs once per shape bucket) -------------------
    def _prefill_impl(self, params, tokens, lengths, rows: Rows):
        """tokens [B, T] right-padded, lengths [B] -> (last logits [B, V], T-slot cache, state, first tokens)."""
        self.traces["prefill"] += 1
        b, t = tokens.shape
        positions = jnp.where(jnp.arange(t) < lengths[:, None], jnp.arange(t), -1)  # (B, T)
        cache = init_cache(self.cfg, b, t, self.dtype)
        hidden, cache = self._expanded.apply({"params": params}, tokens, positions, cache, return_hidden=True)
        last = hidden[jnp.arange(b), jnp.maximum(lengths - 1, 0)]  # (B, D): only these need logits
        logits = jnp.einsum("bd,vd->bv", last, params["lm_head"].astype(self.dtype),
                            preferred_element_type=jnp.float32)
        first = sample(logits, rows.temperature, rows.top_p, rows.top_k, rows.seed, jnp.zeros(b, jnp.int32))
        start = DecodeState(first, lengths, jnp.zeros(b, jnp.int32), lengths == 0)
        state, emitted = _advance(start, first, rows)
        return logits, cache, state, emitted

    def _place_impl(self, small: dict[str, LatentCache], length: int):
        """Copy a prefill cache into the first slots of an empty `length`-slot cache."""
        self.traces["place"] += 1
        batch = next(iter(small.values())).latent.shape[1]
        big = init_cache(self.cfg, batch, length, self.dtype)
        out = jax.tree.map(lambda z, s: jax.lax.dynamic_update_slice_in_dim(z, s, 0, axis=2), big, small)
        sharding = cache_sharding(self.mesh, batch)
        return out if sharding is None else jax.lax.with_sharding_constraint(out, sharding)

    def _step_logits_impl(self, params, cache, tokens, positions):
        """One absorbed decode step: tokens, positions [B] (−1: skip) -> (logits [B, V] f32, cache)."""
        self.traces["step_logits"] += 1
        logits, cache = self._absorbed.apply({"params": params}, tokens[:, None], positions[:, None], cache)
        return logits[:, 0], cache

    def _decode_impl(self, params, cache, state: DecodeState, rows: Rows, steps: int):
        """Up to `steps` decode steps -> (cache, state, tokens [steps, B], −1 where nothing was made)."""
        self.traces["decode"] += 1
        b = state.tokens.shape[0]

        def body(carry):
            i, cache, state, out = carry
            positions = jnp.where(state.done, -1, state.positions)  # done rows write nothing
            logits, cache = self._absorbed.apply({"params": params}, state.tokens[:, None], positions[:, None],
                                                 cache)
            nxt = sample(logits[:, 0], rows.temperature, rows.top_p, rows.top_k, rows.seed, state.generated)
            state, emitted = _advance(state, nxt, rows)
            return i + 1, cache, state, out.at[i].set(emitted)

        def more(carry):
            i, _, state, _ = carry
            return (i < steps) & ~jnp.all(state.done)

        out = jnp.full((steps, b), -1, jnp.int32)
        _, cache, state, out = jax.lax.while_loop(more, body, (0, cache, state, out))
        return cache, state, out

    # Host side ----------------------------------------------------------------------------------
    def prefill(self, requests: list[Request], cache_length: int | None = None):
        """Run prefill for a batch; returns (last logits, decode cache, state, rows, first tokens) on device."""
        b = batch_bucket(len(requests))
        t = length_bucket(max(len(r.prompt) for r in requests))
        need = max(len(r.prompt) + r.max_new_tokens for r in requests)
        s = cache_length or min(length_bucket(need, 64), max(self.cfg.max_position_embeddings, need))
        tokens = np.zeros((b, t), np.int32)
        lengths = np.zeros(b, np.int32)
        for i, r in enumerate(requests):
            tokens[i, :len(r.prompt)] = r.prompt
            lengths[i] = len(r.prompt)
        rows = _rows(requests, b)
        logits, small, state, first = self._prefill(self.params, tokens, lengths, rows)
        return logits, self._place(small, max(s, t)), state, rows, first

    def stream(self, requests: list[Request]) -> Iterator[list[list[int]]]:
        """Yield, per compiled call, each request's new tokens (possibly none); the last one ends with its stop."""
        _, cache, state, rows, first = self.prefill(requests)
        emitted = np.asarray(first)  # blocks: the first tokens are ready (time to first token)
        yield [[int(emitted[i])] for i in range(len(requests))]
        done = np.asarray(state.done)
        while not done[:len(requests)].all():
            cache, state, out = self._decode(self.params, cache, state, rows, self.steps_per_call)
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


def kv_cache_bytes_per_token_per_layer(cfg: Config, dtype=jnp.bfloat16) -> int:
    """Bytes the latent cache holds per token per layer: (kv_lora_rank + qk_rope_head_dim) values."""
    return cfg.kv_cache_width * jnp.dtype(dtype).itemsize


def expanded_cache_bytes_per_token_per_layer(cfg: Config, dtype=jnp.bfloat16) -> int:
    """What a per-head K/V cache would hold instead: heads · (qk_head_dim + v_head_dim) values."""
    return cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * jnp.dtype(dtype).itemsize


def bucket_summary(n: int) -> str:
    """Human-readable bucket of a length (for logs)."""
    return f"{n} -> {length_bucket(n)} (+{length_bucket(n) - n} pad, {100 * (1 - n / length_bucket(n)):.0f}%)"


__all__ = ["Generator", "Request", "Completion", "make_requests", "enable_compile_cache", "cache_root",
           "length_bucket", "batch_bucket", "cache_sharding", "kv_cache_bytes_per_token_per_layer",
           "math"]
