"""What the public ops refuse instead of computing something silently wrong: aliased or overlapping
EMA operands, and double backward through the fused loss.

EMA paths: "kernel" (the flat Triton launch; the interpreter on a CPU-only machine), "torch" (the
same dispatch with the kernel switched off: ``mul_().add_()`` / ``_foreach_lerp_``) and "reference"
(``uamt_fast.reference.ema_update_``, the trainer's ``--no-fused-ema`` loop). Every refusal is a
``ValueError`` raised before anything is written: the teacher keeps its values bit for bit.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

import uamt_fast
from uamt_fast.ops import consistency, ema
from uamt_fast import reference
from uamt_fast.kernels import device
from uamt_fast.kernels import class_vectors

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_EMA_KERNEL = torch.cuda.is_available() or ema.TRITON_ON_CPU
HAS_LOSS_KERNELS = torch.cuda.is_available() or consistency.TRITON_ON_CPU


@pytest.fixture(params=["kernel", "torch", "reference"])
def ema_path(request, monkeypatch):
    """The update function of one path."""
    if request.param == "kernel":
        if not HAS_EMA_KERNEL:
            pytest.skip("needs CUDA or TRITON_INTERPRET=1")
        return uamt_fast.ema_update_
    if request.param == "torch":
        monkeypatch.setattr(ema, "TRITON_ON_CPU", False)
        return uamt_fast.ema_update_
    return reference.ema_update_


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(DEVICE)


def snapshot(x):
    tensors = x.parameters() if isinstance(x, nn.Module) else x if isinstance(x, (list, tuple)) else [x]
    return [t.detach().clone() for t in tensors]


def assert_unchanged(x, before):
    for t, b in zip(snapshot(x), before, strict=True):
        assert torch.equal(t, b)


# ---------------------------------------------------------------------------------------------
# EMA: teacher and student must not alias
# ---------------------------------------------------------------------------------------------


def _aliased_pairs():
    """name -> () -> (teacher, student, regex of the message). Each was silently computed before
    (0.75 x, an unchanged teacher, or a read of half-written values), or raised torch's RuntimeError."""
    def same_tensor():
        x = torch.randn(40, device=DEVICE)
        return x, x, "teacher and student are the same"

    def same_list():
        xs = [torch.randn(5, device=DEVICE), torch.randn(3, 2, device=DEVICE)]
        return xs, xs, "teacher and student are the same"

    def same_module():
        m = model()
        return m, m, "teacher and student are the same"

    def overlapping_views():  # contiguous, so the kernel path takes them: its programs would race
        buf = torch.randn(40, device=DEVICE)
        return buf[:24], buf[16:], r"teacher.* and student.* overlap in memory"

    def equal_tensor_in_lists():
        w = torch.randn(6, device=DEVICE)
        return [torch.randn(2, device=DEVICE), w], [torch.randn(2, device=DEVICE), w], \
            r"teacher tensor 1 and student tensor 1 overlap in memory"

    def student_is_the_teachers_parameters():
        m = model()
        return m, list(m.parameters()), r"teacher parameter '\d\.(weight|bias)' and student tensor \d overlap in memory"

    def modules_sharing_parameters():
        student = model()
        teacher = nn.Sequential(student[0], nn.Linear(4, 2).to(DEVICE))  # the first layer is the student's
        return teacher, student, r"teacher parameter '(0\.\w+)' and student parameter '\1' overlap in memory"

    return {f.__name__: f for f in (same_tensor, same_list, same_module, overlapping_views, equal_tensor_in_lists,
                                    student_is_the_teachers_parameters, modules_sharing_parameters)}


@pytest.mark.parametrize("case", list(_aliased_pairs()))
def test_ema_refuses_aliased_teacher_and_student(ema_path, case):
    teacher, student, message = _aliased_pairs()[case]()
    before = snapshot(teacher)
    with pytest.raises(ValueError, match=message):
        ema_path(teacher, student, 0.75)
    assert_unchanged(teacher, before)


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("case", ["same_module", "shallow_copy"])
def test_ema_flat_path_refuses_a_shared_buffer(monkeypatch, path, case):
    """Flattened modules: ``ema_update_(m, m)`` ran one launch with teacher == student (a no-op on the
    kernel, 0.75 w on the CPU); a shallow ``copy.copy`` shares the flat buffer and took the same path."""
    if path == "kernel" and not HAS_EMA_KERNEL:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    if path == "torch":
        monkeypatch.setattr(ema, "TRITON_ON_CPU", False)
    student = model()
    uamt_fast.flatten_parameters_(student)
    teacher = student if case == "same_module" else copy.copy(student)
    assert uamt_fast.flat_parameters(teacher) is uamt_fast.flat_parameters(student)
    before = snapshot(student)
    message = "the same module" if case == "same_module" else "flat parameter buffers .* overlap in memory"
    with pytest.raises(ValueError, match=message):
        uamt_fast.ema_update_(teacher, student, 0.75)
    assert_unchanged(student, before)


