"""Launch-config sweep of the fused loss / entropy kernels: ``python -m benchmarks.kernel_sweep``.

For each kernel (loss forward with its finalize, loss backward, entropy), each input mix and the
paper's shapes (T=8, C=2, 112x112x80, B = 2 and 4), times every candidate ``LaunchConfig``
(voxels or elements per program x warps) through the real launchers' ``config=`` override with
``triton.testing.do_bench`` (median GPU time; L2 flushed before every call, so inputs come from
HBM), and prints:

- one row per (key, config, B): ms, GB/s, % of the copy bandwidth measured in the same run
  (``benchmarks.measure.copy_bandwidth``) on the bytes the kernel itself must move;
- the best config per key (least total time over B = 2 and 4), in the exact form of
  ``kernels/launch_config.py``'s ``TABLE``, to paste there.

Mixes: ``fp32``, ``bf16``, ``fp16`` (all three inputs in that dtype, contiguous NCDHW); ``trainer``
(what train.py passes under bf16 autocast with channels_last_3d: bf16 everywhere, class stride 1,
the student a batch slice); ``amp`` (bf16 passes, fp32 student and teacher: timed at the default
and at the best ``bf16`` config only, its key is the ``bf16`` one). The kernels unroll the passes
(no pipelined loop at T=8), so there is no ``num_stages`` to sweep.

After the sweep, the finalize kernel alone (the single program that reduces the forward's
partials; it is inside every loss_fwd row): the most a one-launch forward could save.

Bytes per kernel (s = element size of each tensor): loss forward reads the T passes, student and
teacher and writes the gradient (B*C*V each); backward reads and writes the gradient; entropy
reads the passes and writes B*V fp32.

``--budget-s S`` (default 55) bounds the run: each key's default config is timed first, then the
other candidates round-robin over keys, stopping when the budget is spent (compiles included; rows
not reached are listed). ``--json PATH`` writes the rows, the best configs and the environment.
``--cpu``: the same wiring at tiny shapes in the Triton interpreter, in seconds (times mean nothing).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_sweep", description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny shapes in the Triton interpreter (wiring check)")
    p.add_argument("--json", default=None, help="write rows, best configs and environment to this path")
    p.add_argument("--budget-s", type=float, default=55.0, help="stop starting new configs after this many seconds")
    return p.parse_args(argv)


MIXES = ("fp32", "bf16", "fp16", "trainer", "amp")


def main(argv=None) -> dict:
    args = _parse(argv)
    if args.cpu:  # before triton is imported: the kernels then run in the interpreter
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from uamt_fast.kernels import launch_config as L
    from uamt_fast.kernels import predictive_entropy as PE
    from uamt_fast.kernels import uncertainty_loss as K

    from benchmarks import measure

    if args.cpu and not K.TRITON_INTERPRET:
        raise SystemExit("kernel_sweep --cpu: triton was imported before TRITON_INTERPRET=1 could be set")
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("kernel_sweep: no CUDA device; use --cpu for the interpreter wiring check")
    if not args.cpu and K.TRITON_INTERPRET:
        raise SystemExit("kernel_sweep: TRITON_INTERPRET=1 on a GPU run would time the interpreter; unset it")
    device = torch.device("cpu" if args.cpu else "cuda")
    start = time.perf_counter()
    T, C = (2, 2) if args.cpu else (8, 2)
    spatial = (2, 4, 4) if args.cpu else (112, 112, 80)
    batches = (1, 2) if args.cpu else (2, 4)
    V = spatial[0] * spatial[1] * spatial[2]
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

    def inputs(mix: str, B: int):
        """(student, teacher, mc) of one mix; random logits with a shared per-voxel signal."""
        g = torch.Generator(device=device).manual_seed(B)
        base = 2.0 * torch.randn(B, C, *spatial, generator=g, device=device)
        mc = base + 0.7 * torch.randn(T, B, C, *spatial, generator=g, device=device)
        s, q = base + torch.randn_like(base), base + 0.5 * torch.randn_like(base)
        if mix == "trainer":  # as train.py: channels_last_3d network outputs, student = unlabeled half
            cl = torch.channels_last_3d
            mc = torch.cat([q[None], mc]).flatten(0, 1).to(torch.bfloat16, memory_format=cl).unflatten(0, (T + 1, B))
            s = torch.cat([s, s]).to(torch.bfloat16, memory_format=cl)[B:]
            return s, mc[0], mc[1:]
        if mix == "amp":
            return s, q, mc.to(torch.bfloat16)
        return s.to(dt[mix]), q.to(dt[mix]), mc.to(dt[mix])

    def nbytes(*tensors) -> int:
        return sum(x.numel() * x.element_size() for x in tensors)

    # -- what to time: per key, the candidates and a runner ------------------------------------
    thr = torch.tensor(0.5, device=device)

    def candidates(kernel: str, default):
        if args.cpu:
            return [default, L.LaunchConfig(default.block // 2, default.num_warps)]
        if kernel == "loss_bwd":
            blocks, warps = (4096, 8192), (4, 8)
        else:
            blocks, warps = (default.block // 2, default.block, default.block * 2), (4, 8)
        grid = [L.LaunchConfig(b, w) for b in blocks for w in warps if b >= 32 * w]
        return [default] + [c for c in grid if c != default]

    keyed: dict[tuple, list] = {}
    for mix in MIXES:
        for B in batches:
            s, q, mc = inputs(mix, B)
            classes_last = mix == "trainer"
            grad = K.uncertainty_loss_forward(s, q, mc, thr, 0.0, True)[2]
            scale, one = torch.ones((), device=device), torch.ones((), device=device)
            kernels = {
                "loss_fwd": (mc.dtype, lambda cfg, s=s, q=q, mc=mc: K.uncertainty_loss_forward(
                    s, q, mc, thr, 0.0, True, config=cfg), nbytes(s, q, mc, s)),
                "entropy": (mc.dtype, lambda cfg, mc=mc: PE.predictive_entropy_forward(mc, config=cfg),
                            nbytes(mc) + B * V * 4),
                "loss_bwd": (grad.dtype, lambda cfg, grad=grad, scale=scale, one=one: K.uncertainty_loss_backward(
                    grad, scale, one, config=cfg), 2 * nbytes(grad)),
            }
            for kernel, (dtype, fn, moved) in kernels.items():
                if kernel == "loss_bwd" and mix in ("trainer", "amp"):
                    continue  # the same flat pass as bf16 / fp32
                if kernel == "entropy" and mix == "amp":
                    continue  # the same passes as bf16
                key = L.config_key(kernel, dtype, classes_last, C, T, B * V * (C if kernel == "loss_bwd" else 1))
                default = L.default_config(key, B * V * (C if kernel == "loss_bwd" else 1))
                table_key = key if mix != "amp" else key + ("amp",)
                keyed.setdefault(table_key, {"mix": mix, "kernel": kernel, "default": default, "runs": []})
                keyed[table_key]["runs"].append((B, fn, moved))

    for table_key, entry in keyed.items():
        entry["candidates"] = candidates(entry["kernel"], entry["default"])
    # amp: default and (later) the best bf16 config only
    order = []  # round-robin: every key's default first, then each key's next candidate, ...
    depth = max(len(e["candidates"]) for e in keyed.values())
    for i in range(depth):
        for table_key, entry in keyed.items():
            if table_key[-1] == "amp" and i > 0:
                continue
            if i < len(entry["candidates"]):
                order.append((table_key, entry["candidates"][i]))

    # -- timing ------------------------------------------------------------------------------
    copy_gbps = measure.copy_bandwidth(device, 64 * measure.MiB if args.cpu else None)

    def time_ms(fn: Callable) -> float:
        if args.cpu:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")

    rows, skipped = [], []

    def run(table_key, cfg):
        entry = keyed[table_key]
        for B, fn, moved in entry["runs"]:
            ms = time_ms(lambda fn=fn: fn(cfg))
            row = {"kernel": entry["kernel"], "mix": entry["mix"], "key": list(table_key[:6]), "B": B,
                   "block": cfg.block, "num_warps": cfg.num_warps, "default": cfg == entry["default"],
                   "median_ms": ms, "bytes": moved}
            rows.append(measure.add_roofline(row, copy_gbps))
            print(f"{entry['kernel']:<9} {entry['mix']:<8} B={B} block={cfg.block:<5} warps={cfg.num_warps:<2} "
                  f"{ms:9.4f} ms {row['gbps'] or 0:8.1f} GB/s {row.get('pct_copy') or 0:6.1f} %copy"
                  f"{'  (default)' if row['default'] else ''}", flush=True)

    for table_key, cfg in order:
        if time.perf_counter() - start > args.budget_s:
            skipped.append({"key": list(table_key), "block": cfg.block, "num_warps": cfg.num_warps})
            continue
        run(table_key, cfg)

    # the finalize alone (part of every loss_fwd row): the most a one-launch forward could save
    for B in batches:
        if time.perf_counter() - start > args.budget_s:
            break
        key = L.config_key("loss_fwd", torch.bfloat16, False, C, T, B * V)
        programs = B * -(-V // L.config_for("loss_fwd", torch.bfloat16, False, C, T, B * V).block)
        part = torch.zeros(K.NUM_PARTIALS, programs, device=device)
        counts = torch.zeros(programs, device=device, dtype=torch.int32)
        outs = [torch.empty((), device=device), torch.empty((), device=device), torch.empty(4, device=device)]
        args_ = (part, counts, *outs, programs, C, B * V)
        ms = time_ms(lambda args_=args_: K.uamt_loss_finalize_kernel[(1,)](*args_, BLOCK_P=K.FINALIZE_BLOCK,
                                                                           num_warps=4))
        row = {"kernel": "finalize", "mix": "fp32", "key": list(key), "B": B, "block": K.FINALIZE_BLOCK,
               "num_warps": 4, "default": True, "median_ms": ms, "bytes": part.numel() * 4 + programs * 4}
        rows.append(measure.add_roofline(row, copy_gbps))
        print(f"finalize  ({programs} partials)  B={B} {ms:9.4f} ms  (inside every loss_fwd row above)", flush=True)

    best = _best([r for r in rows if r["kernel"] != "finalize"])
    amp_bf16 = [k for k in keyed if k[-1] == "amp"]
    for table_key in amp_bf16:  # amp at the best bf16 forward config too
        b = best.get(table_key[:6])
        if b and b["config"] != keyed[table_key]["default"] and time.perf_counter() - start <= args.budget_s:
            run(table_key, b["config"])

    table_py = "TABLE = {\n" + "".join(
        f"    {k!r}: LaunchConfig(block={v['config'].block}, num_warps={v['config'].num_warps}),"
        f"  # {v['total_ms']:.4f} ms over B={'+'.join(map(str, batches))}; default {v['default_ms']}\n"
        for k, v in sorted(best.items()) if len(k) == 6 and k[-1] != "amp") + "}"
    print(f"\ncopy bandwidth (read + write), same run: {copy_gbps:.1f} GB/s; "
          f"{len(rows)} rows in {time.perf_counter() - start:.1f} s; {len(skipped)} configs not reached (budget)")
    print("launcher table (paste into kernels/launch_config.py):")
    print(table_py)
    result = {
        "environment": measure.environment(device), "copy_gbps": copy_gbps, "cpu_interpreter": args.cpu,
        "shapes": {"T": T, "C": C, "spatial": spatial, "batches": batches}, "budget_s": args.budget_s,
        "complete": not skipped, "rows": rows, "not_reached": skipped,
        "best": [{"key": list(k), "block": v["config"].block, "num_warps": v["config"].num_warps,
                  "total_ms": v["total_ms"], "default_ms": v["default_ms"]} for k, v in sorted(best.items())],
        "table_py": table_py,
    }
    if args.json:
        measure.write_json(args.json, result)
        print(f"written to {args.json}")
    return result


def _best(rows: list[dict]) -> dict:
    """Per key: the config with the least total time over the batch sizes it was timed at (only
    configs timed at every batch size of the key count), and the default's total."""
    from uamt_fast.kernels.launch_config import LaunchConfig

    totals: dict[tuple, dict[tuple, list]] = {}
    for r in rows:
        key = tuple(r["key"]) + (("amp",) if r["mix"] == "amp" else ())
        totals.setdefault(key, {}).setdefault((r["block"], r["num_warps"], r["default"]), []).append(r["median_ms"])
    best = {}
    for key, by_cfg in totals.items():
        n = max(len(v) for v in by_cfg.values())
        complete = {c: sum(v) for c, v in by_cfg.items() if len(v) == n}
        (block, warps, _), total = min(complete.items(), key=lambda kv: kv[1])
        default_ms = next((round(v, 4) for c, v in complete.items() if c[2]), None)
        best[key] = {"config": LaunchConfig(block, warps), "total_ms": total, "default_ms": default_ms}
    return best


if __name__ == "__main__":
    main(sys.argv[1:])
