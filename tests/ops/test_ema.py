"""EMA teacher update: the flat single-launch path and the per-tensor path vs the released loop.

On a CPU-only machine the flat path runs the Triton kernel through the interpreter (conftest sets
TRITON_INTERPRET=1). Parameters are model-initialised (|w| < 1), where one fp32 ulp is < 1.2e-7.
"""
from __future__ import annotations

import copy
import io
import math
import os
import subprocess
import sys
import textwrap

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import uamt_fast
from uamt_fast.ops import ema
from uamt_fast import reference
from uamt_fast.kernels import ema_update as ema_kernel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = 1e-7
ROOT = Path(__file__).resolve().parents[2]


def small_model() -> nn.Module:
    """Conv3d (channels_last weight), batch norm (buffers), transposed conv, linear: 8 tensors, 390 params."""
    model = nn.Sequential(
        nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4), nn.ReLU(), nn.ConvTranspose3d(4, 3, 2, stride=2), nn.Flatten(2),
        nn.Linear(8, 7),
    ).to(DEVICE)
    model[0].weight.data = model[0].weight.data.to(memory_format=torch.channels_last_3d)
    return model


def twins():
    """(student, teacher, reference teacher): independently initialised student and teacher, with
    different batch-norm buffers, and an unflattened copy of the teacher for the reference loop."""
    student, teacher = small_model(), small_model()
    with torch.no_grad():
        teacher[1].running_mean.add_(1.0)
    return student, teacher, copy.deepcopy(teacher)


@pytest.fixture
def launches(monkeypatch):
    """Counts flat-kernel launches and foreach calls made by ema_update_."""
    counts = {"flat": 0, "foreach": 0}
    flat_kernel, foreach = ema.update_flat_, torch._foreach_lerp_

    def counting_flat(*args):
        counts["flat"] += 1
        flat_kernel(*args)

    def counting_foreach(*args):
        counts["foreach"] += 1
        foreach(*args)

    monkeypatch.setattr(ema, "update_flat_", counting_flat)
    monkeypatch.setattr(torch, "_foreach_lerp_", counting_foreach)
    return counts


def assert_params_close(a: nn.Module, b: nn.Module, atol=ATOL):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decay, step", [(0.99, None), (0.99, 3), (0.999, 10_000), (0.5, None)])
def test_flat_path_is_one_launch_and_equals_the_reference_loop(decay, step, launches):
    student, teacher, teacher_ref = twins()
    uamt_fast.flatten_parameters_(student)
    uamt_fast.flatten_parameters_(teacher)
    for _ in range(3):
        uamt_fast.ema_update_(teacher, student, decay, step)
        reference.ema_update_(teacher_ref, student, decay, step)
        with torch.no_grad():  # the student moves between updates
            for p in student.parameters():
                p.add_(torch.randn_like(p) * 0.01)
    assert launches == {"flat": 3, "foreach": 0}
    assert_params_close(teacher, teacher_ref)
    for name, buf in teacher.named_buffers():  # batch-norm buffers are the teacher's own
        assert torch.equal(buf, dict(teacher_ref.named_buffers())[name]), name


def test_list_path_equals_the_reference_loop(launches):
    student, teacher, teacher_ref = twins()
    t_params = list(teacher.parameters())
    t_params[-2] = t_params[-2].T  # non-contiguous tensors are fine on this path
    s_params = list(student.parameters())
    s_params[-2] = s_params[-2].T
    uamt_fast.ema_update_(t_params, s_params, 0.99, step=7)
    reference.ema_update_(teacher_ref, student, 0.99, step=7)
    assert launches == {"flat": 0, "foreach": 1}
    assert_params_close(teacher, teacher_ref)


def test_unflattened_modules_use_the_list_path():
    student, teacher, teacher_ref = twins()
    uamt_fast.ema_update_(teacher, student, 0.9)
    reference.ema_update_(teacher_ref, student, 0.9)
    assert_params_close(teacher, teacher_ref)


