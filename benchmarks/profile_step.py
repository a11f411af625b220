"""Where one UA-MT training step spends its time: torch.profiler over train.py's real step, reduced to tables.

    python -m benchmarks.profile_step --data benchmarks/la_pack --out OUT/profile        # GPU, paper shapes
    python -m benchmarks.profile_step --data benchmarks/la_pack -- --no-compile         # any train.py flag after --
    python -m benchmarks.profile_step --cpu [--data DIR] [--out DIR]                     # wiring only: tiny, CPU

The step is ``train.build`` + ``train.train_step``, nothing else. After ``--warmup`` iterations (the
first one, build included, is "time to first iteration"), ``--iterations`` are timed between two
device syncs (ms/iter, no profiler), then the same number run under ``torch.profiler`` (one more
untimed first). The Chrome trace is reduced to:

- **GPU time by category** (per iteration): conv fprop / dgrad / wgrad kernels (a transposed conv's
  forward runs dgrad kernels, its data gradient fprop ones), conv other (bias adds, cuDNN layout
  transforms), batch norm, other inductor kernels, the fused UA-MT ops, optimizer, EMA, data
  sampling, copies, other eager kernels, and idle (no kernel running on any stream). ``classify``
  takes the kernel name first, then the ``uamt:<phase>`` range train_step was in when it launched.
- **top kernels** by GPU time.
- **per conv layer group** (layers with the same weight shape and input size share cuDNN calls and
  cannot be told apart, e.g. block_four's and block_six's convs): analytic FLOPs and bytes over the
  whole step (student forward + data/weight gradients, teacher forward of the (T+1) passes), the
  measured time of the conv kernels launched by those layers' aten ops, achieved TFLOP/s and GB/s.
- **the floor**: per layer and pass max(FLOPs / matmul rate, bytes / copy bandwidth) plus the bytes of
  the loss, SGD, EMA and data (both rates measured in the same run, ``benchmarks/measure.py``),
  summed; the step is reported as "x% of the floor's speed" (floor ms / step ms).
  Bytes: each conv reads its input and weights and writes its output once (activations in bf16
  under autocast), i.e. batch norm, ReLU and skip additions fused away: the issue's floor.
- **host syncs** per iteration (CUDA runtime calls that wait for the device).

On the CPU (``--cpu``: 32^3 crops, n_filters 4, no compile) the "kernels" are the aten ops' self
times: the same reduction runs, which checks the wiring; the numbers say nothing about a GPU.
Outputs: ``profile.json`` and ``profile.md`` in ``--out``; ``--trace`` also keeps ``trace.json.gz``.
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import gzip
import json
import os
import re
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import measure
from uamt_fast import files

CATEGORIES = ("conv fprop", "conv dgrad", "conv wgrad", "conv backward (unsplit)",
              "conv other (bias, cuDNN transforms)", "batch norm", "other inductor kernels", "fused UA-MT ops",
              "optimizer", "EMA", "data sampling", "copies", "other eager kernels", "idle (no kernel running)")
UAMT_KERNELS = ("_uncertainty_loss", "_finalize_kernel", "_scale_grad_kernel", "_predictive_entropy")
CPU_SIZES = dict(patch=(32, 32, 32), n_filters=4)  # --cpu (here and in train_step.py): wiring only


def data_roots(given: list, cpu: bool, workdir: str, script: str) -> list[str] | None:
    """The ``--data`` roots of a step benchmark; with none given, a small synthetic LA set in ``workdir`` for a
    ``--cpu`` wiring run, or None (after saying why) on the GPU, where the numbers need the real volumes."""
    if given:
        return list(given)
    if not cpu:
        print(f"{script}: --data is required on the GPU", file=sys.stderr)
        return None
    from uamt_fast import data

    root = str(Path(workdir) / "synthetic")
    data.write_synthetic_la(root, n_train=6, n_test=1, shape=(48, 48, 40), seed=0)
    return [root]


# ----------------------------------------------------------------------------- kernel -> category
def classify(name: str, phase: str = "", conv_op: str = "") -> str:
    """The category of a device kernel (or, on the CPU, an aten op) from its name, the train_step phase
    it was launched in ("data", "teacher", "student", "backward", "optimizer", "ema" or "") and the
    name of the conv aten op that launched it ("" if none)."""
    n = name.lower()
    if any(k in name for k in UAMT_KERNELS):
        return "fused UA-MT ops"
    if "_ema_update" in n:
        return "EMA"
    if n.startswith(("memcpy", "memset")):
        return "copies"
    if n.startswith("triton_"):  # inductor's kernels (names from the fused aten ops; "convolution" = its bias)
        return "batch norm" if re.search(r"batch_norm|var_mean|rsqrt", n) else "other inductor kernels"
    if "wgrad" in n:
        return "conv wgrad"
    if "dgrad" in n:
        return "conv dgrad"
    if "fprop" in n or "convolve" in n:
        return "conv fprop"
    if n.startswith("aten::") and "conv" in n:  # CPU: the aten conv ops themselves
        return "conv backward (unsplit)" if "backward" in n else "conv fprop"
    if "multi_tensor_apply" in n or "sgd" in n or phase == "optimizer":
        return "optimizer"
    if phase == "ema":
        return "EMA"
    if phase == "data":
        return "data sampling"
    if conv_op:
        return "conv backward (unsplit)" if "backward" in conv_op else "conv other (bias, cuDNN transforms)"
    if re.search(r"batch_norm|bn_fw|bn_bw|var_mean", n):
        return "batch norm"
    return "other eager kernels"


# ----------------------------------------------------------------------------- trace -> device activities
@dataclass
class Activity:
    """One device kernel / copy (on the CPU: one aten op's self time), with where it was launched from."""

    name: str
    start: float  # us
    dur: float  # us
    phase: str  # the uamt:<phase> range around its launch, or ""
    conv_op: str  # name of the innermost conv aten op around its launch, or ""
    conv_dims: tuple  # that op's "Input Dims"


class _Intervals:
    """Events of one thread sorted by start, for 'which of them contain time t' queries."""

    def __init__(self, events):
        self.events = sorted(events, key=lambda e: e["ts"])
        self.starts = [e["ts"] for e in self.events]

    def innermost(self, t: float, look_back: int = 64):
        i = bisect.bisect_right(self.starts, t)
        for e in reversed(self.events[max(0, i - look_back):i]):
            if e["ts"] <= t <= e["ts"] + e["dur"]:
                return e
        return None


def device_activities(trace: dict, cpu: bool) -> list[Activity]:
    """The trace's device work, each with its phase and its conv op. On a GPU: kernels, memcpys and
    memsets, linked to their launch (runtime/driver call with the same correlation id). On the CPU:
    every aten op with its self time (duration minus its children's)."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    phases = _Intervals([e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("uamt:")])
    ops = [e for e in events if e.get("cat") == "cpu_op"]
    conv_ops = defaultdict(list)
    for e in ops:  # aten's conv ops only (inductor's kernel-launch ranges may have "convolution" in their names)
        if e["name"].startswith("aten::") and "conv" in e["name"] and e.get("args", {}).get("Input Dims"):
            conv_ops[e["tid"]].append(e)
    conv_ops = {tid: _Intervals(v) for tid, v in conv_ops.items()}

    def context(t, tid):
        p = phases.innermost(t)
        c = conv_ops[tid].innermost(t) if tid in conv_ops else None
        dims = tuple(_shape(d) for d in c["args"]["Input Dims"]) if c else ()
        return (p["name"][5:] if p else "", c["name"] if c else "", dims)

    out = []
    if cpu:
        for tid_ops in _by_tid(ops).values():
            for e, self_us in _self_times(tid_ops):
                if self_us > 0:
                    out.append(Activity(e["name"], e["ts"], self_us, *context(e["ts"], e["tid"])))
        return out
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    for e in events:
        if e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        launch = launches.get(e.get("args", {}).get("correlation"))
        ctx = context(launch["ts"], launch["tid"]) if launch else ("", "", ())
        out.append(Activity(e["name"], e["ts"], e["dur"], *ctx))
    return out


def _shape(dims) -> tuple:
    """A tensor argument's "Input Dims" entry as a tuple of ints; () for anything else (scalars, lists)."""
    return tuple(dims) if isinstance(dims, list) and all(isinstance(d, int) for d in dims) else ()


def _by_tid(events):
    groups = defaultdict(list)
    for e in events:
        groups[e["tid"]].append(e)
    return groups


def _self_times(events):
    """(event, self time) for nested complete events of one thread."""
    events = sorted(events, key=lambda e: (e["ts"], -e["dur"]))
    child_time = defaultdict(float)
    stack = []
    for e in events:
        while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
            stack.pop()
        if stack:
            child_time[id(stack[-1])] += e["dur"]
        stack.append(e)
    return [(e, e["dur"] - child_time[id(e)]) for e in events]


def host_syncs(trace: dict) -> int:
    """CUDA runtime calls that make the host wait for the device."""
    return sum(1 for e in trace["traceEvents"] if e.get("cat") == "cuda_runtime" and
               re.search(r"Synchronize|^cudaMemcpy$", e.get("name", "")))


def busy_union_us(acts: list[Activity]) -> tuple[float, float]:
    """(span from the first start to the last end, time with at least one activity running), in us."""
    if not acts:
        return 0.0, 0.0
    spans = sorted((a.start, a.start + a.dur) for a in acts)
    busy, (cur_s, cur_e) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    return spans[-1][1] - spans[0][0] if len(spans) else 0.0, busy


# ----------------------------------------------------------------------------- analytic work of the step
def conv_layers(n_filters: int, patch) -> list[dict]:
    """Every conv of the V-Net at crop ``patch``: name, transposed, weight shape, input/output (C, *S)
    per crop. Shapes come from one forward on the meta device."""
    from uamt_fast.nets.vnet import VNet

    net = VNet(n_filters=n_filters).to("meta")
    layers = []
    for name, m in net.named_modules():
        if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
            m.register_forward_hook(lambda m, i, o, name=name: layers.append(dict(
                name=name, transposed=isinstance(m, torch.nn.ConvTranspose3d), weight=tuple(m.weight.shape),
                bias=m.bias is not None, input=tuple(i[0].shape[1:]), output=tuple(o.shape[1:]))))
    with torch.no_grad():
        net(torch.empty(1, 1, *patch, device="meta"))
    return layers


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def step_passes(cfg) -> list[tuple[str, int]]:
    """(pass, crops) of one training step: the student's forward, data and weight gradients, the teacher's forward."""
    student = cfg.batch_labeled + (cfg.batch_unlabeled if cfg.method != "supervised" else 0)
    passes = [("student fwd", student), ("student dgrad", student), ("student wgrad", student)]
    if cfg.method != "supervised":
        b = cfg.batch_unlabeled if cfg.consistency_on == "unlabeled" else student
        passes.append(("teacher fwd", b * (cfg.mc_passes + 1 if cfg.method == "uamt" else 1)))
    return passes


def layer_work(layer: dict, kind: str, crops: int, act_bytes: int) -> tuple[int, int]:
    """(FLOPs, bytes) of one conv layer in one pass. FLOPs as torch.utils.flop_counter counts them (2 per
    multiply-add, bias excluded); bytes: input and output activations once, weights once (weight grad in fp32).
    The first layer's data gradient is never computed (its input needs no gradient)."""
    if kind.endswith("dgrad") and layer["name"] == "block_one.conv.0":
        return 0, 0
    voxels = _numel(layer["input"][1:] if layer["transposed"] else layer["output"][1:])
    flops = 2 * crops * _numel(layer["weight"]) * voxels
    acts = crops * (_numel(layer["input"]) + _numel(layer["output"])) * act_bytes
    weights = _numel(layer["weight"]) * (4 if kind.endswith("wgrad") else act_bytes)
    return flops, acts + weights


def other_bytes(cfg, n_params: int, act_bytes: int) -> dict:
    """Bytes of the step outside the convs, each read/written once: the fused loss (T + 2 logit tensors
    read, the student gradient written), the supervised losses, SGD with momentum, the EMA, the batch."""
    voxels, classes = _numel(cfg.patch), 2
    b = cfg.batch_unlabeled if cfg.consistency_on == "unlabeled" else cfg.batch_labeled + cfg.batch_unlabeled
    out = {"supervised losses": 2 * cfg.batch_labeled * classes * voxels * act_bytes,
           "SGD (param, grad, momentum)": 5 * 4 * n_params,
           "data (crops written)": (cfg.batch_labeled + cfg.batch_unlabeled) * voxels * (4 + 8)}
    if cfg.method != "supervised":
        out["EMA"] = 3 * 4 * n_params
        out["consistency loss"] = (cfg.mc_passes + 3) * b * classes * voxels * act_bytes
    return out


def step_floor(cfg, layers: list[dict], act_bytes: int, matmul_tflops: float, copy_gbps: float,
               n_params: int) -> dict:
    """The analytic floor of one step: per conv layer and pass max(FLOPs / matmul rate, bytes / copy
    bandwidth), plus the other bytes / copy bandwidth. Returns the total ms, its parts and per layer name
    (flops, bytes, floor ms)."""
    per_layer, compute_ms, memory_ms = {}, 0.0, 0.0
    for layer in layers:
        flops = nbytes = floor = 0
        for kind, crops in step_passes(cfg):
            f, b = layer_work(layer, kind, crops, act_bytes)
            t_c, t_m = f / (matmul_tflops * 1e12) * 1e3, b / (copy_gbps * 1e9) * 1e3
            flops, nbytes, floor = flops + f, nbytes + b, floor + max(t_c, t_m)
            compute_ms, memory_ms = compute_ms + t_c, memory_ms + t_m
        per_layer[layer["name"]] = (flops, nbytes, floor)
    extras = other_bytes(cfg, n_params, act_bytes)
    other_ms = {k: v / (copy_gbps * 1e9) * 1e3 for k, v in extras.items()}
    return {"ms": sum(f for _, _, f in per_layer.values()) + sum(other_ms.values()),
            "flops": sum(f for f, _, _ in per_layer.values()), "conv_compute_ms": compute_ms,
            "conv_memory_ms": memory_ms, "other_ms": other_ms, "other_bytes": extras, "per_layer": per_layer}


def layer_groups(layers: list[dict]) -> dict:
    """Conv layers with the same (weight shape, input size) share one signature: measured time can only be
    attributed per signature. Returns {signature: group name}."""
    members = defaultdict(list)
    for layer in layers:
        members[(layer["weight"], layer["input"][1:])].append(layer["name"])
    names = {}
    for key, group in members.items():
        stages = list(dict.fromkeys(n.split(".")[0] for n in group))
        names[key] = "+".join(stages) + (f" x{len(group)}" if len(group) > 1 else "")
    return names


def signature_of(dims: tuple, weights: set) -> tuple | None:
    """(weight shape, input spatial size) of a conv aten op from its "Input Dims": the first entry that is a
    V-Net weight shape, with the 5-D entry before it as the input (forward) or the input (backward)."""
    for i in range(1, len(dims)):
        if dims[i] in weights and len(dims[i - 1]) == 5:
            return dims[i], dims[i - 1][2:]
    return None


# ----------------------------------------------------------------------------- the reduction
def reduce_profile(acts: list[Activity], iterations: int, layers: list[dict], cfg, act_bytes: int,
                   matmul_tflops: float, copy_gbps: float, n_params: int, ms_per_iter: float) -> dict:
    """Tables of one profile (all times per iteration, in ms)."""
    per = 1e-3 / iterations  # us in the whole profile -> ms per iteration
    span_us, busy_us = busy_union_us(acts)
    by_cat, by_kernel = defaultdict(float), defaultdict(lambda: [0.0, 0])
    for a in acts:
        cat = classify(a.name, a.phase, a.conv_op)
        by_cat[cat] += a.dur
        k = by_kernel[(a.name[:120], cat)]  # one name may fall in several categories (by phase)
        k[0] += a.dur
        k[1] += 1
    by_cat["idle (no kernel running)"] = span_us - busy_us
    categories = [{"category": c, "ms": by_cat[c] * per, "pct_of_span": 100 * by_cat[c] / span_us if span_us else None}
                  for c in CATEGORIES if by_cat.get(c)]
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:25]
    top_kernels = [{"kernel": name, "category": cat, "ms": us * per, "calls": calls / iterations,
                    "pct_of_busy": 100 * us / busy_us if busy_us else None} for (name, cat), (us, calls) in top]

    # per layer group: analytic work over the step's passes, measured conv time of its aten ops
    names = layer_groups(layers)
    weights = {layer["weight"] for layer in layers}
    groups = {name: {"group": name, "convs": 0, "flops": 0, "bytes": 0, "floor_ms": 0.0, "measured_ms": 0.0,
                     "fwd_ms": 0.0, "bwd_ms": 0.0, "teacher_ms": 0.0} for name in dict.fromkeys(names.values())}
    floor = step_floor(cfg, layers, act_bytes, matmul_tflops, copy_gbps, n_params)
    for layer in layers:
        g = groups[names[(layer["weight"], layer["input"][1:])]]
        flops, nbytes, layer_floor = floor["per_layer"][layer["name"]]
        g["convs"] += 1
        g["flops"], g["bytes"], g["floor_ms"] = g["flops"] + flops, g["bytes"] + nbytes, g["floor_ms"] + layer_floor
    for a in acts:
        if not a.conv_op or not classify(a.name, a.phase, a.conv_op).startswith("conv"):
            continue
        sig = signature_of(a.conv_dims, weights)
        if sig is None or sig not in names:
            continue
        g = groups[names[sig]]
        g["measured_ms"] += a.dur * per
        g["teacher_ms" if a.phase == "teacher" else "bwd_ms" if "backward" in a.conv_op else "fwd_ms"] += a.dur * per
    for g in groups.values():
        seconds = g["measured_ms"] * 1e-3
        g["tflops"] = g["flops"] / seconds / 1e12 if seconds else None
        g["gbps"] = g["bytes"] / seconds / 1e9 if seconds else None
        g["pct_of_floor_speed"] = 100 * g["floor_ms"] / g["measured_ms"] if g["measured_ms"] else None
    del floor["per_layer"]
    floor["pct_of_floor_speed"] = 100 * floor["ms"] / ms_per_iter if ms_per_iter else None
    conv_ms = sum(by_cat[c] for c in CATEGORIES if c.startswith("conv")) * per
    return {
        "span_ms": span_us * per, "busy_ms": busy_us * per, "conv_kernels_ms": conv_ms,
        "categories": categories, "top_kernels": top_kernels, "layers": list(groups.values()),
        "floor": floor,
    }


