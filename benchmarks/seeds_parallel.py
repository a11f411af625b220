"""Seeds in parallel: aggregate training throughput of 1, 2, 3, 4 concurrent train.py runs on one device.

    python -m benchmarks.seeds_parallel --data ../shared/data/LA --json seeds.json     # GPU, paper shapes
    python -m benchmarks.seeds_parallel --counts 1,3 --json seeds.json                 # GPU, synthetic volumes
    python -m benchmarks.seeds_parallel --cpu                                          # wiring check only

One train.py step uses a fraction of an H100 (the first H100 run: MFU 8.5%, 2.9 GiB), so several
seeds at once may finish a multi-seed table sooner. For each count K, K processes (spawned, one per
seed) each build train.py's model, sampler and optimizer exactly as ``benchmarks/train_step.py``'s
"ours" variant does (every speed option on), run ``--warmup`` untimed iterations (torch.compile,
cuDNN autotuning), meet at a barrier, and time ``--iters`` iterations with ``train_step.time_loop``
(between two device syncs). Aggregate it/s = K * iters / (last end - first start): the rate at which
the K runs progress together; the speedup is over K = 1 in the same invocation. Processes share the
GPU by time slicing (no MPS assumed; start ``nvidia-cuda-mps-control -d`` beforehand to try MPS).
``benchmarks.reproduce --parallel K`` is how the result is used. Without ``--data`` the runs train on
synthetic LA-like volumes (``uamt_fast.data.write_synthetic_la``; 20 of 128 x 128 x 96 on the GPU): the
same crops, so the same work per step, with no data to carry.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(base_cfg: dict, seed: int, warmup: int, iters: int, threads: int, barrier, results) -> None:
    """One concurrent run: build, warm up, wait for the others, time ``iters`` iterations, report."""
    sys.path.insert(0, str(REPO))
    import torch

    from uamt_fast import train
    from benchmarks import measure
    from benchmarks.train_step import time_loop

    if threads:
        torch.set_num_threads(threads)
    try:
        cfg = train.Config(**(base_cfg | {"seed": seed}))
        parts = train.build(cfg)
        if parts.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        iteration = [0]

        def step():
            train.train_step(parts, iteration[0])
            iteration[0] += 1

        for _ in range(warmup):  # torch.compile, cuDNN autotuning
            step()
        measure.synchronize(parts.device)
        barrier.wait(timeout=1800)
        start = time.monotonic()
        row = time_loop(step, 0, iters, parts.device)
        row |= {"seed": seed, "start": start, "end": time.monotonic()}
        if parts.device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(parts.device) / 2**30
        results.put(row)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which prints it
        barrier.abort()
        results.put({"seed": seed, "error": f"{type(e).__name__}: {e}"})


def measure_count(k: int, base_cfg: dict, args) -> dict:
    ctx = mp.get_context("spawn")  # CUDA cannot be forked; each process initialises its own context
    barrier, results = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(base_cfg, 1337 + i, args.warmup, args.iters, args.threads,
                                              barrier, results)) for i in range(k)]
    for p in procs:
        p.start()
    rows = [results.get() for _ in procs]
    for p in procs:
        p.join()
    errors = [r["error"] for r in rows if "error" in r]
    if errors:
        raise RuntimeError(f"{k} concurrent runs: {errors}")
    wall = max(r["end"] for r in rows) - min(r["start"] for r in rows)
    return {"runs": k, "aggregate_it_per_s": k * args.iters / wall, "per_run_it_per_s": [r["it_per_s"] for r in rows],
            "wall_s": wall, "peak_gib": [r.get("peak_gib") for r in rows]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.seeds_parallel", description=__doc__.split("\n")[0])
    p.add_argument("--data", action="append", default=[], help="LA root; repeat for a data set in several "
                   "folders (default: synthetic LA-like volumes)")
    p.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU, one thread a process: wiring only")
    p.add_argument("--counts", default="1,2,3,4", help="numbers of concurrent runs to measure")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per run (default 40 GPU / 2 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations per run (default 10 GPU / 1 CPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (default 1 with --cpu)")
    p.add_argument("--json", default="", help="write the rows here")
    args = p.parse_args(argv)
    args.iters = args.iters or (2 if args.cpu else 40)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.cpu else 10)
    args.threads = args.threads or (1 if args.cpu else 0)
    counts = [int(c) for c in args.counts.split(",")]
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("seeds_parallel: TRITON_INTERPRET=1 is set (the kernels would run in the interpreter); unset it",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    import torch

    from benchmarks import measure
    from benchmarks.train_step import CPU_SIZES
    from uamt_fast import data

    if not args.cpu and not torch.cuda.is_available():
        print("seeds_parallel: no CUDA device; use --cpu for the wiring check", file=sys.stderr)
        return 2
    workdir = tempfile.TemporaryDirectory(prefix="uamt_seeds_")
    roots = args.data
    if not roots:  # the step's work depends on the crop size only, not on the scans
        synthetic = dict(n_train=6, n_test=1, shape=(48, 48, 40)) if args.cpu else \
            dict(n_train=20, n_test=1, shape=(128, 128, 96))
        roots = [str(data.write_synthetic_la(Path(workdir.name) / "synthetic", seed=0, **synthetic))]
        print(f"synthetic data: {synthetic}", flush=True)
    sizes = CPU_SIZES if args.cpu else dict(patch=(112, 112, 80), n_filters=16)
    base_cfg = dict(data=roots, patch=sizes["patch"], n_filters=sizes["n_filters"], labeled=4 if args.cpu else 16,
                    device="cpu" if args.cpu else "cuda")
    if args.cpu:
        base_cfg |= dict(compile=False)
    env = measure.environment(torch.device(base_cfg["device"]))
    print(measure.environment_line(env), flush=True)
    rows = []
    for k in counts:
        row = measure_count(k, base_cfg, args)
        row["speedup"] = row["aggregate_it_per_s"] / rows[0]["aggregate_it_per_s"] if rows else 1.0
        rows.append(row)
        print(f"  {k} concurrent: {row['aggregate_it_per_s']:.2f} it/s aggregate "
              f"({row['speedup']:.2f}x of {counts[0]}), per run "
              f"{', '.join(f'{r:.2f}' for r in row['per_run_it_per_s'])} it/s", flush=True)
        if args.json:
            measure.write_json(args.json, {"environment": env, "config": base_cfg, "iters": args.iters,
                                           "warmup": args.warmup, "rows": rows})
    workdir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
