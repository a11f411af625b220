"""The paper's Table 1 and Table 2 (and the ACDC benchmark) in one command: every row, several seeds, one table.

    python -m benchmarks.reproduce --data /path/to/LA --seeds 3                 # GPU: all rows
    python -m benchmarks.reproduce --data /path/to/ACDC_prepared --rows acdc --seeds 3   # GPU: the ACDC rows
    python -m benchmarks.reproduce --data /path/to/ACDC_prepared --rows acdc-uamt-7 --cpu  # reduced scale, CPU
    python -m benchmarks.reproduce --data LA/part1 --data LA/part2 --rows uamt --seeds 3 --parallel 3
    python -m benchmarks.reproduce --data /path/to/LA --cpu --rows bayes-16,uamt   # reduced scale, CPU
    python -m benchmarks.reproduce --data /path/to/LA --seeds 3 --devices 0,1,2,3 --parallel 2  # 2 runs per GPU
    python -m benchmarks.reproduce --out runs/reproduce --table-only                  # re-write the table

Each (row, seed) is one ``python train.py`` process with its own run folder ``OUT/<row>/seed<k>``
(config.json, metrics.jsonl, checkpoints, eval.json) and log ``OUT/logs/<row>-seed<k>.log``. The
command is resumable: a run with an eval.json is finished and skipped; a run with a checkpoint.pt
continues with ``train.py --resume``; a run folder with neither (killed before its first checkpoint)
starts again. The scores are those of the *final* student (train.py evaluates the last weights; no
checkpoint is picked on the test set). ``--parallel K`` runs K processes at once: on one GPU they share
it (several seeds fill an under-used device), with several GPUs each process gets one
(``CUDA_VISIBLE_DEVICES``, round robin). ``--devices 0,1,2,3`` (or ``all``: every visible GPU) spreads the
rows x seeds over those GPUs, ``--parallel K`` runs on each device at once, each child seeing only its GPU
(its own ``CUDA_VISIBLE_DEVICES``); a child that fails is a line of results.md, never silently missing.

``OUT/results.md``: per row Dice and Jaccard (%), 95HD and ASD (voxels) as mean ± std over the
finished seeds (sample std, n - 1), the paper's value beside each, and the mean training time. A
finished run whose eval.json cannot be read, or a figure that cannot be drawn (e.g. a student.pt the
safe loader refuses: a crafted pickle, a truncated file), is never silently left out: its row says
so, results.md lists the reason, each reason is one line on stderr, and the exit status is 1.
``--cpu``: the same path at reduced scale (volumes pooled 2x, V-Net width 4, crops 64x48x32, one
thread a process, --iterations default 200): minutes a run on a CPU, numbers not comparable to the
paper's. Arguments after ``--`` go to every train.py call unchanged (e.g. ``-- --eval-stride-xy 32``).
After the runs, with matplotlib installed: ``OUT/figures/curves-<row>.png`` (the seeds' training
curves) and ``OUT/figures/panel-<case>.png`` (the first seed of each row side by side on the first
``--figures-cases`` test cases).

Two families of rows, one per call. ``la`` (``--rows all``, the default, or ``la``): the paper's rows on the LA
release. ``acdc`` (``--rows acdc`` or ``acdc-...``): UA-MT (with the ln C bound, and with SSL4MIS's ln 2: the
``-ln2`` rows) and the supervised 2D U-Net under SSL4MIS's ACDC
protocol (``train.py --dims 2``, the acdc preset's defaults) on a set prepared with ``python -m uamt_fast.data
prepare SRC OUT --preset acdc``, the literature's UA-MT values beside ours; labeled / unlabeled count patients.
A call's rows must be of one family and --data must be that family's (checked in one line before any run):
every train.py run takes one data set, and the two tables differ (the paper's column or the literature's,
ACDC's distances in mm too), so one --data and one results.md per call is the simplest contract; run the
families as two calls with two --out folders. ``--cpu`` for ACDC: slices at 64 x 64, U-Net width 4, 6 + 6
slices a batch (supervised: 12), 300 iterations.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import queue
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEED0 = 1337  # the released seed; seed k of a row is SEED0 + k


@dataclass(frozen=True)
class Row:
    name: str  # the paper's name of the row
    flags: tuple  # train.py flags
    labeled: int
    unlabeled: str  # as the paper's table shows it
    paper: tuple  # (Dice %, Jaccard %, 95HD, ASD) as the paper's Table 1 or 2 prints them (None: no sourced value)
    family: str = "la"  # FAMILIES: the data set the row trains on
    cpu_batch: tuple = ()  # --cpu: the row's smaller batch (train.py flags)


# Table 1 (16 labeled, 80 labeled) and Table 2 (8, 16, 24 labeled) of Yu et al. 2019, every row this code can
# train; the paper's values are as printed (its tables list ASD before 95HD; here 95HD comes first). MT and
# MT-Dice put the consistency on all crops, like the paper's UA-MT row, so the uncertainty mask is the only difference.
ROWS = {
    "vnet-16": Row("Vanilla V-Net", ("--method", "supervised", "--no-dropout", "--labeled", "16"), 16, "0",
                   (84.13, 73.26, 17.93, 4.75)),
    "bayes-16": Row("Bayesian V-Net", ("--method", "supervised", "--labeled", "16"), 16, "0",
                    (86.03, 76.06, 14.26, 3.51)),
    "vnet-80": Row("Vanilla V-Net (full supervision)", ("--method", "supervised", "--no-dropout", "--labeled", "80"),
                   80, "0", (90.25, 82.40, 8.29, 1.91)),
    "bayes-80": Row("Bayesian V-Net (full supervision)", ("--method", "supervised", "--labeled", "80"), 80, "0",
                    (91.14, 83.82, 5.75, 1.52)),
    "mt": Row("MT", ("--method", "mt", "--consistency-on", "all", "--labeled", "16"), 16, "64",
              (88.23, 79.29, 10.64, 2.73)),
    "mt-dice": Row("MT-Dice", ("--method", "mt-dice", "--consistency-on", "all", "--labeled", "16"), 16, "64",
                   (88.32, 79.37, 10.50, 2.76)),
    "uamt-un": Row("UA-MT-UN", ("--method", "uamt", "--consistency-on", "unlabeled", "--labeled", "16"), 16, "64",
                   (88.83, 80.13, 10.04, 3.12)),
    "uamt": Row("UA-MT", ("--method", "uamt", "--consistency-on", "all", "--labeled", "16"), 16, "64",
                (88.88, 80.21, 7.32, 2.26)),
    "bayes-8": Row("Bayesian V-Net", ("--method", "supervised", "--labeled", "8"), 8, "0",
                   (79.99, 68.12, 21.11, 5.48)),
    "uamt-8": Row("UA-MT", ("--method", "uamt", "--consistency-on", "all", "--labeled", "8"), 8, "72",
                  (84.25, 73.48, 13.84, 3.36)),
    "bayes-24": Row("Bayesian V-Net", ("--method", "supervised", "--labeled", "24"), 24, "0",
                    (88.52, 79.70, 10.45, 2.60)),
    "uamt-24": Row("UA-MT", ("--method", "uamt", "--consistency-on", "all", "--labeled", "24"), 24, "56",
                   (90.16, 82.18, 8.90, 2.73)),
}
# The ACDC benchmark under SSL4MIS's protocol (HiLab-git/SSL4MIS, 70 / 10 / 20 patients, 2D U-Net, final
# checkpoint scored per class in 3D). UA-MT: the tables of AiEson/CrossMatch @18188da README.md ("ACDC dataset
# results", 3 and 7 labeled scans; OPMatch's README reproduces the same table). UA-MT's consistency is on the
# unlabeled slices there (SSL4MIS code/train_uncertainty_aware_mean_teacher_2D.py: outputs[args.labeled_bs:]).
# Supervised: SSL4MIS code/train_fully_supervised_2D.py (@f5b9b38): 24 labeled slices a batch, no unlabeled
# ones; no sourced value under this protocol, so "—".
SUPERVISED_2D = ("--method", "supervised", "--batch-labeled", "24", "--batch-unlabeled", "0")
CPU_BATCH_2D = {"uamt": ("--batch-labeled", "6", "--batch-unlabeled", "6"), "supervised": ("--batch-labeled", "12")}
ROWS |= {
    "acdc-uamt-3": Row("UA-MT", ("--method", "uamt", "--consistency-on", "unlabeled", "--labeled-patients", "3"),
                       3, "67", (46.04, 35.97, 20.08, 7.75), "acdc", CPU_BATCH_2D["uamt"]),
    "acdc-uamt-7": Row("UA-MT", ("--method", "uamt", "--consistency-on", "unlabeled", "--labeled-patients", "7"),
                       7, "63", (81.65, 70.64, 6.88, 2.02), "acdc", CPU_BATCH_2D["uamt"]),
    # The same two rows with SSL4MIS's threshold bound, ln 2 whatever C (the code the literature's numbers come
    # from): the like-for-like comparison with them, and what the correction to ln C changes.
    "acdc-uamt-3-ln2": Row("UA-MT, SSL4MIS's ln 2 bound", ("--method", "uamt", "--consistency-on", "unlabeled",
                                                            "--labeled-patients", "3", "--threshold-bound", "ln-2"),
                           3, "67", (46.04, 35.97, 20.08, 7.75), "acdc", CPU_BATCH_2D["uamt"]),
    "acdc-uamt-7-ln2": Row("UA-MT, SSL4MIS's ln 2 bound", ("--method", "uamt", "--consistency-on", "unlabeled",
                                                            "--labeled-patients", "7", "--threshold-bound", "ln-2"),
                           7, "63", (81.65, 70.64, 6.88, 2.02), "acdc", CPU_BATCH_2D["uamt"]),
    "acdc-sup-3": Row("U-Net (supervised)", (*SUPERVISED_2D, "--labeled-patients", "3"), 3, "0", (None,) * 4,
                      "acdc", CPU_BATCH_2D["supervised"]),
    "acdc-sup-7": Row("U-Net (supervised)", (*SUPERVISED_2D, "--labeled-patients", "7"), 7, "0", (None,) * 4,
                      "acdc", CPU_BATCH_2D["supervised"]),
    "acdc-sup-all": Row("U-Net (full supervision)", (*SUPERVISED_2D, "--labeled-patients", "70"), 70, "0",
                        (None,) * 4, "acdc", CPU_BATCH_2D["supervised"]),
}
OTHER_METHODS = {  # the rest of the paper's Table 1, other papers' methods (not re-implemented here)
    "Self-training": (86.92, 77.28, 9.19, 2.21), "DAN": (87.52, 78.29, 9.01, 2.42),
    "ASDNet": (87.90, 78.85, 9.24, 2.08), "TCSE": (88.15, 79.20, 9.57, 2.44),
}
PAPER_NOTE = ("Paper: Yu et al., MICCAI 2019, Table 1 (16 and 80 labeled) and Table 2 (MT, MT-Dice; 8 and 24 "
              "labeled), as printed. Table 1's other methods, on 16 + 64 (Dice / Jaccard / 95HD / ASD), not run "
              "here: " + "; ".join(f"{name} {' / '.join(f'{v:.2f}' for v in values)}"
                                  for name, values in OTHER_METHODS.items()) + ".")
ACDC_NOTE = ("Literature: UA-MT under SSL4MIS's ACDC protocol (3 and 7 labeled patients of 70; 20 test "
              "patients, 40 volumes), as reproduced in the ACDC tables of the CrossMatch README (AiEson/CrossMatch) "
              "and OPMatch's; 95HD and ASD in voxels there. Those numbers come from SSL4MIS's code, whose "
              "uncertainty threshold ramps to ln 2 for 4 classes: the -ln2 rows keep that bound, the others ramp to "
              "ln 4; and SSL4MIS's test script scores the checkpoint its trainer kept by val Dice, where ours are "
              "final checkpoints. Supervised rows: no sourced value (—).")


@dataclass(frozen=True)
class Family:
    data: str  # what --data must be
    iterations: int  # full scale (train.py's default, or the preset's)
    cpu_iterations: int
    cpu_flags: tuple  # --cpu's reduced scale
    column: str  # the header of the published values' columns
    note: str  # where those values come from
    millimetres: bool  # the data's spacing is known: 95HD and ASD in mm too


FAMILIES = {
    "la": Family("the LA release (or a set prepared from it)", 6000, 200,
                 ("--downsample", "2", "--n-filters", "4", "--patch", "64", "48", "32", "--threads", "1"),
                 "paper", PAPER_NOTE, False),
    "acdc": Family("a set prepared with python -m uamt_fast.data prepare SRC OUT --preset acdc", 30000, 300,
                   ("--n-filters", "4", "--patch", "64", "64", "1", "--threads", "1"), "literature", ACDC_NOTE,
                   True),
}
CPU_FLAGS = FAMILIES["la"].cpu_flags
METRICS = (("dice", "Dice %", 100), ("jaccard", "Jaccard %", 100), ("hd95", "95HD", 1), ("asd", "ASD", 1))
MM_METRICS = (("hd95_mm", "95HD mm", 1), ("asd_mm", "ASD mm", 1))  # no published value beside them


def parse_args(argv=None):
    from uamt_fast import cli  # (uamt_fast, torch and triton are imported only when the runner runs)

    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = cli.OneLineParser(prog="python -m benchmarks.reproduce", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n" + __doc__.split("\n\n")[1] + "\n\nArguments after -- go to "
                                "every train.py call unchanged (e.g. -- --eval-stride-xy 32).")
    p.add_argument("--data", action="append", default=[],
                   help="LA root, or an ACDC set prepared with --preset acdc for the acdc rows; repeat for a data set "
                        "in several folders")
    p.add_argument("--rows", default="all", help=f"comma-separated subset of: {', '.join(ROWS)}; or all (the LA "
                                                 "rows; default) or acdc (the ACDC rows)")
    p.add_argument("--seeds", type=cli.number(int, "[1, 1000]"), default=1,
                   help=f"seeds per row, seed k = {SEED0} + k, in [1, 1000] (default: 1)")
    p.add_argument("--iterations", type=cli.number(int, ">= 1"), default=None,
                   help="training iterations, >= 1 (default 6000, ACDC 30000; with --cpu 200, ACDC 300)")
    p.add_argument("--out", default="runs/reproduce",
                   help="folder of the run folders, logs, table, figures (default: %(default)s)")
    p.add_argument("--parallel", type=cli.number(int, "[1, 256]"), default=1,
                   help="train.py processes at once, in [1, 256]: one GPU shared, or one each (default: 1)")
    p.add_argument("--devices", default="",
                   help="GPUs to spread the runs over: comma-separated ids (0,1,2,3) or all (every visible GPU); "
                        "--parallel runs on each, every child with its own CUDA_VISIBLE_DEVICES (default: none)")
    p.add_argument("--cpu", action="store_true", help="reduced scale on the CPU: " + "; ACDC: ".join(
        " ".join(f.cpu_flags) for f in FAMILIES.values()))
    p.add_argument("--table-only", action="store_true", help="run nothing: write the table of the finished runs")
    p.add_argument("--no-figures", dest="figures", action="store_false", help="skip the curves and panels")
    p.add_argument("--figures-cases", type=cli.number(int, ">= 0"), default=2,
                   help="test cases with a panel, >= 0, 0: all (default: 2)")
    args = p.parse_args(argv)
    args.train_args = passthrough
    groups = {"all": "la", "la": "la", "acdc": "acdc"}  # a family's rows by its name
    args.row_list = [key for r in args.rows.split(",") if r.strip()
                     for key in ([k for k, row in ROWS.items() if row.family == groups[r.strip()]]
                                 if r.strip() in groups else [r.strip()])]
    unknown = [r for r in args.row_list if r not in ROWS]
    if unknown or not args.row_list:
        p.error(f"--rows: unknown {unknown}; choose from {', '.join(ROWS)}, all or acdc")
    families = list(dict.fromkeys(ROWS[r].family for r in args.row_list))  # (in the order given)
    if len(families) > 1:
        p.error(f"--rows {args.rows}: " + " and ".join(
            f"{f.upper()} rows ({', '.join(r for r in args.row_list if ROWS[r].family == f)}) need {FAMILIES[f].data}"
            for f in families) + "; give one family a call (one --data), e.g. two calls with two --out folders")
    args.family = families[0]
    if args.seeds < 1 or args.parallel < 1 or (args.iterations is not None and args.iterations < 1):
        p.error("--seeds, --parallel and --iterations must be >= 1")
    if not args.data and not args.table_only:
        p.error("--data is required (the LA root, or several --data for a data set in parts)")
    if args.data:
        check_data_family(p, args.data, args.family, args.rows)
    family = FAMILIES[args.family]
    args.iterations = args.iterations or (family.cpu_iterations if args.cpu else family.iterations)
    args.device_list = []
    if args.devices == "all":
        args.device_list = visible_gpus()
        if not args.device_list:
            p.error("--devices all: no CUDA device is visible on this machine")
    elif args.devices:
        args.device_list = [d.strip() for d in args.devices.split(",")]
        if not all(args.device_list) or len(set(args.device_list)) != len(args.device_list) \
                or any(" " in d for d in args.device_list):
            p.error(f"--devices {args.devices!r}: expected distinct comma-separated GPU ids (0,1,2,3) or all")
    return args


def check_data_family(p, roots, family: str, rows: str) -> None:
    """One-line parser error unless ``roots`` hold ``family``'s data: an ACDC row an ``acdc`` set (the record of
    ``prepare --preset acdc``), an LA row anything else."""
    from uamt_fast import data

    preset = (data.read_record(roots) or {}).get("preset")  # (LA release: no record)
    if (preset == "acdc") != (family == "acdc"):
        what = ("an ACDC set (--preset acdc): give --rows acdc" if preset == "acdc" else
                f"a set prepared with --preset {preset}" if preset else "the LA release (no dataset.json)")
        given = " ".join(map(str, roots))
        p.error(f"--rows {rows}: {family.upper()} rows need {FAMILIES[family].data}; --data {given} is {what}")


# ----------------------------------------------------------------------------- runs
def run_dir(out: Path, row: str, seed: int) -> Path:
    return out / row / f"seed{seed}"


def train_command(args, row: str, seed: int) -> tuple[list[str], str]:
    """The train.py command line for (row, seed) and what it does: 'fresh' or 'resume'."""
    folder = run_dir(Path(args.out), row, seed)
    data = [a for d in args.data for a in ("--data", str(Path(d).resolve()))]
    if (folder / "checkpoint.pt").is_file():  # a killed run: the saved config is reused, data may have moved
        extra = ("--threads", "1") if args.cpu else ()
        return [sys.executable, str(REPO / "train.py"), "--resume", str(folder), *data, *extra,
                *args.train_args], "resume"
    flags = [*ROWS[row].flags, "--iterations", str(args.iterations), "--seed", str(SEED0 + seed)]
    cpu = (*FAMILIES[ROWS[row].family].cpu_flags, *ROWS[row].cpu_batch) if args.cpu else ()
    return [sys.executable, str(REPO / "train.py"), *data, "--out", str(folder), *flags, *cpu,
            *args.train_args], "fresh"


def run_one(args, row: str, seed: int, gpu: str | None) -> dict:
    """One train.py process for (row, seed), its output in the log file; returns what happened."""
    from uamt_fast import files

    folder = run_dir(Path(args.out), row, seed)
    command, mode = train_command(args, row, seed)
    if mode == "fresh" and os.path.lexists(folder):  # killed before its first checkpoint: nothing to resume
        files.remove(folder.parent, folder.name)
    log = Path(args.out) / "logs" / f"{row}-seed{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ) | ({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {})
    t = time.perf_counter()
    with files.open_log(log) as f:
        f.write(f"$ {' '.join(command)}\n".encode())
        f.flush()
        rc = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    finished = rc == 0 and (folder / "eval.json").is_file()  # rc 0 without eval.json: stopped (--stop-at, Ctrl-C)
    return {"row": row, "seed": seed, "mode": mode, "rc": rc, "finished": finished, "gpu": gpu,
            "wall_s": time.perf_counter() - t, "log": str(log)}


def visible_gpus() -> list[str]:
    """GPU ids to spread the processes over ([] on a machine without CUDA; one id: they share it)."""
    try:
        import torch
    except ImportError:
        return []
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return (listed or [str(i) for i in range(n)])[:n]


def run_all(args) -> list[dict]:
    jobs = [(row, seed) for row in args.row_list for seed in range(args.seeds)]
    todo = [(row, seed) for row, seed in jobs if not (run_dir(Path(args.out), row, seed) / "eval.json").is_file()]
    print(f"{len(jobs)} runs, {len(jobs) - len(todo)} finished already, {len(todo)} to run "
          f"({args.parallel} at a time)", flush=True)
    slots = queue.Queue()
    workers = args.parallel
    if args.device_list:  # --devices: K = --parallel slots on each device
        workers = args.parallel * len(args.device_list)
        for k in range(workers):
            slots.put(args.device_list[k % len(args.device_list)])
    else:  # slot k runs on GPU k mod (number of GPUs); one GPU (or none): all share it
        gpus = visible_gpus()
        for k in range(args.parallel):
            slots.put(gpus[k % len(gpus)] if len(gpus) > 1 else None)

    def work(job):
        row, seed = job
        gpu = slots.get()
        try:
            print(f"  start {row} seed {seed}" + (f" on GPU {gpu}" if gpu else ""), flush=True)
            result = run_one(args, row, seed, gpu)
        finally:
            slots.put(gpu)
        status = ("finished" if result["finished"] else "stopped before the end (no eval.json)" if result["rc"] == 0
                  else f"FAILED (exit {result['rc']}, see {result['log']})")
        print(f"  {row} seed {seed}: {status} in {result['wall_s']:.0f} s ({result['mode']})", flush=True)
        return result

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(work, todo))


# ----------------------------------------------------------------------------- the table
def collect(out: Path, row: str, seeds: int, optional=()) -> dict:
    """Per metric the values of the finished seeds of ``row``, their train seconds, and ``problems``: one line
    per finished seed whose eval.json cannot be read (that seed is not counted) or whose metrics.jsonl cannot
    (its train time is left out). ``optional``: metrics an eval.json may lack (NaN then; the mm distances of a
    set without a spacing)."""
    values = {key: [] for key, _, _ in METRICS + tuple(optional)} | {"train_s": [], "seeds": 0, "unreadable": 0,
                                                                      "problems": []}
    for seed in range(seeds):
        folder = run_dir(out, row, seed)
        if not (folder / "eval.json").is_file():
            continue
        try:
            mean = json.loads((folder / "eval.json").read_text())["mean"]
            scores = {key: math.nan if mean[key] is None else scale * float(mean[key])  # null: NaN (strict JSON)
                      for key, _, scale in METRICS}
            scores |= {key: math.nan if mean.get(key) is None else scale * float(mean[key])
                       for key, _, scale in optional}
        except (OSError, ValueError, KeyError, TypeError) as e:
            values["unreadable"] += 1
            values["problems"].append(f"{row} seed {seed}: not counted: {folder / 'eval.json'} is not a readable "
                                      f"train.py eval.json ({_reason(e)})")
            continue
        for key, value in scores.items():
            values[key].append(value)
        values["seeds"] += 1
        try:
            speed = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()
                     if "train_seconds" in line] if (folder / "metrics.jsonl").is_file() else []
            seconds = sum(float(s["train_seconds"]) for s in speed)  # one entry per (resumed) segment
        except (OSError, ValueError, KeyError, TypeError) as e:
            values["problems"].append(f"{row} seed {seed}: train time left out: {folder / 'metrics.jsonl'} is "
                                      f"unreadable ({_reason(e)})")
            continue
        if speed:
            values["train_s"].append(seconds)
    return values


def _reason(e: BaseException) -> str:
    """``Type: first line of the message``, for one-line reports."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def mean_std(xs) -> str:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return "—"
    return f"{statistics.fmean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def unlabeled_in(data_roots, row: Row) -> str:
    """The row's unlabeled count as the data hold it (ACDC: patients; LA: scans), shown beside the benchmark's
    where they differ (a subset, a CPU pack); the benchmark's alone without readable data or for a supervised
    row."""
    if not data_roots or row.unlabeled == "0":
        return row.unlabeled
    from uamt_fast import data

    try:
        ids = data.read_list(data_roots, "train") + data.read_unlabeled(data_roots)
    except data.DataError:  # (data the runs themselves refused: their logs say why; the benchmark's count stands)
        return row.unlabeled
    units = len(dict.fromkeys(i.split("_frame")[0] for i in ids)) if row.family == "acdc" else len(ids)
    here = max(units - row.labeled, 0)
    return row.unlabeled if str(here) == row.unlabeled else f"{here} (benchmark: {row.unlabeled})"


