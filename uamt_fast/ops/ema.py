"""Mean-teacher EMA of parameters: one fused launch over flat parameter buffers, any layout otherwise.

Typical use::

    flatten_parameters_(student)            # once, after building the models and before the optimizer
    flatten_parameters_(teacher)
    optimizer = torch.optim.SGD(student.parameters(), ...)
    ...
    ema_update_(teacher, student, decay=0.99, step=iteration)   # one kernel launch

``ema_update_`` runs eagerly (outside any compiled region); it never syncs the host.
"""
from __future__ import annotations

import math
import operator
import os
import sys
import warnings
import weakref

import torch

from uamt_fast import reference
from uamt_fast.kernels.device import TRITON_INTERPRET, check_writes, triton_can_take
from uamt_fast.ops.scalars import integer_value, real_value

try:
    from uamt_fast.kernels import ema_update as ema_kernel
except ImportError:  # no triton: the flat update falls back to torch ops
    ema_kernel = None

KERNELS_AVAILABLE = ema_kernel is not None  # Triton imported: the fused update exists
# CPU tensors run the kernel in the interpreter (TRITON_INTERPRET=1 before import, as CI does).
# Tests set this to False to force the torch-ops path.
TRITON_ON_CPU = TRITON_INTERPRET and KERNELS_AVAILABLE
ALIGN = 16  # elements (64 bytes): every parameter view starts aligned for vectorised kernels

_FLAT_ATTR = "_uamt_flat_parameters"
_DATA_PTR = torch.Tensor.data_ptr


# Parameter / submodule registrations anywhere in the process, counted by two global nn.Module
# hooks (register_parameter, and so setattr of a Parameter and load_state_dict(assign=True),
# add_module, setattr of a Module). While the count is unchanged no flattened model can have gained
# a parameter, so the per-call check need not walk the module tree. The hooks are installed while
# some flattened module's record is alive (each record holds them, and a weakref finalizer lets go
# when it is collected) and removed when none is: a process that drops its flattened models pays
# nothing at its later registrations.
_registrations = 0
_hook_handles: tuple | None = None
_hook_holders = 0


def _count_registration(*args) -> None:
    global _registrations
    _registrations += 1


def _hold_registration_hooks(record) -> None:
    """Install the hooks unless they are, and keep them while ``record`` lives."""
    global _hook_handles, _hook_holders
    if _hook_handles is None:
        _hook_handles = (torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration),
                         torch.nn.modules.module.register_module_module_registration_hook(_count_registration))
    _hook_holders += 1
    weakref.finalize(record, _release_registration_hooks).atexit = False


def _release_registration_hooks() -> None:
    global _hook_handles, _hook_holders
    _hook_holders -= 1
    if _hook_holders == 0 and _hook_handles is not None:
        for handle in _hook_handles:
            handle.remove()
        _hook_handles = None


def registration_hooks_installed() -> bool:
    """Whether the two global ``nn.Module`` registration hooks that count parameter / submodule
    registrations are installed: from the first :func:`flatten_parameters_` call for as long as some
    flattened module (or a copy of one) is alive, not otherwise."""
    return _hook_handles is not None


class _FlatRecord:
    """What flatten_parameters_ leaves on a module to find its buffer again without walking the
    module tree: per tensor the owner's ``_parameters`` dict, the attribute name, the Parameter and
    its byte offset in the buffer; and the (shape, stride) signature two models must share to be
    updated element for element (interned: equal signatures share their items, so comparing is quick)."""

    __slots__ = ("buffer", "owner_dicts", "names", "params", "byte_offsets", "signature", "_base", "_expected",
                 "_registrations_seen", "__weakref__")

    def __init__(self, buffer, owner_dicts, names, params, byte_offsets, signature, copied=False):
        self.buffer = buffer
        self.owner_dicts = tuple(owner_dicts)
        self.names, self.params = tuple(names), tuple(params)
        self.byte_offsets = tuple(byte_offsets)
        self.signature = _SIGNATURES.setdefault(signature, signature)
        self._base, self._expected = None, None
        # A copy's first check walks the module tree: registrations before it was made were not counted for it.
        self._registrations_seen = None if copied else _registrations
        _hold_registration_hooks(self)

    def __reduce__(self):
        """deepcopy / pickle (of a flattened module) rebuild the record through ``__init__``: the copy
        holds the registration hooks too while it lives."""
        return type(self), (self.buffer, self.owner_dicts, self.names, self.params, self.byte_offsets, self.signature,
                            True)

    def is_valid(self, module: torch.nn.Module) -> bool:
        """Every parameter of ``module`` is still a view of the buffer at its slot.

        One pass over the tensors, in C-speed ``map`` loops: the tensor registered now under each
        recorded name must start at its slot (a parameter re-pointed by ``.to()`` or ``p.data = ...``,
        replaced, deleted, or cloned by ``deepcopy`` does not). The module tree is walked only after
        a parameter or submodule was registered somewhere since the last check (new parameters)."""
        base = _DATA_PTR(self.buffer)
        if base != self._base:  # first call, or the buffer was re-created (an unpickled module)
            self._base, self._expected = base, [base + off for off in self.byte_offsets]
        try:
            if list(map(_DATA_PTR, map(dict.get, self.owner_dicts, self.names))) != self._expected:
                return False
        except TypeError:  # a parameter was deleted (dict.get gave None)
            return False
        if self._registrations_seen != _registrations:
            current = tuple(module.parameters())
            if len(current) != len(self.params) or not all(map(operator.is_, current, self.params)):
                return False
            self._registrations_seen = _registrations
        return True


