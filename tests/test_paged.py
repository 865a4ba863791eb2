"""The paged latent cache: decode through page tables equals the contiguous cache (fp32 logits, one
device, a mesh, and a mesh across two processes), prefill from a prefix hit equals a full prefill,
and the scheduler over a pool of pages (exhaustion, preemption, prefix caching, cancellation) gives
every request its reply alone."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from paged_util import PAGE, PROMPTS, TOLERANCE, paged_equals_contiguous, rel
from serve_util import collect as _collect

from kimi_jax.bench.multihost import free_port
from kimi_jax.model.paged import init_pages
from kimi_jax.runtime import generation
from kimi_jax.runtime.requests import Constraint, Request, make_requests
from kimi_jax.runtime.sampling import SamplingParams
from kimi_jax.runtime.scheduler import Scheduler
from kimi_jax.serve.metrics import prometheus_text
from kimi_jax.text.grammar import Grammars, json_grammar

pytestmark = pytest.mark.generation


@pytest.fixture(scope="module")
def model():
    from kimi_jax.runtime.default_model import load_default

    return load_default()  # float32


def test_paged_decode_equals_contiguous_decode(model):
    paged_equals_contiguous(model)


def test_decode_write_orders_agree(model):
    """Decode writing each step's keys before attention reads them (CPU, GPU) equals decode reading the
    cache as it was and the new keys apart (TPU's order): paged in one order against contiguous in the
    other, both ways round."""
    gen = model.generator
    assert gen.backend.decode_writes_first
    read_first = generation.Generator(model.config, gen.params, gen.dtype,
                                      dataclasses.replace(gen.backend, decode_writes_first=False))
    paged_equals_contiguous(model, contiguous_gen=read_first)
    paged_equals_contiguous(model, paged_gen=read_first)


@pytest.mark.slow
def test_paged_decode_equals_contiguous_decode_on_a_mesh(model):
    """dp_attention splits the batch (and the pool's pages) over data × expert: 4 shards of 8 devices."""
    from kimi_jax.runtime.default_model import load_default

    sharded = load_default(mesh="data=2,expert=2,tensor=2", rules="dp_attention")
    assert sharded.generator.batch_shards == 4
    paged_equals_contiguous(sharded, contiguous_gen=model.generator)


@pytest.mark.slow
def test_paged_decode_equals_contiguous_decode_across_two_processes(model, tmp_path):
    """Two processes of 4 CPU devices (jax.distributed on 127.0.0.1, gloo) hold one dp_attention mesh,
    each process 2 of the pool's 4 page shards: paged decode there equals contiguous decode there (each
    process asserts it), and the logits process 0 gathered equal one unsharded process's."""
    out, port = tmp_path / "logits.npz", free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("KIMI_")}
    env.update(JAX_PLATFORMS="cpu")
    script = Path(__file__).with_name("paged_two_processes.py")
    procs = [subprocess.Popen([sys.executable, str(script), str(out), "--mesh", "data=2,expert=2,tensor=2",
                               "--rules", "dp_attention", "--coordinator-address", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i), "--num-cpu-devices", "4"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i}:\n{logs[i][-4000:]}"
    here = paged_equals_contiguous(model)
    with np.load(out, allow_pickle=False) as there:
        assert there["paged"].shape == here["contiguous"].shape
        for step, (two, one) in enumerate(zip(there["paged"], here["contiguous"])):
            assert rel(two, one) <= TOLERANCE, f"step {step}"
        assert rel(there["blocks"], here["contiguous"]) <= TOLERANCE


def test_prefill_from_a_prefix_hit_equals_a_full_prefill(model):
    """A prompt whose first pages are another's (a prefix-cache hit) is prefilled from the hit only,
    attending to those pages, with the logits of a full prefill."""
    cfg, gen = model.config, model.generator
    base = PROMPTS[1]  # 14 tokens: 3 full pages of 4
    longer = base + [30, 31, 32]
    pool = init_pages(cfg, 16, PAGE, model.dtype)
    counts = jnp.zeros((1, cfg.padded_vocab_size), jnp.int32)
    first_pages = np.array([[9, 3, 12, 5, -1, -1]], np.int32)
    request = make_requests(cfg, [base], max_new_tokens=2, temperature=0)
    _, pool, counts, *_ = gen.prefill_paged(pool, counts, request, [0], first_pages, [0], [[]])
    shared = np.array([[9, 3, 12, 7, 1, -1]], np.int32)  # the 3 full pages, then its own
    request = make_requests(cfg, [longer], max_new_tokens=2, temperature=0)
    hit_last, pool, *_ = gen.prefill_paged(pool, counts, request, [0], shared, [12], [[]])
    full_last, *_ = gen.prefill(request)
    assert gen.traces["prefill_paged"] >= 1
    assert rel(hit_last[0], full_last[0]) <= 1e-5
    assert int(np.asarray(hit_last[0]).argmax()) == int(np.asarray(full_last[0]).argmax())


# The scheduler over pages ------------------------------------------------------------------------
def _request(model, prompt, max_new):
    return Request(tuple(prompt), max_new, SamplingParams(0.0), tuple(model.stop_ids))


def _serve(model, prompts, max_new, generator=None, **kwargs):
    """Run prompts through a fresh scheduler (submitted together); returns (their tokens, the scheduler)."""
    sched = Scheduler(generator or model.generator, **kwargs).start()
    outs = []
    for p in prompts:
        out, sink = _collect()
        sched.submit(_request(model, p, max_new), sink)
        outs.append(out)
    for out in outs:
        assert out["done"].wait(300)
    sched.stop()
    return [o["tokens"] for o in outs], sched


LONG = [[1, 5, 9, 13] * 5, [1, 7, 7], [1, 5, 9, 13] * 5 + [2, 3], [1, 2], [3, 1, 4, 1, 5, 9, 2, 6]]


@pytest.fixture(scope="module")
def alone(model):
    """Each of LONG's greedy reply alone (Model.generate: the contiguous cache)."""
    return [model.generate([p], max_new_tokens=20, temperature=0)[0] for p in LONG]


@pytest.mark.parametrize("chunk", [512, 5])
def test_page_exhaustion_preempts_and_loses_no_request(model, alone, chunk):
    """A pool of one sequence's pages for 4 slots: admission waits, the youngest is preempted and
    recomputed (with chunk 5, prompts are also preempted between their chunks), and every reply
    equals its reply alone; at the end no page is held."""
    got, sched = _serve(model, LONG, 20, max_batch=4, max_context=64, page_size=8, num_pages=8, prefill_chunk=chunk)
    assert got == alone
    assert sched.metrics.preemptions > 0
    assert sched.pages.used == 0 and sched.pages.available == 8
    with pytest.raises(ValueError, match="KV pages cannot hold one sequence"):
        Scheduler(model.generator, max_batch=2, max_context=64, page_size=8, num_pages=7)


def test_prefix_cache_keeps_replies_and_counts_hits(model, alone):
    off, sched_off = _serve(model, LONG, 20, max_batch=4, max_context=64, page_size=8, num_pages=8,
                            prefix_cache=False)
    assert off == alone and sched_off.metrics.prefix_hit_tokens == 0
    # One at a time, so each prompt finds the pages the ones before it left.
    sched = Scheduler(model.generator, max_batch=4, max_context=64, page_size=8).start()
    for p, want in zip(LONG + LONG[:1], alone + alone[:1]):
        out, sink = _collect()
        sched.submit(_request(model, p, 20), sink)
        assert out["done"].wait(300) and out["tokens"] == want
    sched.stop()
    m = sched.metrics
    # LONG[2] reuses the 2 full pages of LONG[0]'s 20-token prompt (its third page holds LONG[0]'s reply),
    # and so does LONG[0] again.
    assert m.prefix_hit_tokens == 16 + 16
    assert m.prefix_queried_tokens == sum(map(len, LONG)) + len(LONG[0])
    exported = dict(line.rsplit(" ", 1) for line in prometheus_text(sched).splitlines() if not line.startswith("#"))
    assert float(exported["kimi_jax_prefix_cache_hit_tokens_total"]) == 32
    assert float(exported["kimi_jax_prefix_cache_hit_rate"]) == pytest.approx(32 / m.prefix_queried_tokens, abs=1e-6)
    assert float(exported["kimi_jax_kv_pages_used"]) == 0 and float(exported["kimi_jax_preemptions_total"]) == 0
    assert float(exported["kimi_jax_kv_pages_free"]) == sched.pages.num_pages == 32
    # The generator's programs (prefill and decode at least) are counted as they are built.
    assert float(exported["kimi_jax_compilations_total"]) == sum(model.generator.traces.values()) >= 2


def test_requests_that_differ_only_in_sampling_share_cached_pages(model):
    """A page's contents depend on its tokens alone: a sampled request with a logit_bias and a penalty
    hits the pages a greedy one left, and its reply is the one it gets with the prefix cache off."""
    sampled = dataclasses.replace(_request(model, LONG[2], 12),
                                  sampling=SamplingParams(0.9, seed=5, presence_penalty=0.5, logit_bias=((7, 2.0),)))
    replies = {}
    for cached in (True, False):
        sched = Scheduler(model.generator, max_batch=2, max_context=64, page_size=8, prefix_cache=cached).start()
        for request in (_request(model, LONG[0], 4), sampled):  # one after the other: the second finds the pages
            out, sink = _collect()
            sched.submit(request, sink)
            assert out["done"].wait(300)
        sched.stop()
        replies[cached] = out["tokens"]
        assert sched.metrics.prefix_hit_tokens == (16 if cached else 0)  # LONG[0]'s 2 full pages of 8
    assert replies[True] == replies[False] and len(replies[True]) > 0


def test_serve_flags_size_the_pool_and_switch_the_prefix_cache(model):
    from kimi_jax.serve.cli import make_scheduler, parse_args

    sched = make_scheduler(parse_args(["--max-batch", "2", "--max-context", "100", "--page-size", "16",
                                       "--kv-pages", "9", "--no-prefix-cache"]), model.generator)
    assert (sched.page_size, sched.pages_per_seq, sched.pages.num_pages) == (16, 7, 9)
    assert not sched.pages.prefix_cache
    assert make_scheduler(parse_args([]), model.generator).pages.prefix_cache  # on by default


def test_the_prefill_chunk_is_512_unless_a_flag_says(model):
    """serve's --prefill-chunk and --long-prefill-chunk reach the scheduler, whose defaults they share
    (BENCHMARKS.md "Paged cache")."""
    from kimi_jax.serve.cli import make_scheduler, parse_args

    assert make_scheduler(parse_args([]), model.generator).prefill_chunk == 512
    assert Scheduler(model.generator).prefill_chunk == 512
    assert make_scheduler(parse_args(["--prefill-chunk", "128"]), model.generator).prefill_chunk == 128
    assert Scheduler(model.generator).long_prefill_chunk == 128  # long prompts' share (BENCHMARKS.md)
    assert make_scheduler(parse_args(["--long-prefill-chunk", "64"]), model.generator).long_prefill_chunk == 64
    assert Scheduler(model.generator, prefill_chunk=32).long_prefill_chunk == 32  # never more than the budget


def test_warm_up_builds_every_program_before_ready(model):
    """With warm_up the scheduler builds every program a call can need before `ready` (runtime/programs.py):
    decode per block-list length (plain with and without logit adjustments, rich), and the prefill
    ones. Then requests of every kind (chunked long prompts, a logit_bias and penalties, logprobs, a
    JSON Schema, two samples sharing a prompt, preemption when the pool runs out) build nothing more,
    their replies are those of a scheduler that compiles as it goes, and /metrics says how many
    programs the warm-up built."""
    g = model.generator
    fresh = generation.Generator(model.config, g.params, g.dtype, g.backend)  # nothing compiled yet
    # Blocks of 4 pages (up to 16 in a call); 26 pages take the 900-, 600- and 20-token prompts at once,
    # and their replies then need more.
    kwargs = dict(max_batch=4, max_context=1024, page_size=64, num_pages=26)
    kwargs["grammars"] = Grammars(model.tokenizer, model.config.padded_vocab_size)
    sched = Scheduler(fresh, warm_up=True, **kwargs).start()
    assert sched.ready.wait(600)
    shapes = sched.shapes
    assert sched.decode_block_buckets() == [4, 8, 16] and shapes.widths() == [16]
    assert shapes.chunks() == [(1, 32), (1, 64), (1, 128), (1, 256), (1, 512), (2, 32), (2, 64), (2, 128),
                               (2, 256), (4, 32), (4, 64), (4, 128)]
    built = {"decode": 9, "prefill_paged": 12, "first_tokens": 6, "first_logprobs": 3, "copy_pages": 6,
             "set_counts": 1}
    assert dict(fresh.traces) == built and sched.metrics.warm_up_compilations == sum(built.values())
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, 1000, n)) for n in (900, 600, 20, 300, 40)]
    requests = [_request(model, p, 12) for p in prompts]
    requests[:3] = [dataclasses.replace(r, max_new_tokens=80, stop_ids=()) for r in requests[:3]]  # they grow
    requests[1] = dataclasses.replace(requests[1], sampling=SamplingParams(0.0, presence_penalty=1.0,
                                                                           logit_bias=((7, 5.0),)))
    requests[2] = dataclasses.replace(requests[2], logprobs=True)
    requests[3] = dataclasses.replace(requests[3], constraint=Constraint(json_grammar(
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})))
    requests[4] = dataclasses.replace(requests[4], sampling=SamplingParams(0.8, seed=1))
    requests.append(dataclasses.replace(requests[4], sampling=SamplingParams(0.8, seed=2)))  # shares its prefill
    outs = []
    for r in requests:
        out, sink = _collect()
        sched.submit(r, sink)
        outs.append(out)
    for out in outs:
        assert out["done"].wait(300)
    sched.stop()
    assert sched.metrics.preemptions >= 1
    assert dict(fresh.traces) == built, "a program was built after the warm-up"
    exported = dict(line.split() for line in prometheus_text(sched).splitlines() if not line.startswith("#"))
    assert float(exported["kimi_jax_warm_up_compilations"]) == float(exported["kimi_jax_compilations_total"]) == 37
    plain = Scheduler(g, **kwargs).start()
    for r, out in zip(requests, outs):
        again, sink = _collect()
        plain.submit(r, sink)
        assert again["done"].wait(300)
        assert again["tokens"] == out["tokens"]
    plain.stop()
    assert outs[2]["logprobs"] and len(outs[2]["logprobs"]) == len(outs[2]["tokens"])
    assert model.tokenizer.decode(outs[3]["tokens"]).startswith("{")  # the grammar's reply


