"""Train-step A/B: the released UA-MT iteration vs train.py's, and train.py's with each speed option off.

    python -m benchmarks.train_step --data ../shared/data/LA            # GPU, paper shapes
    python -m benchmarks.train_step --data benchmarks/la_pack --json out.json
    python -m benchmarks.train_step --data LA_parts/part1 --data LA_parts/part2   # a data set in parts
    python -m benchmarks.train_step --cpu                               # wiring check: tiny shapes, CPU
    python -m benchmarks.train_step --dims 2 --data /path/to/ACDC_prepared   # GPU, SSL4MIS's 2D ACDC step
    python -m benchmarks.train_step --dims 2 --cpu                      # its wiring check (synthetic ACDC)

All variants run in one process on the same device, the same crop size and the same cases:

- ``reference``: ``benchmarks/reference_trainer.py``, the released code's iteration (fp32, eager,
  1 + T/2 sequential teacher forwards, unfused loss, per-parameter EMA loop, h5 DataLoader with 4
  workers, cuDNN deterministic as released); ``reference+cudnn.benchmark`` is the same with the
  cuDNN autotuner on.
- ``ours``: ``train.train_step`` with every default on (one batched teacher forward of the T + 1
  passes, bf16 autocast, channels_last_3d, torch.compile, fused loss, fused EMA, fused SGD, cuDNN
  autotuner, volumes on the GPU with GPU augmentation), then the same with one option off (``-``) or
  one opt-in lever on (``+``) at a time; ``ours (warm start)`` repeats ``ours`` after
  ``torch._dynamo.reset()``, so it compiles again from the on-disk caches the first ``ours`` filled.

Compiled code is shared: dynamo's cache is kept across variants (new models of the same structure
pass the same guards), so a variant whose graphs equal ``ours``'s (``-fused SGD``, ``-fused EMA``,
``-cudnn.benchmark``, ``-GPU data``) compiles nothing, and one that changes one graph (the teacher's
for ``-batched teacher``) compiles only that one. The inductor caches go to ``--compile-cache``
(default: train.py's ``~/.cache/uamt_fast``; the first ``ours`` is a cold start when it is empty, as
on a fresh machine, and ``profile_step`` run afterwards with the same folder starts warm).

Per variant: the time to the first iteration (build + first step, synced: compilation and cuDNN
autotuning included), ``--warmup`` - 1 more untimed iterations, then ``--iters`` iterations between
two device syncs: ms/iter, it/s, speedup over the reference, peak device memory of the timed
iterations, achieved TFLOP/s, MFU and % of the floor's speed (the analytic floor of profile_step.py);
``start`` says how the first iteration began: "cold" (first compilation, empty caches), "warm"
(compiled again from the on-disk caches), "shared" (all graphs from an earlier variant), "new graphs"
(compiled graphs of its own, with whatever the caches held) or "eager"; ``recompiles`` counts the
graphs dynamo compiled for it. FLOPs per iteration come from
``torch.utils.flop_counter.FlopCounterMode`` over one reference iteration (convolutions and matmuls,
forward and backward; the same model work as ours: 4 student crops forward + backward and 18
teacher crop-passes forward) and are cross-checked on one eager iteration of ours. MFU is over the
dense matmul rate measured in the same run (bf16 on a GPU, fp32 on a CPU).

``--dims 2``: ``train.py --dims 2``'s step at SSL4MIS's 2D ACDC shape (code/train_uncertainty_aware_mean_teacher_
2D.py: 12 labeled + 12 unlabeled 256 x 256 slices, a 24 x 1 x 256 x 256 student input, T = 8 teacher passes of
the 12 unlabeled, C = 4, U-Net width 16) on a set prepared with ``--preset acdc`` (or any prepared set, sliced);
``--cpu``: 32 x 32 slices, width 4, 2 + 2 slices, a synthetic ACDC set. Only our variants run: the reference
rows replay the released 3D trainer (SSL4MIS's 2D trainer is not re-implemented here), and the analytic floor
models the V-Net's convolutions, so neither is reported; FLOPs come from an eager variant of ours where one runs.
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
from benchmarks.profile_step import CPU_SIZES, data_roots
from benchmarks.reference_trainer import ReferenceConfig, ReferenceTrainer, release_h5_folder

# Our variants: train.Config overrides, in the order they run (the most telling first, so a time
# budget cuts the least important ones). "ours" has every option on.
VARIANTS = {
    "ours": {},
    "ours (warm start)": {},  # after torch._dynamo.reset(): compiled again from the on-disk caches
    # the same compiled graphs as "ours", or none
    "ours -fused SGD": {"sgd": "foreach"},
    "ours -fused EMA": {"fused_ema": False},
    "ours -cudnn.benchmark": {"cudnn_benchmark": False},
    "ours -GPU data": {"data_device": "cpu"},
    "ours -compile": {"compile": False},
    # the opt-in levers, each compiling graphs of its own
    "ours teacher_chunks=3": {"teacher_chunks": 3},
    "ours +full-res contiguous": {"full_res_contiguous": True},
    "ours +regional compile": {"compile_blocks": True},
    "ours +reduce-overhead": {"compile_mode": "reduce-overhead"},
    # the earlier ablations (first H100 run), each compiling graphs of its own
    "ours -batched teacher": {"teacher_chunks": None},  # None -> T + 1 forward calls, one per pass
    "ours -fused loss": {"fused_loss": False},
    "ours -channels_last_3d": {"channels_last": False},
    "ours -bf16": {"amp": False},
}
REFERENCES = ("reference", "reference+cudnn.benchmark")
ORDER = (*REFERENCES, *VARIANTS)
SAME_AS_OURS_ON_CPU = {  # --cpu: these would repeat "ours" exactly, so they are not run
    "ours (warm start)": "on the CPU 'ours' runs without torch.compile",
    "ours -compile": "on the CPU 'ours' runs without torch.compile already",
    "ours +regional compile": "on the CPU 'ours' runs without torch.compile",
    "ours +reduce-overhead": "CUDA graphs are CUDA-only (and the CPU runs without torch.compile)",
    "ours -cudnn.benchmark": "no cuDNN on the CPU",
    "ours -GPU data": "on the CPU the volumes are on the CPU already",
    "ours -bf16": "train.py's bf16 autocast is CUDA-only",
    "reference+cudnn.benchmark": "no cuDNN on the CPU",
}
NOT_IN_2D = "the released trainer is 3D (SSL4MIS's 2D trainer is not re-implemented here)"
# --dims 2: SSL4MIS's 2D ACDC step (see the module docstring); --cpu: wiring only
SIZES_2D = dict(patch=(256, 256, 1), n_filters=16, batch_labeled=12, batch_unlabeled=12)
CPU_SIZES_2D = dict(patch=(32, 32, 1), n_filters=4, batch_labeled=2, batch_unlabeled=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n")[0])
    p.add_argument("--data", action="append", default=[], help="LA root (train.list + '2018LA_Seg_Training Set') "
                   "or a `python -m uamt_fast.data pack` folder; repeat it for a data set in parts; --cpu without "
                   "--data uses a synthetic set")
    p.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU: checks the wiring, not the speed")
    p.add_argument("--labeled", type=int, default=None, help="labeled cases (the first of train.list): default 16 as "
                   "in the paper; --dims 2: 14, the volumes of SSL4MIS's 7 labeled ACDC patients (--cpu: 2)")
    p.add_argument("--dims", type=int, choices=(2, 3), default=3,
                   help="3: the paper's 3D step; 2: SSL4MIS's 2D ACDC step (only our variants; see above)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per variant (default 20 GPU / 2 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations per variant, the first one "
                   "timed as the time to first iteration (default 3 GPU / 1 CPU)")
    p.add_argument("--reference-iters", type=int, default=None,
                   help="timed iterations of the reference (default 16 GPU = 2 loader epochs / 2 CPU)")
    p.add_argument("--compile-cache", default="", help="train.py's --compile-cache for every variant (default: "
                   "train.py's, ~/.cache/uamt_fast); the first compile is cold only if it holds no cache yet")
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
    if args.labeled is None:
        args.labeled = 16 if args.dims == 3 else 2 if args.cpu else 14
    if args.cpu:
        args.iters, args.warmup = args.iters or 2, args.warmup or 1
        args.reference_iters = args.reference_iters or 2
    else:
        args.iters, args.warmup = args.iters or 20, args.warmup or 3
        args.reference_iters = args.reference_iters or 16
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
    # Compiled graphs stay (dynamo's cache is shared by the variants, see the module docstring);
    # the memory of the last variant goes.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _graphs_compiled() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def time_loop(step, warmup: int, iters: int, device, started: float) -> dict:
    """The first call (time to first iteration since ``started``), ``warmup`` - 1 more, then ``iters``
    calls between two syncs: ms/iter, it/s, peak memory."""
    step()
    measure.synchronize(device)
    first_iter_s = time.perf_counter() - started
    t = time.perf_counter()
    for _ in range(warmup - 1):
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
           "warmup_s": warmup_s, "first_iter_s": first_iter_s}
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
    started = time.perf_counter()
    cfg = ReferenceConfig(base_dir=str(h5_dir), labeled_ids=labeled_ids, unlabeled_ids=unlabeled_ids, patch=patch,
                          n_filters=n_filters, device=device.type, cudnn_benchmark=name.endswith("cudnn.benchmark"),
                          num_workers=args.reference_workers)
    trainer = ReferenceTrainer(cfg)
    flags = trainer.cudnn_flags()
    last = {}

    def step():
        last.update(trainer.step())

    with cudnn_flags(flags["benchmark"], flags["deterministic"]):
        row = time_loop(step, args.warmup, args.reference_iters, device, started)
        flops = count_flops(step)
    row.update(variant=name, cudnn=flags, last_logged=dict(last), start="eager")
    del trainer
    _free(device)
    return row, flops


def run_ours(name, args, device, train_mod, base_cfg: dict, cases, compiled_before: bool) -> tuple[dict, int | None]:
    overrides = dict(VARIANTS[name])
    if overrides.get("teacher_chunks", 0) is None:
        overrides["teacher_chunks"] = base_cfg.get("mc_passes", 8) + 1
    cfg = train_mod.Config(**(base_cfg | overrides))
    compiled = cfg.compile if cfg.compile is not None else device.type == "cuda"
    if name == "ours (warm start)":
        torch._dynamo.reset()  # compile again, from the on-disk caches
    graphs = _graphs_compiled()
    started = time.perf_counter()
    parts = train_mod.build(cfg, train_cases=cases)
    iteration = [0]
    last = {}

    def step():
        terms, _ = train_mod.train_step(parts, iteration[0])
        iteration[0] += 1
        last["terms"] = terms

    with cudnn_flags(cfg.cudnn_benchmark, False):  # as train.build sets it
        row = time_loop(step, args.warmup, args.iters, device, started)
        recompiles = _graphs_compiled() - graphs
        flops = None if compiled else count_flops(step)  # FlopCounterMode and compiled graphs don't mix
    if not compiled:
        start = "eager"
    elif name == "ours (warm start)":
        start = "warm"
    elif recompiles == 0:
        start = "shared"  # every graph came from an earlier variant
    elif not compiled_before:
        start = "cold"  # the first compilation, empty caches
    else:
        start = "warm (cache on disk)" if name == "ours" else "new graphs"
    row.update(variant=name, config={k: v for k, v in vars(cfg).items() if k in base_cfg or k in overrides},
               last_terms=[float(x) for x in last["terms"]], start=start, recompiles=recompiles)
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
    from uamt_fast import train as train_mod  # the trainer
    from uamt_fast import data

    workdir = tempfile.TemporaryDirectory(prefix="uamt_train_step_")
    # One compile cache folder for the whole run, set before anything compiles: "ours" starts cold if it is
    # empty (as on a fresh machine), and a later run (profile_step) with the same folder starts warm.
    compile_cache = args.compile_cache or train_mod.Config.compile_cache
    cache_root = Path(compile_cache).expanduser()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root / "inductor")
    cache_was_empty = not any(cache_root.glob("inductor/*"))
    print(f"compile cache {cache_root} ({'empty: the first compile is cold' if cache_was_empty else 'not empty'})")
    # Every variant adds cache entries to the same code objects (VNet.forward, student_losses, the blocks).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if args.dims == 2:
        sizes = CPU_SIZES_2D if args.cpu else SIZES_2D
        roots = acdc_roots(args.data, args.cpu, workdir.name)
    else:
        sizes = CPU_SIZES if args.cpu else dict(patch=(112, 112, 80), n_filters=16)
        roots = data_roots(args.data, args.cpu, workdir.name, "train_step")
    if roots is None:
        return 2
    base_cfg = dict(data=roots, labeled=args.labeled, device=device.type, seed=1337, compile_cache=compile_cache,
                    **sizes)
    if args.dims == 2:  # the set's classes (ACDC: 4), as train.py reads them from its record
        base_cfg |= dict(dims=2, num_classes=(data.read_record(roots) or {}).get("num_classes") or 2)
    if args.cpu:  # on the CPU compile is off (minutes of inductor C++ compile) and channels_last is opt-in
        base_cfg |= dict(compile=False, channels_last=True)
    cfg0 = train_mod.Config(**base_cfg)
    cases = train_mod.load_split(cfg0, "train")
    labeled_ids, unlabeled_ids = data.semi_supervised_split([c.id for c in cases], cfg0.labeled)
    h5_dir = release_h5_folder(roots, cases, workdir.name) if args.dims == 3 else None
    print(f"{len(cases)} training cases ({len(labeled_ids)} labeled), crop {sizes['patch']}, n_filters "
          f"{sizes['n_filters']}" + (f"; reference reads h5 from {h5_dir}" if h5_dir else
                                     f", {sizes['batch_labeled']} + {sizes['batch_unlabeled']} slices a batch, "
                                     f"{cfg0.num_classes} classes"), flush=True)
    env = measure.environment(device)  # from here on CUDA is initialised
    print(measure.environment_line(env), flush=True)
    rate = measure.matmul_tflops(device)
    print(f"dense matmul rate, same run: {rate:.3g} TFLOP/s ({'bf16 8192^3' if device.type == 'cuda' else 'fp32 1024^3'})",
          flush=True)
    floor = step_floor(train_mod, cfg0, device, rate) if args.dims == 3 else None
    if floor:
        print(f"floor of the step (benchmarks/profile_step.py's model, copy {floor['copy_gbps']:.4g} GB/s): "
              f"{floor['ms']:.2f} ms", flush=True)

    rows, skipped, flops = [], [], {}
    compiled_before = not cache_was_empty  # a cache on disk: nothing compiles cold
    start = time.perf_counter()
    for name in args.variant_list:
        if args.budget_s and time.perf_counter() - start > args.budget_s:
            skipped.append(name)
            print(f"  {name}: skipped (past --budget-s {args.budget_s:.0f})", flush=True)
            continue
        why = NOT_IN_2D if args.dims == 2 and name in REFERENCES else SAME_AS_OURS_ON_CPU.get(name) if args.cpu \
            else None
        if why:
            skipped.append(name)
            print(f"  {name}: skipped ({why})", flush=True)
            continue
        t = time.perf_counter()
        if name in REFERENCES:
            row, n_flops = run_reference(name, args, device, h5_dir, labeled_ids, unlabeled_ids,
                                         sizes["patch"], sizes["n_filters"])
            flops.setdefault("reference", n_flops)
        else:
            row, n_flops = run_ours(name, args, device, train_mod, base_cfg, cases, compiled_before)
            compiled_before |= row["start"] != "eager"
            if n_flops is not None:
                flops.setdefault("ours_eager", n_flops)
        row["wall_s"] = time.perf_counter() - t
        rows.append(row)
        print(f"  {name}: {row['ms_per_iter']:.1f} ms/iter, first iteration {row['first_iter_s']:.1f} s "
              f"({row['start']}), {row['wall_s']:.0f} s in all", flush=True)
        if args.json:  # after every variant: a run stopped by a time limit keeps what it measured
            measure.write_json(args.json, summarize(rows, flops, rate, env, skipped, cases, labeled_ids, sizes, False,
                                                    floor))

    result = summarize(rows, flops, rate, env, skipped, cases, labeled_ids, sizes, True, floor)
    if args.json:
        measure.write_json(args.json, result)
    print(format_table(result))
    workdir.cleanup()
    return 0


def acdc_roots(given: list, cpu: bool, workdir: str) -> list[str] | None:
    """``--dims 2``'s data: the ``--data`` roots; with none, on the CPU a synthetic ACDC set prepared with
    ``--preset acdc`` in ``workdir``, or None (after saying why) on the GPU, where the numbers need real slices."""
    if given:
        return list(given)
    if not cpu:
        print("train_step: --data is required on the GPU (--dims 2: a set prepared with --preset acdc)",
              file=sys.stderr)
        return None
    from uamt_fast.data import acdc
    from uamt_fast.data.prepare import prepare

    acdc.write_synthetic(Path(workdir) / "acdc_source", "raw", shape=(48, 48, 4))
    prepare(Path(workdir) / "acdc_source", Path(workdir) / "acdc", "acdc")
    return [str(Path(workdir) / "acdc")]


def step_floor(train_mod, cfg, device, rate: float) -> dict:
    """The analytic floor of ours' step (``profile_step.step_floor``: convs at the matmul rate or the copy
    bandwidth, whichever is slower, plus the other bytes), bf16 activations on a GPU, fp32 on a CPU."""
    from benchmarks import profile_step

    bandwidth = measure.copy_bandwidth(device)
    n_params = sum(p.numel() for p in train_mod.VNet(n_filters=cfg.n_filters).parameters())
    floor = profile_step.step_floor(cfg, profile_step.conv_layers(cfg.n_filters, cfg.patch),
                                    2 if device.type == "cuda" else 4, rate, bandwidth, n_params)
    return {"ms": floor["ms"], "flops": floor["flops"], "copy_gbps": bandwidth,
            "conv_compute_ms": floor["conv_compute_ms"], "conv_memory_ms": floor["conv_memory_ms"]}


def summarize(rows, flops, rate, env, skipped, cases, labeled_ids, sizes, complete: bool, floor: dict) -> dict:
    """Speedups over the reference, TFLOP/s, MFU and % of the floor's speed for every row; the JSON of the run."""
    model_flops = flops.get("reference") or flops.get("ours_eager")
    ref = next((r for r in rows if r["variant"] == "reference"), None)
    for r in rows:
        r["speedup_vs_reference"] = ref["ms_per_iter"] / r["ms_per_iter"] if ref else None
        if model_flops:
            r["tflops"] = model_flops / (r["ms_per_iter"] * 1e-3) / 1e12
            r["mfu_pct"] = 100 * r["tflops"] / rate
        r["pct_of_floor_speed"] = 100 * floor["ms"] / r["ms_per_iter"] if floor else None
    return {"environment": env, "matmul_tflops": rate, "flops_per_iter": dict(flops), "rows": rows, "floor": floor,
            "skipped": list(skipped), "cases": len(cases), "labeled": len(labeled_ids), "complete": complete, **sizes}