def test_flat_kernel_on_odd_sized_buffers_and_single_tensors(launches):
    n = 3 * ema_kernel.BLOCK + 7  # several programs, ragged tail
    teacher, student = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    expected = teacher.clone().mul_(0.75).add_(student, alpha=0.25)
    uamt_fast.ema_update_(teacher, student, 0.75)
    assert launches == {"flat": 1, "foreach": 0}
    torch.testing.assert_close(teacher, expected, atol=ATOL, rtol=1e-7)
    # bf16 buffers: arithmetic in fp32, one conversion at the store (within 1 bf16 ulp: the GPU
    # rounds to nearest, the Triton interpreter truncates)
    t16, s16 = torch.randn(n, device=DEVICE).bfloat16(), torch.randn(n, device=DEVICE).bfloat16()
    exact = t16.double() * 0.75 + s16.double() * 0.25
    uamt_fast.ema_update_(t16, s16, 0.75)
    assert ((t16.double() - exact).abs() <= 2**-7 * exact.abs()).all()


def test_warm_up_alpha():
    student, teacher, _ = twins()
    uamt_fast.flatten_parameters_(student)
    uamt_fast.flatten_parameters_(teacher)
    uamt_fast.ema_update_(teacher, student, 0.99, step=0)  # alpha = min(1 - 1/1, 0.99) = 0: a copy
    for p, q in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(p, q)
    before = [p.clone() for p in teacher.parameters()]
    s_new = [p.detach() + 1.0 for p in student.parameters()]
    with torch.no_grad():
        for p, q in zip(student.parameters(), s_new):
            p.copy_(q)
    uamt_fast.ema_update_(teacher, student, 0.99, step=3)  # alpha = min(0.75, 0.99) = 0.75
    for p, b, s in zip(teacher.parameters(), before, s_new):
        torch.testing.assert_close(p, 0.75 * b + 0.25 * s, atol=ATOL, rtol=0)
    assert reference.ema_alpha(0.99, 3) == 0.75 and reference.ema_alpha(0.99, 10_000) == 0.99


def test_vnet_flat_update():
    """The real architecture (narrow, to keep the interpreter quick): 118 tensors, one launch."""
    student = uamt_fast.VNet(n_filters=2).to(DEVICE)
    teacher = uamt_fast.VNet(n_filters=2).to(DEVICE)
    teacher_ref = copy.deepcopy(teacher)
    flat_t = uamt_fast.flatten_parameters_(teacher)
    uamt_fast.flatten_parameters_(student)
    assert len(list(teacher.parameters())) == 118
    assert flat_t.numel() >= sum(p.numel() for p in teacher.parameters())
    uamt_fast.ema_update_(teacher, student, 0.99, step=100)
    reference.ema_update_(teacher_ref, student, 0.99, step=100)
    assert_params_close(teacher, teacher_ref)


# ---------------------------------------------------------------------------------------------
# the flat buffer keeps the model working
# ---------------------------------------------------------------------------------------------


def test_flatten_keeps_values_names_layouts_and_views():
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    strides = {k: p.stride() for k, p in model.named_parameters()}
    ids = {k: id(p) for k, p in model.named_parameters()}
    flat = uamt_fast.flatten_parameters_(model)
    assert flat.dtype == torch.float32 and flat.dim() == 1 and flat.is_contiguous()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, p in model.named_parameters():
        assert id(p) == ids[k] and p.stride() == strides[k]  # same Parameter objects, same layout
        assert p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
        assert (p.data_ptr() - flat.data_ptr()) % (ema.ALIGN * 4) == 0
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert uamt_fast.flat_parameters(model) is flat
    with torch.no_grad():  # writes through the parameters land in the buffer
        model[-1].bias.fill_(3.0)
    assert (flat == 3.0).sum() == model[-1].bias.numel()