def markdown_table(out: Path, rows, seeds: int, iterations: int, cpu: bool,
                   data_roots=None) -> tuple[str, list[str]]:
    """The results.md text, and the problems it reports (one line each; see ``collect``). ``rows`` are of one
    family (``parse_args``): its published values' column and note, ACDC's distances in mm too; with
    ``data_roots``, the unlabeled counts of those data (``unlabeled_in``)."""
    family = FAMILIES[ROWS[rows[0]].family] if rows else FAMILIES["la"]
    extra = MM_METRICS if family.millimetres else ()
    header = ["row", "method", "labeled", "unlabeled", "seeds"]
    for _, name, _ in METRICS:
        header += [name, family.column]
    header += [name for _, name, _ in extra] + ["train time (s)"]
    lines, problems = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)], []
    for key in rows:
        row, v = ROWS[key], collect(out, key, seeds, extra)
        problems += v["problems"]
        unreadable = f" ({v['unreadable']} unreadable, see below)" if v["unreadable"] else ""
        cells = [key, row.name, str(row.labeled), unlabeled_in(data_roots, row),
                 f"{v['seeds']}/{seeds}{unreadable}"]
        for i, (metric, _, _) in enumerate(METRICS):
            cells += [mean_std(v[metric]), "—" if row.paper[i] is None else f"{row.paper[i]:.2f}"]
        cells += [mean_std(v[metric]) for metric, _, _ in extra]
        cells.append(mean_std(v["train_s"]).split(" ±")[0] if v["train_s"] else "—")
        lines.append("| " + " | ".join(cells) + " |")
    scale = (f"reduced CPU scale ({' '.join(family.cpu_flags)}): not comparable to the {family.column}" if cpu
             else "full scale")
    units = ("Dice, Jaccard in % (the mean of RV, Myo and LV), 95HD and ASD in voxels (in mm where marked); "
             "labeled / unlabeled: patients" if family.millimetres else "Dice, Jaccard in %, 95HD and ASD in voxels")
    notes = [f"Mean ± sample std over the finished seeds; final checkpoints (never the best on the test set); "
             f"{iterations} iterations, {scale}. {units}.", family.note]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n" + problems_text(problems), problems