def test_prefix_cache_evicts_under_pressure(model, alone):
    """A pool barely larger than one sequence: cached pages are evicted for new ones, and the replies stay."""
    got, sched = _serve(model, LONG + LONG, 20, max_batch=2, max_context=64, page_size=8, num_pages=9)
    assert got == alone + alone
    assert sched.pages.evictions > 0


class _CancelDuringPrefill:
    """The real generator, but the first prefill cancels `victim` while it runs (a client gone mid-prefill)."""

    def __init__(self, generator):
        self.generator, self.scheduler, self.victim = generator, None, None

    def __getattr__(self, name):
        return getattr(self.generator, name)

    def prefill_paged(self, *args):
        if self.victim is not None:
            self.scheduler.cancel(self.victim)
            self.victim = None
        return self.generator.prefill_paged(*args)


@pytest.mark.parametrize("chunk", [512, 10])
def test_cancelled_requests_leave_no_page_to_reuse_wrongly(model, alone, chunk):
    """A request cancelled during its prefill (with chunk 10: after its first chunk, one full page in),
    and one cancelled after some decode steps: the pages they leave are reused by later requests, whose
    replies are still their replies alone."""
    gen = _CancelDuringPrefill(model.generator)
    sched = Scheduler(gen, max_batch=4, max_context=64, page_size=8, prefill_chunk=chunk).start()
    gen.scheduler = sched
    first, sink = _collect()
    gen.victim = sched.submit(_request(model, LONG[0], 20), sink)
    assert first["done"].wait(300) and first["reason"] == "cancelled" and first["tokens"] == []
    again, sink = _collect()
    sched.submit(_request(model, LONG[0], 20), sink)
    assert again["done"].wait(300) and again["tokens"] == alone[0]
    # Cancelled mid-decode: the pages it wrote are registered with the tokens it had made, no more.
    long_out, sink = _collect()
    job = sched.submit(Request(tuple(LONG[4]), 40, SamplingParams(0.0), ()), sink)
    while len(long_out["tokens"]) < 5:
        assert not long_out["done"].is_set()
        long_out["done"].wait(0.01)
    sched.cancel(job)
    assert long_out["done"].wait(60) and long_out["reason"] == "cancelled"
    follow = LONG[4] + job.output[:12]  # into the pages the cancelled one wrote
    out, sink = _collect()
    sched.submit(_request(model, follow, 10), sink)
    assert out["done"].wait(300)
    sched.stop()
    assert out["tokens"] == model.generate([follow], max_new_tokens=10, temperature=0)[0]
    # The victim left its full pages written (2 of its 20-token prompt, or 1 after one chunk of 10).
    assert sched.metrics.prefix_hit_tokens >= {512: 16, 10: 8}[chunk] + 16
    assert sched.pages.used == 0


