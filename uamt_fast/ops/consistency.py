"""Public UA-MT consistency ops: input checks and device dispatch in front of the fused kernels.

- CUDA / ROCm tensors on a GPU Triton runs (``uamt_fast.kernels.device.gpu_runs_triton``: NVIDIA from
  compute capability 7.0, AMD CDNA2-4 and RDNA3-4) run the Triton kernels through
  ``uamt_fast.kernels.uncertainty_loss.fused_uncertainty_loss`` and
  ``uamt_fast.kernels.predictive_entropy.fused_predictive_entropy`` (each kernel file holds its op's whole
  wiring: the ``torch.ops.uamt_fast.*`` op ``torch.compile(fullgraph=True)`` keeps in its graph, and the
  eager path that calls the same launchers without the dispatcher).
- CPU tensors run the same kernels through the Triton interpreter when ``TRITON_INTERPRET=1`` was
  set before import (how CI tests them), else the reference math of ``uamt_fast.reference`` in
  fp32. Other devices use the reference math, and so does an older GPU (with one warning per device).
  ``uses_kernels(x)`` says which path a tensor takes.

Everything is checked before any launch; bad input raises ``TypeError`` / ``ValueError`` naming
the argument, what was expected and what came.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from uamt_fast import reference
from uamt_fast.kernels.device import TRITON_INTERPRET, triton_can_take
from uamt_fast.ops.scalars import integer_value, real_value

try:
    from uamt_fast.kernels import predictive_entropy as entropy_kernels
    from uamt_fast.kernels import uncertainty_loss as loss_kernels
except ImportError:  # no triton (e.g. macOS): every tensor takes the reference math
    entropy_kernels = loss_kernels = None

KERNELS_AVAILABLE = loss_kernels is not None  # Triton imported: the fused kernels exist
# CPU tensors run the kernels in the interpreter (TRITON_INTERPRET=1 before import, as CI does).
# Tests set this to False to force the reference path.
TRITON_ON_CPU = TRITON_INTERPRET and KERNELS_AVAILABLE

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ConsistencyStats(NamedTuple):
    """What a trainer logs about the uncertainty mask; each a 0-dim fp32 tensor on the logits' device
    (reading them with ``.item()`` is the caller's host sync, never ours).

    Attributes:
        mask_fraction: fraction of the B * prod(spatial) voxels with uncertainty < threshold.
        uncertainty_mean: mean predictive entropy over all voxels.
        uncertainty_min: its minimum.
        uncertainty_max: its maximum.
    """

    mask_fraction: torch.Tensor
    uncertainty_mean: torch.Tensor
    uncertainty_min: torch.Tensor
    uncertainty_max: torch.Tensor


def uses_kernels(x: torch.Tensor) -> bool:
    """Whether the ops take the fused kernels for ``x``'s device: a GPU Triton runs, or the CPU while
    ``TRITON_ON_CPU``; else the reference math of ``uamt_fast.reference``."""
    return KERNELS_AVAILABLE and triton_can_take(x, TRITON_ON_CPU)


def _check_float_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float16/bfloat16/float32/float64 tensor of logits, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(x.shape)}")


def _check_mc_logits(mc_logits, spatial_dims) -> None:
    """(T, B, C, *spatial): 1 to 3 spatial dims, C >= 2. Only rank 6 speaks for itself; rank 4 and 5
    read just as well as passes stacked in the batch and never unflattened, so the caller says which."""
    _check_float_tensor("mc_logits", mc_logits)
    shape, rank = tuple(mc_logits.shape), mc_logits.dim()
    if not 4 <= rank <= 6:
        raise ValueError(
            f"mc_logits: expected (T, B, C, *spatial) with 1 to 3 spatial dims (rank 4 to 6), got shape {shape}"
        )
    if shape[2] < 2:
        raise ValueError(f"mc_logits: expected C >= 2 classes at dim 2, got shape {shape}")
    if spatial_dims is None:
        if rank < 6:
            stacked = ("(T*B, C, H, W) 2D", "(T*B, C, D, H, W) 3D")[rank - 4]
            raise ValueError(
                f"mc_logits: shape {shape} is ambiguous: (T, B, C, *spatial) with {rank - 3} spatial "
                f"dim{'s' if rank > 4 else ''}, or {stacked} passes stacked in the batch. Say which with "
                f"spatial_dims={rank - 3}; stacked passes must first become (T, B, C, *spatial), e.g. "
                "mc_logits.unflatten(0, (T, B))"
            )
        return
    dims = integer_value(spatial_dims, "spatial_dims: expected 1, 2 or 3")
    if dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims: expected 1, 2 or 3, got {dims}")
    if rank != 3 + dims:
        raise ValueError(
            f"mc_logits: expected (T, B, C, *spatial) with spatial_dims={dims} (rank {3 + dims}), got shape "
            f"{shape}; stacked passes (T*B, C, *spatial) must first be unflattened: mc_logits.unflatten(0, (T, B))"
        )


def _check_logits(student_logits, teacher_logits, mc_logits) -> None:
    _check_float_tensor("student_logits", student_logits)
    _check_float_tensor("teacher_logits", teacher_logits)
    _check_float_tensor("mc_logits", mc_logits)
    shape = tuple(student_logits.shape)
    if not 3 <= len(shape) <= 5:
        raise ValueError(
            f"student_logits: expected (B, C, *spatial) with 1 to 3 spatial dims (rank 3 to 5), got shape {shape}"
        )
    if shape[1] < 2:
        raise ValueError(f"student_logits: expected C >= 2 classes at dim 1, got shape {shape}")
    if tuple(teacher_logits.shape) != shape:
        raise ValueError(
            f"teacher_logits: expected the student's shape {shape}, got {tuple(teacher_logits.shape)}"
        )
    if mc_logits.dim() != len(shape) + 1 or tuple(mc_logits.shape[1:]) != shape:
        raise ValueError(
            f"mc_logits: expected (T, *student shape) = (T, {', '.join(map(str, shape))}), "
            f"got {tuple(mc_logits.shape)}"
        )
    devices = {x.device for x in (student_logits, teacher_logits, mc_logits)}
    if len(devices) > 1:
        raise ValueError(
            "student_logits, teacher_logits, mc_logits: expected one device, got "
            f"{student_logits.device}, {teacher_logits.device}, {mc_logits.device}"
        )


def _check_threshold_value(value: float) -> None:
    if not 0.0 < value < math.inf:  # also rejects NaN; plain comparisons stay traceable by torch.compile
        raise ValueError(f"threshold: expected a finite positive entropy threshold, got {value}")


def _threshold_args(threshold, device: torch.device) -> tuple[torch.Tensor | None, float]:
    """``(tensor or None, float)`` for the kernel.

    A tensor on the logits' device is passed by pointer: no host sync, and so a CUDA tensor is not
    range-checked (a CPU one is, outside torch.compile tracing). A real number of any numeric type
    (int, float, NumPy scalar) is checked and passed by value; a CPU tensor with CUDA logits is read
    (no device sync) and passed by value.
    """
    if not isinstance(threshold, torch.Tensor):
        value = real_value(threshold, "threshold: expected a float (any real number type) or a 0-dim float tensor")
        _check_threshold_value(value)
        if torch.compiler.is_compiling():
            # A float op argument would be specialised: one recompile per value of the ramped-up
            # threshold. As a traced 0-dim tensor it is a graph input instead.
            return torch.full((), value, dtype=torch.float32, device=device), 0.0
        return None, value
    if threshold.dim() != 0:
        raise ValueError(f"threshold: expected a 0-dim tensor, got shape {tuple(threshold.shape)}")
    if not threshold.is_floating_point():
        raise TypeError(f"threshold: expected a floating-point tensor, got {threshold.dtype}")
    if threshold.is_cpu and not torch.compiler.is_compiling():
        _check_threshold_value(float(threshold))
    if threshold.device == device:
        return threshold.detach(), 0.0
    if not threshold.is_cpu:
        raise ValueError(f"threshold: expected a tensor on {device} or on the CPU, got one on {threshold.device}")
    return None, float(threshold)


def uncertainty_consistency_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mc_logits: torch.Tensor,
    threshold,
    *,
    return_stats: bool = False,
):
    """UA-MT uncertainty-masked consistency loss (Yu et al. 2019, Eq. 3, normalised as released)::

        u = -sum_c mu_c ln(mu_c + 1e-6),  mu = mean_t softmax(mc_logits[t])      (uncertainty)
        loss = sum_v [u_v < H] sum_c (softmax(s)_vc - softmax(t)_vc)^2 / (C * sum_v [u_v < H] + 1e-16)

    One fused pass on GPU (every input read once, arithmetic in fp32 whatever the input dtypes,
    deterministic); the gradient reaches ``student_logits`` only.

    Args:
        student_logits: (B, C, *spatial), 1 to 3 spatial dims, C >= 2; fp32/bf16/fp16/fp64, any
            strides (a channels_last_3d tensor is read in place).
        teacher_logits: (B, C, *spatial), the target (no gradient).
        mc_logits: (T, B, C, *spatial), T >= 1 stochastic teacher passes (no gradient).
        threshold: H > 0, a real number (int, float, NumPy scalar; not a bool) or a 0-dim float
            tensor. A number or a CPU tensor is checked (finite, positive); a CUDA tensor is used
            as is, since checking it would sync the host.
            Inside ``torch.compile`` pass a float or a tensor on the logits' device (a float
            becomes a graph input, so the ramped-up threshold does not recompile).
        return_stats: also return a :class:`ConsistencyStats` of device tensors.

    Returns:
        The 0-dim fp32 loss, or ``(loss, stats)``. An empty mask gives exactly 0 (and a zero
        gradient); NaN or Inf in any of the logits gives NaN (loss, gradient and uncertainty stats).

    Differentiable once on the fused path: with ``create_graph=True`` the student gradient comes with
    a graph whose backward raises ``RuntimeError`` ("trying to differentiate twice"), never a silent
    graph-less gradient. The reference path (CPU tensors without the interpreter, other devices) is
    plain autograd and supports double backward.
    """
    _check_logits(student_logits, teacher_logits, mc_logits)
    thr_tensor, thr_value = _threshold_args(threshold, student_logits.device)
    if uses_kernels(student_logits):
        loss, stats = loss_kernels.fused_uncertainty_loss(student_logits, teacher_logits, mc_logits, thr_tensor,
                                                          thr_value)
    else:
        loss, stats = reference.uncertainty_consistency_loss_with_stats(
            student_logits, teacher_logits, mc_logits, thr_tensor if thr_tensor is not None else thr_value
        )
    if not return_stats:
        return loss
    return loss, ConsistencyStats(stats[0], stats[1], stats[2], stats[3])


def predictive_entropy(mc_logits: torch.Tensor, *, spatial_dims: int | None = None) -> torch.Tensor:
    """Uncertainty map of T stochastic passes: ``-sum_c mu_c ln(mu_c + 1e-6)``, ``mu = mean_t softmax``.

    Args:
        mc_logits: (T, B, C, *spatial) logits, C >= 2, any float dtype and strides. Passes that were
            run stacked in one batch, (T*B, C, *spatial), must first be unflattened:
            ``mc_logits.unflatten(0, (T, B))``.
        spatial_dims: 1, 2 or 3, the number of spatial dims. Required for rank 4 and 5 (2D images are
            (T, B, C, H, W), rank 5, which is also the rank of stacked 3D passes (T*B, C, D, H, W));
            rank 6, (T, B, C, D, H, W), is read as 3D without it.

    Returns:
        (B, *spatial) fp32 tensor (no gradient). One fused pass on GPU.

    Raises:
        ValueError: for a rank other than 3 + spatial_dims, or rank 4 or 5 without ``spatial_dims``.
    """
    _check_mc_logits(mc_logits, spatial_dims)
    mc_logits = mc_logits.detach()
    if uses_kernels(mc_logits):
        return entropy_kernels.fused_predictive_entropy(mc_logits)
    return reference.predictive_entropy(mc_logits.float())


__all__ = ["ConsistencyStats", "uncertainty_consistency_loss", "predictive_entropy", "uses_kernels"]
