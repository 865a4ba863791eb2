"""Continuous batching: a fixed set of decode slots kept busy by one model thread, over a paged cache.

The latent cache is a pool of `num_pages` pages of `page_size` positions (model/paged.py); each
decode slot reads and writes its sequence through a page table, and holds only the pages its tokens
fill (runtime/pages.py does the bookkeeping, in plain Python). The model thread loops:

    1. free the slots of finished or cancelled jobs (their rows are marked done: position −1,
       so they write nothing; their pages go back to the pool);
    2. prefill, within a budget of `prefill_chunk` tokens per iteration: first the next chunks of
       prompts whose prefill is under way, then waiting jobs, oldest first, while a slot is free and
       the pool has the pages for the prompt and one decode call (admission is by free pages, not
       free slots alone): look the prompt's full pages up in the prefix cache, prefill only the
       tokens after the hit (a batch of up to `max_prefill` distinct prompts, shapes bucketed; jobs
       with the same prompt, such as the `n` samples of one request, share its prefill), and emit
       each job's first token once its whole prompt is in. A prompt longer than what is left of the
       budget is prefilled in chunks over several iterations (chunked prefill), so a long prompt
       delays the running streams' next decode call by one chunk's prefill, not its whole length;
       prompts longer than `prefill_chunk` take at most `long_prefill_chunk` of the budget between
       them (short prompts keep the rest);
    3. give each running sequence the pages its next decode call may write; when the pool runs out,
       preempt the youngest running sequence (the last admitted): its pages are released (its full
       pages stay in the prefix cache) and it goes back to the front of the queue, to be recomputed
       from its prompt and the tokens it already made when pages free up. Its reply goes on where it
       stopped: no token is lost, repeated or changed (greedy tokens equal an unpreempted run's);
    4. run one compiled decode call of `steps_per_call` steps over all slots (while a slot's reply is
       constrained by a grammar, each step asks the host for the rows' masks: runtime/constrained.py)
       and block on its tokens; hand each job its new tokens. Its attention reads the running rows'
       pages as a list of blocks of pages.BLOCK_POSITIONS positions (model/paged.py), whose length is
       bucketed to a power of two: a call costs what its rows hold, not the batch × its longest row.

With `warm_up` the thread first builds every program a call can need (runtime/programs.py): decode
per block-list length (plain with and without logit adjustments, and rich, which serves rows with
logprobs, a grammar or both; `decode_block_buckets`, `Generator.decode`) and the prefill programs
(`PrefillShapes`), and sets `ready` only then, so that no request waits for a compile. Requests
submitted meanwhile wait in the queue. A prefill call only takes shapes of that set: chunks that
together would not be one wait for the iteration's next call.

Preemption (vLLM's "recompute") was chosen over reserving every request's worst case up front:
a reservation of prompt + max_tokens would hold pages that most replies never fill, and the
waiting head of the queue already waits for pages rather than being skipped (no starvation).

Automatic prefix caching (on unless `prefix_cache=False`): a sequence's full pages are registered
under a digest of their tokens and all before them once written, and kept in an LRU list when the
sequence ends, so a later prompt with the same start reuses them and prefills from the hit.

Rows never interact: a slot's sequence lives in its own pages (shared ones are never written) and
attention only sees keys at positions ≤ the row's own, so a request's greedy tokens do not depend on
what shares the batch. New requests wait at most one decode call before they are prefilled.

The thread owns JAX; the asyncio side calls `submit` / `cancel` (thread-safe) and receives
events through each job's `sink` callback, which runs on the model thread. Submissions and
cancellations take effect at the start of the next iteration, as *events*: across processes
(runtime/lockstep.py) process 0 publishes each iteration's events before it acts on them and
every other process runs the same iteration from them (`follow`), so all of them call the same
compiled programs in the same order. Page allocation, prefix hits, eviction and preemption depend
only on those events (no clock, no randomness), so every process takes the same decisions.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.model.paged import init_pages, with_table
from kimi_jax.runtime import lockstep
from kimi_jax.runtime.constrained import SlotConstraints
from kimi_jax.runtime.generation import MAX_STOP_IDS, DecodeState, Generator, Rows, adjusts
from kimi_jax.runtime.jobs import Job, Metrics, QueueFull, SchedulerStopped, TokenLogProb
from kimi_jax.runtime.pages import (
    PagePool,
    block_buckets,
    block_list,
    decode_blocks,
    pages_for,
    pages_per_block,
    table_width,
)
from kimi_jax.runtime.programs import PrefillShapes
from kimi_jax.runtime.requests import Request
from kimi_jax.runtime.sampling import MAX_LOGIT_BIAS, TOP_LOGPROBS
from kimi_jax.text.grammar import GrammarError, Grammars

# Positions per page: a prefix is shared in whole pages, and one page of one layer is a contiguous
# 64 × 576 × 2 bytes = 72 KB read for Kimi-K2 in bf16 (big enough for an efficient gather).
PAGE_SIZE = 64
# Prefill tokens per scheduler iteration: a longer prompt is prefilled in chunks between decode calls,
# and each chunk delays the running streams' next tokens by what it costs (BENCHMARKS.md "Paged
# cache"). A chunk's cost grows faster than its length (on CPU 256 tokens after 3,584 cached ones
# took 30-65 ms, 128 took 13), so a prompt longer than the budget (a long prompt) takes at most
# LONG_PREFILL_CHUNK of it per iteration, long prompts together, while short prompts are still
# admitted whole up to PREFILL_CHUNK tokens (one budget of 128 for all let a burst of 10 short
# requests run at most 5 at once, tests/test_serve.py). Measured on CPU with 8 streams running while
# a 4,000-token prompt is admitted: their p99 inter-token latency 1.7-1.8x the same streams' median
# without it, against 2.9-4.7x with 512 for the long prompt too; the long prompt's own first token
# comes 2.7x later (3.6x in bfloat16). vLLM's `long_prefill_token_threshold` makes the same split. GPU and TPU are not
# measured.
PREFILL_CHUNK = 512
LONG_PREFILL_CHUNK = 128


class Scheduler:
    """Continuous batching over `generator` with `max_batch` slots of up to `max_context` positions each,
    and a pool of `num_pages` pages of `page_size` positions (default: enough for every slot to reach
    `max_context`; fewer pages is less memory, and admission then waits or preempts, see the module
    docstring). `prefix_cache` turns automatic prefix caching on. `prefill_chunk`: prompt tokens
    prefilled per iteration, of which prompts longer than that take at most `long_prefill_chunk`
    (see PREFILL_CHUNK).

    The generator is used through `cfg`, `dtype`, `mesh`, `layout`, `batch_shards`,
    `steps_per_call`, `pool_shardings`, `prefill_paged` and `decode` alone, so a stand-in with those
    (tests/serve_util.py rewrites the replies to scripted prompts) is scheduled like the real one.
    `grammars` (the tokenizer's, text/grammar.py) runs requests with a `Constraint`.
    """

    def __init__(self, generator: Generator, max_batch: int = 16, max_context: int = 4096, max_queue: int = 256,
                 max_prefill: int = 8, steps_per_call: int | None = None,
                 lockstep_: lockstep.Lockstep | lockstep.Solo | None = None, page_size: int = PAGE_SIZE,
                 num_pages: int | None = None, prefix_cache: bool = True, grammars: Grammars | None = None,
                 prefill_chunk: int = PREFILL_CHUNK, long_prefill_chunk: int = LONG_PREFILL_CHUNK,
                 warm_up: bool = False):
        shards = generator.batch_shards
        self.generator = generator
        self.max_batch = -(-max_batch // shards) * shards  # the mesh splits the batch evenly
        self.max_context = min(max_context, generator.cfg.max_position_embeddings)
        self.page_size, self.pages_per_seq = page_size, pages_for(self.max_context, page_size)
        num_pages = num_pages or self.max_batch * self.pages_per_seq
        if num_pages < self.pages_per_seq:
            raise ValueError(f"{num_pages} KV pages cannot hold one sequence of max_context={self.max_context} "
                             f"tokens ({self.pages_per_seq} pages of {page_size}); give at least that many pages "
                             "(--kv-pages) or lower --max-context")
        self.pages = PagePool(-(-num_pages // shards) * shards, page_size, prefix_cache)  # split like the batch
        self.max_queue, self.max_prefill = max_queue, max_prefill
        for name, value in (("prefill_chunk", prefill_chunk), ("long_prefill_chunk", long_prefill_chunk)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1 token, got {value}")
        self.prefill_chunk, self.long_prefill_chunk = prefill_chunk, min(long_prefill_chunk, prefill_chunk)
        self.steps_per_call = steps_per_call or generator.steps_per_call
        self.shapes = PrefillShapes(max_prefill, self.max_batch, prefill_chunk, page_size, self.pages_per_seq, shards)
        self.metrics = Metrics()
        self._waiting: collections.deque[Job] = collections.deque()
        self._slots: list[Job | None] = [None] * self.max_batch
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.lockstep = lockstep_ or lockstep.Solo()
        self._inbox: list[tuple[str, Job | None]] = []  # events of the next iteration (process 0)
        self._jobs: dict[int, Job] = {}  # unfinished jobs by id
        self._next_id = 0
        self._step = 0  # iterations run
        self.grammars = grammars
        self._finish_lock = threading.Lock()  # a lost follower fails jobs from the watchdog thread
        self.warm_up = warm_up
        self.ready = threading.Event()  # set once the model thread has warmed up and takes requests

    # Thread-safe API ----------------------------------------------------------------------------
    def submit(self, request: Request, sink) -> Job:
        """Queue a request; raises QueueFull when `max_queue` jobs are already waiting."""
        if len(request.prompt) + request.max_new_tokens > self.max_context:
            raise ValueError(f"prompt ({len(request.prompt)} tokens) + max new tokens ({request.max_new_tokens}) "
                             f"exceed the server's context of {self.max_context} tokens")
        if len(request.stop_ids) > MAX_STOP_IDS - 1:
            raise ValueError(f"at most {MAX_STOP_IDS - 1} stop token ids, got {len(request.stop_ids)}")
        if request.constraint is not None and self.grammars is None:
            raise ValueError("this server was started without grammars: constrained decoding is off")
        if not self.alive and self._thread is not None:
            raise SchedulerStopped(f"the model thread has stopped ({self.error}); restart the server")
        with self._wake:
            if self.queue_depth >= self.max_queue:
                raise QueueFull(f"{self.queue_depth} requests are already waiting (max_queue={self.max_queue})")
            job = Job(request, sink, self._next_id)
            self._next_id += 1
            self._inbox.append(("submit", job))
            self._wake.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Drop a job (client gone, stop string seen): no more tokens reach its sink, and its slot is
        freed at the start of the next iteration, before the next decode call."""
        with self._wake:
            job.cancel_asked = True
            self._inbox.append(("cancel", job))
            self._wake.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting) + sum(kind == "submit" for kind, _ in self._inbox)

    @property
    def iterations(self) -> int:
        """Scheduler iterations run (each one's events published first, across processes)."""
        return self._step

    @property
    def active(self) -> int:
        """Slots in use (prefilling or decoding)."""
        return sum(j is not None for j in self._slots)

    @property
    def decoding(self) -> int:
        """Slots whose prompt is in: they take part in decode calls."""
        return sum(j is not None and s not in self._partial for s, j in enumerate(self._slots))

    def start(self) -> Scheduler:
        """Run the model thread (process 0 of a lockstep also starts its watchdog: a lost follower
        fails every job, see `fail`)."""
        if not self.lockstep.leader:
            raise RuntimeError("a follower runs `follow()` in its main thread, not `start()`")
        self.lockstep.on_lost.append(self.fail)
        self.lockstep.start()
        self._thread = threading.Thread(target=self._run, name="kimi-jax-model", daemon=True)
        self._thread.start()
        return self

    def follow(self) -> None:
        """A follower process (runtime/lockstep.py): run process 0's iterations until it stops (then
        its heartbeat stops too)."""
        self.lockstep.start()
        try:
            self._run()
        finally:
            self.lockstep.stop()

    def stop(self) -> None:
        """Stop after the current iteration (on every process of a lockstep)."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.lockstep.stop()

    @property
    def compilations(self) -> int:
        """Programs the generator has built (compiled, or loaded from the persistent compile cache)."""
        return sum(self.generator.traces.values())

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def fail(self, why: str) -> None:
        """The server cannot go on (a follower process is lost): every unfinished job ends with an
        error, `alive` turns False (/health 503) and new requests are refused (503)."""
        self.error = SchedulerStopped(why)
        with self._wake:
            inbox = [j for kind, j in self._inbox if kind == "submit"]
            self._wake.notify()
        with self._finish_lock:
            jobs = list(self._jobs.values()) + inbox
        for job in jobs:
            self._finish(job, f"error: {why}")

    # Model thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._reset()
            if self.warm_up:
                self._warm_up()
            self.lockstep.ready()  # every process has built its programs: none waits on another's compiles
            self.ready.set()
            while True:
                if self._apply(self._next_events()):
                    break
                self._free_cancelled()
                self._admit()
                if self.decoding:
                    self._grow()  # may preempt
                if self.decoding:
                    self._decode()
                self.lockstep.finished(self._step, self.active)
                self._step += 1
        except BaseException as e:  # report to every job instead of hanging them
            self.error = self.error or e
            with self._wake:
                jobs = list(self._jobs.values())
                self._waiting.clear()
            for job in jobs:
                self._finish(job, f"error: {type(e).__name__}: {e}")
            raise

    def decode_block_buckets(self) -> list[int]:
        """Every length a decode call's block list can have (`pages.block_buckets`)."""
        return block_buckets(self.max_batch, self.pages_per_seq, self.page_size)

    def _warm_up(self) -> None:
        """Build (compile, or load from the compile cache) every program a call can need
        (runtime/programs.py), so that no request waits for a compile: the decode programs per
        block-list length (`decode_block_buckets`), plain with and without logit adjustments and rich
        (logprobs, grammar masks, adjustments: one program, `Generator.decode`), each run on the idle
        slots (all done, so the loop runs no step and the pool is unchanged); then the prefill ones
        (`Generator.warm_up_paged`, on inert operands)."""
        started, before = time.perf_counter(), self.compilations
        rows = jax.device_put(self._rows)
        for width in self.decode_block_buckets():
            blocks = block_list({}, pages_per_block(self.page_size), self.page_size, len(self._slots), width)
            for logprobs, adjust in ((None, False), (None, True), (TOP_LOGPROBS, False)):  # plain ×2, rich
                cache, _, out, _ = self.generator.decode(with_table(self._pool, self._tables, blocks), self._state,
                                                         rows, self.steps_per_call, logprobs, adjust)
                self._pool = with_table(cache, None)
                np.asarray(out)  # blocks: one program at a time
        shapes = self.shapes
        self._pool, counts = self.generator.warm_up_paged(self._pool, self._state.counts, shapes.chunks(),
                                                          shapes.widths(), shapes.samples(), shapes.copies())
        self._state = self._state._replace(counts=counts)
        self.metrics.warm_up_seconds = time.perf_counter() - started
        self.metrics.warm_up_compilations = self.compilations - before

    def _next_events(self) -> list[dict]:
        """This iteration's events. Process 0 waits for work and takes what arrived; a follower
        receives what process 0 published for this iteration."""
        if not self.lockstep.leader:
            return self.lockstep.receive(self._step)
        with self._wake:
            while not self._stop and not self._inbox and not self._waiting and not self.active and not self.error:
                self._wake.wait()
            inbox, self._inbox = self._inbox, []
            stop = self._stop or self.error is not None
        events = []
        for kind, job in inbox:
            if kind == "submit":
                self._jobs[job.id] = job
                events.append({"submit": job.id, "request": lockstep.request_to_json(job.request)})
            else:
                events.append({"cancel": job.id})
        events += [{"stop": True}] if stop else []
        self.lockstep.publish(self._step, events)  # before anything is done with them
        return events

    def _apply(self, events: list[dict]) -> bool:
        """Apply an iteration's events (the same on every process); True on the stop event."""
        for event in events:
            if "submit" in event:
                job = self._jobs.get(event["submit"])
                if job is None:  # a follower: the same job, its tokens go nowhere
                    job = Job(lockstep.request_from_json(event["request"]), _discard, event["submit"])
                    self._jobs[job.id] = job
                self._waiting.append(job)
            elif "cancel" in event:
                job = self._jobs.get(event["cancel"])
                if job is not None:
                    job.cancelled = True
            elif event.get("stop"):
                return True
        return False

    def _reset(self) -> None:
        g, b = self.generator, self.max_batch
        self._pool = init_pages(g.cfg, self.pages.num_pages, self.page_size, g.dtype)
        if g.mesh is not None:  # the pool lives where decode wants it (pages split like the batch)
            self._pool = jax.device_put(self._pool, g.pool_shardings(self._pool))
        self._tables = np.full((b, self.pages_per_seq), -1, np.int32)  # each slot's page table (−1: none)
        self._held: list[list[int]] = [[] for _ in range(b)]  # each slot's pages, in position order
        self._admitted_at = [0] * b  # admission counter of each slot's job: the largest is the youngest
        self._partial: dict[int, int] = {}  # slots whose prompt is being prefilled in chunks -> positions written
        self._admissions = 0
        # Host copies (every slot starts free: done), but the [B, V] token counts stay on device.
        self._state = DecodeState(np.zeros(b, np.int32), np.zeros(b, np.int32), np.zeros(b, np.int32),
                                  np.ones(b, bool), jnp.zeros((b, g.cfg.padded_vocab_size), jnp.int32))
        self._rows = Rows(np.zeros(b, np.float32), np.ones(b, np.float32), np.zeros(b, np.int32),
                          np.zeros(b, np.uint32), np.ones(b, np.int32), np.full((b, MAX_STOP_IDS), -1, np.int32),
                          np.zeros(b, np.float32), np.zeros(b, np.float32),
                          np.full((b, MAX_LOGIT_BIAS), -1, np.int32), np.zeros((b, MAX_LOGIT_BIAS), np.float32))
        self._rows_device = None
        self._constraints = SlotConstraints(self.grammars, b, self.metrics)
        self._mask_source = g.register_masks(self._constraints.step_masks) if self.grammars else None

    def _free(self, slot: int) -> None:
        """Empty a slot: its row is done, its written full pages are registered for reuse (the prefix
        cache) and its pages released."""
        job = self._slots[slot]
        if job is not None:
            # Positions 0..written−1 are on the device: the last token made is only written by the
            # next step (state.positions is the position it would take); a prompt cut off mid-prefill
            # has written its chunks so far.
            written = self._partial.pop(slot, None)
            written = int(self._state.positions[slot]) if written is None else written
            self.pages.register(_sequence(job), self._held[slot], written)
        self.pages.release(self._held[slot])
        self._held[slot] = []
        self._tables[slot] = -1
        self._slots[slot] = None
        self._state.done[slot] = True
        self._constraints.free(slot)

    def _free_cancelled(self) -> None:
        gone = [j for j in self._waiting if j.cancelled]
        self._waiting = collections.deque(j for j in self._waiting if not j.cancelled)
        for job in gone:
            self._finish(job, "cancelled")
        for slot, job in enumerate(self._slots):
            if job is not None and job.cancelled:
                self._finish(job, "cancelled")
                self._free(slot)

    def _admit(self) -> None:
        """Spend this iteration's prefill budget (`prefill_chunk` tokens, of which long prompts take at
        most `long_prefill_chunk`): the next chunks of prompts under way, then waiting jobs into free
        slots while their pages fit (several calls if room)."""
        budget = [self.prefill_chunk, self.long_prefill_chunk]  # [all prompts, long ones], spent by `_pick`
        while budget[0] > 0:
            picked = self._pick(budget)
            if not picked:
                return
            self._prefill(picked)

    def _share(self, seq: tuple[int, ...], budget: list[int]) -> int:
        """Tokens of `budget` a chunk of `seq` may take. A sequence longer than `prefill_chunk` is long:
        every chunk of it draws on the long prompts' share too, its last included (the last is the one
        after the most cached positions, the dearest per token)."""
        return min(budget) if len(seq) > self.prefill_chunk else budget[0]

    def _take(self, seq: tuple[int, ...], start: int, budget: list[int], ends: dict) -> int:
        """Tokens of the chunk of `seq` from `start` that this prefill call (`ends`: its chunks so far)
        can take within `budget` (`_share`); 0 when the call already holds `max_prefill` sequences, or
        would with it not be one of the compiled prefill programs (`PrefillShapes.fits`: the chunk goes
        in the next call)."""
        take = min(self._share(seq, budget), len(seq) - start)
        longest = max([take, *(end - st for (_, st), end in ends.items())])
        if take <= 0 or len(ends) >= self.max_prefill or not self.shapes.fits(len(ends) + 1, longest):
            return 0
        return take

    def _spend(self, seq: tuple[int, ...], start: int, take: int, budget: list[int], ends: dict) -> None:
        """Put the chunk of `seq` from `start` of `take` tokens in the call, and spend them from `budget`."""
        budget[0] -= take
        if len(seq) > self.prefill_chunk:
            budget[1] -= take
        ends[seq, start] = start + take

    def _pick(self, budget: list[int]) -> list[_Chunk]:
        """This prefill call's chunks, within `budget` (`_admit`): prompts under way first (oldest first),
        then waiting jobs, oldest first. The head of the queue waits (and so does everyone behind it)
        until its pages are available, or until the next iteration when the budget is spent."""
        picked, ends = [], {}  # ends: (sequence, start) -> end of the chunk computed for it
        for slot in sorted(self._partial, key=self._admitted_at.__getitem__):
            job, start = self._slots[slot], self._partial[slot]
            seq = _sequence(job)
            if (seq, start) not in ends:  # else the same tokens as a chunk picked already: computed once
                take = self._take(seq, start, budget, ends)
                if not take:
                    continue
                self._spend(seq, start, take, budget, ends)
            picked.append(_Chunk(job, slot, self._held[slot], start, ends[seq, start], new=False))
        free = [i for i, j in enumerate(self._slots) if j is None]
        while self._waiting and free:
            job = self._waiting[0]
            seq = _sequence(job)
            # A hit stops short of the last token: prefill computes at least one, for its logits.
            hit = self.pages.match(seq, limit=(len(seq) - 1) // self.page_size)
            start = len(hit) * self.page_size
            shared = (seq, start) in ends  # the same tokens as a job picked already: computed once
            take = 0 if shared else self._take(seq, start, budget, ends)
            if not shared and not take:
                break
            need = pages_for(self._reach(job, len(seq)), self.page_size) - len(hit)
            if need > self.pages.available - self.pages.cached_among(hit):
                break
            self._waiting.popleft()
            try:  # a grammar that does not compile fails its job alone
                self._constraints.admit(free[0], job.request.constraint, job.request.stop_ids, job.output)
            except GrammarError as e:
                self._finish(job, f"error: the grammar does not compile: {e}")
                continue
            self.pages.acquire(hit)
            pages = hit + self.pages.allocate(need)
            if not shared:
                self._spend(seq, start, take, budget, ends)
            picked.append(_Chunk(job, free.pop(0), pages, start, ends[seq, start], new=True))
        return picked

    def _reach(self, job: Job, position: int) -> int:
        """Positions a job's sequence may have written by the end of a decode call that starts at
        `position`: one per step, but never past prompt + max new tokens."""
        return min(position + self.steps_per_call, len(job.request.prompt) + job.request.max_new_tokens)

    def _prefill(self, picked: list[_Chunk]) -> int:
        """Prefill the picked chunks into their pages and slots, and hand out the first tokens of the jobs
        whose prompt is now in (the others stay partial: their rows sit out decode). -> tokens computed."""
        start = time.perf_counter()
        jobs, slots = [c.job for c in picked], [c.slot for c in picked]
        # The table reaches the chunk's end (bucketed): a chunk's attention costs what precedes it, not
        # the whole prompt's pages.
        width = table_width(max(pages_for(c.end, self.page_size) for c in picked), self.page_size, self.pages_per_seq)
        tables = np.full((len(picked), width), -1, np.int32)
        for k, c in enumerate(picked):
            tables[k, :min(len(c.pages), width)] = c.pages[:width]
        final = [k for k, c in enumerate(picked) if c.end == len(_sequence(c.job))]
        masks, allowed = self._constraints.masks([slots[k] for k in final]) if final else None, None
        if masks is not None:  # first-token masks of the rows that sample theirs now
            allowed = np.full((len(picked), masks.shape[1]), -1, np.int32)
            allowed[final] = masks
        logits, self._pool, counts, state, _, first_device = self.generator.prefill_paged(
            self._pool, self._state.counts, [j.request for j in jobs], slots, tables, [c.start for c in picked],
            [j.output for j in jobs], allowed, [c.end for c in picked])
        self._state = self._state._replace(counts=counts)
        first = np.asarray(first_device)  # blocks: the first tokens are ready (and the pages written)
        logprobs = None
        if any(jobs[k].request.logprobs for k in final):
            logprobs = jax.tree.map(np.asarray, self.generator.first_logprobs(logits, first_device, TOP_LOGPROBS))
        m = self.metrics
        for k, c in enumerate(picked):
            job, slot, seq = c.job, c.slot, _sequence(c.job)
            if c.new:
                self._slots[slot], self._held[slot] = job, c.pages
                self._tables[slot, :len(c.pages)] = c.pages
                self._admissions += 1
                self._admitted_at[slot] = self._admissions
                m.prompt_tokens += 0 if job.output else len(job.request.prompt)  # a resumed job was counted
                m.prefix_queried_tokens += len(seq)
                m.prefix_hit_tokens += c.start
            self.pages.register(seq, c.pages, c.end)  # written now: reusable by the next prompt
            if c.end < len(seq):  # more chunks to come: the row sits out decode (done) meanwhile
                self._partial[slot] = c.end
                self._state.done[slot] = True
                continue
            self._partial.pop(slot, None)
            for field, value in zip(self._state[:4], state[:4]):
                field[slot] = value[k]
            self._set_rows(slot, job.request)
        self._rows_device = None
        m.prefill_calls += 1
        m.busy_seconds += time.perf_counter() - start
        for k in final:
            job, slot = jobs[k], slots[k]
            lp = [_token_logprob(logprobs, k)] if logprobs is not None and job.request.logprobs else None
            self._deliver(slot, job, [int(first[k])] if first[k] >= 0 else [], lp)
        computed = {(_sequence(c.job), c.start): c.end - c.start for c in picked}
        m.prefill_tokens += sum(computed.values())
        return sum(computed.values())

    def _grow(self) -> None:
        """Give each running sequence, oldest first, the pages its next decode call may write;
        when the pool is short, preempt the youngest running sequence (see the module docstring)."""
        running = (s for s, j in enumerate(self._slots) if j is not None and s not in self._partial)
        for slot in sorted(running, key=self._admitted_at.__getitem__):  # a partial one holds its prompt's pages
            job = self._slots[slot]
            if job is None:  # preempted while an older one grew
                continue
            need = pages_for(self._reach(job, int(self._state.positions[slot])), self.page_size) - len(self._held[slot])
            while need > self.pages.available:
                youngest = max((s for s, j in enumerate(self._slots) if j is not None),
                               key=self._admitted_at.__getitem__)
                self._preempt(youngest)
                if youngest == slot:
                    break
            if self._slots[slot] is not None and need > 0:
                pages = self.pages.allocate(need)
                self._tables[slot, len(self._held[slot]):len(self._held[slot]) + need] = pages
                self._held[slot] += pages

    def _preempt(self, slot: int) -> None:
        """Stop a running sequence to free its pages; it waits at the front of the queue and is
        recomputed (its prompt and the tokens it made, mostly from the prefix cache) when admitted."""
        job = self._slots[slot]
        self._free(slot)
        job.preemptions += 1
        self.metrics.preemptions += 1
        self._waiting.appendleft(job)

    def _set_rows(self, slot: int, request: Request) -> None:
        r, s = self._rows, request.sampling
        r.temperature[slot], r.top_p[slot], r.top_k[slot] = s.temperature, s.top_p, s.top_k
        r.seed[slot], r.max_new[slot] = s.seed, request.max_new_tokens
        stops = request.stop_ids + self._constraints.trigger(slot)  # an armed constraint halts at its trigger
        r.stop_ids[slot] = -1
        r.stop_ids[slot, :len(stops)] = stops
        r.presence[slot], r.frequency[slot] = s.presence_penalty, s.frequency_penalty
        r.bias_ids[slot], r.bias[slot] = -1, 0.0
        for j, (token, value) in enumerate(s.logit_bias):
            r.bias_ids[slot, j], r.bias[slot, j] = token, value

    def _decode(self) -> None:
        start = time.perf_counter()
        if self._rows_device is None:
            self._rows_device = jax.device_put(self._rows)
        active = self.decoding
        running = [s for s, j in enumerate(self._slots) if j is not None and s not in self._partial]
        jobs = [self._slots[s].request for s in running]
        wants = any(r.logprobs for r in jobs)
        # Attention reads each running row's own pages, as blocks (a partial row sits the call out, and
        # writes nothing); writes go through the slots' tables.
        blocks = decode_blocks({s: self._held[s] for s in running}, self.page_size, len(self._slots))
        cache = with_table(self._pool, self._tables, blocks)
        cache, state, out, logprobs = self.generator.decode(
            cache, self._state, self._rows_device, self.steps_per_call, TOP_LOGPROBS if wants else None,
            adjusts(jobs), self._mask_source if self._constraints.active else None)  # masks: asked for every step
        self._pool = with_table(cache, None)  # one pool shape between calls: prefill compiles once
        out = np.asarray(out)  # (steps, B); blocks on the call
        logprobs = None if logprobs is None else jax.tree.map(np.asarray, logprobs)
        # writable host copies, but the token counts stay on device
        self._state = DecodeState(*(np.array(x) for x in state[:4]), state.counts)
        elapsed = time.perf_counter() - start
        steps = int((out >= 0).any(axis=1).sum())
        made = int((out >= 0).sum())
        m = self.metrics
        m.decode_calls += 1
        m.decode_steps += steps
        m.occupied_slot_steps += active * steps
        m.max_occupancy = max(m.max_occupancy, active)
        m.busy_seconds += elapsed
        m.last_tokens_per_s = made / elapsed if elapsed > 0 else 0.0
        for slot in running:
            job = self._slots[slot]
            if job is not None:  # not finished by an earlier row's sink (cancel) meanwhile
                steps_made = np.flatnonzero(out[:, slot] >= 0)
                lp = None
                if logprobs is not None and job.request.logprobs:
                    lp = [_token_logprob(logprobs, (step, slot)) for step in steps_made]
                self._deliver(slot, job, [int(out[step, slot]) for step in steps_made], lp)

    def _deliver(self, slot: int, job: Job, tokens: list[int], logprobs: list[TokenLogProb] | None = None) -> None:
        """Hand new tokens (and their log probabilities) to a job; finish it and free its slot when its
        row is done. An armed constraint may start here (the row halted at its trigger goes on)."""
        if self._constraints.take(slot, tokens, int(self._state.generated[slot])):
            self._state.done[slot] = self._state.generated[slot] >= job.request.max_new_tokens
            self._set_rows(slot, job.request)  # the trigger is no longer a stop
            self._rows_device = None
        done = bool(self._state.done[slot])
        if tokens and job.first_token_at is None:
            job.first_token_at = time.perf_counter()
            self.metrics.observe_ttft(job.first_token_at - job.submitted)
        job.generated += len(tokens)
        job.output += tokens
        self.metrics.generation_tokens += len(tokens)
        if done:
            last, failure = tokens[-1] if tokens else None, self._constraints.failure(slot)
            reason = f"error: {failure}" if failure else "stop" if last in job.request.stop_ids else "length"
            self._finish(job, reason, tokens, logprobs)
            self._free(slot)
        elif tokens and not (job.cancelled or job.cancel_asked or job.finished):
            job.sink(tokens, None, logprobs)

    def _finish(self, job: Job, reason: str, tokens: list[int] = (), logprobs: list[TokenLogProb] | None = None):
        """The job's last call of its sink: its final tokens (if any) with the finish reason."""
        with self._finish_lock:
            if job.finished:
                return
            job.finished = True
            self._jobs.pop(job.id, None)
        self.metrics.requests[reason.split(":")[0]] += 1
        job.sink(list(tokens), reason, logprobs)


class _Chunk(NamedTuple):
    """One row of a prefill call: positions start..end−1 of a job's sequence, into its slot's pages;
    `new` on its first chunk (the job is admitted by it)."""

    job: Job
    slot: int
    pages: list[int]
    start: int
    end: int
    new: bool


def _sequence(job: Job) -> tuple[int, ...]:
    """A job's tokens so far: its prompt and what it has generated (a resumed job is prefilled from these)."""
    return job.request.prompt + tuple(job.output)


def _discard(tokens, reason, logprobs=None) -> None:
    """A follower's sink: process 0 alone answers the client."""


def _token_logprob(logprobs, at) -> TokenLogProb:
    """One token's entry of host LogProbs arrays (`at`: the row, or (step, row))."""
    return float(logprobs.chosen[at]), [(int(i), float(v)) for i, v in zip(logprobs.top_ids[at], logprobs.top[at])]

