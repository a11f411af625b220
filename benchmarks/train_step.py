"""Train-step A/B: the released UA-MT iteration vs train.py's, and train.py's with each speed option off.

    python -m benchmarks.train_step --data ../shared/data/LA            # GPU, paper shapes
    python -m benchmarks.train_step --data benchmarks/la_pack --json out.json
    python -m benchmarks.train_step --cpu                               # wiring check: tiny shapes, CPU

All variants run in one process on the same device, the same crop size and the same cases:

- ``reference``: ``benchmarks/reference_trainer.py``, the released code's iteration (fp32, eager,
  1 + T/2 sequential teacher forwards, unfused loss, per-parameter EMA loop, h5 DataLoader with 4
  workers, cuDNN deterministic as released); ``reference+cudnn.benchmark`` is the same with the
  cuDNN autotuner on.
- ``ours``: ``train.train_step`` with every option on (one batched teacher forward of the T + 1
  passes, bf16 autocast, channels_last_3d, torch.compile, fused loss, fused EMA, volumes on the GPU
  with GPU augmentation), then the same with one option off at a time.

Per variant: ``--warmup`` untimed iterations (compilation, cuDNN autotuning, DataLoader start-up),
then ``--iters`` iterations between two device syncs: ms/iter, it/s, speedup over the reference,
peak device memory of the timed iterations, achieved TFLOP/s and MFU. FLOPs per iteration come from
``torch.utils.flop_counter.FlopCounterMode`` over one reference iteration (convolutions and matmuls,
forward and backward; the same model work as ours: 4 student crops forward + backward and 18
teacher crop-passes forward) and are cross-checked on one eager iteration of ours. MFU is over the
dense matmul rate measured in the same run (bf16 on a GPU, fp32 on a CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import measure
from benchmarks.reference_trainer import ReferenceConfig, ReferenceTrainer, release_h5_folder

# Our variants: train.Config overrides, in the order they run (the most telling first, so a time
# budget cuts the least important ones). "ours" has every option on.
VARIANTS = {
    "ours": {},
    "ours -compile": {"compile": False},
    "ours -fused EMA": {"fused_ema": False},
    "ours -fused loss": {"fused_loss": False},
    "ours -batched teacher": {"teacher_chunks": None},  # None -> T + 1 forward calls, one per pass
    "ours -GPU data": {"data_device": "cpu"},
    "ours -channels_last_3d": {"channels_last": False},
    "ours -bf16": {"amp": False},
}
REFERENCES = ("reference", "reference+cudnn.benchmark")
ORDER = ("reference", *VARIANTS, "reference+cudnn.benchmark")
SAME_AS_OURS_ON_CPU = {  # --cpu: these would repeat "ours" exactly, so they are not run
    "ours -compile": "on the CPU 'ours' runs without torch.compile already",
    "ours -GPU data": "on the CPU the volumes are on the CPU already",
    "ours -bf16": "train.py's bf16 autocast is CUDA-only",
    "reference+cudnn.benchmark": "no cuDNN on the CPU",
}
CPU_SIZES = dict(patch=(32, 32, 32), n_filters=4)  # --cpu: wiring only


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="", help="LA root (train.list + '2018LA_Seg_Training Set') or a "
                   "`python -m uamt_fast.data pack` folder; --cpu without --data uses a synthetic set")
    p.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU: checks the wiring, not the speed")
    p.add_argument("--labeled", type=int, default=16, help="labeled cases (the first of train.list), as in the paper")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per variant (default 30 GPU / 2 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations per variant (default 8 GPU / 1 CPU)")
    p.add_argument("--reference-iters", type=int, default=None,
                   help="timed iterations of the reference (default 24 GPU = 3 loader epochs / 2 CPU)")
    p.add_argument("--variants", default="all",
                   help=f"comma-separated subset of: {', '.join(ORDER)}")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="stop starting new variants after this many seconds (0: no limit); skipped ones are listed")
    p.add_argument("--json", default="", help="write the environment, ceilings and every row here")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); on a shared, "
                   "busy CPU 1 thread avoids oversubscription")
    p.add_argument("--reference-workers", type=int, default=4, help="DataLoader workers of the reference (released: 4)")
    args = p.parse_args(argv)
    known = set(REFERENCES) | set(VARIANTS)
    args.variant_list = list(ORDER) if args.variants == "all" else \
        [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variant_list if v not in known]
    if unknown:
        p.error(f"--variants: unknown {unknown}; expected a subset of {sorted(known)}")
    if args.cpu:
        args.iters, args.warmup = args.iters or 2, args.warmup if args.warmup is not None else 1
        args.reference_iters = args.reference_iters or 2
    else:
        args.iters, args.warmup = args.iters or 30, args.warmup if args.warmup is not None else 8
        args.reference_iters = args.reference_iters or 24
    return args


# ----------------------------------------------------------------------------- data shared by all variants
@contextlib.contextmanager
def cudnn_flags(benchmark: bool, deterministic: bool):
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, deterministic
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


def _free(device):
    # Forget compiled graphs: every variant builds new modules, and recompiles of the same code
    # objects (VNet.forward, student_losses) would otherwise pile up to dynamo's cache limit, after
    # which it silently runs eager. Inductor's on-disk cache keeps a repeated compile cheap.
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_loop(step, warmup: int, iters: int, device) -> dict:
    """``warmup`` calls, then ``iters`` calls between two syncs: ms/iter, it/s, peak memory."""
    t = time.perf_counter()
    for _ in range(warmup):
        step()
    measure.synchronize(device)
    warmup_s = time.perf_counter() - t
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(iters):
        step()
    measure.synchronize(device)
    elapsed = time.perf_counter() - t
    row = {"ms_per_iter": 1e3 * elapsed / iters, "it_per_s": iters / elapsed, "iters": iters, "warmup": warmup,
           "warmup_s": warmup_s}
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / measure.GiB
    return row


def count_flops(step) -> int:
    """FLOPs of one call of ``step`` (convolutions and matmuls, forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- the variants
def run_reference(name, args, device, h5_dir, labeled_ids, unlabeled_ids, patch, n_filters) -> tuple[dict, int]:
    cfg = ReferenceConfig(base_dir=str(h5_dir), labeled_ids=labeled_ids, unlabeled_ids=unlabeled_ids, patch=patch,
                          n_filters=n_filters, device=device.type, cudnn_benchmark=name.endswith("cudnn.benchmark"),
                          num_workers=args.reference_workers)
    trainer = ReferenceTrainer(cfg)
    flags = trainer.cudnn_flags()
    last = {}

    def step():
        last.update(trainer.step())

    with cudnn_flags(flags["benchmark"], flags["deterministic"]):
        row = time_loop(step, args.warmup, args.reference_iters, device)
        flops = count_flops(step)
    row.update(variant=name, cudnn=flags, last_logged=dict(last))
    del trainer
    _free(device)
    return row, flops


def run_ours(name, args, device, train_mod, base_cfg: dict, cases) -> tuple[dict, int | None]:
    overrides = dict(VARIANTS[name])
    if overrides.get("teacher_chunks", 0) is None:
        overrides["teacher_chunks"] = base_cfg.get("mc_passes", 8) + 1
    cfg = train_mod.Config(**(base_cfg | overrides))
    parts = train_mod.build(cfg, train_cases=cases)
    iteration = [0]
    last = {}

    def step():
        terms, _ = train_mod.train_step(parts, iteration[0])
        iteration[0] += 1
        last["terms"] = terms

    with cudnn_flags(True, False):  # train.py's main sets cudnn.benchmark on CUDA
        row = time_loop(step, args.warmup, args.iters, device)
        compiled = cfg.compile if cfg.compile is not None else device.type == "cuda"
        flops = None if compiled else count_flops(step)  # FlopCounterMode and compiled graphs don't mix
    row.update(variant=name, config={k: v for k, v in vars(cfg).items() if k in base_cfg or k in overrides},
               last_terms=[float(x) for x in last["terms"]])
    del parts
    _free(device)
    return row, flops


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("train_step: no CUDA device; use --cpu for the wiring check", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("train_step: TRITON_INTERPRET=1 is set: the fused kernels would run in the CPU interpreter "
              "(minutes per iteration, meaningless times); unset it", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    import train as train_mod  # the repository-root trainer (run from the repo root)
    from uamt_fast import data

    workdir = tempfile.TemporaryDirectory(prefix="uamt_train_step_")
    sizes = CPU_SIZES if args.cpu else dict(patch=(112, 112, 80), n_filters=16)
    root = Path(args.data) if args.data else None
    if root is None:
        if not args.cpu:
            print("train_step: --data is required on the GPU", file=sys.stderr)
            return 2
        root = Path(workdir.name) / "synthetic"
        data.write_synthetic_la(str(root), n_train=6, n_test=1, shape=(48, 48, 40), seed=0)
    base_cfg = dict(data=str(root), labeled=args.labeled, patch=sizes["patch"], n_filters=sizes["n_filters"],
                    device=device.type, seed=1337)
    if args.cpu:  # on the CPU compile is off (minutes of inductor C++ compile) and channels_last is opt-in
        base_cfg |= dict(compile=False, channels_last=True)
    cfg0 = train_mod.Config(**base_cfg)
    cases = train_mod.load_split(cfg0, "train")
    labeled_ids, unlabeled_ids = data.semi_supervised_split([c.id for c in cases], cfg0.labeled)
    h5_dir = release_h5_folder(root, cases, workdir.name)
    print(f"{len(cases)} training cases ({len(labeled_ids)} labeled), crop {sizes['patch']}, n_filters "
          f"{sizes['n_filters']}; reference reads h5 from {h5_dir}", flush=True)
    env = measure.environment(device)  # from here on CUDA is initialised
    print(measure.environment_line(env), flush=True)
    rate = measure.matmul_tflops(device)
    print(f"dense matmul rate, same run: {rate:.3g} TFLOP/s ({'bf16 8192^3' if device.type == 'cuda' else 'fp32 1024^3'})",
          flush=True)

    rows, skipped, flops = [], [], {}
    start = time.perf_counter()
    for name in args.variant_list:
        if args.budget_s and time.perf_counter() - start > args.budget_s:
            skipped.append(name)
            print(f"  {name}: skipped (past --budget-s {args.budget_s:.0f})", flush=True)
            continue
        if args.cpu and name in SAME_AS_OURS_ON_CPU:
            skipped.append(name)
            print(f"  {name}: skipped ({SAME_AS_OURS_ON_CPU[name]})", flush=True)
            continue
        t = time.perf_counter()
        if name in REFERENCES:
            row, n_flops = run_reference(name, args, device, h5_dir, labeled_ids, unlabeled_ids,
                                         sizes["patch"], sizes["n_filters"])
            flops.setdefault("reference", n_flops)
        else:
            row, n_flops = run_ours(name, args, device, train_mod, base_cfg, cases)
            if n_flops is not None:
                flops.setdefault("ours_eager", n_flops)
        row["wall_s"] = time.perf_counter() - t
        rows.append(row)
        print(f"  {name}: {row['ms_per_iter']:.1f} ms/iter ({row['wall_s']:.0f} s with warm-up)", flush=True)
        if args.json:  # after every variant: a run stopped by a time limit keeps what it measured
            measure.write_json(args.json, summarize(rows, flops, rate, env, skipped, cases, labeled_ids, sizes, False))

    result = summarize(rows, flops, rate, env, skipped, cases, labeled_ids, sizes, True)
    if args.json:
        measure.write_json(args.json, result)
    print(format_table(result))
    workdir.cleanup()
    return 0


def summarize(rows, flops, rate, env, skipped, cases, labeled_ids, sizes, complete: bool) -> dict:
    """Speedups over the reference, TFLOP/s and MFU for every row; the JSON document of the run."""
    model_flops = flops.get("reference") or flops.get("ours_eager")
    ref = next((r for r in rows if r["variant"] == "reference"), None)
    for r in rows:
        r["speedup_vs_reference"] = ref["ms_per_iter"] / r["ms_per_iter"] if ref else None
        if model_flops:
            r["tflops"] = model_flops / (r["ms_per_iter"] * 1e-3) / 1e12
            r["mfu_pct"] = 100 * r["tflops"] / rate
    return {"environment": env, "matmul_tflops": rate, "flops_per_iter": dict(flops), "rows": rows,
            "skipped": list(skipped), "cases": len(cases), "labeled": len(labeled_ids), "complete": complete, **sizes}


def format_table(result: dict) -> str:
    flops = result["flops_per_iter"]
    lines = [f"train step, crop {result['patch']}, n_filters {result['n_filters']}, {result['cases']} cases; "
             f"FLOPs/iter: reference {_tf(flops.get('reference'))} TFLOP, ours eager {_tf(flops.get('ours_eager'))} TFLOP; "
             f"matmul rate {result['matmul_tflops']:.3g} TFLOP/s; torch threads {result['environment']['torch_threads']}",
             f"{'variant':<27} {'ms/iter':>9} {'it/s':>8} {'vs ref':>7} {'peak GiB':>9} {'TFLOP/s':>9} {'MFU %':>6}"]
    for r in result["rows"]:
        lines.append(f"{r['variant']:<27} {r['ms_per_iter']:9.1f} {r['it_per_s']:8.2f} "
                     f"{_f(r.get('speedup_vs_reference'), '6.2f')}x {_f(r.get('peak_gib'), '9.2f')} "
                     f"{_f(r.get('tflops'), '9.3g')} {_f(r.get('mfu_pct'), '6.3g')}")
    if result["skipped"]:
        lines.append(f"skipped: {', '.join(result['skipped'])}")
    return "\n".join(lines)


def _tf(x):
    return "-" if x is None else f"{x / 1e12:.4g}"


def _f(x, spec):
    return "-" if x is None else format(x, spec)


if __name__ == "__main__":
    sys.exit(main())