def test_flat_kernel_launcher_and_op_refuse_overlap():
    """The launcher and its torch.library op (what a compiled caller reaches) check it too."""
    if not HAS_EMA_KERNEL:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    from uamt_fast.kernels import ema_update as ema_kernel

    buf = torch.randn(40, device=DEVICE)
    before = buf.clone()
    for update in (ema_kernel.ema_update_flat_, torch.ops.uamt_fast.ema_update_flat_):
        with pytest.raises(ValueError, match="ema_update_flat_: teacher and student overlap in memory"):
            update(buf[:24], buf[16:], 0.75)
        with pytest.raises(ValueError, match="teacher and student overlap in memory"):
            update(buf, buf, 0.75)
    assert torch.equal(buf, before)


# ---------------------------------------------------------------------------------------------
# EMA: a teacher tensor must not overlap itself or another teacher tensor
# ---------------------------------------------------------------------------------------------


def _overlapping_teachers():
    """name -> () -> (teacher list, student list, message regex)."""
    def expanded():  # torch's own check says "overlap": mul_/foreach raised a RuntimeError
        t = torch.zeros(1, device=DEVICE).expand(10)
        return [t], [torch.ones(10, device=DEVICE)], r"teacher tensor 0 has elements that share one memory location"

    def as_strided_rows():  # rows 0-2, 2-4, 4-6: torch's check says "too hard"; torch wrote it silently
        t = torch.zeros(10, device=DEVICE).as_strided((3, 3), (2, 1))
        return [t], [torch.ones(3, 3, device=DEVICE)], r"teacher tensor 0 has elements .*strides \(2, 1\)"

    def same_tensor_twice():  # written twice, silently, on every path
        w = torch.zeros(10, device=DEVICE)
        return [w, w], [torch.ones(10, device=DEVICE)] * 2, r"teacher tensor 0 and teacher tensor 1 .*twice"

    def overlapping_slices():
        w = torch.zeros(10, device=DEVICE)
        return [w[:6], w[4:]], [torch.ones(6, device=DEVICE)] * 2, "teacher tensor 0 and teacher tensor 1"

    return {f.__name__: f for f in (expanded, as_strided_rows, same_tensor_twice, overlapping_slices)}


@pytest.mark.parametrize("case", list(_overlapping_teachers()))
def test_ema_refuses_overlapping_teacher_tensors(ema_path, case):
    teacher, student, message = _overlapping_teachers()[case]()
    before = snapshot(teacher)
    with pytest.raises(ValueError, match=message):
        ema_path(teacher, student, 0.75)
    assert_unchanged(teacher, before)


def test_ema_single_overlapping_teacher_tensor_is_named():
    t = torch.zeros(1, device=DEVICE).expand(10)
    with pytest.raises(ValueError, match=r"ema_update_: teacher has elements that share one memory location"):
        uamt_fast.ema_update_(t, torch.ones(10, device=DEVICE), 0.75)


@pytest.mark.parametrize("layout", ["halves", "interleaved_rows", "student_views_overlap"])
def test_ema_accepts_disjoint_views_and_overlapping_students(ema_path, layout):
    """The checks are not over-broad: disjoint views of one storage (including a strided layout torch's
    own check cannot decide) are legal teachers, and students (only read) may overlap each other."""
    buf = torch.randn(40, device=DEVICE)
    if layout == "halves":  # one contiguous tensor each: the flat kernel's case
        teacher, student = [buf[:20]], [buf[20:]]
    elif layout == "interleaved_rows":  # offsets {0, 2, 4} + {0, 3}: six distinct elements
        teacher, student = [buf.as_strided((2, 3), (3, 2))], [torch.randn(2, 3, device=DEVICE)]
    else:
        teacher, student = [torch.randn(8, device=DEVICE) for _ in range(2)], [buf[:8], buf[4:12]]
    expected = [t.clone().mul_(0.75).add_(s, alpha=0.25) for t, s in zip(teacher, student)]
    ema_path(teacher, student, 0.75)
    for t, e in zip(teacher, expected, strict=True):
        torch.testing.assert_close(t, e, rtol=1e-7, atol=1e-7)


