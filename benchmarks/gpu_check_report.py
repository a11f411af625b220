"""Merge the outputs of ``benchmarks/gpu_check.sh`` into ``gpu_check.json`` and print the short table.

    python -m benchmarks.gpu_check_report OUT_DIR --status STATUS.tsv --work WORK_DIR --mode gpu|cpu --elapsed S

Reads (whatever exists; a missing part is reported as missing, never invented): the step status
table, the pytest summary line of ``correctness.log``, ``micro.json``, ``train_step.json``, and the
training run's ``eval.json`` / ``metrics.jsonl`` copied into WORK_DIR. Writes ``gpu_check.json`` and
``summary.txt`` into OUT_DIR and prints the summary.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from benchmarks import measure

# Targets of the kernel and trainer issues (H100), quoted next to the measured numbers.
TARGET_PCT_COPY = 80.0
TARGET_STEP_SPEEDUP = 5.0


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _pytest_counts(log: Path) -> dict | None:
    """Counts from the last pytest summary line ('3 failed, 40 passed, 2 skipped in 12.3s')."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    lines = [ln for ln in text.splitlines() if re.search(r"\b(passed|failed|error|errors|skipped)\b.* in [\d.]+s", ln)]
    if not lines:
        return None
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", lines[-1])}
    counts["line"] = lines[-1].strip("= ")
    return counts


def _read_status(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, rc, seconds = (line.split("\t") + ["", ""])[:3]
        rows.append({"step": name, "exit": rc, "seconds": int(seconds or 0)})
    return rows


def _metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(result: dict) -> str:
    """The short table: correctness, ceilings, the key kernel rows, the train step, the training run."""
    out = []
    env = (result.get("micro") or {}).get("environment") or (result.get("train_step") or {}).get("environment")
    out.append(f"gpu_check ({result['mode']}), {result['elapsed_s']} s: " + (measure.environment_line(env) if env else "?"))
    out.append("steps: " + ", ".join(f"{s['step']} exit {s['exit']} ({s['seconds']} s)" for s in result["steps"]))
    c = result.get("correctness")
    out.append(f"correctness on device: {c['line'] if c else 'no pytest summary found (see correctness.log)'}")

    micro = result.get("micro")
    if micro:
        partial = "" if micro.get("complete", True) else "; INCOMPLETE: the run stopped early, rows so far"
        out.append(f"copy bandwidth {micro['copy_gbps']:.0f} GB/s (target for kernels: >= {TARGET_PCT_COPY:.0f}% of it)"
                   f"{partial}")
        out.append(f"{'kernel row':<46} {'provider':<20} {'ms':>8} {'floor':>7} {'%copy':>6}  speedup")
        for r in micro["rows"]:
            if r.get("baseline") or r.get("median_ms") is None:
                continue
            sp = ", ".join(f"{v:.1f}x {k}" for k, v in (r.get("speedup") or {}).items())
            floor = f"{r['floor_ms']:7.3f}" if r.get("floor_ms") is not None else f"{'-':>7}"
            pct = f"{r['pct_copy']:6.1f}" if r.get("pct_copy") is not None else f"{'-':>6}"
            out.append(f"{r['group'][:46]:<46} {r['provider'][:20]:<20} {r['median_ms']:8.3f} {floor} {pct}  {sp}")
    else:
        out.append("micro-benchmarks: no micro.json (see micro.log)")

    ts = result.get("train_step")
    if ts:
        ref = next((r for r in ts["rows"] if r["variant"] == "reference"), None)
        flops = ts.get("flops_per_iter", {}).get("reference")
        if not ts.get("complete", True):
            out.append("train step: INCOMPLETE, the run stopped early; rows so far:")
        out.append(f"train step (crop {ts['patch']}, {ts['cases']} cases; {(flops or 0) / 1e12:.3g} TFLOP/iter; "
                   f"matmul {ts['matmul_tflops']:.3g} TFLOP/s; target ours >= {TARGET_STEP_SPEEDUP:.0f}x reference)")
        for r in ts["rows"]:
            sp = f"{r['speedup_vs_reference']:.2f}x" if ref and r.get("speedup_vs_reference") else "-"
            peak = f"{r['peak_gib']:.1f} GiB" if r.get("peak_gib") is not None else "-"
            mfu = f"{r['mfu_pct']:.1f}%" if r.get("mfu_pct") is not None else "-"
            out.append(f"  {r['variant']:<27} {r['ms_per_iter']:8.1f} ms/iter {r['it_per_s']:7.2f} it/s  {sp:>7}  "
                       f"peak {peak:>9}  MFU {mfu}")
        if ts.get("skipped"):
            out.append(f"  skipped: {', '.join(ts['skipped'])}")
    else:
        out.append("train step: no train_step.json (see train_step.log)")

    tr = result.get("training")
    if tr and tr.get("eval"):
        m = tr["eval"]["mean"]
        speed = tr.get("speed") or {}
        out.append(f"training run: {speed.get('iterations', '?')} iterations at {speed.get('it_per_s', float('nan')):.2f} it/s "
                   f"({speed.get('train_seconds', float('nan')):.0f} s), test Dice {m['dice']:.4f}, Jaccard {m['jaccard']:.4f}, "
                   f"95HD {m['hd95']:.2f}, ASD {m['asd']:.2f} on {len(tr['eval']['cases'])} cases")
    else:
        out.append("training run: no eval.json (see train.log)")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--status", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--mode", choices=("gpu", "cpu"), required=True)
    p.add_argument("--elapsed", type=int, default=0)
    a = p.parse_args(argv)

    metrics = _metrics(a.work / "metrics.jsonl")
    speed = next((m for m in reversed(metrics) if "it_per_s" in m and "train_seconds" in m), None)
    result = {
        "mode": a.mode,
        "elapsed_s": a.elapsed,
        "steps": _read_status(a.status),
        "correctness": _pytest_counts(a.out / "correctness.log"),
        "micro": _load_json(a.out / "micro.json"),
        "train_step": _load_json(a.out / "train_step.json"),
        "training": {"eval": _load_json(a.work / "eval.json"), "metrics": metrics,
                     "speed": speed and {**speed, "iterations": speed.get("iteration")}},
    }
    measure.write_json(a.out / "gpu_check.json", result)
    text = summarize(result)
    (a.out / "summary.txt").write_text(text + "\n")
    print("\n" + "=" * 100 + "\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
