"""DDP scaling of train.py: aggregate it/s and scaling efficiency for 1..N torchrun processes.

    python -m benchmarks.ddp_scaling --max-procs 8                  # GPUs: one process each (NCCL), paper shapes
    python -m benchmarks.ddp_scaling --cpu --max-procs 2            # wiring check on a CPU (gloo), tiny shapes

For each N, ``torchrun --nproc_per_node N train.py`` trains on synthetic LA-like volumes
(``uamt_fast.data.write_synthetic_la``, written once; GPU: 20 of 128 x 128 x 96) and stops before the
evaluation (``--stop-at``). Every rank keeps the per-rank batch (2 labeled + 2 unlabeled crops): weak
scaling, the global batch grows with N. The rate is the last log window of rank 0's metrics.jsonl (the
first window holds torch.compile and cuDNN autotuning): global iterations per second; aggregate it/s =
N x that (per-rank batches a second, what one process would have to reach alone); efficiency =
aggregate(N) / (N x aggregate(1)). On a CPU the N processes share its cores, so the efficiency there says
the wiring works, not how DDP scales.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CPU_FLAGS = ["--n-filters", "4", "--patch", "32", "32", "16", "--labeled", "4", "--no-compile", "--device", "cpu",
             "--threads", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(n: int, data_root: Path, out: Path, iterations: int, flags: list) -> dict:
    """One torchrun launch of N processes; its rate from rank 0's last log window."""
    window = max(1, iterations // 2)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
               str(free_port()), str(REPO / "train.py"), "--data", str(data_root), "--out", str(out),
               "--iterations", str(iterations), "--stop-at", str(iterations), "--log-every", str(window),
               "--save-every", str(iterations), *flags]
    env = dict(os.environ) | {"OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    p = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if p.returncode != 0:
        raise SystemExit(f"ddp_scaling: {n} processes failed (exit {p.returncode}): "
                         f"{(p.stderr.strip().splitlines() or [''])[-1][:300]}")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rate = [x for x in lines if "loss_ce" in x][-1]["it_per_s"]
    return {"procs": n, "it_per_s": rate, "aggregate_it_per_s": n * rate, "wall_s": time.perf_counter() - t}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ddp_scaling", description=__doc__.split("\n")[0])
    p.add_argument("--max-procs", type=int, default=None, help="1..N processes (default: the GPUs, or 2 with --cpu)")
    p.add_argument("--cpu", action="store_true", help="gloo on the CPU, tiny shapes: " + " ".join(CPU_FLAGS))
    p.add_argument("--iterations", type=int, default=None, help="per launch (default 40 with --cpu, 100 on GPUs)")
    p.add_argument("--json", default="", help="also write the rows to this file")
    args, extra = p.parse_known_args(argv)  # anything else goes to every train.py call
    import torch

    from uamt_fast import data, files

    gpus = 0 if args.cpu else torch.cuda.device_count()
    if not args.cpu and gpus == 0:
        p.error("no CUDA device: give --cpu for the wiring check")
    n_max = args.max_procs or (2 if args.cpu else gpus)
    iterations = args.iterations or (40 if args.cpu else 100)
    flags = (CPU_FLAGS if args.cpu else []) + extra
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        data.write_synthetic_la(root, n_train=8 if args.cpu else 20, n_test=1,
                                shape=(48, 48, 32) if args.cpu else (128, 128, 96), seed=0)
        for n in range(1, n_max + 1):
            rows.append(run(n, root, Path(tmp) / f"run{n}", iterations, flags))
            base = rows[0]["aggregate_it_per_s"]
            rows[-1]["efficiency"] = rows[-1]["aggregate_it_per_s"] / (n * base)
            r = rows[-1]
            print(f"{n} process{'es' if n > 1 else '  '}: {r['it_per_s']:.2f} global it/s, aggregate "
                  f"{r['aggregate_it_per_s']:.2f} it/s, efficiency {100 * r['efficiency']:.0f}% "
                  f"({r['wall_s']:.0f} s launch)", flush=True)
    device = "CPU (gloo)" if args.cpu else f"{gpus} x {torch.cuda.get_device_name(0)} (NCCL)"
    print(f"{device}, torch {torch.__version__}, {iterations} iterations a launch, per-rank batch 2 + 2 crops")
    if args.json:
        files.atomic_write_text(args.json, json.dumps({"device": device, "iterations": iterations, "rows": rows},
                                                      indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
