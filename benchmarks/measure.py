"""Timing and roofline helpers shared by every benchmark in this folder.

Two numbers per GPU row, because they answer different questions (see benchmarks/README.md):

- ``kernel_time(fn, arg_sets)``: the GPU time of the call's kernels alone, as a compiled training
  step pays it: the calls are captured in one CUDA graph and replayed
  (``triton.testing.do_bench_cudagraph``), so no host work and no launch latency is in the number.
  Where a call cannot be captured, the kernel durations from ``torch.profiler`` are summed instead
  (the row's ``kernel_timer`` says which).
- ``wall_time(fn, arg_sets)``: eager wall-clock per call, host included, as an eager user pays it:
  ``torch.utils.benchmark.Timer`` over back-to-back calls, with a device sync at each clock read.

Both cycle through ``arg_sets``, sized by ``rotation_count`` so that together they are several
times the L2 cache: no call finds its inputs in cache left there by the previous one.

The two ceilings of the card are measured in the same process: ``copy_bandwidth`` (a large
device-to-device copy, bytes read + bytes written) and ``matmul_tflops`` (an 8192^3 bf16 product on
random data). A kernel's "% of copy" and a step's MFU are taken against these, not the datasheet.
``time_cuda`` (CUDA events around each call) times those probes and the train step.

On the CPU the same helpers fall back to ``time.perf_counter`` so that the wiring runs
everywhere; CPU numbers only say what the reference path costs on that machine.
"""
from __future__ import annotations

import datetime as _dt
import itertools
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from uamt_fast import files

