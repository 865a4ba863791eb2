"""`python -m kimi_jax.bench.sampling`: the per-step cost of the sampling extras (issue 16) at Kimi-K2's
vocabulary, logits [16, 163840] float32: plain greedy sampling; the same plus the token counts'
update (what every batch pays: the decode loop carries the counts); with one row biased and
penalised (`adjust_logits`, traced in only when a row has them); and greedy plus the top-20 log
probabilities (traced in only when a row asks for them). Prints min and median milliseconds of
`--reps` calls each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.runtime.sampling import MAX_LOGIT_BIAS, TOP_LOGPROBS, adjust_logits, sample, token_logprobs

BATCH, VOCAB = 16, 163840


def _time(f, reps: int) -> tuple[float, float]:
    jax.block_until_ready(f())  # compile
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(f())
        out.append(time.perf_counter() - start)
    return min(out) * 1e3, statistics.median(out) * 1e3


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m kimi_jax.bench.sampling", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=200)
    args = p.parse_args(argv)
    b, v = BATCH, VOCAB
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(b, v)).astype(np.float32))
    zeros_f, zeros_i = jnp.zeros(b, jnp.float32), jnp.zeros(b, jnp.int32)
    seeds, ones = jnp.zeros(b, jnp.uint32), jnp.ones(b, jnp.float32)
    no_ids, no_bias = jnp.full((b, MAX_LOGIT_BIAS), -1, jnp.int32), jnp.zeros((b, MAX_LOGIT_BIAS), jnp.float32)
    counts = jnp.zeros((b, v), jnp.int32)

    @jax.jit
    def plain(z):
        return sample(z, zeros_f, ones, zeros_i, seeds, zeros_i)

    def extras_impl(z, presence, ids, bias, counts, adjust):
        if adjust:
            z = adjust_logits(z, presence, presence, ids, bias, counts)
        nxt = sample(z, zeros_f, ones, zeros_i, seeds, zeros_i)
        return nxt, counts.at[jnp.arange(b), nxt].add(1)

    # The counts are donated, as the decode loop carries them in place (generation.py `_advance`).
    extras_jit = jax.jit(extras_impl, static_argnums=(5,), donate_argnums=(4,))
    carried = [counts]

    def extras(z, presence, ids, bias, adjust=True):
        nxt, carried[0] = extras_jit(z, presence, ids, bias, carried[0], adjust)
        return nxt

    one_presence = zeros_f.at[0].set(0.5)
    one_ids, one_bias = no_ids.at[0, :10].set(jnp.arange(10)), no_bias.at[0, :10].set(5.0)
    with_logprobs = jax.jit(lambda z: token_logprobs(z, plain(z), TOP_LOGPROBS))
    cases = [("greedy sample", lambda: plain(logits)),
             ("+ the counts' update (no row biased or penalised)",
              lambda: extras(logits, zeros_f, no_ids, no_bias, adjust=False)),
             ("+ the counts and adjust_logits (one row biased and penalised)",
              lambda: extras(logits, one_presence, one_ids, one_bias)),
             (f"greedy + log probabilities (top {TOP_LOGPROBS})", lambda: with_logprobs(logits))]
    print(f"logits [{b}, {v}] float32 on {jax.devices()[0].platform}, {args.reps} reps")
    for name, f in cases:
        low, mid = _time(f, args.reps)
        print(f"  {name}: min {low:.2f} ms, median {mid:.2f} ms")


if __name__ == "__main__":
    main()
