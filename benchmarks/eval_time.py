"""Sliding-window evaluation time of one real LA case with the paper's V-Net (timing only: untrained weights).

    python -m benchmarks.eval_time --data ../shared/data/LA [--batch-size 4] [--threads 2] [--device cpu]
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch

from uamt_fast import VNet
from uamt_fast.data import load_case, read_list
from uamt_fast.evaluation.inference import PATCH_SIZE, evaluate, window_starts


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "LA"))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    case = load_case(args.data, read_list(args.data, "test")[0])
    n_windows = int(np.prod([len(window_starts(s, w, st)) for s, w, st in zip(case.image.shape, PATCH_SIZE, (18, 18, 4))]))
    model = VNet(n_filters=16).to(args.device).eval()
    t = time.perf_counter()
    evaluate(model, [case], batch_size=args.batch_size)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    print(f"case {case.id} {case.image.shape}: {n_windows} windows of {PATCH_SIZE}, batch {args.batch_size}, "
          f"{args.device}, {args.threads} threads: {dt:.1f} s ({dt / n_windows:.2f} s/window)")


if __name__ == "__main__":
    main()
