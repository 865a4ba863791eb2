"""Constrained decoding in the scheduler: each slot's grammar matcher and the masks of the next step.

A request with a `Constraint` gets a matcher (text/grammar.py) when it is admitted. Before every
token it makes, the matcher writes the row's allowed-token bitmask, and every token it made is fed
back. A constraint with `after` (tool_choice auto) is *armed* instead: its trigger token is one more
device stop id of the row, so a multi-step decode call halts that row right after the model opens
the tool-call section; the scheduler then starts the matcher and lets the row go on (`take`).

While some slot's matcher is active the scheduler runs one decode step per call (a mask depends on
the token before it); unconstrained batches keep `steps_per_call` steps per call and a program with
no mask at all. Every process of a lockstep runs the same matchers on the same tokens, so their
masks agree without being sent.
"""

from __future__ import annotations

import time

import numpy as np

from kimi_jax.runtime.generation import Constraint
from kimi_jax.text.grammar import GrammarError, Grammars, Matcher


class SlotConstraints:
    """The grammar state of `slots` scheduler slots (all unconstrained without `grammars`)."""

    def __init__(self, grammars: Grammars | None, slots: int, metrics=None):
        self.grammars, self.metrics = grammars, metrics  # metrics: the scheduler's (mask_seconds, masked_tokens)
        self._matchers: list[Matcher | None] = [None] * slots  # active: masks every token
        self._armed: list[Constraint | None] = [None] * slots  # waiting for their trigger token
        words = grammars.words if grammars is not None else 1
        self._allowed = np.full((slots, words), -1, np.int32)  # all ones: every token allowed

    def admit(self, slot: int, constraint: Constraint | None) -> None:
        """Give `slot` its request's constraint (GrammarError if the grammar does not compile)."""
        self.free(slot)
        if constraint is None:
            return
        if self.grammars is None:
            raise GrammarError("this scheduler was built without a tokenizer's grammars: constrained requests "
                               "need Scheduler(grammars=...)")
        if constraint.after is None:
            self._matchers[slot] = self.grammars.matcher(constraint.grammar)
        else:
            self.grammars.check(constraint.grammar)  # fail now, not when the trigger comes
            self._armed[slot] = constraint

    def free(self, slot: int) -> None:
        self._matchers[slot] = self._armed[slot] = None
        self._allowed[slot] = -1

    def trigger(self, slot: int) -> tuple[int, ...]:
        """Device stop ids `slot` needs besides its request's: its armed constraint's trigger."""
        armed = self._armed[slot]
        return () if armed is None else (armed.after,)

    @property
    def active(self) -> bool:
        """Some slot's next token is masked (decode then runs one step per call)."""
        return any(m is not None for m in self._matchers)

    def masks(self, slots: list[int] | None = None) -> np.ndarray | None:
        """The allowed-token bitmasks [len(slots) or all slots, W] of the next token, or None when none
        of those slots is constrained."""
        slots = list(range(len(self._matchers))) if slots is None else slots
        live = [s for s in slots if self._matchers[s] is not None]
        if not live:
            return None
        start = time.perf_counter()
        for s in live:
            self._matchers[s].fill(self._allowed[s])
        if self.metrics is not None:
            self.metrics.mask_seconds += time.perf_counter() - start
            self.metrics.masked_tokens += len(live)
        return self._allowed[slots]

    def take(self, slot: int, tokens: list[int], stop_ids: tuple[int, ...]) -> bool:
        """Feed the tokens `slot` made to its matcher; True when the last one was the slot's trigger
        (its matcher has just started: the row must go on although the device stopped it)."""
        matcher = self._matchers[slot]
        if matcher is not None:
            for t in tokens:
                if t in stop_ids:  # the end of the turn: nothing follows it
                    break
                matcher.advance(t)
            return False
        armed = self._armed[slot]
        if armed is not None and tokens and tokens[-1] == armed.after:
            self._armed[slot] = None
            self._matchers[slot] = self.grammars.matcher(armed.grammar)
            return True
        return False
