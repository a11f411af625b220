"""Fused EMA teacher update over one flat parameter buffer: ``theta' <- alpha theta' + (1 - alpha) theta``.

Reads the teacher and student buffers once and writes the teacher once, in place; fp32 arithmetic
whatever the buffers' dtypes. With both models' parameters laid out in one contiguous buffer each
(``uamt_fast.flatten_parameters_``), the EMA of the whole network is this single launch instead of
the released per-tensor ``mul_().add_()`` loop (2 launches and 5 passes over memory per tensor).

Bytes at the paper's model (V-Net, 9,448,866 fp32 parameters, 37.8 MB per copy; the flat buffer
starts each tensor on a 16-element boundary: 14 elements of padding):

    read teacher 37.8 MB + read student 37.8 MB + write teacher 37.8 MB = 113.4 MB

At ~3 TB/s (H100 device-copy bandwidth, measured by benchmarks/) the floor is ~38 us: memory-bound
(2 flops per element). ``torch._foreach_lerp_`` over the 118 separate tensors moves the same bytes
in a few launches of multi-tensor-apply chunks; the per-tensor loop moves 5/3 as many bytes in 236
launches.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from uamt_fast.kernels.device import TRITON_INTERPRET, check_triton_can_take

# 4,096 elements per program (16 per thread at 8 warps, four 128-bit accesses per operand):
# 2,307 programs for the V-Net, ~17 per SM on an H100. The interpreter gets small blocks so CPU
# tests cover several programs and a ragged tail.
BLOCK = 256 if TRITON_INTERPRET else 4096
NUM_WARPS = 8


@triton.jit
def uamt_ema_update_kernel(
    teacher_ptr,  # (N,) contiguous, updated in place, any float dtype
    student_ptr,  # (N,) contiguous, any float dtype
    n,  # int, number of elements
    alpha,  # fp32, weight of the teacher
    one_minus_alpha,  # fp32, weight of the student (computed in fp64 on the host, as the reference does)
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    t = tl.load(teacher_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(student_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    # Same form as the reference `t.mul_(alpha).add_(s, alpha=1 - alpha)`.
    t = t * alpha + s * one_minus_alpha
    tl.store(teacher_ptr + offs, t.to(teacher_ptr.dtype.element_ty), mask=ok)


def ema_update_flat_(teacher: torch.Tensor, student: torch.Tensor, alpha: float) -> None:
    """``teacher <- alpha teacher + (1 - alpha) student`` in place, one launch.

    Both are contiguous float tensors with the same number of elements on one CUDA device (or on
    the CPU under ``TRITON_INTERPRET=1``). ``alpha`` is a Python float; it is not range-checked
    here (``uamt_fast.ema_update_`` checks it). Refuses (``ValueError``) a teacher that overlaps the
    student in memory (the same tensor included): its programs would race on shared elements (a
    contiguous teacher cannot overlap itself).
    """
    check_triton_can_take("ema_update_flat_", teacher, student)
    for name, x in (("teacher", teacher), ("student", student)):
        if not (x.is_floating_point() and x.is_contiguous()):
            raise ValueError(f"ema_update_flat_: {name} must be a contiguous float tensor, got {x.dtype}, "
                             f"strides {x.stride()}")
    if teacher.numel() != student.numel() or teacher.device != student.device:
        raise ValueError(
            f"ema_update_flat_: expected buffers of equal size on one device, got teacher "
            f"{teacher.numel()} on {teacher.device} and student {student.numel()} on {student.device}"
        )
    n = teacher.numel()
    if n == 0:
        return
    # Contiguous (so neither overlaps itself): the two address ranges must be disjoint. O(1).
    t0, s0 = teacher.data_ptr(), student.data_ptr()
    if t0 < s0 + student.nbytes and s0 < t0 + teacher.nbytes:
        raise ValueError(
            "ema_update_flat_: teacher and student overlap in memory (the same tensor, or views of one storage); "
            "the programs would read elements that others write. Pass separate buffers"
        )
    uamt_ema_update_kernel[(triton.cdiv(n, BLOCK),)](
        teacher, student, n, float(alpha), 1.0 - float(alpha), BLOCK=BLOCK, num_warps=NUM_WARPS
    )


# torch.library registration: lets a compiled region call the update on flat buffers
# (uamt_fast.ema_update_ calls the launcher directly, skipping the dispatcher, since it runs eagerly).
@torch.library.custom_op("uamt_fast::ema_update_flat_", mutates_args=("teacher",))
def ema_update_flat_op(teacher: torch.Tensor, student: torch.Tensor, alpha: float) -> None:
    """In-place ``teacher <- alpha teacher + (1 - alpha) student`` over flat buffers."""
    ema_update_flat_(teacher, student, alpha)


@ema_update_flat_op.register_fake
def _(teacher, student, alpha):
    return None