class _Recording:
    """The real generator, logging its calls: ("prefill", tokens computed) and ("decode", rows running)."""

    def __init__(self, generator):
        self.generator, self.calls = generator, []

    def __getattr__(self, name):
        return getattr(self.generator, name)

    def prefill_paged(self, pool, counts, requests, slots, tables, starts, histories, allowed=None, ends=None):
        seqs = [r.prompt + tuple(h) for r, h in zip(requests, histories)]
        ends = ends or [len(sq) for sq in seqs]
        self.calls.append(("prefill", sum(e - s for _, s, e in set(zip(seqs, starts, ends)))))
        return self.generator.prefill_paged(pool, counts, requests, slots, tables, starts, histories, allowed, ends)

    def decode(self, cache, state, *args):
        self.calls.append(("decode", int((~np.asarray(state.done)).sum())))
        return self.generator.decode(cache, state, *args)


class _Chunks(_Recording):
    """`_Recording` that logs each prefill call's chunks as ("prefill", {(prompt length, start, end)})."""

    def prefill_paged(self, pool, counts, requests, slots, tables, starts, histories, allowed=None, ends=None):
        seqs = [r.prompt + tuple(h) for r, h in zip(requests, histories)]
        self.calls.append(("prefill", {(len(sq), st, e) for sq, st, e in zip(seqs, starts, ends)}))
        return self.generator.prefill_paged(pool, counts, requests, slots, tables, starts, histories, allowed, ends)


