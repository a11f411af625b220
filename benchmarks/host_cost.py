"""Host cost of the public ops' eager call path on the CPU: what Python pays per call besides the math.

    python -m benchmarks.host_cost            # prints a markdown table (median microseconds per call)

Rows (all on the CPU, tiny tensors; each the smallest of 5 medians of
``torch.utils.benchmark.Timer.blocked_autorange``, since other processes on a shared machine only add time):

- ``uncertainty_consistency_loss`` / ``predictive_entropy``: the public call with the math stubbed
  out (the reference math returns preallocated tensors), so the row is argument checks, threshold
  handling and dispatch; for a float threshold, a 0-dim CPU tensor threshold and numpy scalars.
- the kernel route (the CUDA path, taken here by CPU tensors) with the launchers stubbed: checks,
  custom-op dispatch or the eager autograd.Function, and the backward; what an eager CUDA call
  pays on the host besides the launches themselves.
- ``ema_update_``: two flattened V-Nets (9,448,866 parameters, 118 tensors) with the flat update
  stubbed out: decay/step checks and the check that both models still share their flat buffers.
  The list path (unflattened models, ``torch._foreach_lerp_`` stubbed) for comparison.

Run without ``TRITON_INTERPRET`` (CPU tensors then take the reference path, whose math is stubbed).
"""
from __future__ import annotations

import os
import platform

import numpy as np
import torch
from torch.utils.benchmark import Timer

import uamt_fast
from uamt_fast.ops import consistency, ema
from uamt_fast import reference


def _median_us(stmt: str, env: dict, repeats: int = 5) -> float:
    """The smallest of ``repeats`` medians: on a shared machine, other processes only add time."""
    return min(Timer(stmt, globals=env).blocked_autorange(min_run_time=0.2).median for _ in range(repeats)) * 1e6


def rows() -> list[tuple[str, float]]:
    torch.manual_seed(0)
    mc = torch.randn(2, 1, 2, 4, 4, 4)
    student, teacher = torch.randn(1, 2, 4, 4, 4, requires_grad=True), torch.randn(1, 2, 4, 4, 4)
    loss0, stats0, u0 = torch.zeros(()), torch.zeros(4), torch.zeros(1, 4, 4, 4)
    grad0, scale0 = torch.zeros_like(student), torch.zeros(())
    env = {"uamt_fast": uamt_fast, "s": student, "t": teacher, "mc": mc, "np": np, "torch": torch,
           "thr_t": torch.tensor(0.5)}
    out = []
    saved = reference.uncertainty_consistency_loss_with_stats, reference.predictive_entropy
    reference.uncertainty_consistency_loss_with_stats = lambda *args: (loss0, stats0)
    reference.predictive_entropy = lambda x: u0
    try:
        for label, thr in (("float", "0.5"), ("0-dim CPU tensor", "thr_t"), ("np.float32", "np.float32(0.5)")):
            try:
                us = _median_us(f"uamt_fast.uncertainty_consistency_loss(s, t, mc, {thr})", env)
            except TypeError:
                us = float("nan")  # numpy scalars were refused before the API changes
            out.append((f"uncertainty_consistency_loss, threshold {label} (math stubbed)", us))
        out.append(("uncertainty_consistency_loss, return_stats=True (math stubbed)",
                    _median_us("uamt_fast.uncertainty_consistency_loss(s, t, mc, 0.5, return_stats=True)", env)))
        try:
            uamt_fast.predictive_entropy(mc, spatial_dims=3)
            entropy_call = "uamt_fast.predictive_entropy(mc, spatial_dims=3)"
        except TypeError:  # before the spatial_dims= argument
            entropy_call = "uamt_fast.predictive_entropy(mc)"
        out.append(("predictive_entropy (math stubbed)", _median_us(entropy_call, env)))
    finally:
        reference.uncertainty_consistency_loss_with_stats, reference.predictive_entropy = saved

    # The kernel route on CPU tensors with the launchers stubbed: what an eager CUDA call pays on
    # the host besides the launches (checks, custom-op dispatch or autograd.Function, backward).
    if consistency.KERNELS_AVAILABLE:
        from uamt_fast.kernels import predictive_entropy as entropy_kernels
        from uamt_fast.kernels import uncertainty_loss as loss_kernels

        stubs = {(loss_kernels, "uncertainty_loss_forward"): lambda *args, **kw: (loss0.clone(), stats0.clone(), grad0,
                                                                                  scale0),
                 (loss_kernels, "uncertainty_loss_backward"): lambda g, scale, grad_out, **kw: g.clone(),
                 (entropy_kernels, "predictive_entropy_forward"): lambda x, **kw: u0.clone()}
        saved_launchers = {key: getattr(*key) for key in stubs}
        saved_flag = consistency.TRITON_ON_CPU
        for (module, name), stub in stubs.items():
            setattr(module, name, stub)
        consistency.TRITON_ON_CPU = True
        try:
            out.append(("uncertainty_consistency_loss forward, kernel route, launches stubbed",
                        _median_us("uamt_fast.uncertainty_consistency_loss(s, t, mc, 0.5)", env)))
            out.append(("uncertainty_consistency_loss forward + backward, kernel route, launches stubbed",
                        _median_us("uamt_fast.uncertainty_consistency_loss(s, t, mc, 0.5).backward()", env)))
            out.append(("predictive_entropy, kernel route, launch stubbed",
                        _median_us(entropy_call, env)))
        finally:
            consistency.TRITON_ON_CPU = saved_flag
            for (module, name), fn in saved_launchers.items():
                setattr(module, name, fn)

    s_net, t_net = uamt_fast.VNet(), uamt_fast.VNet()
    s_plain, t_plain = uamt_fast.VNet(), uamt_fast.VNet()
    uamt_fast.flatten_parameters_(s_net)
    uamt_fast.flatten_parameters_(t_net)
    saved_flat, saved_lerp = ema.update_flat_, torch._foreach_lerp_
    ema.update_flat_ = lambda *args: None
    torch._foreach_lerp_ = lambda *args: None
    try:
        env_ema = {"uamt_fast": uamt_fast, "ema": ema, "t": t_net, "s": s_net, "tp": t_plain, "sp": s_plain, "np": np}
        out.append(("EMA staleness check of one flattened V-Net (flat_parameters)",
                    _median_us("uamt_fast.flat_parameters(t)", env_ema)))
        out.append(("ema_update_, flattened V-Nets, step=int (update stubbed)",
                    _median_us("uamt_fast.ema_update_(t, s, 0.99, step=1000)", env_ema)))
        try:
            us = _median_us("uamt_fast.ema_update_(t, s, np.float32(0.99), step=np.int64(1000))", env_ema)
        except TypeError:
            us = float("nan")  # numpy scalars were refused before the API changes
        out.append(("ema_update_, flattened V-Nets, numpy decay/step (update stubbed)", us))
        out.append(("ema_update_, unflattened V-Nets, list path (foreach stubbed)",
                    _median_us("uamt_fast.ema_update_(tp, sp, 0.99, step=1000)", env_ema)))
    finally:
        ema.update_flat_, torch._foreach_lerp_ = saved_flat, saved_lerp
    return out


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("host_cost: unset TRITON_INTERPRET (CPU tensors must take the stubbed reference path)")
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread, "
          f"min of 5 medians of torch.utils.benchmark blocked_autorange(min_run_time=0.2)\n")
    print("| call | median us |\n|---|---|")
    for name, us in rows():
        print(f"| {name} | {us:.1f} |" if us == us else f"| {name} | refused |")


if __name__ == "__main__":
    main()
