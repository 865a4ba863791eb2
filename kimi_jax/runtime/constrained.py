"""Constrained decoding in the scheduler: each slot's grammar matcher and the masks of every step.

A request with a `Constraint` gets a matcher (text/grammar.py) when it is admitted. Its first token
is sampled by prefill under the matcher's first mask (`masks`); after that the decode loop asks for
the masks of every step itself (`step_masks`, a host callback inside the compiled loop: see
Generator.register_masks), so constrained and free rows share multi-step decode calls. The callback
first feeds each constrained row the token it made at the step before (the matcher runs one token
behind the device: `_consumed`), then writes the row's allowed-token bitmask; free rows allow all.

A constraint with `after` (tool_choice auto) is *armed* instead: its trigger token is one more device
stop id of the row, so the decode loop halts that row right after the model opens the tool-call
section; the scheduler then starts the matcher and lets the row go on (`take`).

A matcher that fails (a token outside its mask: a bug) lets its row write only an end-of-turn token,
so the row ends on every process alike, and its job finishes with the error (`failure`). The callback runs
on the process that holds the program's first device; every process keeps the same slot states
(they apply the same events), so they agree on which programs to run.
"""

from __future__ import annotations

import time

import numpy as np

from kimi_jax.runtime.requests import Constraint
from kimi_jax.text.grammar import GrammarError, Grammars, Matcher


class SlotConstraints:
    """The grammar state of `slots` scheduler slots (all unconstrained without `grammars`)."""

    def __init__(self, grammars: Grammars | None, slots: int, metrics=None):
        self.grammars, self.metrics = grammars, metrics  # metrics: the scheduler's (mask_seconds, masked_tokens)
        self._matchers: list[Matcher | None] = [None] * slots  # active: masks every token
        self._armed: list[Constraint | None] = [None] * slots  # waiting for their trigger token
        self._consumed = np.zeros(slots, np.int64)  # tokens of the slot's reply its matcher has taken
        self._stops: list[tuple[int, ...]] = [()] * slots  # end-of-turn ids: never fed to a matcher
        self._failed: list[str | None] = [None] * slots
        words = grammars.words if grammars is not None else 1
        self._allowed = np.full((slots, words), -1, np.int32)  # all ones: every token allowed

    def admit(self, slot: int, constraint: Constraint | None, stop_ids: tuple[int, ...],
              history: list[int] = ()) -> None:
        """Give `slot` its request's constraint (GrammarError if the grammar does not compile).
        `history`: the tokens the request made before it was preempted; its matcher takes them again."""
        self.free(slot)
        if constraint is None:
            return
        if self.grammars is None:
            raise GrammarError("this scheduler was built without a tokenizer's grammars: constrained requests "
                               "need Scheduler(grammars=...)")
        self._stops[slot] = tuple(stop_ids)
        history = list(history)
        if constraint.after is not None and constraint.after not in history:
            self.grammars.check(constraint.grammar)  # fail now, not when the trigger comes
            self._armed[slot] = constraint
            return
        matcher = self.grammars.matcher(constraint.grammar)
        start = 0 if constraint.after is None else history.index(constraint.after) + 1  # after its trigger
        for token in history[start:]:
            matcher.advance(token)
        self._matchers[slot], self._consumed[slot] = matcher, len(history)

    def free(self, slot: int) -> None:
        self._matchers[slot] = self._armed[slot] = self._failed[slot] = None
        self._consumed[slot] = 0
        self._allowed[slot] = -1

    def trigger(self, slot: int) -> tuple[int, ...]:
        """Device stop ids `slot` needs besides its request's: its armed constraint's trigger."""
        armed = self._armed[slot]
        return () if armed is None else (armed.after,)

    @property
    def active(self) -> bool:
        """Some slot's tokens are masked (decode calls then ask for masks every step)."""
        return any(m is not None for m in self._matchers) or any(f is not None for f in self._failed)

    def masks(self, slots: list[int]) -> np.ndarray | None:
        """The first-token masks [len(slots), W] of newly admitted slots (for prefill), or None when none
        of them is constrained."""
        if all(self._matchers[s] is None for s in slots):
            return None
        for s in slots:
            if self._matchers[s] is not None:
                self._fill(s)
        return self._allowed[slots]

    def step_masks(self, tokens: np.ndarray, generated: np.ndarray, done: np.ndarray) -> np.ndarray:
        """The decode loop's callback: feed each constrained row the token it made last, then return
        every row's mask [slots, W] for the token it makes now."""
        for s, matcher in enumerate(self._matchers):
            if matcher is None or done[s]:
                continue
            if generated[s] > self._consumed[s]:  # one token behind: the one made at the step before
                self._consumed[s] = generated[s]
                if int(tokens[s]) not in self._stops[s]:
                    try:
                        matcher.advance(int(tokens[s]))
                    except GrammarError as e:
                        self._fail(s, str(e))
                        continue
            self._fill(s)
        return self._allowed.copy()

    def take(self, slot: int, tokens: list[int], generated: int) -> bool:
        """After a call, the tokens `slot` made: True when the last one was the slot's trigger (its
        matcher has just started: the row must go on although the device stopped it)."""
        armed = self._armed[slot]
        if armed is not None and tokens and tokens[-1] == armed.after:
            self._armed[slot] = None
            self._matchers[slot] = self.grammars.matcher(armed.grammar)  # the trigger itself is not fed
            self._consumed[slot] = generated
            return True
        return False

    def failure(self, slot: int) -> str | None:
        """Why the slot's matcher failed (its row is ending its turn), or None."""
        return self._failed[slot]

    def _fill(self, slot: int) -> None:
        start = time.perf_counter()
        self._matchers[slot].fill(self._allowed[slot])
        if self.metrics is not None:
            self.metrics.mask_seconds += time.perf_counter() - start
            self.metrics.masked_tokens += 1

    def _fail(self, slot: int, why: str) -> None:
        """The row may only end its turn now (every process sees it end); `take` reports `why`."""
        self._matchers[slot], self._failed[slot] = None, why
        row = np.zeros(self._allowed.shape[1] * 32, bool)
        row[list(self._stops[slot])] = True
        self._allowed[slot] = np.packbits(row, bitorder="little").view(np.int32)