def test_a_long_prompt_takes_its_own_share_of_the_budget(model):
    """Budget 20 tokens per iteration, long prompts (longer than 20) at most 4 of it: a 30-token prompt
    arriving with 3 short ones is prefilled 4 tokens an iteration, its last chunk too, while the short
    ones come in whole at once, and every reply is its reply alone."""
    long, short = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3] * 3, [LONG[1], LONG[3], LONG[4]]
    new = [12, 24, 24, 24]  # the short ones decode while the long one is prefilled
    want = [model.generate([p], max_new_tokens=n, temperature=0)[0] for p, n in zip([long, *short], new)]
    gen = _Chunks(model.generator)
    sched = Scheduler(gen, max_batch=4, max_context=64, page_size=8, prefill_chunk=20, long_prefill_chunk=4,
                      steps_per_call=2, prefix_cache=False)
    outs = []
    for p, n in zip([long, *short], new):  # queued before the model thread starts: one iteration sees them all
        out, sink = _collect()
        sched.submit(_request(model, p, n), sink)
        outs.append(out)
    sched.start()
    for out in outs:
        assert out["done"].wait(300)
    sched.stop()
    assert [o["tokens"] for o in outs] == want
    iterations, current = [], []  # the chunks prefilled between decode calls
    for kind, chunks in gen.calls:
        if kind == "decode":
            iterations.append(current)
            current = []
        else:
            current += chunks
    iterations.append(current)
    assert sorted(iterations[0]) == sorted([(30, 0, 4)] + [(len(p), 0, len(p)) for p in short])
    of_long = [(st, e) for chunks in iterations for n, st, e in chunks if n == 30]
    assert of_long == [(st, min(st + 4, 30)) for st in range(0, 30, 4)]
    assert all(sum(n == 30 for n, _, _ in chunks) <= 1 for chunks in iterations)  # one chunk an iteration