_SIGNATURES: dict = {}


def flatten_parameters_(module: torch.nn.Module) -> torch.Tensor:
    """Give ``module`` one contiguous fp32 parameter buffer; each parameter becomes a view into it.

    The ``Parameter`` objects stay the same (their ``.data`` is re-pointed), so ``named_parameters``,
    ``state_dict``/``load_state_dict`` (which copies in place) and optimizers, created before or after,
    keep working; each view keeps its parameter's strides (channels_last weights stay channels_last)
    and starts on a 64-byte boundary. Call it once the model is built and on its device: anything that
    re-binds parameters afterwards (``.to(dtype)``, ``.to(device)``, ``load_state_dict(assign=True)``,
    ``deepcopy``, a new parameter or submodule) ends the sharing, which ``ema_update_`` detects (it
    then warns and takes the per-tensor path). To notice new parameters cheaply, the first call
    installs two global ``nn.Module`` registration hooks that only count registrations; they are removed
    once no flattened module is alive (:func:`registration_hooks_installed`). Buffers
    (batch-norm running statistics) are not flattened: ``ema_update_`` leaves them alone.

    Args:
        module: a model whose parameters are float32 and all on one device.

    Returns:
        The flat buffer, 1-D fp32 (padding between tensors holds zeros).
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"flatten_parameters_: expected an nn.Module, got {type(module).__name__}")
    owned = []  # (owner, name, param) in module.parameters() order, shared parameters once
    seen = set()
    for prefix, owner in module.named_modules():
        for name, p in owner._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            if p.dtype != torch.float32:
                raise ValueError(f"flatten_parameters_: expected float32 parameters, got {p.dtype} at "
                                 f"'{prefix + '.' if prefix else ''}{name}'")
            owned.append((owner, name, p))
    if not owned:
        raise ValueError("flatten_parameters_: the module has no parameters")
    devices = {p.device for _, _, p in owned}
    if len(devices) > 1:
        raise ValueError(f"flatten_parameters_: expected parameters on one device, got {sorted(map(str, devices))}")

    offsets, total = [], 0
    for _, _, p in owned:
        offsets.append(total)
        total += -(-p.numel() // ALIGN) * ALIGN
    buffer = torch.zeros(total, dtype=torch.float32, device=owned[0][2].device)
    signature = []
    with torch.no_grad():
        for (_, _, p), offset in zip(owned, offsets):
            # empty_like keeps a dense layout's strides (contiguous, channels_last, ...); a dense
            # layout spans exactly numel elements, so the view stays inside its slot.
            strides = torch.empty_like(p, device="meta").stride()
            view = buffer.as_strided(p.shape, strides, offset)
            view.copy_(p)
            p.data = view
            signature.append((tuple(p.shape), strides))
    owners, names, params = zip(*owned)
    record = _FlatRecord(buffer, (owner._parameters for owner in owners), names, params,
                         (off * buffer.element_size() for off in offsets), tuple(signature))
    object.__setattr__(module, _FLAT_ATTR, record)
    return buffer


def flat_parameters(module: torch.nn.Module) -> torch.Tensor | None:
    """The flat buffer of ``module`` if every parameter is still a view of it, else None."""
    record = _valid_record(module)
    return None if record is None else record.buffer


def _valid_record(module) -> _FlatRecord | None:
    record = getattr(module, _FLAT_ATTR, None)
    return record if record is not None and record.is_valid(module) else None


def _alpha(decay, step) -> float:
    decay = real_value(decay, "ema_update_: decay must be a float in [0, 1]")
    if not (math.isfinite(decay) and 0.0 <= decay <= 1.0):
        raise ValueError(f"ema_update_: decay must be in [0, 1], got {decay}")
    if step is not None:
        step = integer_value(step, "ema_update_: step must be an int >= 0 or None")
        if step < 0:
            raise ValueError(f"ema_update_: step must be >= 0, got {step}")
    return reference.ema_alpha(decay, step)


def _as_tensor_list(x, role: str) -> list[torch.Tensor]:
    if isinstance(x, torch.nn.Module):
        return list(x.parameters())
    if isinstance(x, torch.Tensor):
        return [x]
    try:
        params = list(x)
    except TypeError:
        raise TypeError(f"ema_update_: {role} must be an nn.Module, a tensor or an iterable of tensors, "
                        f"got {type(x).__name__}") from None
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"ema_update_: {role}[{i}] is a {type(p).__name__}, expected a tensor")
    return params


def _describer(teacher, student):
    """``describe(role, i)`` for :func:`check_writes`: "teacher parameter '0.weight'" for a module (names
    are looked up only when a message is written), "teacher tensor i" otherwise."""
    objects = {"written": ("teacher", teacher), "read": ("student", student)}

    def describe(role: str, i: int) -> str:
        name, obj = objects[role]
        if isinstance(obj, torch.nn.Module):
            return f"{name} parameter '{next(n for j, (n, _) in enumerate(obj.named_parameters()) if j == i)}'"
        return f"{name} tensor {i}" if not isinstance(obj, torch.Tensor) else name

    return describe


def _check_not_aliased(teacher, student) -> None:
    if teacher is student:
        kind = "module" if isinstance(teacher, torch.nn.Module) else "tensor" if isinstance(
            teacher, torch.Tensor) else type(teacher).__name__
        raise ValueError(
            f"ema_update_: teacher and student are the same {kind}; the teacher must be a separate copy of "
            "the student's parameters (e.g. teacher = copy.deepcopy(student)), else the update does nothing "
            "useful (or, per tensor, writes what it reads)"
        )


def _check_flat_buffers(teacher: torch.Tensor, student: torch.Tensor) -> None:
    """Two contiguous buffers on one device: O(1) address-range test."""
    t0, s0 = _DATA_PTR(teacher), _DATA_PTR(student)
    if t0 < s0 + student.nbytes and s0 < t0 + teacher.nbytes:
        raise ValueError(
            "ema_update_: the teacher's and the student's flat parameter buffers (flatten_parameters_) overlap "
            "in memory: the two modules share parameters (a shallow copy.copy of the student, or modules "
            "built around the same Parameter objects?). The teacher must own its parameters: "
            "teacher = copy.deepcopy(student)"
        )


def uses_kernel(x: torch.Tensor) -> bool:
    """Whether the flat update takes the Triton kernel for ``x``'s device: a GPU Triton runs, or the CPU
    while ``TRITON_ON_CPU``; else torch ops."""
    return KERNELS_AVAILABLE and triton_can_take(x, TRITON_ON_CPU)


def update_flat_(teacher: torch.Tensor, student: torch.Tensor, alpha: float) -> None:
    """``teacher <- alpha teacher + (1 - alpha) student`` over two contiguous buffers of one device, checked
    by the caller: the fused kernel (``uamt_fast.kernels.ema_update``) where :func:`uses_kernel`, else
    ``mul_`` / ``add_``. Every flat path of :func:`ema_update_` ends here, once per call."""
    if uses_kernel(teacher):
        ema_kernel.ema_update_flat_(teacher, student, alpha)
    else:
        with torch.no_grad():
            teacher.mul_(alpha).add_(student, alpha=1.0 - alpha)


def ema_update_(teacher, student, decay: float, step: int | None = None) -> None:
    """Mean-teacher update ``theta' <- alpha theta' + (1 - alpha) theta`` of parameters, in place.

    ``alpha = decay``, or ``min(1 - 1/(step + 1), decay)`` when ``step`` is given (UA-MT's warm-up).
    Only parameters move: buffers, such as the batch-norm running statistics, are the teacher's
    own (the teacher's BN layers keep the statistics of what the teacher saw, as in the released
    code). Arithmetic is fp32. Runs eagerly: a ``torch.compile``'d caller runs it outside its graph.

    Paths, fastest first:

    - both modules flattened with :func:`flatten_parameters_` (and still sharing their buffers, with
      identical parameter shapes and strides): one fused Triton launch over the flat buffers;
    - two single tensors (e.g. the flat buffers themselves), contiguous, same shape and dtype: the same launch;
    - otherwise ``torch._foreach_lerp_`` over the parameter lists (a few multi-tensor launches).

    Every path (and :func:`uamt_fast.reference.ema_update_`) refuses aliasing with a ``ValueError``
    naming the tensors: teacher and student the same module or tensor, any teacher tensor sharing
    memory with any student tensor or with another teacher tensor, and a teacher tensor whose elements
    share memory locations (``expand()``, overlapping ``as_strided``). The checks read data pointers,
    shapes and strides only: O(1) on the flat path, a few microseconds per tensor on the others.

    Args:
        teacher: module, tensor, or iterable of tensors; updated in place.
        student: the same kind of thing with matching shapes.
        decay: a real number in [0, 1] (int, float, NumPy scalar, 0-dim CPU tensor; not a bool).
        step: global step for the warm-up (an integer of any integer type, >= 0), or None.

    Raises:
        ValueError: bad ``decay``/``step``, mismatched parameter lists, or aliased teacher and student.
    """
    alpha = _alpha(decay, step)
    _check_not_aliased(teacher, student)
    if isinstance(teacher, torch.nn.Module) and isinstance(student, torch.nn.Module):
        t_rec, s_rec = _valid_record(teacher), _valid_record(student)
        if t_rec is not None and s_rec is not None and t_rec.signature == s_rec.signature \
                and t_rec.buffer.device == s_rec.buffer.device:
            _check_flat_buffers(t_rec.buffer, s_rec.buffer)
            update_flat_(t_rec.buffer, s_rec.buffer, alpha)
            return
        for role, module, rec in (("teacher", teacher, t_rec), ("student", student, s_rec)):
            if rec is None and hasattr(module, _FLAT_ATTR):
                warnings.warn(
                    f"ema_update_: the {role}'s parameters no longer share the buffer of flatten_parameters_ "
                    "(re-bound by .to(), load_state_dict(assign=True) or deepcopy?); using the per-tensor "
                    "path. Call flatten_parameters_ again to get the single-launch update back.",
                    stacklevel=_caller_stacklevel(),
                )

    t_params, s_params = _as_tensor_list(teacher, "teacher"), _as_tensor_list(student, "student")
    if len(t_params) != len(s_params):
        raise ValueError(
            f"ema_update_: teacher has {len(t_params)} parameter tensors, student has {len(s_params)}"
        )
    for i, (t, s) in enumerate(zip(t_params, s_params)):
        if t.shape != s.shape:
            raise ValueError(f"ema_update_: parameter {i}: teacher shape {tuple(t.shape)} != student "
                             f"shape {tuple(s.shape)}")
        if not (t.is_floating_point() and t.dtype == s.dtype):
            raise ValueError(f"ema_update_: parameter {i}: expected one float dtype, got teacher {t.dtype} "
                             f"and student {s.dtype}")
        if t.device != s.device:
            raise ValueError(f"ema_update_: parameter {i}: teacher on {t.device}, student on {s.device}")
    if not t_params:
        return
    check_writes("ema_update_", t_params, s_params, _describer(teacher, student))
    if len(t_params) == 1 and t_params[0].is_contiguous() and s_params[0].is_contiguous():
        update_flat_(t_params[0].detach(), s_params[0].detach(), alpha)
        return
    with torch.no_grad():
        torch._foreach_lerp_([t.detach() for t in t_params], [s.detach() for s in s_params], 1.0 - alpha)


# Keep torch.compile from tracing the update (it reads data pointers and launches Triton itself):
# a compiled caller runs it eagerly, outside its graph. torch._disable_dynamo is torch's own
# lazy form of torch.compiler.disable: it imports torch._dynamo (~1.5 s) at the first call, not
# when uamt_fast is imported.
_eager_update = ema_update_
ema_update_ = (torch._disable_dynamo if hasattr(torch, "_disable_dynamo") else torch.compiler.disable)(_eager_update)


def _caller_stacklevel() -> int:
    """The ``warnings.warn`` stacklevel of the first frame outside this file and torch: how many
    wrapper frames torch puts between the caller and ``_eager_update`` differs between versions."""
    skip = (__file__, os.path.dirname(torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


__all__ = ["flatten_parameters_", "flat_parameters", "ema_update_", "registration_hooks_installed", "update_flat_",
           "uses_kernel"]
