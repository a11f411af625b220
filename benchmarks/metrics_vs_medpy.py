"""Metric time on real LA cases: uamt_fast.evaluation.metrics.case_metrics vs medpy's dc + jc + hd95 + asd.

    python -m benchmarks.metrics_vs_medpy --data ../shared/data/LA [--cases 3] [--threads 2]

The prediction is the real label dilated by one voxel and shifted by (2, -1, 1): a realistic error
(Dice ~0.85-0.9). Asserts agreement to 1e-6 before printing times (best of 7 for ours, of 3 for medpy).
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch
from medpy.metric import binary as medpy_binary
from scipy import ndimage

from uamt_fast.data import load_case, read_list
from uamt_fast.evaluation.metrics import case_metrics


def best_of(f, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        result = f()
        times.append(time.perf_counter() - t)
    return result, min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "LA"))
    p.add_argument("--cases", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for cid in read_list(args.data, "test")[: args.cases]:
        gt = load_case(args.data, cid).label.astype(bool)
        pred = np.roll(ndimage.binary_dilation(gt), (2, -1, 1), axis=(0, 1, 2))
        ours, t_ours = best_of(lambda: case_metrics(pred, gt), 7)
        ref, t_ref = best_of(lambda: (medpy_binary.dc(pred, gt), medpy_binary.jc(pred, gt),
                                      medpy_binary.hd95(pred, gt), medpy_binary.asd(pred, gt)), 3)
        assert all(abs(a - b) <= 1e-6 for a, b in zip(ours.values(), ref)), (ours, ref)
        print(f"{cid} {gt.shape}: ours {t_ours * 1e3:.0f} ms | medpy {t_ref * 1e3:.0f} ms | "
              f"x{t_ref / t_ours:.1f} | dice {ours['dice']:.4f} hd95 {ours['hd95']:.3f} asd {ours['asd']:.3f}")


if __name__ == "__main__":
    main()