def test_chunked_prefill_interleaves_decode_and_keeps_replies(model, alone):
    """A stream is running when two long prompts arrive: they are prefilled 6 tokens per iteration, the
    running stream decodes between their chunks, and every reply equals its reply alone."""
    gen = _Recording(model.generator)
    sched = Scheduler(gen, max_batch=4, max_context=64, page_size=8, prefill_chunk=6, steps_per_call=2).start()
    running, sink = _collect()
    sched.submit(_request(model, LONG[1], 20), sink)
    while not running["tokens"]:
        running["done"].wait(0.01)
    outs = []
    for p in (LONG[0], LONG[2]):  # 20 and 22 tokens; LONG[2] starts with LONG[0]'s first two pages
        out, sink = _collect()
        sched.submit(_request(model, p, 20), sink)
        outs.append(out)
    for out in [running] + outs:
        assert out["done"].wait(300)
    sched.stop()
    assert [running["tokens"]] + [o["tokens"] for o in outs] == [alone[1], alone[0], alone[2]]
    prefills = [n for kind, n in gen.calls if kind == "prefill"]
    assert max(prefills) <= 6 and len(prefills) >= (20 + 22 - 16) // 6
    assert sched.metrics.prefill_tokens == sum(prefills)
    # Between the first and the last chunk of the long prompts, the running stream kept decoding.
    kinds = [kind for kind, _ in gen.calls]
    first = kinds.index("prefill", kinds.index("decode"))
    last = len(kinds) - 1 - kinds[::-1].index("prefill")
    assert sum(kind == "decode" and n >= 1 for kind, n in gen.calls[first:last]) >= 3
    assert sched.pages.used == 0
