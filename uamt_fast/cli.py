"""What the project's command lines share: argparse errors as one line, argument types that check a range, and
a settings dataclass turned into flags and checked field by field (train.py's Config).

A range is written as it reads in ``--help``: ``"[a, b]"``, ``"(a, b]"``, ``"[a, b)"`` (intervals) or
``">= a"``, ``"> a"`` (half-lines). Floats must also be finite: NaN and Inf are never a setting.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re


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


def flag(name: str) -> str:
    """The flag of a settings field: ``eval_stride_xy`` -> ``--eval-stride-xy``."""
    return "--" + name.replace("_", "-")


def check_fields(settings, ranges: dict, choices: dict) -> None:
    """Each field of the dataclass instance ``settings`` has its declared type (an int field an int, not a
    bool or float; a float field a real number, stored as float; a tuple a tuple of ints; a list a list of
    str), each field of ``choices`` is one of them and each field of ``ranges`` lies in its range: the
    command line guarantees the types, a settings dict read from a file need not. ValueError naming the flag."""
    for f in dataclasses.fields(settings):
        value, ok = getattr(settings, f.name), True
        if f.type == "int":
            ok = type(value) is int
        elif f.type == "float":
            ok = type(value) in (int, float)
            if ok:
                setattr(settings, f.name, float(value))
        elif f.type in ("bool", "bool | None"):
            ok = isinstance(value, bool) or (value is None and f.type == "bool | None")
        elif f.type == "str":
            ok = isinstance(value, str)
        elif f.type == "tuple":
            ok = isinstance(value, tuple) and all(type(p) is int for p in value)
        elif f.type == "list":
            ok = isinstance(value, list) and all(isinstance(d, str) for d in value)
        if not ok:
            expected = {"tuple": "a list of integers", "list": "a list of strings"}.get(f.type, f.type)
            raise ValueError(f"{flag(f.name)}: expected {expected}, got {type(value).__name__} {value!r:.60}")
    for name, allowed in choices.items():
        if getattr(settings, name) not in allowed:
            raise ValueError(f"{flag(name)} must be one of {', '.join(allowed)}; got {getattr(settings, name)!r}")
    for name, spec in ranges.items():
        if not in_range(getattr(settings, name), spec):
            raise ValueError(f"{flag(name)} must be {spec_text(spec)}; got {getattr(settings, name)!r}")


def dataclass_parser(cls, description: str, epilog: str, ranges: dict, choices: dict,
                     appended=()) -> OneLineParser:
    """A flag per field of the dataclass ``cls``, given flags only (``argparse.SUPPRESS``: defaults stay the
    dataclass's). Its --help text is the field's ``# comment`` in the source, its default and its valid range
    or choices; bools are --x / --no-x, a tuple takes 3 ints, a list one or more ids (``appended``: the flag
    is repeated instead, as --data DIR)."""
    comments = dict(re.findall(r"^    (\w+): [^#\n]*# (.*)$", inspect.getsource(cls), re.MULTILINE))
    p = OneLineParser(description=description, argument_default=argparse.SUPPRESS,
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog)
    for f in dataclasses.fields(cls):
        help = comments.get(f.name, "")
        if f.default not in (None, "", dataclasses.MISSING):  # (MISSING: a default_factory, e.g. a list)
            shown = {True: "on", False: "off"}.get(f.default, f.default) if isinstance(f.default, bool) else f.default
            help += f" (default: {' '.join(map(str, shown)) if isinstance(shown, tuple) else shown})"
        if f.name in ranges:
            help += f" (valid: {ranges[f.name]})"
        elif f.name in choices:
            help += f" (one of: {', '.join(choices[f.name])})"
        help = help.replace("%", "%%")
        if f.type in ("bool", "bool | None"):
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, help=help)
        elif f.name in appended:
            p.add_argument(flag(f.name), action="append", metavar="DIR", help=help)
        elif f.type == "list":
            p.add_argument(flag(f.name), nargs="+", metavar="ID", help=help)
        elif f.type == "tuple":
            p.add_argument(flag(f.name), type=int, nargs=3, metavar=("X", "Y", "Z"), help=help)
        else:
            p.add_argument(flag(f.name), type={"int": int, "float": number(float), "str": str}[f.type], help=help)
    return p


__all__ = ["OneLineParser", "in_range", "spec_text", "number", "flag", "check_fields", "dataclass_parser"]
