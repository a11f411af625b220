"""pytest set-up of the micro-benchmarks: ``python -m pytest benchmarks/`` (pytest-benchmark).

- Collects ``bench_*.py`` (the project's tests are ``tests/test_*.py``; the suites stay apart).
- Never sets ``TRITON_INTERPRET`` (``tests/conftest.py`` does, for CPU correctness tests): an
  interpreted kernel's time means nothing. On a CPU the fused rows skip with a reason and only
  the reference rows run; on a GPU with ``TRITON_INTERPRET=1`` in the environment the run stops.
- The ``bench`` fixture (one per session) knows the device, measures its copy bandwidth once and
  collects one row per benchmark. At the end, after pytest-benchmark's own tables, a table is
  printed (kernel time and eager wall-clock per call, p20-p80, arithmetic floor, % of copy bandwidth,
  peak memory, speedup over each baseline of the same group on both), also written to
  ``.benchmarks/uamt_fast_summary.txt`` (``--bench-summary PATH``) and, with ``--bench-json PATH``,
  with the environment as JSON.

Options: ``--bench-json PATH``; ``--bench-summary PATH``; ``--bench-tiny`` (tiny shapes: the CPU dry run of
gpu_check.sh; with ``TRITON_INTERPRET=1`` exported beforehand the fused rows then run in the Triton
interpreter, which checks their wiring, not their speed); ``UAMT_BENCH_DEVICE=cpu`` forces the CPU on a GPU machine.
"""
from __future__ import annotations

import itertools
import os
from functools import cached_property
from pathlib import Path

import pytest
import torch

from benchmarks import measure
from uamt_fast import files

SUMMARY_PATH = ".benchmarks/uamt_fast_summary.txt"  # the summary table's file, relative to where pytest runs


def pytest_addoption(parser):
    group = parser.getgroup("uamt_fast benchmarks")
    group.addoption("--bench-json", default=None, help="write every row and the environment as JSON to this path")
    group.addoption("--bench-tiny", action="store_true", help="tiny shapes (wiring check, e.g. gpu_check.sh --cpu)")
    group.addoption("--bench-summary", default=SUMMARY_PATH, help="write the summary table (printed last) to this "
                    "text file (default: %(default)s)")


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest itself; collect them only once.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _device() -> torch.device:
    want = os.environ.get("UAMT_BENCH_DEVICE", "auto")
    if want not in ("auto", "cpu", "cuda"):
        raise pytest.UsageError(f"UAMT_BENCH_DEVICE must be auto, cpu or cuda; got {want!r}")
    if want == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("UAMT_BENCH_DEVICE=cuda but torch sees no CUDA device")
    return torch.device("cuda" if want != "cpu" and torch.cuda.is_available() else "cpu")


def pytest_configure(config):
    if _device().type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        raise pytest.UsageError(
            "TRITON_INTERPRET=1 is set on a CUDA machine: the Triton kernels would run in the CPU "
            "interpreter and every fused timing would be meaningless. Unset it for benchmarks/."
        )