MiB = 1 << 20
GiB = 1 << 30


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Per-call times of one benchmarked callable, in milliseconds."""

    median_ms: float
    p20_ms: float | None  # None where the timer gives a mean only (profiler kernel sums)
    p80_ms: float | None
    calls: int  # timed calls behind the quantiles
    rotation: int  # distinct input sets cycled through

    def as_dict(self) -> dict:
        return asdict(self)


def quantiles_ms(times_ms: Sequence[float], rotation: int) -> Timing:
    """Median, p20 and p80 of per-call times in milliseconds."""
    q = statistics.quantiles(times_ms, n=10, method="inclusive") if len(times_ms) > 1 else [times_ms[0]] * 9
    return Timing(statistics.median(times_ms), q[1], q[7], len(times_ms), rotation)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cuda(
    fn: Callable, arg_sets: Sequence[tuple], *, warmup_ms: float = 50.0, rep_ms: float = 200.0,
    min_calls: int = 10, max_calls: int = 500,
) -> Timing:
    """Median device time of ``fn(*arg_sets[i % n])`` with CUDA events around each call.

    Warm-up runs at least 3 calls and at least ``warmup_ms``; then the number of timed calls is
    picked so that they take about ``rep_ms`` in all (clamped to [min_calls, max_calls]).
    Host-bound callables (a Python loop of small launches) are measured as the GPU sees them:
    the gaps between launches fall inside the events.
    """
    n = len(arg_sets)
    if n == 0:
        raise ValueError("time_cuda: arg_sets is empty; expected at least one tuple of arguments")
    i = 0
    torch.cuda.synchronize()
    start = time.perf_counter()
    calls = 0
    while calls < 3 or (time.perf_counter() - start) * 1e3 < warmup_ms:
        fn(*arg_sets[i % n])
        i += 1
        calls += 1
        torch.cuda.synchronize()
    # estimate one call from the last warm-up calls (synchronised, so an overestimate: fine)
    t0 = torch.cuda.Event(enable_timing=True)
    t1 = torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(3):
        fn(*arg_sets[i % n])
        i += 1
    t1.record()
    torch.cuda.synchronize()
    est_ms = max(t0.elapsed_time(t1) / 3, 1e-3)
    reps = int(min(max_calls, max(min_calls, math.ceil(rep_ms / est_ms))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for k in range(reps):
        args = arg_sets[i % n]
        i += 1
        starts[k].record()
        fn(*args)
        ends[k].record()
    torch.cuda.synchronize()
    return quantiles_ms([s.elapsed_time(e) for s, e in zip(starts, ends)], n)


def time_host(fn: Callable, arg_sets: Sequence[tuple], *, warmup_calls: int = 1, rep_ms: float = 500.0,
              min_calls: int = 1, max_calls: int = 100) -> Timing:
    """``time.perf_counter`` version of ``time_cuda`` for the CPU (and for host-synchronised steps)."""
    n = len(arg_sets)
    if n == 0:
        raise ValueError("time_host: arg_sets is empty; expected at least one tuple of arguments")
    i = 0
    for _ in range(warmup_calls):
        fn(*arg_sets[i % n])
        i += 1
    times = []
    budget_start = time.perf_counter()
    while len(times) < min_calls or (len(times) < max_calls and (time.perf_counter() - budget_start) * 1e3 < rep_ms):
        t = time.perf_counter()
        fn(*arg_sets[i % n])
        times.append((time.perf_counter() - t) * 1e3)
        i += 1
    return quantiles_ms(times, n)


def kernel_time(fn: Callable, arg_sets: Sequence[tuple], *, rep_ms: float = 10.0) -> tuple[Timing, str]:
    """GPU time per call of ``fn(*args)``'s kernels, cycling through ``arg_sets``; returns (timing, how).

    CUDA-graph replay (``triton.testing.do_bench_cudagraph``: the calls unrolled into one graph,
    median, p20, p80 over its 10 replays): what a compiled step pays, host cost and launch gaps
    removed. If the call cannot be captured (a host sync inside it, say), the kernel durations of
    20 calls under ``torch.profiler`` are summed instead (a mean: no spread). Warm up ``fn`` first.
    """
    from triton.testing import do_bench_cudagraph

    cycle = itertools.cycle(arg_sets)
    try:
        median, p20, p80 = do_bench_cudagraph(lambda: fn(*next(cycle)), rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(median, p20, p80, 10, len(arg_sets)), "CUDA-graph replay (triton.testing.do_bench_cudagraph)"
    except Exception as e:  # noqa: BLE001 - any capture failure falls back to the profiler, and says so
        torch.cuda.synchronize()
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    how = f"torch.profiler kernel sum, mean of 20 calls (graph capture failed: {why})"
    return kernel_time_profiler(fn, arg_sets), how


def kernel_time_profiler(fn: Callable, arg_sets: Sequence[tuple], *, calls: int = 20) -> Timing:
    """Mean per call of the summed device time of every kernel ``fn(*args)`` launches (``torch.profiler``)."""
    from torch.profiler import ProfilerActivity, profile

    n = len(arg_sets)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            fn(*arg_sets[i % n])
        torch.cuda.synchronize()
    total_us = sum(e.self_device_time_total for e in prof.key_averages())
    mean_ms = total_us / 1e3 / calls
    return Timing(mean_ms, None, None, calls, n)


def wall_time(fn: Callable, arg_sets: Sequence[tuple], *, min_run_s: float = 0.03, warmup_calls: int = 3) -> Timing:
    """Eager wall-clock per call of ``fn(*args)``, host included, cycling through ``arg_sets``.

    ``torch.utils.benchmark.Timer.blocked_autorange`` over blocks of back-to-back calls; its clock
    syncs the device at each read, so a block's time is the host issuing the calls and the device
    running them, overlapped as in an eager training loop (the longer of the two sets the pace). Its
    block-size search grows the block tenfold until it takes ``min_run_s`` (0.03 s: a 0.5 ms call
    is timed as blocks of 100). Median, p20 and p80 over the blocks (often one).
    """
    from torch.utils.benchmark import Timer

    n = len(arg_sets)
    for i in range(warmup_calls):  # compilation, autotuning, first-touch allocations stay out
        fn(*arg_sets[i % n])
    cycle = itertools.cycle(arg_sets)
    m = Timer(stmt="call()", globals={"call": lambda: fn(*next(cycle))}).blocked_autorange(min_run_time=min_run_s)
    t = quantiles_ms([x * 1e3 for x in m.times], n)
    t.calls = len(m.times) * m.number_per_run
    return t


def rotation_count(bytes_per_set: int, device: torch.device, *, cache_multiple: int = 4, max_sets: int = 8) -> int:
    """How many distinct input sets to cycle through so that together they exceed the L2 cache
    ``cache_multiple`` times over (at least 2 on a GPU; 1 on the CPU, where every paper-shape
    input is far larger than the last-level cache already)."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * MiB)
    return int(min(max_sets, max(2, math.ceil(cache_multiple * l2 / max(bytes_per_set, 1)))))