def test_views_stay_views_after_updates_and_optimizer_steps():
    student, teacher, _ = twins()
    twin = copy.deepcopy(student)  # unflattened student, stepped by its own optimizer
    flat_s = uamt_fast.flatten_parameters_(student)
    uamt_fast.flatten_parameters_(teacher)
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 2, 3, 3, 3, device=DEVICE)
    for step in range(2):
        for model, optimizer in ((student, opt), (twin, opt_twin)):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
        uamt_fast.ema_update_(teacher, student, 0.99, step=step)
    assert_params_close(student, twin, atol=1e-6)  # the optimizer stepped the flat parameters
    assert uamt_fast.flat_parameters(student) is flat_s
    assert uamt_fast.flat_parameters(teacher) is not None
    before = flat_s.clone()
    with torch.no_grad():
        next(student.parameters()).add_(1.0)
    assert not torch.equal(before, flat_s)


def test_state_dict_round_trip():
    student, teacher, _ = twins()
    flat = uamt_fast.flatten_parameters_(teacher)
    uamt_fast.flatten_parameters_(student)
    uamt_fast.ema_update_(teacher, student, 0.9)
    saved = io.BytesIO()
    torch.save(teacher.state_dict(), saved)
    state = torch.load(io.BytesIO(saved.getvalue()), weights_only=True)

    plain = small_model()  # into an ordinary model
    plain.load_state_dict(state)
    for k, v in teacher.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k

    other = small_model()  # into a flattened model: values copied in place, views kept
    other_flat = uamt_fast.flatten_parameters_(other)
    other.load_state_dict(state)
    assert uamt_fast.flat_parameters(other) is other_flat
    assert torch.equal(other_flat, flat)


def test_rebound_parameters_are_detected_and_updated_correctly(launches):
    student, teacher, teacher_ref = twins()
    uamt_fast.flatten_parameters_(student)
    uamt_fast.flatten_parameters_(teacher)
    copied = copy.deepcopy(teacher)  # deepcopy clones each parameter: the views are gone
    assert uamt_fast.flat_parameters(copied) is None
    with pytest.warns(UserWarning, match="no longer share the buffer"):
        uamt_fast.ema_update_(copied, student, 0.9)
    reference.ema_update_(teacher_ref, student, 0.9)
    assert launches == {"flat": 0, "foreach": 1}
    assert_params_close(copied, teacher_ref)

    replaced = copy.deepcopy(student)  # load_state_dict(assign=True) swaps the Parameter objects
    uamt_fast.flatten_parameters_(replaced)
    replaced.load_state_dict(small_model().state_dict(), assign=True)
    assert uamt_fast.flat_parameters(replaced) is None


def test_parameters_added_after_flattening_are_not_skipped():
    student, teacher, _ = twins()
    extra_head = nn.Linear(7, 2).to(DEVICE)  # built before flattening, attached after
    for model in (student, teacher):
        uamt_fast.flatten_parameters_(model)
        assert uamt_fast.flat_parameters(model) is not None
    teacher.add_module("head", copy.deepcopy(extra_head))
    student.add_module("head", extra_head)
    assert uamt_fast.flat_parameters(teacher) is None
    with pytest.warns(UserWarning, match="no longer share the buffer"):
        uamt_fast.ema_update_(teacher, student, 0.0)  # alpha 0: the teacher becomes the student
    for p, q in zip(teacher.parameters(), student.parameters(), strict=True):
        assert torch.equal(p, q)

    other = small_model()
    uamt_fast.flatten_parameters_(other)
    other[-1].scale = nn.Parameter(torch.ones(1, device=DEVICE))  # a new parameter on a submodule
    assert uamt_fast.flat_parameters(other) is None