class BenchSession:
    """Device, ceilings and the rows measured in this pytest session."""

    def __init__(self, device: torch.device, tiny: bool, json_path: str | None = None):
        self.device = device
        self.tiny = tiny
        self.json_path = json_path
        self.rows: list[dict] = []

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @cached_property
    def env(self) -> dict:
        return measure.environment(self.device)

    @cached_property
    def copy_gbps(self) -> float:
        return measure.copy_bandwidth(self.device, None if not self.tiny else 64 * measure.MiB)

    @property
    def interpreted(self) -> bool:
        """Tiny CPU dry run with TRITON_INTERPRET=1: fused rows run the kernels in the interpreter, to
        check their wiring (their times mean nothing and are marked so)."""
        return not self.cuda and self.tiny and os.environ.get("TRITON_INTERPRET") == "1"

    def require_cuda(self, what: str, wiring_row: bool = False) -> None:
        """Skip a fused row off CUDA: on a CPU the public ops run the reference math, so its time
        would say nothing. In the ``interpreted`` dry run the rows marked ``wiring_row`` (one per op
        and mode) still run, once each: an interpreted call takes seconds."""
        if self.cuda:
            return
        if not self.interpreted:
            pytest.skip(f"{what}: the fused Triton kernels run on CUDA only; on the CPU only reference rows are timed")
        if not wiring_row:
            pytest.skip(f"{what}: the interpreted dry run checks one row per op and mode")

    def run(self, benchmark, *, group: str, provider: str, fn, arg_sets: list[tuple], bytes_moved: int | None,
            baseline: bool, peak: bool = False, host: bool = False, kernel: bool = False, kernel_time: bool = False,
            **meta) -> dict:
        """Time ``fn(*args)`` over the rotated ``arg_sets``; record and return the row.

        GPU: ``wall_ms``, eager wall-clock per call (``measure.wall_time``, host included), and with
        ``kernel_time`` also ``kernel_ms``, the kernels alone (``measure.kernel_time``: CUDA-graph
        replay). The row's ``median_ms`` (and ``%copy``, the first speedups) is the kernel time where
        there is one, else the wall time. pytest-benchmark's own timer is not used on a GPU. CPU:
        pytest-benchmark's median is ``wall_ms`` and ``median_ms``; there is no kernel time.
        ``peak``: also record the extra device memory of one call (forward + backward rows).
        ``host``: the callable does host work only (a CPU data loader): ``perf_counter`` on any
        device. ``kernel``: a row of the fused kernels (in the ``interpreted`` dry run it runs once
        and is marked so).
        """
        benchmark.group = group
        cycle = itertools.cycle(arg_sets)
        row = {"group": group, "provider": provider, "baseline": baseline, "bytes": bytes_moved, **meta}
        interpreted = self.interpreted and kernel
        if interpreted:
            row["provider"] = provider = f"{provider} (interpreter)"
        if self.cuda and not host:
            wall = measure.wall_time(fn, arg_sets)  # warms up first: compilation stays out of both numbers
            row.update(wall_ms=wall.median_ms, wall_p20_ms=wall.p20_ms, wall_p80_ms=wall.p80_ms, wall_calls=wall.calls,
                       rotation=wall.rotation, wall_timer="torch.utils.benchmark.Timer, device sync at each clock read")
            timing, row["timer"] = wall, row["wall_timer"]
            if kernel_time:
                timing, row["kernel_timer"] = measure.kernel_time(fn, arg_sets)
                row.update(kernel_ms=timing.median_ms, kernel_p20_ms=timing.p20_ms, kernel_p80_ms=timing.p80_ms,
                           timer=row["kernel_timer"])
            row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms)
            if peak:
                row["peak_bytes"] = measure.peak_memory_bytes(lambda: fn(*arg_sets[0]), self.device)
        else:
            if interpreted:
                benchmark.pedantic(lambda: fn(*next(cycle)), rounds=1, iterations=1)
            else:
                benchmark(lambda: fn(*next(cycle)))
            stats = getattr(benchmark, "stats", None)
            if stats is not None:  # None under --benchmark-disable
                timing = measure.quantiles_ms([t * 1e3 for t in stats.stats.sorted_data], len(arg_sets))
                row.update(timing.as_dict(), wall_ms=timing.median_ms, timer="pytest-benchmark perf_counter")
        measure.add_roofline(row, self.copy_gbps)
        benchmark.extra_info.update({k: v for k, v in row.items() if isinstance(v, (int, float, str, bool))})
        self.add_row(row)
        return row

    def add_row(self, row: dict) -> None:
        """Keep ``row``; with --bench-json the file is rewritten at once, so a run stopped by a time
        limit still leaves every row measured so far."""
        self.rows.append(row)
        if self.json_path:
            self.write_json(complete=False)

    def write_json(self, complete: bool) -> None:
        rows = measure.add_speedups(sorted(self.rows, key=lambda r: r["group"]))
        measure.write_json(self.json_path, {"environment": self.env, "copy_gbps": self.copy_gbps, "tiny": self.tiny,
                                            "complete": complete, "rows": rows})


_SESSION: BenchSession | None = None

# LA data for the data-pipeline rows: the release root or a `python -m uamt_fast.data pack` folder.
LA_ROOT = Path(os.environ.get("UAMT_LA_ROOT", Path(__file__).resolve().parents[2] / "shared" / "data" / "LA"))


@pytest.fixture(scope="session")
def la_root() -> Path:
    if not (LA_ROOT / "train.list").is_file():
        pytest.skip(f"LA data not found at {LA_ROOT} (set UAMT_LA_ROOT to the LA root or a packed copy)")
    return LA_ROOT


@pytest.fixture(scope="session")
def bench(request) -> BenchSession:
    global _SESSION
    _SESSION = BenchSession(_device(), request.config.getoption("--bench-tiny"), request.config.getoption("--bench-json"))
    return _SESSION


@pytest.hookimpl(wrapper=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The table comes after pytest-benchmark's tables (this wrapper's code after ``yield`` runs after every plain
    summary hook; only pytest's short list of skips may follow) and is also written to ``--bench-summary``."""
    result = yield
    if _SESSION is None or not _SESSION.rows:
        return result
    rows = measure.add_speedups(sorted(_SESSION.rows, key=lambda r: r["group"]))
    timers = "kernel: CUDA-graph replay (do_bench_cudagraph); wall: torch.utils.benchmark.Timer, synced; medians" \
        if _SESSION.cuda else "wall: perf_counter via pytest-benchmark, median; no kernel time on a CPU"
    text = "\n".join([measure.environment_line(_SESSION.env),
                      f"copy bandwidth (read + write), same run: {_SESSION.copy_gbps:.1f} GB/s; {timers}",
                      measure.format_table(rows)])
    path = Path(config.getoption("--bench-summary"))
    path.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write_text(path, text + "\n")
    tr = terminalreporter
    tr.write_sep("=", "uamt_fast micro-benchmarks: summary")
    tr.write_line(text)
    tr.write_line(f"this table is also in {path}")
    if _SESSION.json_path:
        _SESSION.write_json(complete=True)
        tr.write_line(f"rows written to {_SESSION.json_path}")
    return result