def problems_text(problems) -> str:
    """The results.md lines of ``problems``, one each ('' for none)."""
    return "".join(f"\nProblem: {p}" for p in problems) + ("\n" if problems else "")


# ----------------------------------------------------------------------------- figures
def write_figures(args) -> list[str]:
    """The curves of each row and the panels of each row's first finished seed (``figures.write_panels``, as
    train.py --figures draws them: a 2D model's slice by slice); returns the problems (one line each): a row whose
    metrics.jsonl or student.pt cannot be read (e.g. refused by the weights-only loader) is left out of its
    figure, the others are drawn."""
    try:
        from uamt_fast.training import checkpoints
        from uamt_fast import data, figures

        figures.pyplot()
    except ImportError as e:
        print(f"figures skipped: {e}", flush=True)
        return []
    out, problems = Path(args.out), []
    firsts = {}
    for row in args.row_list:
        finished = {f"seed {s}": run_dir(out, row, s) for s in range(args.seeds)
                    if (run_dir(out, row, s) / "eval.json").is_file()}
        if finished:
            try:
                print(f"  {figures.training_curves(finished, out / 'figures' / f'curves-{row}.png')}", flush=True)
            except (OSError, ValueError) as e:
                problems.append(f"figures: no curves for {row}: {e}")
            firsts[row] = next(iter(finished.values())) / "student.pt"
    models, cfg = {}, None  # (one family a call: the rows' models are all V-Nets or all 2D U-Nets)
    for row, path in firsts.items():
        try:
            models[row], cfg, _ = checkpoints.load_vnet(path)
        except ValueError as e:  # checkpoints.CheckpointError: one line naming the file
            problems.append(f"figures: {row} left out of the panels: {e}")
    if not models:
        return problems
    try:
        ids = data.read_list(args.data, "test")[: args.figures_cases or None]
        for path in figures.write_panels(models, data.load_cases(args.data, ids), out / "figures", cfg,
                                         class_names=data.label_names(args.data)):
            print(f"  {path}", flush=True)
    except (OSError, ValueError) as e:
        problems.append(f"figures: no panels: {e}")
    return problems