def test_flat_path_checks_in_constant_time(monkeypatch):
    """The trainer's hot path (flattened modules) compares two buffers; it never sweeps the parameters."""
    calls = []
    monkeypatch.setattr(ema, "check_writes", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(ema, "TRITON_ON_CPU", False)
    student, teacher = model(), model()
    for m in (student, teacher):
        uamt_fast.flatten_parameters_(m)
    uamt_fast.ema_update_(teacher, student, 0.99)
    assert calls == []
    uamt_fast.ema_update_(list(teacher.parameters()), list(student.parameters()), 0.99)
    assert len(calls) == 1


@pytest.mark.parametrize("shape, strides, overlaps", [
    ((10,), (0,), True), ((3, 3), (2, 1), True), ((2, 2), (1, 1), True), ((2, 3), (3, 2), False),
    ((4, 5), (1, 4), False), ((3, 1, 4), (4, 100, 1), False), ((2, 3, 4), (1, 8, 2), False), ((3, 4), (3, 1), True),
])
def test_internal_overlap(shape, strides, overlaps):
    """``device.internal_overlap`` against the element offsets themselves."""
    x = torch.zeros(64).as_strided(shape, strides)
    offsets = sum(torch.arange(n).view(-1, *[1] * (len(shape) - 1 - d)) * st
                  for d, (n, st) in enumerate(zip(shape, strides)))
    assert (offsets.unique().numel() < x.numel()) == overlaps
    assert device.internal_overlap(x) == overlaps


# ---------------------------------------------------------------------------------------------
# the fused loss is differentiable once
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def poisoned_outputs(monkeypatch):
    def poison(x):
        return x.fill_(torch.iinfo(torch.int32).min if x.dtype == torch.int32 else math.nan)

    monkeypatch.setattr(class_vectors, "empty", lambda *a, **k: poison(torch.empty(*a, **k)))
    monkeypatch.setattr(class_vectors, "empty_like", lambda *a, **k: poison(torch.empty_like(*a, **k)))


def tiny_logits(device_, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64)
    teacher = torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64)
    mc = torch.randn(2, 1, 2, 3, 4, generator=g, dtype=torch.float64)
    return student.to(device_, dtype).requires_grad_(), teacher.to(device_, dtype), mc.to(device_, dtype)


def fused_loss(student, teacher, mc, via):
    if via == "public":
        return uamt_fast.uncertainty_consistency_loss(student, teacher, mc, 0.6)
    return torch.ops.uamt_fast.uncertainty_consistency_loss(student, teacher, mc, None, 0.6, True)[0]


@pytest.mark.parametrize("via", ["public", "custom_op"])
@pytest.mark.parametrize("other_term", [False, True])
def test_fused_loss_double_backward_raises(poisoned_outputs, via, other_term):
    """``create_graph=True`` used to give a gradient with no graph (once_differentiable attaches its
    error node only when the incoming gradient requires grad): a penalty on it silently dropped the
    loss's second derivative (``other_term``: the penalty still had a graph from another term)."""
    if not HAS_LOSS_KERNELS:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    student, teacher, mc = tiny_logits(DEVICE)

    def total():
        return fused_loss(student, teacher, mc, via) + (student.square().sum() if other_term else 0.0)

    (grad,) = torch.autograd.grad(total(), student, create_graph=True)
    assert grad.requires_grad
    with pytest.raises(RuntimeError, match="trying to differentiate twice"):
        grad.square().sum().backward()
    (plain,) = torch.autograd.grad(total(), student)  # the first-order gradient is the plain one, bit for bit
    assert torch.isfinite(plain).all() and torch.equal(grad.detach(), plain)


def test_reference_path_double_backward_matches_float64(monkeypatch):
    """The CPU reference math is plain autograd: its second derivative is real, and right."""
    monkeypatch.setattr(consistency, "TRITON_ON_CPU", False)
    student, teacher, mc = tiny_logits("cpu")
    v = torch.randn_like(student)
    (grad,) = torch.autograd.grad(uamt_fast.uncertainty_consistency_loss(student, teacher, mc, 0.6), student,
                                  create_graph=True)
    (hv,) = torch.autograd.grad((grad * v).sum(), student)
    s64 = student.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad(reference.uncertainty_consistency_loss(s64, teacher.double(), mc.double(), 0.6),
                                 s64, create_graph=True)
    (hv64,) = torch.autograd.grad((g64 * v.double()).sum(), s64)
    assert hv.abs().max() > 0
    torch.testing.assert_close(hv.double(), hv64, rtol=1e-4, atol=1e-7)