def format_table(result: dict) -> str:
    flops = result["flops_per_iter"]
    lines = [f"train step, crop {result['patch']}, n_filters {result['n_filters']}, {result['cases']} cases; "
             f"FLOPs/iter: reference {_tf(flops.get('reference'))} TFLOP, ours eager {_tf(flops.get('ours_eager'))} TFLOP; "
             f"matmul rate {result['matmul_tflops']:.3g} TFLOP/s; torch threads "
             f"{result['environment']['torch_threads']}; floor "
             f"{_f(result['floor'] and result['floor']['ms'], '.2f')} ms/iter",
             f"{'variant':<27} {'ms/iter':>9} {'it/s':>8} {'vs ref':>7} {'peak GiB':>9} {'TFLOP/s':>9} {'MFU %':>6} "
             f"{'%floor':>7} {'1st it s':>9} start"]
    for r in result["rows"]:
        lines.append(f"{r['variant']:<27} {r['ms_per_iter']:9.1f} {r['it_per_s']:8.2f} "
                     f"{_f(r.get('speedup_vs_reference'), '6.2f')}x {_f(r.get('peak_gib'), '9.2f')} "
                     f"{_f(r.get('tflops'), '9.3g')} {_f(r.get('mfu_pct'), '6.3g')} "
                     f"{_f(r.get('pct_of_floor_speed'), '7.1f')} {_f(r.get('first_iter_s'), '9.1f')} "
                     f"{r.get('start', '')}")
    if result["skipped"]:
        lines.append(f"skipped: {', '.join(result['skipped'])}")
    return "\n".join(lines)


def _tf(x):
    return "-" if x is None else f"{x / 1e12:.4g}"


def _f(x, spec):
    return "-" if x is None else format(x, spec)


if __name__ == "__main__":
    sys.exit(main())
