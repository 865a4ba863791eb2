"""argparse types shared by the command lines (serve, generate, plan, convert).

Each checks one flag's value and raises `argparse.ArgumentTypeError`, which argparse prints as one
line naming the flag (`argument --port: must be an integer in [0, 65535], got 99999`) before it
exits with status 2: a bad flag never reaches the code that would fail on it with a traceback.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def integer(lo: int, hi: int | None = None):
    """An integer in [lo, hi] (hi None: no upper bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            span = f"≥ {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"must be an integer {span}, got {value}")
        return value

    return parse


def real(lo: float, hi: float | None = None, open_lo: bool = False):
    """A finite number in [lo, hi] ((lo, hi] with `open_lo`); inf and nan are refused."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        low_ok = value > lo if open_lo else value >= lo
        if not math.isfinite(value) or not low_ok or (hi is not None and value > hi):
            left = "(" if open_lo else "["
            span = f"{'>' if open_lo else '≥'} {lo}" if hi is None else f"in {left}{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"must be a finite number {span}, got {text}")
        return value

    return parse


def directory(what: str):
    """An existing directory (`what` it should be, for the message: "checkpoint directory")."""

    def parse(text: str) -> str:
        path = Path(text)
        if path.is_file():
            raise argparse.ArgumentTypeError(f"{text} is a file; pass the {what} (the directory holding "
                                             "config.json)")
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"{what} {text} does not exist")
        return text

    return parse


SEED = integer(0, 2**32 - 1)
PORT = integer(0, 65535)