def test_registration_hooks_live_only_while_a_flattened_module_does():
    """flatten_parameters_ counts parameter / submodule registrations with two process-wide nn.Module hooks;
    they are installed while some flattened module (or a deepcopy / unpickled copy of one) is alive, removed
    when none is, and installed again by the next flatten_parameters_. In a fresh process, where no other
    test's models are alive."""
    code = textwrap.dedent("""
        import copy, gc, io
        import torch, torch.nn as nn
        import uamt_fast
        from uamt_fast.ops import ema
        installed = ema.registration_hooks_installed
        assert not installed()  # importing installs nothing
        a, b = nn.Linear(3, 2), nn.Linear(3, 2)
        uamt_fast.flatten_parameters_(a)
        uamt_fast.flatten_parameters_(b)
        assert installed()
        del a
        gc.collect()
        assert installed()  # b is still flattened
        uamt_fast.flatten_parameters_(b)  # flattened again: the old record goes, the new one holds them
        assert installed()
        c = copy.deepcopy(b)
        saved = io.BytesIO()
        torch.save(b, saved)
        del b
        gc.collect()
        assert installed()  # the deepcopy holds them
        del c
        gc.collect()
        assert not installed()  # no flattened module alive: removed
        saved.seek(0)
        d = torch.load(saved, weights_only=False)
        assert installed() and uamt_fast.flat_parameters(d) is not None  # the unpickled copy holds them
        del d
        gc.collect()
        assert not installed()
        e = nn.Sequential(nn.Linear(3, 2))
        uamt_fast.flatten_parameters_(e)  # installed again: registrations are counted again
        assert installed() and uamt_fast.flat_parameters(e) is not None
        e[0].extra = nn.Parameter(torch.ones(1))
        saved = io.BytesIO()
        torch.save(e, saved)
        assert uamt_fast.flat_parameters(e) is None
        saved.seek(0)
        assert uamt_fast.flat_parameters(torch.load(saved, weights_only=False)) is None  # a copy checks afresh
        print("ok")
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.mark.parametrize("rebind", ["to_double", "data", "dict", "delete", "submodule"])
def test_every_way_of_rebinding_a_parameter_is_detected(rebind, launches):
    """The per-call check reads the tensor registered now under each recorded name: re-pointed
    (``.to()``, ``p.data = ...``), replaced behind ``setattr`` (``_parameters[name] = ...``),
    deleted, or a whole submodule swapped."""
    student, teacher, teacher_ref = twins()
    for model in (student, teacher):
        uamt_fast.flatten_parameters_(model)
    if rebind == "to_double":
        for model in (student, teacher, teacher_ref):
            model.double()
    elif rebind == "data":
        teacher[3].bias.data = teacher[3].bias.data.clone()
    elif rebind == "dict":
        teacher[3]._parameters["bias"] = nn.Parameter(teacher[3].bias.detach().clone())
    elif rebind == "delete":
        del teacher[3].bias
        assert uamt_fast.flat_parameters(teacher) is None
        return
    else:
        teacher[3] = copy.deepcopy(teacher[3])
    assert uamt_fast.flat_parameters(teacher) is None
    with pytest.warns(UserWarning, match="teacher's parameters no longer share the buffer") as record:
        uamt_fast.ema_update_(teacher, student, 0.9)
    assert record[0].filename == __file__  # the warning names the caller's line
    reference.ema_update_(teacher_ref, student, 0.9)
    assert launches == {"flat": 0, "foreach": 1}
    assert_params_close(teacher, teacher_ref)


def test_compiled_caller_runs_the_update_eagerly():
    """torch.compile does not trace ema_update_ (data pointers, a Triton launch): it runs outside the graph."""
    student, teacher, teacher_ref = twins()
    for model in (student, teacher):
        uamt_fast.flatten_parameters_(model)

    @torch.compile(backend="eager")
    def step(x):
        y = x * 2
        uamt_fast.ema_update_(teacher, student, 0.9, step=5)
        return y + 1

    assert torch.equal(step(torch.ones(3)), torch.full((3,), 3.0))
    reference.ema_update_(teacher_ref, student, 0.9, step=5)
    assert_params_close(teacher, teacher_ref)
    assert uamt_fast.flat_parameters(teacher) is not None


def test_custom_op_updates_flat_buffers():
    teacher, student = torch.randn(300, device=DEVICE), torch.randn(300, device=DEVICE)
    expected = teacher.clone().mul_(0.9).add_(student, alpha=0.1)
    torch.ops.uamt_fast.ema_update_flat_(teacher, student, 0.9)
    torch.testing.assert_close(teacher, expected, atol=ATOL, rtol=1e-7)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "decay, step, error, message",
    [
        (1.5, None, ValueError, r"decay must be in \[0, 1\]"),
        (-0.1, None, ValueError, r"decay must be in \[0, 1\]"),
        (math.nan, None, ValueError, r"decay must be in \[0, 1\]"),
        (True, None, TypeError, "decay must be a float"),
        ("0.99", None, TypeError, "decay must be a float"),
        (0.99, -1, ValueError, "step must be >= 0"),
        (0.99, 2.0, TypeError, "step must be an int"),
        (np.bool_(True), None, TypeError, "decay must be a float in \\[0, 1\\], got bool"),
        (torch.tensor([0.9, 0.9]), None, TypeError, r"got a tensor of shape \(2,\)"),
        (0.99, True, TypeError, "step must be an int >= 0 or None, got bool"),
        (0.99, np.float64(3.0), TypeError, "step must be an int"),
        (0.99, torch.tensor(3.0), TypeError, "step must be an int"),
        (0.99, np.int64(-1), ValueError, "step must be >= 0"),
    ],
)
def test_bad_decay_and_step(decay, step, error, message):
    student, teacher, _ = twins()
    with pytest.raises(error, match=message):
        uamt_fast.ema_update_(teacher, student, decay, step)


@pytest.mark.parametrize("decay, step", [(np.float32(0.75), np.int64(3)), (np.float64(0.75), np.int32(3)),
                                         (torch.tensor(0.75), torch.tensor(3)), (Fraction(3, 4), 3), (1, None)])
def test_decay_and_step_of_any_numeric_type(decay, step):
    """Real numbers of any type, as the trainer's numpy / tensor bookkeeping hands them over."""
    student, teacher, _ = twins()
    expected = copy.deepcopy(teacher)
    uamt_fast.ema_update_(expected, student, float(decay), None if step is None else int(step))
    uamt_fast.ema_update_(teacher, student, decay, step)
    assert_params_close(teacher, expected, atol=0)


def test_bad_parameter_lists():
    student, teacher, _ = twins()
    s, t = list(student.parameters()), list(teacher.parameters())
    with pytest.raises(ValueError, match="teacher has 7 parameter tensors, student has 8"):
        uamt_fast.ema_update_(t[:-1], s, 0.9)
    with pytest.raises(ValueError, match=r"parameter 0: teacher shape \(4, 2, 3, 3, 3\) != student shape"):
        uamt_fast.ema_update_([t[0]], [s[1]], 0.9)
    with pytest.raises(ValueError, match="parameter 0: expected one float dtype"):
        uamt_fast.ema_update_([t[0].detach().double()], [s[0]], 0.9)
    with pytest.raises(ValueError, match="parameter 0: expected one float dtype"):
        uamt_fast.ema_update_([torch.zeros(3, dtype=torch.long)], [torch.zeros(3, dtype=torch.long)], 0.9)
    with pytest.raises(TypeError, match="student must be an nn.Module, a tensor or an iterable"):
        uamt_fast.ema_update_(teacher, 3, 0.9)
    with pytest.raises(TypeError, match=r"student\[1\] is a str"):
        uamt_fast.ema_update_(t[:2], [s[0], "w"], 0.9)
    with pytest.raises(ValueError, match="teacher has"):  # modules of different architectures
        uamt_fast.ema_update_(teacher, nn.Linear(2, 2).to(DEVICE), 0.9)


def test_bad_flatten():
    with pytest.raises(TypeError, match="expected an nn.Module"):
        uamt_fast.flatten_parameters_([torch.zeros(3)])
    with pytest.raises(ValueError, match="expected float32 parameters, got torch.float64 at '0.weight'"):
        uamt_fast.flatten_parameters_(nn.Sequential(nn.Linear(2, 2)).double())
    with pytest.raises(ValueError, match="no parameters"):
        uamt_fast.flatten_parameters_(nn.ReLU())
