"""What the project's command lines share: argparse errors as one line, and argument types that check a range.

A range is written as it reads in ``--help``: ``"[a, b]"``, ``"(a, b]"``, ``"[a, b)"`` (intervals) or
``">= a"``, ``"> a"`` (half-lines). Floats must also be finite: NaN and Inf are never a setting.
"""
from __future__ import annotations

import argparse
import math


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors raise ``error_type(message)`` (the caller prints one line and exits 2) instead of
    printing the usage and exiting."""

    error_type = ValueError

    def error(self, message):
        raise self.error_type(message)


def in_range(value, spec: str | None) -> bool:
    """``value`` is finite and lies in ``spec`` (None: anywhere)."""
    if not math.isfinite(value):
        return False
    if spec is None:
        return True
    if spec[0] in "[(":
        low, high = (float(x) for x in spec[1:-1].split(","))
        return (low <= value if spec[0] == "[" else low < value) and (value <= high if spec[-1] == "]" else value < high)
    op, bound = spec.split()
    return value >= float(bound) if op == ">=" else value > float(bound)


def spec_text(spec: str) -> str:
    """``"in [0, 1]"`` or ``">= 1"``: how a range reads after "must be"."""
    return f"in {spec}" if spec[0] in "[(" else spec


def number(kind: type, spec: str | None = None):
    """argparse type: a ``kind`` (int or float) in ``spec``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not in_range(value, spec):
            what = "an integer" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(f"expected {what}{' ' + spec_text(spec) if spec else ''}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


__all__ = ["OneLineParser", "in_range", "spec_text", "number"]