def format_markdown(result: dict) -> str:
    """profile.md: the run, the floor, and the three tables."""
    r, f = result, result["floor"]
    lines = [f"# Train-step profile ({'CPU wiring check, not a performance number' if r['cpu'] else r['device']})", "",
             f"{r['environment_line']}  ",
             f"command: `{r['command']}`  ",
             f"crop {tuple(r['patch'])}, n_filters {r['n_filters']}, {r['iterations']} profiled iterations; "
             f"flags: {r['flags']}", "",
             f"- step: **{r['ms_per_iter']:.2f} ms/iter** without the profiler ({1e3 / r['ms_per_iter']:.1f} it/s), "
             f"{r['profiled_ms_per_iter']:.2f} ms/iter under it; time to first iteration {r['first_iter_s']:.1f} s "
             f"(build + compile + first step)",
             f"- ceilings, same run: matmul {r['matmul_tflops']:.3g} TFLOP/s, copy {r['copy_gbps']:.4g} GB/s",
             f"- floor: **{f['ms']:.2f} ms** ({f['flops'] / 1e12:.3f} TFLOP; convs: compute "
             f"{f['conv_compute_ms']:.2f} ms, memory {f['conv_memory_ms']:.2f} ms; the rest "
             f"{sum(f['other_ms'].values()):.2f} ms): the step runs at "
             f"**{_f(f['pct_of_floor_speed'], '.1f')}% of the floor's speed**; MFU {_f(r.get('mfu_pct'), '.1f')}%",
             f"- device busy {r['busy_ms']:.2f} of {r['span_ms']:.2f} ms per iteration; host syncs per iteration: "
             f"{_f(r['host_syncs_per_iter'], '.1f')}", "",
             "| category | ms/iter | % of span |", "|---|---:|---:|"]
    lines += [f"| {c['category']} | {c['ms']:.3f} | {_f(c['pct_of_span'], '.1f')} |" for c in r["categories"]]
    lines += ["", "| top kernel | category | ms/iter | calls/iter | % of busy |", "|---|---|---:|---:|---:|"]
    lines += [f"| `{k['kernel'][:90]}` | {k['category']} | {k['ms']:.3f} | {k['calls']:.1f} | "
              f"{_f(k['pct_of_busy'], '.1f')} |" for k in r["top_kernels"]]
    lines += ["", "| conv layers | convs | GFLOP | MB | measured ms | fwd | bwd | teacher | TFLOP/s | GB/s | "
              "floor ms | % of floor speed |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {g['group']} | {g['convs']} | {g['flops'] / 1e9:.1f} | {g['bytes'] / 1e6:.0f} | "
              f"{g['measured_ms']:.3f} | {g['fwd_ms']:.3f} | {g['bwd_ms']:.3f} | {g['teacher_ms']:.3f} | "
              f"{_f(g['tflops'], '.3g')} | {_f(g['gbps'], '.4g')} | {g['floor_ms']:.3f} | "
              f"{_f(g['pct_of_floor_speed'], '.1f')} |" for g in r["layers"]]
    return "\n".join(lines) + "\n"


