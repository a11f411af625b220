"""``--blend mean`` vs ``--blend gaussian`` on a trained run's test cases: Dice, and the seams of the uncertainty map.

    python -m benchmarks.blend_seams RUN --data /path/to/LA [--passes 8] [--first N] [--threads 1] --json OUT.json

For each test case (``test.list`` of ``--data``) and each blend, with the run's own patch, strides, downsample and
class count (its ``student.pt`` config, as ``train.py --eval`` reads it):

- **Dice**: the evaluation's prediction (``inference.sliding_window_predict``, upsampled to full resolution for a
  ``downsample`` run) scored by ``metrics.labelmap_metrics`` against the full-resolution label, as ``eval.json``.
- **Seams**: the uncertainty map predict writes (predictive entropy of ``--passes`` MC-dropout passes,
  ``uncertainty.mc_dropout_mean``), taken on the grid the windows slide over (the pooled image of a
  ``downsample`` run: no upsampling blurs a border there). ``border``: the mean absolute difference between
  neighbouring voxels across a window border (the two voxels on either side of a plane where a window starts or
  ends, every axis); ``elsewhere``: the same over every other neighbour pair; ``ratio`` = border / elsewhere
  (1: borders do not stand out). The same numbers for the foreground probability of the deterministic
  prediction (``prob_*``). Both blends draw the same dropout masks (the same seed per case), so the comparison
  is paired.

Writes the raw JSON (per case and the means over the cases, the settings, versions and the command) to --json;
prints a table. Nothing here is a test: numbers go to benchmarks/RESULTS.md with the machine that ran them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import uamt_fast
from uamt_fast import data, files
from uamt_fast.evaluation import inference, metrics, uncertainty
from uamt_fast.training import checkpoints


def border_pairs(size: int, patch: int, stride: int, lo: int) -> np.ndarray:
    """Bool (size - 1,): pair (i, i + 1) of an unpadded axis of ``size`` straddles a window border (a window's first
    voxel at i + 1, or its last at i), the windows of ``inference.window_starts`` over the axis padded by ``lo``
    in front (``inference.centred_padding``)."""
    padded = max(size, patch)
    straddles = np.zeros(max(size - 1, 0), bool)
    for start in inference.window_starts(padded, patch, stride):
        for plane in (start - lo, start + patch - lo):  # first voxel of the window, first voxel after it
            if 0 < plane < size:
                straddles[plane - 1] = True
    return straddles


def seam_jumps(volume: torch.Tensor, patch, strides) -> dict:
    """Mean absolute neighbour difference of ``volume`` (X, Y, Z) across window borders and elsewhere, over all
    three axes, for windows ``patch`` at ``strides`` (the sliding window's own grid)."""
    padding = inference.centred_padding(volume.shape, patch)
    border, other = [], []
    for axis, (size, p, s, (lo, _)) in enumerate(zip(volume.shape, patch, strides, padding)):
        jumps = volume.diff(dim=axis).abs().movedim(axis, 0).reshape(size - 1, -1)
        straddles = torch.from_numpy(border_pairs(size, p, s, lo))
        border.append(jumps[straddles].flatten())
        other.append(jumps[~straddles].flatten())
    border_mean, other_mean = torch.cat(border).double().mean().item(), torch.cat(other).double().mean().item()
    return {"border": border_mean, "elsewhere": other_mean,
            "ratio": border_mean / other_mean if other_mean > 0 else float("nan")}


def measure_case(net, case, cfg: dict, blend: str, passes: int, seed: int) -> dict:
    """Dice of the evaluation's prediction and the seams of the uncertainty and probability maps of one case."""
    patch, strides = tuple(cfg["patch"]), (cfg["eval_stride_xy"], cfg["eval_stride_xy"], cfg["eval_stride_z"])
    k, classes, batch = cfg.get("downsample", 1), cfg.get("num_classes") or 2, cfg.get("eval_batch", 4)
    args = (patch, strides[0], strides[2], classes, batch)
    labels, _ = inference.sliding_window_predict(net, case.image, *args, downsample=k, blend=blend)
    row = {"dice": metrics.labelmap_metrics(labels, case.label, classes)["dice"]}
    # The grid the windows slide over: the pooled image as sliding_window_predict pools it.
    grid = torch.nn.functional.avg_pool3d(torch.as_tensor(case.image)[None, None], k)[0, 0].numpy()
    probs = inference.sliding_window_predict(net, grid, *args, blend=blend)[1]
    torch.manual_seed(seed)  # the same dropout masks for both blends
    entropy = uncertainty.predictive_entropy(uncertainty.mc_dropout_mean(net, grid, passes, *args, blend=blend))
    row |= {f"prob_{key}": value for key, value in seam_jumps(1 - probs[0], patch, strides).items()}
    return row | seam_jumps(entropy, patch, strides)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.blend_seams", description=__doc__.splitlines()[0])
    p.add_argument("run", help="a train.py run folder (its student.pt) or checkpoint")
    p.add_argument("--data", required=True, help="the data set whose test.list is measured")
    p.add_argument("--passes", type=int, default=8, help="MC-dropout passes of the uncertainty map (default 8)")
    p.add_argument("--first", type=int, default=0, help="only the first N test cases (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--json", required=True, help="where the raw results go")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    net, cfg, path = checkpoints.load_vnet(args.run)
    net.eval()
    ids = data.read_list(args.data, "test")[: args.first or None]
    rows, t0 = [], time.perf_counter()
    for n, case_id in enumerate(ids):
        case = data.load_case(args.data, case_id)
        row = {"case": case_id} | {blend: measure_case(net, case, cfg, blend, args.passes, seed=n)
                                   for blend in inference.BLENDS}
        rows.append(row)
        print(f"[{n + 1}/{len(ids)}] {case_id} " + " | ".join(
            f"{b}: Dice {row[b]['dice']:.4f} seams {row[b]['border']:.4f}/{row[b]['elsewhere']:.4f} "
            f"= {row[b]['ratio']:.2f}" for b in inference.BLENDS) + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    keys = list(rows[0][inference.BLENDS[0]])
    means = {b: {k: float(np.mean([r[b][k] for r in rows])) for k in keys} for b in inference.BLENDS}
    for blend, mean in means.items():
        print(f"mean over {len(rows)} cases, {blend:>8}: Dice {mean['dice']:.4f}, uncertainty seams border "
              f"{mean['border']:.4f} elsewhere {mean['elsewhere']:.4f} ratio {mean['ratio']:.3f}; probability "
              f"seams ratio {mean['prob_ratio']:.3f}")
    result = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python -m benchmarks.blend_seams", *(sys.argv[1:] if argv is None else argv)]),
        "checkpoint": str(Path(path).resolve()), "data": str(Path(args.data).resolve()),
        "settings": {k: cfg.get(k) for k in ("patch", "eval_stride_xy", "eval_stride_z", "downsample", "n_filters",
                                             "iterations", "method", "num_classes", "eval_batch")}
        | {"passes": args.passes, "threads": args.threads, "gaussian_sigma_scale": inference.GAUSSIAN_SIGMA_SCALE},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "uamt_fast": uamt_fast.__version__,
                     "python": platform.python_version()},
        "seconds": round(time.perf_counter() - t0, 1), "cases": rows, "mean": means}
    files.atomic_write_text(Path(args.json), json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
