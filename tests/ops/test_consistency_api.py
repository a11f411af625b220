"""The public ops' contracts on every path: NaN propagation, shape rules, scalar types, device routing, import cost.

"kernels" runs the Triton kernels (through the interpreter on a CPU-only machine, where conftest sets
TRITON_INTERPRET=1); "reference" forces the plain-PyTorch path, as CPU users without the interpreter get it.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

import uamt_fast
from uamt_fast.ops import consistency, ema
from uamt_fast.kernels import device

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_KERNELS = torch.cuda.is_available() or consistency.TRITON_ON_CPU
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["kernels", "reference"])
def path(request, monkeypatch):
    if request.param == "kernels":
        if not HAS_KERNELS:
            pytest.skip("needs CUDA or TRITON_INTERPRET=1")
        return DEVICE
    monkeypatch.setattr(consistency, "TRITON_ON_CPU", False)
    return "cpu"


def logits(device, B=1, C=2, T=2, spatial=(2, 3, 4)):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(B, C, *spatial, generator=g)
    teacher = torch.randn(B, C, *spatial, generator=g)
    mc = torch.randn(T, B, C, *spatial, generator=g)
    return student.to(device).requires_grad_(), teacher.to(device), mc.to(device)


# ---------------------------------------------------------------------------------------------
# NaN / Inf: NaN loss and NaN in every gradient entry, whichever input holds it
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where, value", [("student", math.nan), ("teacher", math.inf), ("mc", math.nan),
                                          ("mc", -math.inf)])
def test_non_finite_logit_gives_nan_loss_and_nan_gradient(path, where, value):
    student, teacher, mc = logits(path)
    with torch.no_grad():
        {"student": student, "teacher": teacher, "mc": mc}[where].view(-1)[5] = value
    loss, stats = uamt_fast.uncertainty_consistency_loss(student, teacher, mc, 0.6, return_stats=True)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isnan(loss)
    assert torch.isnan(grad).all(), f"{int(torch.isnan(grad).sum())} of {grad.numel()} gradient entries NaN"
    assert torch.isnan(stats.uncertainty_mean) and torch.isnan(stats.uncertainty_max)


def test_finite_logits_give_the_same_loss_and_gradient_on_both_paths(monkeypatch):
    if not HAS_KERNELS:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    student, teacher, mc = logits(DEVICE)
    loss = uamt_fast.uncertainty_consistency_loss(student, teacher, mc, 0.6)
    (grad,) = torch.autograd.grad(loss, student)
    monkeypatch.setattr(consistency, "TRITON_ON_CPU", False)
    student, teacher, mc = (x.detach().cpu() for x in (student, teacher, mc))
    student.requires_grad_()
    ref_loss = uamt_fast.uncertainty_consistency_loss(student, teacher, mc, 0.6)
    (ref_grad,) = torch.autograd.grad(ref_loss, student)
    assert torch.isfinite(ref_grad).all() and ref_loss > 0
    torch.testing.assert_close(loss.cpu(), ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.cpu(), ref_grad, rtol=1e-4, atol=1e-7)


def test_eager_path_gives_the_custom_ops_bits():
    """Eager calls run the launchers without the custom-op dispatcher; torch.compile gets the op. Same bits."""
    if not HAS_KERNELS:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    student, teacher, mc = logits(DEVICE)
    loss, stats = uamt_fast.uncertainty_consistency_loss(student, teacher, mc, 0.6, return_stats=True)
    (grad,) = torch.autograd.grad(loss * 0.5, student)
    op_loss, op_stats, _, _ = torch.ops.uamt_fast.uncertainty_consistency_loss(student, teacher, mc, None, 0.6, True)
    (op_grad,) = torch.autograd.grad(op_loss * 0.5, student)
    assert torch.equal(loss, op_loss) and torch.equal(torch.stack(stats), op_stats) and torch.equal(grad, op_grad)
    assert torch.equal(uamt_fast.predictive_entropy(mc), torch.ops.uamt_fast.predictive_entropy(mc))


# ---------------------------------------------------------------------------------------------
# predictive_entropy: ambiguous ranks must say their spatial dims
# ---------------------------------------------------------------------------------------------


def test_stacked_passes_are_refused_not_misread(monkeypatch):
    monkeypatch.setattr(consistency, "TRITON_ON_CPU", False)
    with pytest.raises(ValueError, match=r"shape \(36, 3, 32, 32\) is ambiguous.*spatial_dims=1.*unflatten"):
        uamt_fast.predictive_entropy(torch.randn(36, 3, 32, 32))  # (T*B, C, H, W) teacher output
    with pytest.raises(ValueError, match=r"ambiguous.*\(T\*B, C, D, H, W\) 3D.*spatial_dims=2"):
        uamt_fast.predictive_entropy(torch.randn(6, 2, 4, 4, 4))
    with pytest.raises(ValueError, match=r"spatial_dims=2 \(rank 5\), got shape \(6, 2, 4, 4, 4, 4\).*unflatten"):
        uamt_fast.predictive_entropy(torch.randn(6, 2, 4, 4, 4, 4), spatial_dims=2)
    with pytest.raises(ValueError, match="spatial_dims: expected 1, 2 or 3, got 4"):
        uamt_fast.predictive_entropy(torch.randn(2, 1, 2, 4), spatial_dims=4)
    with pytest.raises(TypeError, match="spatial_dims: expected 1, 2 or 3, got bool"):
        uamt_fast.predictive_entropy(torch.randn(2, 1, 2, 4), spatial_dims=True)


@pytest.mark.parametrize("spatial, spatial_dims", [((4,), 1), ((3, 4), 2), ((2, 3, 4), 3), ((2, 3, 4), None)])
def test_predictive_entropy_shapes(path, spatial, spatial_dims):
    T, B, C = 3, 2, 2
    mc = torch.randn(T, B, C, *spatial).to(path)
    u = uamt_fast.predictive_entropy(mc, spatial_dims=spatial_dims)
    assert u.shape == (B, *spatial)
    stacked = mc.flatten(0, 1)  # what a batched teacher forward returns
    torch.testing.assert_close(uamt_fast.predictive_entropy(stacked.unflatten(0, (T, B)), spatial_dims=len(spatial)), u)


# ---------------------------------------------------------------------------------------------
# scalar arguments: real numbers of any numeric type, never bools or strings
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.5, np.float32(0.5), np.float64(0.5), np.float16(0.5), Fraction(1, 2),
                                       torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float64)])
def test_threshold_of_any_real_type(monkeypatch, threshold):
    monkeypatch.setattr(consistency, "TRITON_ON_CPU", False)
    student, teacher, mc = logits("cpu")
    expected = uamt_fast.uncertainty_consistency_loss(student, teacher, mc, 0.5)
    assert torch.equal(uamt_fast.uncertainty_consistency_loss(student, teacher, mc, threshold), expected)


def test_integer_threshold(monkeypatch):
    monkeypatch.setattr(consistency, "TRITON_ON_CPU", False)
    student, teacher, mc = logits("cpu")
    expected = uamt_fast.uncertainty_consistency_loss(student, teacher, mc, 1.0)
    for threshold in (1, np.int64(1), np.int32(1)):
        assert torch.equal(uamt_fast.uncertainty_consistency_loss(student, teacher, mc, threshold), expected)


@pytest.mark.parametrize("threshold, error, message", [
    (True, TypeError, r"threshold: expected a float \(any real number type\) or a 0-dim float tensor, got bool"),
    (np.bool_(True), TypeError, "got bool"),
    ("0.5", TypeError, "got str"),
    (0.5 + 0j, TypeError, "got complex"),
    (None, TypeError, "got NoneType"),
    (np.float32(-1.0), ValueError, "finite positive"),
    (np.float64(math.nan), ValueError, "finite positive"),
    (torch.tensor(1), TypeError, "floating-point tensor"),
])
def test_bad_threshold(monkeypatch, threshold, error, message):
    monkeypatch.setattr(consistency, "TRITON_ON_CPU", False)
    with pytest.raises(error, match=message):
        uamt_fast.uncertainty_consistency_loss(*logits("cpu"), threshold)


# ---------------------------------------------------------------------------------------------
# device routing: one helper, one seam
# ---------------------------------------------------------------------------------------------


def test_triton_can_take():
    cpu, meta = torch.zeros(2), torch.zeros(2, device="meta")
    assert device.triton_can_take(cpu, cpu=True) and not device.triton_can_take(cpu, cpu=False)
    assert not device.triton_can_take(meta, cpu=True)
    assert device.triton_can_take(cpu) == device.TRITON_INTERPRET
    with pytest.raises(RuntimeError, match="my_op: tensor on meta cannot run a Triton kernel"):
        device.check_triton_can_take("my_op", cpu.cuda() if torch.cuda.is_available() else cpu, meta)


def test_the_module_flags_route_cpu_tensors(monkeypatch):
    monkeypatch.setattr(consistency, "TRITON_ON_CPU", False)
    monkeypatch.setattr(ema, "TRITON_ON_CPU", False)
    x = torch.zeros(2)
    assert not consistency.uses_kernels(x) and not ema.uses_kernel(x)
    monkeypatch.setattr(consistency, "TRITON_ON_CPU", True)
    monkeypatch.setattr(ema, "TRITON_ON_CPU", True)
    assert consistency.uses_kernels(x) == consistency.KERNELS_AVAILABLE
    assert ema.uses_kernel(x) == ema.KERNELS_AVAILABLE


# ---------------------------------------------------------------------------------------------
# import cost
# ---------------------------------------------------------------------------------------------


def test_import_does_not_pull_in_dynamo():
    """torch._dynamo costs ~1.5 s to import; uamt_fast imports it only when ema_update_ is first called."""
    code = ("import sys, uamt_fast; assert 'torch._dynamo' not in sys.modules, "
            "[m for m in sys.modules if m.startswith('torch._dynamo')][:3]")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