def _f(x, spec):
    return "-" if x is None else format(x, spec)


# ----------------------------------------------------------------------------- the run
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n")[0],
                                epilog="Arguments after -- are train.py "
                                "flags (e.g. -- --no-compile --teacher-chunks 3).")
    p.add_argument("--data", action="append", default=[], help="LA root or a `python -m uamt_fast.data pack` "
                   "folder; repeat it for a data set in parts (--cpu without --data: a synthetic set)")
    p.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU: checks the wiring, not the speed")
    p.add_argument("--out", default="", help="folder for profile.json, profile.md (and trace.json.gz)")
    p.add_argument("--iterations", type=int, default=None,
                   help="timed and profiled iterations (default 20 GPU / 2 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 5 GPU / 1 CPU)")
    p.add_argument("--labeled", type=int, default=16, help="labeled cases (the first of train.list), as in the paper")
    p.add_argument("--trace", action="store_true", help="also keep the Chrome trace (trace.json.gz, chrome://tracing)")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.train_flags = extra
    args.iterations = args.iterations or (2 if args.cpu else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.cpu else 5)
    if args.iterations < 1 or args.warmup < 1:
        p.error("--iterations and --warmup must be >= 1 (the first warm-up iteration is the time to first iteration)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("profile_step: no CUDA device; use --cpu for the wiring check", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("profile_step: TRITON_INTERPRET=1 is set: the fused kernels would run in the interpreter; unset it",
              file=sys.stderr)
        return 2
    from uamt_fast import train  # the trainer

    device = torch.device("cpu" if args.cpu else "cuda")
    workdir = tempfile.TemporaryDirectory(prefix="uamt_profile_")
    roots = data_roots(args.data, args.cpu, workdir.name, "profile_step")
    if roots is None:
        return 2
    base = dict(data=roots, labeled=args.labeled, device=device.type, seed=1337)
    if args.cpu:
        base |= dict(CPU_SIZES, compile=False, threads=1, labeled=min(args.labeled, 2))
    try:
        cfg = train.Config(**(base | train.parse_args(args.train_flags)))
    except ValueError as e:
        print(f"profile_step: {e}", file=sys.stderr)
        return 2
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cases = train.load_split(cfg, "train")
    env = measure.environment(device)
    print(measure.environment_line(env), flush=True)

    # build + first iteration (compile, cuDNN autotuning), the rest of the warm-up, then the timed run
    t0 = time.perf_counter()
    parts = train.build(cfg, train_cases=cases)
    iteration = 0

    def step():
        nonlocal iteration
        train.train_step(parts, iteration)
        iteration += 1

    step()
    measure.synchronize(device)
    first_iter_s = time.perf_counter() - t0
    print(f"time to first iteration: {first_iter_s:.1f} s", flush=True)
    for _ in range(args.warmup - 1):
        step()
    measure.synchronize(device)
    t = time.perf_counter()
    for _ in range(args.iterations):
        step()
    measure.synchronize(device)
    ms_per_iter = 1e3 * (time.perf_counter() - t) / args.iterations
    print(f"step: {ms_per_iter:.2f} ms/iter ({args.iterations} iterations, no profiler)", flush=True)

    # the profiled iterations (one more first: the profiler's own warm-up)
    trace_path = Path(workdir.name) / "trace.json"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([] if args.cpu else [torch.profiler.ProfilerActivity.CUDA])
    with torch.profiler.profile(activities=activities, record_shapes=True,
                                schedule=torch.profiler.schedule(wait=0, warmup=1, active=args.iterations, repeat=1),
                                on_trace_ready=lambda p: p.export_chrome_trace(str(trace_path))) as prof:
        measure.synchronize(device)
        t = time.perf_counter()
        for _ in range(args.iterations + 1):
            step()
            prof.step()
        measure.synchronize(device)
        profiled_ms = 1e3 * (time.perf_counter() - t) / (args.iterations + 1)
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if out is not None and args.trace:
        files.atomic_write(out / "trace.json.gz", lambda f: f.write(gzip.compress(trace_path.read_bytes())))
    trace = json.loads(trace_path.read_text())

    # ceilings, same run; the reduction (a failure here still leaves the timings and, with --trace, the trace)
    rate, bandwidth = measure.matmul_tflops(device), measure.copy_bandwidth(device)
    act_bytes = 2 if cfg.amp and device.type == "cuda" else 4
    layers = conv_layers(cfg.n_filters, cfg.patch)
    n_params = sum(p.numel() for p in parts.student.parameters())
    try:
        tables = reduce_profile(device_activities(trace, args.cpu), args.iterations, layers, cfg, act_bytes, rate,
                                bandwidth, n_params, ms_per_iter)
    except Exception as e:  # noqa: BLE001 - keep what was measured
        print(f"profile_step: the trace reduction failed ({type(e).__name__}: {e})", file=sys.stderr)
        if out is not None:
            measure.write_json(out / "profile.json", {"error": f"{type(e).__name__}: {e}", "ms_per_iter": ms_per_iter,
                                                      "first_iter_s": first_iter_s, "environment": env})
        raise
    flags = {k: v for k, v in vars(cfg).items() if k in train.Config.__dataclass_fields__ and
             k not in ("data", "out", "resume", "eval", "demo")}
    result = {"cpu": args.cpu, "device": env["device"], "environment": env,
              "environment_line": measure.environment_line(env),
              "command": "python -m benchmarks.profile_step " + " ".join(sys.argv[1:] if argv is None else argv),
              "patch": list(cfg.patch), "n_filters": cfg.n_filters, "iterations": args.iterations,
              "flags": " ".join(args.train_flags) or "(defaults)", "config": flags,
              "first_iter_s": first_iter_s, "ms_per_iter": ms_per_iter, "profiled_ms_per_iter": profiled_ms,
              "matmul_tflops": rate, "copy_gbps": bandwidth,
              "host_syncs_per_iter": None if args.cpu else host_syncs(trace) / (args.iterations + 1),
              "mfu_pct": None, **tables}
    result["mfu_pct"] = 100 * tables["floor"]["flops"] / (ms_per_iter * 1e-3) / 1e12 / rate
    text = format_markdown(result)
    print(text)
    if out is not None:
        measure.write_json(out / "profile.json", result)
        files.atomic_write_text(out / "profile.md", text)
        print(f"wrote {out / 'profile.json'}, {out / 'profile.md'}" + (", trace.json.gz" if args.trace else ""))
    with contextlib.suppress(OSError):
        workdir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
