"""The console progress of the long commands (uamt_fast.progress): train.py's line after the first iteration and
its ETA on every line, plain lines in a file or pipe and one updating line on a terminal, metrics.jsonl untouched;
the rate and the due lines on a fake clock."""
from __future__ import annotations

import io
import json
import re
import sys

import pytest

from tests.trainer_cli import TINY
from uamt_fast import progress, train

pytestmark = pytest.mark.usefixtures("trainer_on_cpu")  # tests/conftest.py

ETA = r"ETA \d+:\d\d:\d\d"
STATUS = re.compile(rf"iter (\d+)/4 \| \d+\.\d\d it/s \| {ETA}")  # the progress line
LOGGED = re.compile(rf"iter (\d+)/4 \| CE .* \| \d+\.\d\d it/s \| {ETA}")  # a log line, the ETA appended


def train_tiny(root, out) -> int:
    return train.main(["--data", str(root), *TINY, "--n-filters", "2", "--iterations", "4", "--threads", "1",
                       "--out", str(out)])


def logged_iterations(out) -> list:
    """metrics.jsonl: the log lines' iterations, and the keys of the last line (the run's speed)."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [line["iteration"] for line in lines[:-1]] + [sorted(lines[-1])]


def test_train_prints_a_line_after_the_first_iteration_and_an_eta_on_every_line(tiny_root, tmp_path, capsys):
    """Not a terminal (a log file, a pipe): plain lines, the first right after iteration 1, every one with its
    ETA; metrics.jsonl keeps its lines: every --log-every (2) iterations and the speed line."""
    assert train_tiny(tiny_root, tmp_path / "run") == 0
    out = capsys.readouterr().out
    assert "\r" not in out and "\033" not in out
    lines = out.splitlines()
    header = next(k for k, line in enumerate(lines) if line.startswith("uamt: "))
    assert STATUS.fullmatch(lines[header + 1]) and STATUS.fullmatch(lines[header + 1])[1] == "1", lines[header + 1]
    printed = [line for line in lines if line.startswith("iter ")]
    assert [m[1] for m in map(LOGGED.fullmatch, printed) if m] == ["2", "4"], printed
    assert all(STATUS.fullmatch(line) or LOGGED.fullmatch(line) for line in printed), printed
    assert printed[-1].endswith("ETA 0:00:00")
    assert logged_iterations(tmp_path / "run") == [2, 4, ["it_per_s", "iteration", "train_seconds"]]


def test_on_a_terminal_one_line_updates_in_place_and_is_erased_before_other_output(tiny_root, tmp_path, capsys,
                                                                                   monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # (capsys's stream: the trainer's stdout)
    assert train_tiny(tiny_root, tmp_path / "run") == 0
    out = capsys.readouterr().out
    assert out.count(progress.ERASE) >= 2  # the line after iteration 1 drawn, then erased for the log line
    drawn = out.split(progress.ERASE)[1]  # the updating line after iteration 1: no newline, erased next
    assert STATUS.fullmatch(drawn) and STATUS.fullmatch(drawn)[1] == "1", repr(drawn)
    for line in out.split(progress.ERASE)[2:]:  # each erase: an updating line, or a line of its own after it
        assert STATUS.fullmatch(line) or LOGGED.match(line), repr(line)  # (an updating line is erased, never
        # run into: fullmatch)
    assert logged_iterations(tmp_path / "run") == [2, 4, ["it_per_s", "iteration", "train_seconds"]]


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_rate_leaves_out_the_first_iteration_and_counts_only_the_recent_ones():
    clock, stream = FakeClock(), io.StringIO()
    shown = progress.TrainingProgress(10, 1000, stream=stream, live=False, now=clock)
    assert shown.rate() == 0.0 and shown.eta(10) == "?:??:??"
    clock.t += 60.0  # iteration 11: a minute of compiling
    shown.update(11)
    assert shown.rate() == pytest.approx(1 / 60) and stream.getvalue() == "iter 11/1000 | 0.02 it/s | ETA 16:29:00\n"
    for _ in range(20):  # then 2 iterations a second: the first one's minute is no longer counted
        clock.t += 0.5
        shown.update(shown.recent[-1][0] + 1)
    assert shown.rate() == pytest.approx(2.0)
    for _ in range(200):  # 8 iterations a second for 25 s: the rate is that of the last RECENT_S (30) seconds
        clock.t += 0.125
        shown.update(shown.recent[-1][0] + 1)
    assert progress.RECENT_S == 30.0 and shown.rate() == (200 + 2 * 5) / 30
    assert progress.clock(3725.4) == "1:02:05" and progress.clock(float("inf")) == "?:??:??"


def test_plain_lines_when_nothing_was_printed_for_a_while_and_log_lines_carry_the_eta():
    clock, stream = FakeClock(), io.StringIO()
    shown = progress.TrainingProgress(0, 100, stream=stream, live=False, now=clock)
    for done in range(1, 61):
        clock.t += 1.0
        shown.update(done, "iter 20/100 | CE 1" if done == 20 else None)
    assert stream.getvalue().splitlines() == ["iter 1/100 | 1.00 it/s | ETA 0:01:39",
                                              "iter 20/100 | CE 1 | ETA 0:01:20",
                                              f"iter {20 + int(progress.PLAIN_EVERY_S)}/100 | 1.00 it/s | ETA 0:00:50"]


def test_the_updating_line_is_redrawn_at_most_every_refresh_and_erased_before_a_line():
    clock, stream = FakeClock(), io.StringIO()
    shown = progress.TrainingProgress(0, 10, stream=stream, live=True, now=clock)
    for done in range(1, 5):
        clock.t += progress.REFRESH_S / 2
        shown.update(done)
    shown.write("stopped at iteration 4")
    erase = progress.ERASE
    assert stream.getvalue() == (f"{erase}iter 1/10 | 4.00 it/s | ETA 0:00:02{erase}iter 3/10 | 4.00 it/s | "
                                 f"ETA 0:00:02{erase}stopped at iteration 4\n")
    shown.clear()  # nothing shown: nothing erased
    assert stream.getvalue().endswith("stopped at iteration 4\n")


def test_case_progress_counts_finished_cases_and_gives_the_eta_of_the_rest():
    clock, stream = FakeClock(), io.StringIO()
    cases = progress.CaseProgress(3, stream=stream, now=clock)
    clock.t += 10.0
    cases.finished("case_007", 9.96)  # out of order: the count is of cases finished
    clock.t += 2.0
    cases.finished("case_001", 11.5)
    clock.t += 1.5
    cases.finished("case_002")  # one after another (predict): the time since the last case finished
    assert stream.getvalue().splitlines() == ["[1/3] case_007 10.0 s (ETA 0:00:20)",
                                              "[2/3] case_001 11.5 s (ETA 0:00:06)", "[3/3] case_002 1.5 s"]
