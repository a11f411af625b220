"""Merge the outputs of ``benchmarks/gpu_check.sh`` into ``gpu_check.json`` and print the short table.

    python -m benchmarks.gpu_check_report OUT_DIR [MORE_OUT_DIRS ...] [--mode gpu|cpu] [--elapsed S]

Reads whatever the stages left (a missing part is reported as missing, never invented), taking each
part from the first folder that has it, so the folders of separate device calls (one per stage) merge
into one report: ``header.log`` and ``status.tsv`` (every folder's), the pytest summary line of
``correctness.log``, ``sweep.json``, ``micro.json``, ``train_step.json``, ``profile/`` (its JSON files
and the first markdown table), and the training run's ``eval.json`` / ``metrics.jsonl`` /
``config.json``. Writes ``gpu_check.json`` and ``summary.txt`` into the first folder and prints the
summary, with each kernel row checked against the kernel targets.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from benchmarks import measure
from uamt_fast import files

# The targets of the kernels and of the train step, on an H100.
TARGET_PCT_COPY = 80.0  # kernel time >= 80% of the measured copy bandwidth (bytes floor)
TARGET_LOSS_VS_COMPILE = 1.5  # every loss row >= 1.5x torch.compile(reference) on kernel time
TARGET_EMA_VS_FOREACH = 1.5  # EMA as train.py calls it >= 1.5x torch._foreach_lerp_
TARGET_STEP_MS = 20.0  # train step <= 20 ms per iteration at the paper's shapes
TARGET_STEP_SPEEDUP = 10.0  # >= 10x the reference trainer in the same run
PROFILE_JSON_MAX_BYTES = 200_000  # larger files (traces) stay files


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _first(dirs: list[Path], name: str) -> Path | None:
    return next((d / name for d in dirs if (d / name).exists()), None)


def _pytest_counts(log: Path | None) -> dict | None:
    """Counts from the last pytest summary line ('3 failed, 40 passed, 2 skipped in 12.3s')."""
    try:
        text = log.read_text(errors="replace") if log else ""
    except OSError:
        return None
    summary = re.compile(r"\b(passed|failed|error|errors|skipped)\b.* in [\d.]+s")
    lines = [ln for ln in text.splitlines() if summary.search(ln)]
    if not lines:
        return None
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", lines[-1])}
    counts["line"] = lines[-1].strip("= ")
    return counts


def _read_status(dirs: list[Path]) -> list[dict]:
    rows = []
    for d in dirs:
        path = d / "status.tsv"
        for line in path.read_text().splitlines() if path.is_file() else []:
            stage, step, rc, seconds = (line.split("\t") + ["", "", ""])[:4]
            rows.append({"stage": stage, "step": step, "exit": rc, "seconds": int(seconds or 0), "dir": d.name})
    return rows


def _metrics(path: Path | None) -> list[dict]:
    if path is None:
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _profile(dirs: list[Path]) -> dict | None:
    """The profile folder's small JSON files and its first markdown file (profile_step's own formats)."""
    folder = _first(dirs, "profile")
    if folder is None or not folder.is_dir():
        return None
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    out = {"dir": str(folder), "files": [str(p.relative_to(folder)) for p in files], "json": {}, "markdown": None}
    for p in files:
        if p.suffix == ".json" and p.stat().st_size <= PROFILE_JSON_MAX_BYTES:
            out["json"][str(p.relative_to(folder))] = _load_json(p)
        elif p.suffix == ".md" and out["markdown"] is None:
            out["markdown"] = p.read_text(errors="replace")
    return out


def _header_line(path: Path | None) -> str | None:
    """One line from header.log: mode, stages, start, commit hash, GPU, versions."""
    if path is None:
        return None
    parts = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("name, driver_version"):  # nvidia-smi's csv header
            continue
        if line.startswith("commit "):
            line = line[:17]  # 'commit ' + 10 hex digits; the subject stays in header.log
        parts.append(re.sub(r" in /\S*$", "", line))
        if len(parts) == 4:  # one call's header; later calls append theirs
            break
    return " | ".join(parts)


def target_check(row: dict, copy_gbps: float | None) -> str:
    """'ok' or 'MISS (...)' against the kernel targets for a fused row; '' for rows without a target."""
    op, provider = row.get("op"), row.get("provider", "")
    if op == "ema_update_" and provider != "fused_flat":
        return ""
    if op not in ("uncertainty_consistency_loss", "predictive_entropy", "ema_update_") or row.get("baseline"):
        return ""
    if "kernel_ms" not in row:
        return "no kernel time"
    miss = []
    if row.get("pct_copy") is None or row["pct_copy"] < TARGET_PCT_COPY:
        miss.append(f"{row.get('pct_copy') or 0:.0f}% copy < {TARGET_PCT_COPY:.0f}%")
    kernel, wall = row.get("speedup") or {}, row.get("wall_speedup") or {}
    if op == "uncertainty_consistency_loss":
        if kernel.get("compile", 0) < TARGET_LOSS_VS_COMPILE:
            miss.append(f"{kernel.get('compile', 0):.2f}x compile < {TARGET_LOSS_VS_COMPILE}x")
        if row.get("mode") == "fwd+bwd" and wall.get("compile", 0) < 1.0:
            miss.append("eager wall > compiled reference's")
    if op == "ema_update_" and kernel.get("foreach_lerp", 0) < TARGET_EMA_VS_FOREACH:
        miss.append(f"{kernel.get('foreach_lerp', 0):.2f}x foreach_lerp < {TARGET_EMA_VS_FOREACH}x")
    return "ok" if not miss else "MISS (" + "; ".join(miss) + ")"


def _micro_lines(micro: dict) -> list[str]:
    out = []
    partial = "" if micro.get("complete", True) else "; INCOMPLETE: the run stopped early, rows so far"
    out.append(f"copy bandwidth {micro['copy_gbps']:.0f} GB/s{partial}. kernel: CUDA-graph replay; wall: eager per "
               f"call, host included; speedup kernel/wall over each baseline; "
               "target: >= 80% of copy bandwidth, >= 1.5x torch.compile")
    out.append(f"{'row':<44} {'provider':<20} {'kernel ms':>9} {'wall ms':>9} {'floor':>7} {'%copy':>6}  "
               "speedup  target")
    for r in micro["rows"]:
        if r.get("baseline") or r.get("median_ms") is None:
            continue
        r["target"] = target_check(r, micro.get("copy_gbps"))
        fmt = measure.fmt_number
        out.append(f"{r['group'][:44]:<44} {r['provider'][:20]:<20} {fmt(r.get('kernel_ms'), '9.3f')} "
                   f"{fmt(r.get('wall_ms'), '9.3f')} {fmt(r.get('floor_ms'), '7.3f')} "
                   f"{fmt(r.get('pct_copy'), '6.1f')}  {measure.speedup_text(r)}  {r['target']}")
    return out


def _train_step_lines(ts: dict) -> list[str]:
    out = []
    ref = next((r for r in ts["rows"] if r["variant"] == "reference"), None)
    flops = ts.get("flops_per_iter", {}).get("reference")
    if not ts.get("complete", True):
        out.append("train step: INCOMPLETE, the run stopped early; rows so far:")
    out.append(f"train step (crop {ts.get('patch')}, {ts.get('cases')} cases; {(flops or 0) / 1e12:.3g} TFLOP/iter; "
               f"matmul {ts.get('matmul_tflops', 0):.3g} TFLOP/s; targets: ours <= {TARGET_STEP_MS:.0f} ms, "
               f">= {TARGET_STEP_SPEEDUP:.0f}x reference)")
    for r in ts["rows"]:
        sp = f"{r['speedup_vs_reference']:.2f}x" if ref and r.get("speedup_vs_reference") else "-"
        peak = f"{r['peak_gib']:.1f} GiB" if r.get("peak_gib") is not None else "-"
        mfu = f"{r['mfu_pct']:.1f}%" if r.get("mfu_pct") is not None else "-"
        out.append(f"  {r['variant']:<27} {r['ms_per_iter']:8.1f} ms/iter {r['it_per_s']:7.2f} it/s  {sp:>7}  "
                   f"peak {peak:>9}  MFU {mfu}")
    if ts.get("skipped"):
        out.append(f"  skipped: {', '.join(ts['skipped'])}")
    return out


def summarize(result: dict) -> str:
    """The short table: steps, correctness, ceilings, kernel rows, sweep, train step, profile, training."""
    out = [f"gpu_check ({result['mode']}), {result['elapsed_s']} s: " + ("\n  ".join(result["headers"]) or "?")]
    out.append("steps: " + ", ".join(f"{s['stage']}/{s['step']} exit {s['exit']} ({s['seconds']} s)"
                                     for s in result["steps"]))
    ran = {s["stage"] for s in result["steps"]}
    c, micro, sweep = result.get("correctness"), result.get("micro"), result.get("sweep")
    if "kernels" in ran or c or micro or sweep is not None:
        out.append(f"correctness on device: {c['line'] if c else 'no pytest summary found (see correctness.log)'}")
        if sweep is not None:
            rows = sweep.get("rows") if isinstance(sweep, dict) else sweep
            out.append(f"kernel sweep: {len(rows) if isinstance(rows, list) else '?'} rows in sweep.json")
        out += _micro_lines(micro) if micro else ["micro-benchmarks: no micro.json (see micro.log)"]
    else:
        out.append("kernels stage: not run")

    ts, prof = result.get("train_step"), result.get("profile")
    if "step" in ran or ts or prof:
        out += _train_step_lines(ts) if ts else ["train step: no train_step.json (see train_step.log)"]
        if prof:
            out.append(f"profile: {len(prof['files'])} files in {prof['dir']}")
            out += ["  " + ln for ln in (prof["markdown"] or "").splitlines()[:40]]
        else:
            out.append("profile: no profile/ folder (see profile.log)")
    else:
        out.append("step stage: not run")

    tr = result.get("training") or {}
    if "training" not in ran and not tr.get("eval"):
        out.append("training stage: not run")
    elif tr.get("eval"):
        m, speed = tr["eval"]["mean"], tr.get("speed") or {}

        def metric(name: str, spec: str) -> str:  # eval.json writes an undefined distance as null
            return "n/a" if m.get(name) is None else format(m[name], spec)

        wall = f", {tr['wall_s']} s wall clock incl. cold start and evaluation" if tr.get("wall_s") is not None else ""
        nan = float("nan")
        out.append(f"training run: {speed.get('iterations', '?')} iterations at {speed.get('it_per_s', nan):.2f} it/s "
                   f"({speed.get('train_seconds', nan):.0f} s training{wall}), test Dice {metric('dice', '.4f')}, "
                   f"Jaccard {metric('jaccard', '.4f')}, 95HD {metric('hd95', '.2f')}, ASD {metric('asd', '.2f')} "
                   f"on {len(tr['eval']['cases'])} cases")
    else:
        out.append("training run: no eval.json (see train.log)")
    return "\n".join(out)


def collect(dirs: list[Path], mode: str, elapsed: int) -> dict:
    steps = _read_status(dirs)
    metrics = _metrics(_first(dirs, "metrics.jsonl"))
    speed = next((m for m in reversed(metrics) if "it_per_s" in m and "train_seconds" in m), None)
    train_step = next((s for s in steps if s["stage"] == "training" and s["step"] == "train"), None)
    return {
        "mode": mode,
        "elapsed_s": elapsed,
        "dirs": [str(d) for d in dirs],
        "headers": [h for d in dirs if (h := _header_line(_first([d], "header.log")))],
        "steps": steps,
        "correctness": _pytest_counts(_first(dirs, "correctness.log")),
        "sweep": _load_json(p) if (p := _first(dirs, "sweep.json")) else None,
        "micro": _load_json(p) if (p := _first(dirs, "micro.json")) else None,
        "train_step": _load_json(p) if (p := _first(dirs, "train_step.json")) else None,
        "profile": _profile(dirs),
        "training": {"eval": _load_json(p) if (p := _first(dirs, "eval.json")) else None,
                     "config": _load_json(p) if (p := _first(dirs, "config.json")) else None,
                     "metrics": metrics, "speed": speed and {**speed, "iterations": speed.get("iteration")},
                     "wall_s": train_step["seconds"] if train_step and train_step["exit"] == "0" else None},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dirs", type=Path, nargs="+", help="gpu_check.sh output folders; the report is written to the first")
    p.add_argument("--mode", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--elapsed", type=int, default=0, help="seconds the gpu_check.sh call took")
    a = p.parse_args(argv)
    missing = [str(d) for d in a.dirs if not d.is_dir()]
    if missing:
        p.error(f"not a folder: {', '.join(missing)}")
    result = collect(a.dirs, a.mode, a.elapsed)
    text = summarize(result)  # also fills each kernel row's "target"
    measure.write_json(a.dirs[0] / "gpu_check.json", result)
    files.atomic_write_text(a.dirs[0] / "summary.txt", text + "\n")
    print("\n" + "=" * 100 + "\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