def peak_memory_bytes(fn: Callable, device: torch.device) -> int | None:
    """Extra device memory one call of ``fn`` needs at its peak, above what was allocated before
    (inputs and parameters excluded). ``None`` on the CPU, where there is no allocator to ask."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


# --------------------------------------------------------------------------------------------
# ceilings of the machine, measured in the same run
# --------------------------------------------------------------------------------------------
def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Device-to-device copy rate in GB/s (1e9 bytes/s), counting bytes read plus bytes written.

    1 GiB per buffer on a GPU (far beyond any L2), 256 MiB on the CPU. Median of timed copies.
    """
    nbytes = nbytes or (GiB if device.type == "cuda" else 256 * MiB)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timer = time_cuda if device.type == "cuda" else time_host
    t = timer(lambda: dst.copy_(src), [()])
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device, dtype: torch.dtype | None = None, n: int | None = None) -> float:
    """Dense matrix-product rate in TFLOP/s (``2 n^3`` per product), random operands.

    Defaults: bf16 at n=8192 on a GPU (the rate the tensor cores reach on a model's GEMMs and
    convolutions), fp32 at n=1024 on the CPU (what the CPU trainer runs in).
    """
    cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    n = n or (8192 if cuda else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timer = time_cuda if cuda else time_host
    t = timer(torch.mm, [(a, b)])
    return 2 * n**3 / (t.median_ms * 1e-3) / 1e12


# --------------------------------------------------------------------------------------------
# what ran where
# --------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    """Device, versions and date: the header every results file carries."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # CPU-only installs without triton still run the reference rows
        triton_version = None
    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": triton_version,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device_type": device.type,
        "device": platform.processor() or platform.machine(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device=props.name,
            sm_count=props.multi_processor_count,
            gpu_memory_gib=round(props.total_memory / GiB, 1),
            l2_cache_mib=round(getattr(props, "L2_cache_size", 0) / MiB, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
        try:  # driver and clocks, when nvidia-ml-py is installed (optional)
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
            env["sm_clock_max_mhz"] = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)
            env["power_limit_w"] = pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000
        except Exception as e:  # noqa: BLE001 - NVML is informational only
            env["nvml"] = f"unavailable: {type(e).__name__}"
    return env


def environment_line(env: dict) -> str:
    dev = env["device"] if env["device_type"] == "cuda" else f"CPU ({env['cpu_count']} cores)"
    extra = f", CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}" if env["device_type"] == "cuda" else ""
    return f"{dev}; torch {env['torch']}, triton {env['triton']}{extra}; Python {env['python']}; {env['date_utc']}"


# --------------------------------------------------------------------------------------------
# rows and tables
# --------------------------------------------------------------------------------------------
def gbps(nbytes: int | None, ms: float | None) -> float | None:
    """Achieved rate in GB/s (1e9 bytes/s)."""
    if not nbytes or not ms:
        return None
    return nbytes / (ms * 1e-3) / 1e9


def add_roofline(row: dict, copy_gbps: float | None) -> dict:
    """Fill ``gbps``, ``pct_copy`` and ``floor_ms`` (bytes / copy bandwidth) from ``bytes`` and ``median_ms``
    (the kernel time on a GPU row that has one)."""
    row["gbps"] = gbps(row.get("bytes"), row.get("median_ms"))
    if copy_gbps and row.get("bytes"):
        row["floor_ms"] = row["bytes"] / (copy_gbps * 1e9) * 1e3
        row["pct_copy"] = 100.0 * row["gbps"] / copy_gbps if row["gbps"] else None
    return row


def add_speedups(rows: list[dict]) -> list[dict]:
    """For each row and every baseline row ``b`` of its group: ``speedup[b] = median(b) / median(row)``
    (kernel time on a GPU) and ``wall_speedup[b]`` on the eager wall-clock, where both rows have one.

    A group is one problem (same op, mode, shape, dtype); a baseline is a row whose ``baseline``
    flag is set (the reference ops, torch.compile of them, the per-parameter loop, foreach).
    """
    by_group: dict[str, list[dict]] = {}
    for r in rows:
        by_group.setdefault(r["group"], []).append(r)
    for group_rows in by_group.values():
        baselines = [b for b in group_rows if b.get("baseline")]
        for r in group_rows:
            # kernel time against kernel time only (else the median, a wall time, against the same)
            first = "kernel_ms" if r.get("kernel_ms") else "median_ms"
            for key, field in (("speedup", first), ("wall_speedup", "wall_ms")):
                same = [b for b in baselines if b is not r and b.get(field)
                        and (field != "median_ms" or not b.get("kernel_ms"))]
                if r.get(field):
                    r[key] = {b["provider"]: b[field] / r[field] for b in same}
    return rows


def fmt_number(x, spec: str) -> str:
    width = int(re.match(r"\d*", spec).group() or 0)
    return "-".rjust(width) if x is None else format(x, spec)


def speedup_text(row: dict) -> str:
    """'1.52x/0.90x vs compile, ...': kernel-time speedup / wall-clock speedup over each baseline."""
    kernel, wall = row.get("speedup") or {}, row.get("wall_speedup") or {}
    parts = []
    for name in dict.fromkeys([*kernel, *wall]):
        k, w = kernel.get(name), wall.get(name)
        both = "kernel_ms" in row  # GPU rows: kernel/wall; CPU rows have one number
        parts.append(f"{fmt_number(k, '.2f')}x/{fmt_number(w, '.2f')}x vs {name}" if both else
                     f"{fmt_number(k, '.2f')}x vs {name}")
    return ", ".join(parts + ([row["note"]] if row.get("note") else []))


def format_table(rows: list[dict]) -> str:
    """A plain-text table: one line per row, grouped, with speedups over each baseline.

    ``kernel ms``: CUDA-graph (or profiler) kernel time, what a compiled step pays; ``wall ms``: eager
    wall-clock per call, host included. ``%copy`` and the first speedup are on kernel time (on the
    CPU, where there is no kernel time, on wall time); the second speedup is on wall-clock.
    """
    head = f"{'group':<44} {'provider':<20} {'kernel ms':>9} {'wall ms':>9} {'p20-p80':>13} {'floor ms':>8} " \
           f"{'%copy':>6} {'peak MiB':>8}  speedup kernel/wall"
    lines = [head, "-" * len(head)]
    for r in rows:
        spread = f"{fmt_number(r.get('p20_ms'), '.3f')}-{fmt_number(r.get('p80_ms'), '.3f')}"
        peak = r.get("peak_bytes")
        lines.append(
            f"{r['group'][:44]:<44} {r['provider'][:20]:<20} {fmt_number(r.get('kernel_ms'), '9.3f')} "
            f"{fmt_number(r.get('wall_ms', r.get('median_ms')), '9.3f')} {spread:>13} "
            f"{fmt_number(r.get('floor_ms'), '8.3f')} {fmt_number(r.get('pct_copy'), '6.1f')} "
            f"{fmt_number(None if peak is None else peak / MiB, '8.1f')}  {speedup_text(r)}"
        )
    return "\n".join(lines)


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON, creating the parent folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write_text(path, json.dumps(obj, indent=1, default=str) + "\n")
    return path
