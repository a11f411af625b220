"""How far a long command is and how long the rest will take, on stdout (where the commands print the rest).

``TrainingProgress`` (train.py's loop): a line after the first iteration and an ETA on every line. On a
terminal one line updates in place (``\\r``, erased before any other line is printed) about twice a second;
in a file or a pipe it is plain lines: one after the first iteration, one when nothing was printed for
``PLAIN_EVERY_S``, and the log lines, each with the ETA. The rate is measured over the last ``RECENT_S``
seconds of iterations, by wall time alone: reading the clock never waits for the GPU, so the loop keeps its
one host-device sync every --log-every iterations (the log line's, after which the clock is read again and
the rate between two log lines is exact).

``CaseProgress`` (prepare, predict): ``[3/20] case_003 4.1 s (ETA 0:00:52)``, a line a finished case, counted
in the order they finish (prepare's workers finish out of order).
"""
from __future__ import annotations

import math
import sys
import time
from collections import deque

RECENT_S = 30.0  # the rate is measured over this much of the latest wall time
PLAIN_EVERY_S = 30.0  # in a file or pipe: a progress line when nothing was printed for this long
REFRESH_S = 0.5  # on a terminal: the updating line is redrawn at most this often
ERASE = "\r\033[K"  # back to the line's start and erase it (ANSI "erase in line")


def clock(seconds: float) -> str:
    """``h:mm:ss`` of a duration (``?:??:??`` when it is unknown: no rate measured yet)."""
    if not math.isfinite(seconds):
        return "?:??:??"
    whole = round(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


class TrainingProgress:
    """train.py's console progress of iterations ``start`` .. ``total`` (see the module docstring).
    ``live``: one updating line (default: whether ``stream`` is a terminal); ``now``: the clock (tests)."""

    def __init__(self, start: int, total: int, stream=None, live: bool | None = None, now=time.perf_counter):
        self.start, self.total, self.now = start, total, now
        self.stream = sys.stdout if stream is None else stream
        self.live = self.stream.isatty() if live is None else live
        t = now()
        self.recent = deque([(start, t)])  # (iterations done, time) of the latest iterations
        self.printed = t  # when the last line (or the updating line) was written
        self.shown = False  # an updating line is on the screen

    def rate(self) -> float:
        """Iterations a second over the recent ones (0.0 before the first one ends)."""
        (d0, t0), (d1, t1) = self.recent[0], self.recent[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0

    def status(self, done: int) -> str:
        """``iter 37/6000 | 1.23 it/s | ETA 1:20:48``"""
        return f"iter {done}/{self.total} | {self.rate():.2f} it/s | ETA {self.eta(done)}"

    def eta(self, done: int) -> str:
        rate = self.rate()
        return clock((self.total - done) / rate if rate > 0 else math.inf)

    def update(self, done: int, line: str | None = None) -> None:
        """After iteration ``done`` (1-based): the clock is read; ``line`` (a log line) is printed with the ETA
        appended, else the progress line when it is due."""
        t = self.now()
        self.recent.append((done, t))
        # The first iteration carries the one-off costs (torch.compile, cuDNN autotuning, the first allocations):
        # out of the rate once a second one is measured. Then only the last RECENT_S seconds count.
        while len(self.recent) > 2 and (self.recent[0][0] == self.start or t - self.recent[1][1] >= RECENT_S):
            self.recent.popleft()
        if line is not None:
            self.write(f"{line} | ETA {self.eta(done)}")
        elif self.live and (t - self.printed >= REFRESH_S or done == self.start + 1):
            self.stream.write(ERASE + self.status(done))
            self.stream.flush()
            self.shown, self.printed = True, t
        elif not self.live and (t - self.printed >= PLAIN_EVERY_S or done == self.start + 1):
            self.write(self.status(done))

    def write(self, text: str) -> None:
        """A line of its own (the updating line erased first)."""
        self.clear()
        print(text, file=self.stream, flush=True)
        self.printed = self.now()

    def clear(self) -> None:
        """Erase the updating line, if one is shown (before any other output)."""
        if self.shown:
            self.stream.write(ERASE)
            self.stream.flush()
            self.shown = False


def timed(fn, *args, **kwargs):
    """``(fn(*args, **kwargs), its wall time in seconds)``: a case's own time, where a pool runs several at once."""
    t0 = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - t0


class CaseProgress:
    """prepare's and predict's line a finished case: ``[k/n] id seconds`` and the ETA of the rest (the mean wall
    time a case so far, which counts the workers that run at once)."""

    def __init__(self, total: int, stream=None, now=time.perf_counter):
        self.total, self.done, self.now = total, 0, now
        self.stream = sys.stdout if stream is None else stream
        self.t0 = self.last = now()

    def finished(self, case_id: str, seconds: float | None = None) -> None:
        """Case ``case_id`` is done, in ``seconds`` (None: the time since the last case finished, or since the
        start: a case's own time where they run one after another)."""
        t = self.now()
        seconds, self.last = t - self.last if seconds is None else seconds, t
        self.done += 1
        left = self.total - self.done
        eta = f" (ETA {clock((t - self.t0) / self.done * left)})" if left else ""
        print(f"[{self.done}/{self.total}] {case_id} {seconds:.1f} s{eta}", file=self.stream, flush=True)


__all__ = ["CaseProgress", "TrainingProgress", "clock", "timed"]
