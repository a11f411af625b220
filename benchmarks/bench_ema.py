"""EMA teacher update of the V-Net (9,448,866 fp32 parameters in 118 tensors), four ways.

``theta_t <- alpha theta_t + (1 - alpha) theta_s`` with alpha = 0.99:

- ``loop`` (baseline): the released code's per-parameter ``t.mul_(alpha).add_(s, alpha=1-alpha)``,
  two kernel launches per tensor (``uamt_fast.reference.ema_update_``).
- ``foreach_lerp`` (baseline): ``torch._foreach_lerp_(teacher, student, 1 - alpha)``, timm's ModelEmaV3.
- ``list_path``: ``uamt_fast.ema_update_`` on plain parameter lists: its checks, then its
  multi-tensor path (today ``torch._foreach_lerp_``; a pointer-table kernel would slot in here).
- ``fused_flat``: ``uamt_fast.ema_update_`` on two models whose parameters are views of one flat
  buffer each (``uamt_fast.flatten_parameters_``), called as ``train.py`` calls it (``step=``): the
  staleness check (are the parameters still views of the buffer?), then a single launch.
- ``fused_flat_buffers``: ``uamt_fast.ema_update_`` on the two flat buffers themselves
  (``uamt_fast.flat_parameters``): the single launch without the per-module check, so the gap
  to ``fused_flat`` is that check's host time.

Bytes that must move: read teacher + read student + write teacher, 3 x 4 x P. Each GPU row has the
kernel time (CUDA-graph replay: the staleness check's host time is not in it) and the eager
wall-clock per call (it is). On a CPU only the two baselines run.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import measure
from uamt_fast import reference
from uamt_fast.nets.vnet import VNet

DECAY = 0.99
STEP = 3000  # a mid-run global step: alpha = min(1 - 1/(STEP + 1), DECAY) = DECAY
PAPER_FILTERS = 16  # 9,448,866 parameters
TINY_FILTERS = 4


def _models(n_filters: int, device, seed: int, flat: bool):
    torch.manual_seed(seed)
    student, teacher = VNet(n_filters=n_filters).to(device), VNet(n_filters=n_filters).to(device)
    teacher.requires_grad_(False)
    if flat:
        import uamt_fast

        uamt_fast.flatten_parameters_(student)
        uamt_fast.flatten_parameters_(teacher)
    return teacher, student


@pytest.mark.parametrize("provider", ["loop", "foreach_lerp", "list_path", "fused_flat", "fused_flat_buffers"])
def test_ema_update(benchmark, bench, provider):
    flat = provider.startswith("fused_flat")
    if provider not in ("loop", "foreach_lerp"):
        bench.require_cuda(f"EMA {provider}", wiring_row=True)
        import uamt_fast
    n_filters = TINY_FILTERS if bench.tiny else PAPER_FILTERS
    teacher, student = _models(n_filters, bench.device, 0, flat=flat)
    n_params = sum(p.numel() for p in student.parameters())
    nbytes = 3 * 4 * n_params
    pairs = [(teacher, student)] + [_models(n_filters, bench.device, k, flat=flat)
                                    for k in range(1, measure.rotation_count(nbytes, bench.device))]
    if provider == "loop":
        sets = pairs

        def fn(t, s):
            reference.ema_update_(t, s, DECAY)
    elif provider == "foreach_lerp":
        sets = [(list(t.parameters()), list(s.parameters())) for t, s in pairs]

        def fn(t, s):
            torch._foreach_lerp_(t, s, 1.0 - DECAY)
    elif provider == "list_path":
        sets = [(list(t.parameters()), list(s.parameters())) for t, s in pairs]

        def fn(t, s):
            uamt_fast.ema_update_(t, s, DECAY)
    elif provider == "fused_flat":
        sets = pairs

        def fn(t, s):
            uamt_fast.ema_update_(t, s, DECAY, step=STEP)
    else:
        sets = [(uamt_fast.flat_parameters(t), uamt_fast.flat_parameters(s)) for t, s in pairs]
        if any(b is None for pair in sets for b in pair):
            raise RuntimeError("flatten_parameters_ did not leave a flat buffer on the V-Net")

        def fn(t, s):
            uamt_fast.ema_update_(t, s, DECAY)

    with torch.no_grad():
        bench.run(benchmark, group=f"ema VNet(n_filters={n_filters}) {n_params:,} params fp32", provider=provider,
                  fn=fn, arg_sets=sets, bytes_moved=nbytes, baseline=provider in ("loop", "foreach_lerp"),
                  kernel=provider not in ("loop", "foreach_lerp"), kernel_time=True,
                  op="ema_update_", n_params=n_params, n_tensors=len(list(student.parameters())))