def main(argv=None) -> int:
    from uamt_fast import files

    try:
        args = parse_args(argv)
        out = files.make_folder(args.out, "runs, logs and table")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = [] if args.table_only else run_all(args)
    table, problems = markdown_table(out, args.row_list, args.seeds, args.iterations, args.cpu, args.data)
    failed = [r for r in results if r["rc"] != 0]
    table += problems_text([f"{r['row']} seed {r['seed']} FAILED (exit {r['rc']}"
                            + (f", GPU {r['gpu']}" if r.get("gpu") else "") + f"); log {r['log']}" for r in failed])
    files.atomic_write_text(out / "results.md", table)
    print(table)
    print(f"wrote {out / 'results.md'}")
    if args.figures and args.data and not args.table_only:
        figure_problems = write_figures(args)
        if figure_problems:  # in results.md too: its reader learns why a figure lacks a row
            files.atomic_write_text(out / "results.md", table + problems_text(figure_problems))
        problems += figure_problems
    for r in failed:
        print(f"FAILED: {r['row']} seed {r['seed']} (exit {r['rc']}); log {r['log']}", file=sys.stderr)
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    unfinished = [f"{r['row']} seed {r['seed']}" for r in results if r["rc"] == 0 and not r["finished"]]
    if unfinished:
        print(f"not finished (run the same command again to resume): {', '.join(unfinished)}")
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
