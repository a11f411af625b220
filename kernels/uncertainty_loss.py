"""The fused UA-MT uncertainty-masked consistency loss: forward (loss, stats and student gradient in one
pass), backward (one scaling pass), and its wiring into PyTorch, eager and ``torch.compile``.

Math (per voxel ``v`` of sample ``b``; ``x_t`` = logits of stochastic teacher pass ``t``, ``s`` =
student logits, ``q`` = softmax(teacher logits); all in fp32)::

    mu_v   = (1/T) sum_t softmax(x_t,v)                    mean prediction of the T passes
    u_v    = -sum_c mu_vc ln(mu_vc + 1e-6)                  predictive entropy (the uncertainty)
    m_v    = 1[u_v < H]                                     keep the confident voxels
    p_v    = softmax(s_v),  d_v = p_v - q_v
    loss   = sum_v m_v sum_c d_vc^2 / (C N + 1e-16),        N = sum_v m_v (voxels, not voxels x classes)
    dL/ds_vj = 2 m_v p_vj (d_vj - sum_k d_vk p_vk) / (C N + 1e-16)

This file, top to bottom (the per-voxel building blocks are ``class_vectors.py``'s):

- ``uamt_uncertainty_loss_fwd_kernel``, grid (voxel blocks, B). Reads every element of the T passes
  (T, B, C, V), the student and the teacher (B, C, V) exactly once; writes the *unnormalised* student
  gradient ``g = 2 m p (d - <d, p>)`` (B, C, V) in the student's dtype, divided by GRAD_SCALE (4 for
  C = 2, else 2: an exact power of two, put back by the backward scale), and one row of per-program
  partials: masked squared-difference sum, mask count, uncertainty sum / min / max. Any NaN or +-Inf
  logit of a voxel makes its u NaN, and the NaN u reaches the program's u sum, from which the
  finalize poisons the loss, the scale and the stats (a NaN u alone would just fail ``u < H`` and
  drop out of the mask: a silent finite loss).
- ``uamt_loss_finalize_kernel``: one program reads the partials (5 values per forward program) in a
  fixed order (no float atomics, so a given input gives a bit-identical loss on every run) and writes
  the loss, the backward scale ``GRAD_SCALE / (C N + 1e-16)`` and the stats (mask fraction,
  uncertainty mean / min / max).
- ``uamt_loss_scale_grad_kernel`` (backward): reads g, writes ``grad_student = g * grad_output * scale``.
- the launchers ``uncertainty_loss_forward`` / ``uncertainty_loss_backward``: what a launch needs
  (views, layout codes, offset width, the launch config of ``launch_config.py``, output buffers);
  inputs are validated by ``uamt_fast.ops.consistency`` before.
- the wiring: the ``torch.library`` ops ``torch.ops.uamt_fast.uncertainty_consistency_loss`` (+ its
  ``_backward``) with their fake kernels and autograd, which ``torch.compile`` keeps in its graph; the
  eager ``autograd.Function`` (the same launchers without the dispatcher: a quarter of the host time);
  and ``fused_uncertainty_loss``, which picks one of the two.

Bytes. Two launches for the forward (kernel + single-program finalize) rather than one with an
atomic "last program" ticket: the finalize reads a few kB and costs one small launch; the ticket
needs a persistent zeroed counter per device (hidden state that concurrent streams and CUDA graphs
would share). The gradient is produced during the forward pass (as Liger's cross-entropy does) and
only scaled in backward: the loss is the last op of its branch. The alternative, saving a 1-byte
mask and recomputing softmax(s), softmax(t) in backward, moves more bytes. At the paper's shapes
(T=8, B=2, C=2, 112x112x80, V = 1,003,520 voxels per sample, fp32; E = B*C*V = 4,014,080 elements
per logits tensor, 16.06 MB)::

    inputs read once (both strategies):     mc 8*E*4 = 128.5 MB + student 16.1 + teacher 16.1 = 160.6 MB
    (a) gradient in forward (chosen):       fwd write g 16.1 MB; bwd read g 16.1 + write grad 16.1  -> 208.7 MB
    (b) 1-byte mask + recompute in bwd:     fwd write mask 2.0 MB; bwd read s, t 32.1 + mask 2.0
                                            + write grad 16.1                                        -> 212.8 MB

(a) moves fewer bytes, keeps the backward a trivial elementwise kernel, and holds 16 MB between
forward and backward where (b) holds student + teacher + mask (34 MB). With bf16 teacher passes
(fp32 student and teacher) mc is 64.2 MB and (a) moves 144.5 MB. Partials (5 values per program
of 512 to 1,024 voxels) are noise. At ~3 TB/s (H100 device-copy bandwidth, measured by benchmarks/) the
floor for fwd + bwd is 208.7 MB / 3 TB/s ~ 70 us: the kernels are memory-bound (about ten
arithmetic ops and one exp per mc element, far below the H100's compute and SFU rates). The trainer's
mix (train.py under bf16 autocast: student, teacher and passes all bf16) halves every tensor: 64.2 +
8.0 + 8.0 read and 8.0 written in forward, 16.1 in backward: 104.4 MB, ~35 us.

Instructions (the kernels are memory-bound only if they issue few enough instructions per byte:
``tests/kernels/test_kernel_structure.py::test_instruction_budget`` counts them in the sm_90 SASS and
``python -m benchmarks.instruction_budget`` prints the table); how the per-voxel math keeps them few
is in ``class_vectors.py``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from uamt_fast.kernels import class_vectors
from uamt_fast.kernels.class_vectors import (
    PAIRS, VEC, block_voxels, cvt_store, load_classes, nan_probe, negate_stored, sigmoid_terms, softmax_terms, store,
    to_fp32, uncertainty, voxel_offsets,
)
# TRITON_INTERPRET: the kernels run on CPU tensors through the Triton interpreter (what CI does).
from uamt_fast.kernels.device import TRITON_INTERPRET, check_triton_can_take, nvidia_arch
from uamt_fast.kernels.launch_config import LaunchConfig, config_for

MASK_EPS = 1e-16  # added to C * N, as released
NUM_PARTIALS = 4  # float partials per program: masked sq sum, u sum (NaN-poisoned), u min, u max
FINALIZE_BLOCK = 4 if TRITON_INTERPRET else 1024  # partials per step of the single finalize program


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _partials_combine(sq_a, u_sum_a, u_min_a, u_max_a, count_a, sq_b, u_sum_b, u_min_b, u_max_b, count_b):
    return (sq_a + sq_b, u_sum_a + u_sum_b, tl.minimum(u_min_a, u_min_b), tl.maximum(u_max_a, u_max_b),
            count_a + count_b)


@triton.jit
def uamt_uncertainty_loss_fwd_kernel(
    s_ptr,  # student logits (B, C, V), any float dtype, strides s_sb, s_sc, s_sv
    s_sb, s_sc, s_sv,
    q_ptr,  # teacher logits (B, C, V)
    q_sb, q_sc, q_sv,
    mc_ptr,  # teacher passes (T, B, C, V)
    mc_st, mc_sb, mc_sc, mc_sv,
    g_ptr,  # out: unnormalised student gradient (B, C, V), student dtype (unused if not WRITE_GRAD)
    g_sb, g_sc, g_sv,
    part_ptr,  # out: fp32 (NUM_PARTIALS, P) partials, P = B * num_programs(0)
    count_ptr,  # out: int32 (P,) mask counts
    thr_ptr,  # 0-dim threshold tensor (read if THR_FROM_PTR)
    thr_value,  # float threshold (used if not THR_FROM_PTR)
    V,
    T: tl.constexpr,
    C: tl.constexpr,
    THR_FROM_PTR: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    S_LAYOUT: tl.constexpr,  # student, teacher, gradient, passes: VEC, PAIRS, STRIDED or GENERIC
    Q_LAYOUT: tl.constexpr,
    G_LAYOUT: tl.constexpr,
    MC_LAYOUT: tl.constexpr,
    BLOCK_V: tl.constexpr,
    APPROX: tl.constexpr,  # NVIDIA: 10 major + minor (hardware ex2 / lg2 / rcp, see class_vectors); 0: portable math
    MASKED: tl.constexpr,  # V < BLOCK_V: masked loads and stores (see block_voxels)
    WIDE: tl.constexpr,  # int64 element offsets (see block_voxels)
):
    pid_b = tl.program_id(1).to(tl.int64)
    P = tl.num_programs(0) * tl.num_programs(1)
    prog = pid_b * tl.num_programs(0) + tl.program_id(0)
    offs_v, mine = block_voxels(tl.program_id(0), V, BLOCK_V, BLOCK_V, MASKED, WIDE)
    flat, flat_mine = block_voxels(tl.program_id(0), V, 2 * BLOCK_V, BLOCK_V, MASKED, WIDE)  # PAIRS: 2 per voxel

    # 1. Uncertainty of the T passes (NaN where one of their logits is NaN or +-Inf): the same bits as
    #    uamt_predictive_entropy_kernel's.
    u = uncertainty(mc_ptr + pid_b * mc_sb, mc_st, mc_sc, mc_sv, tl.program_id(0), V, C, T, MC_LAYOUT, BLOCK_V, APPROX,
                    MASKED, WIDE)
    if THR_FROM_PTR:
        thr = tl.load(thr_ptr).to(tl.float32)
    else:
        thr = thr_value

    # 2. Student and teacher softmax p, q; d = p - q; sq = sum_c d_c^2; the gradient's
    #    g_j = 2 p_j (d_j - sum_k d_k p_k), stored as g / GRAD_SCALE (4 for C = 2, else 2: a power of two,
    #    so the rounding is g's own) without its GRAD_SCALE / (C N + eps), which waits for backward.
    if S_LAYOUT == PAIRS:
        s = load_classes(s_ptr + pid_b * s_sb, 1, flat, flat_mine, C, PAIRS, MASKED)
    else:
        s = load_classes(s_ptr + pid_b * s_sb, s_sc, voxel_offsets(offs_v, s_sv, C, S_LAYOUT), mine, C, S_LAYOUT,
                         MASKED)
    if Q_LAYOUT == PAIRS:
        q = load_classes(q_ptr + pid_b * q_sb, 1, flat, flat_mine, C, PAIRS, MASKED)
    else:
        q = load_classes(q_ptr + pid_b * q_sb, q_sc, voxel_offsets(offs_v, q_sv, C, Q_LAYOUT), mine, C, Q_LAYOUT,
                         MASKED)
    s, q = to_fp32(s, C, S_LAYOUT, APPROX), to_fp32(q, C, Q_LAYOUT, APPROX)
    if C == 2:
        # d_0 = -d_1, so sq = 2 d_1^2 (the 2 is applied to the program's sum) and
        # g_1 = 2 p_1 (d_1 - d_1 (p_1 - p_0)) = 4 d_1 p_1 p_0 = -g_0.
        p1, a_s = sigmoid_terms(s[0], s[1], APPROX)
        q1, a_q = sigmoid_terms(q[0], q[1], APPROX)
        u = tl.fma(a_q, 0.0, tl.fma(a_s, 0.0, u))  # the NaN probe of student and teacher
        d1 = p1 - q1
        sq = d1 * d1
        g_kept = (d1 * tl.fma(-p1, p1, p1),)  # g_1 / 4 (p_1 p_0 = p_1 - p_1^2)
    else:
        es, r = softmax_terms(s, C, APPROX)
        eq, rq = softmax_terms(q, C, APPROX)
        u = nan_probe(nan_probe(u, s, C), q, C)
        p = ()
        d = ()
        sq = tl.zeros(offs_v.shape, dtype=tl.float32)
        dp = tl.zeros(offs_v.shape, dtype=tl.float32)
        for c in tl.static_range(C):
            p = p + (es[c] * r,)
            d = d + (p[c] - eq[c] * rq,)
            sq = tl.fma(d[c], d[c], sq)
            dp = tl.fma(d[c], p[c], dp)
        g_kept = ()
        for c in tl.static_range(C):
            g_kept = g_kept + (p[c] * (d[c] - dp),)  # g_c / 2

    # 3. The mask. A NaN probe poisons u (any non-finite logit: a pass, the student, the teacher): the
    #    voxel leaves the mask, and the NaN reaches the loss, the backward scale and the stats through
    #    the program's u sum (uamt_loss_finalize_kernel).
    kept = u < thr  # the mask of the gradient (a stored voxel gets its own value, owned or not) ...
    keep = kept & mine  # ... and of the sums and the count (owned voxels only)

    if WRITE_GRAD:  # unkept voxels get an exact 0
        g_dtype: tl.constexpr = g_ptr.dtype.element_ty
        g_ptr += pid_b * g_sb
        if C == 2:
            g1 = tl.where(kept, g_kept[0], 0.0)
            if G_LAYOUT == PAIRS:  # join the pair back: one contiguous (vector) store
                g01 = cvt_store(tl.reshape(tl.join(-g1, g1), [2 * BLOCK_V]), g_dtype, True, APPROX)
                store(g_ptr + flat, g01, flat_mine, MASKED)
            else:
                g1_stored = cvt_store(g1, g_dtype, G_LAYOUT == VEC, APPROX)
                g_offs = voxel_offsets(offs_v, g_sv, C, G_LAYOUT)
                store(g_ptr + g_offs, negate_stored(g1_stored, g1, APPROX), mine, MASKED)
                store(g_ptr + g_sc + g_offs, g1_stored, mine, MASKED)
        else:
            g_offs = voxel_offsets(offs_v, g_sv, C, G_LAYOUT)
            for c in tl.static_range(C):
                store(g_ptr + g_offs, cvt_store(tl.where(kept, g_kept[c], 0.0), g_dtype, G_LAYOUT == VEC, APPROX),
                      mine, MASKED)
                g_ptr += g_sc

    # 4. This program's partials (finished by uamt_loss_finalize_kernel in a fixed order): the only
    #    reduction across threads, once per program, all five values in one pass through shared memory.
    #    Unmasked blocks need no select for the min and max (a voxel counted twice changes neither).
    if MASKED:
        u_lo, u_hi = tl.where(mine, u, float("inf")), tl.where(mine, u, float("-inf"))
    else:
        u_lo, u_hi = u, u
    sq_sum, u_sum, u_min, u_max, count = tl.reduce(
        (tl.where(keep, sq, 0.0), tl.where(mine, u, 0.0), u_lo, u_hi, keep.to(tl.int32)), 0, _partials_combine,
    )
    if C == 2:
        sq_sum = 2.0 * sq_sum
    tl.store(part_ptr + 0 * P + prog, sq_sum)
    tl.store(part_ptr + 1 * P + prog, u_sum)
    tl.store(part_ptr + 2 * P + prog, u_min)
    tl.store(part_ptr + 3 * P + prog, u_max)
    tl.store(count_ptr + prog, count)


@triton.jit
def uamt_loss_finalize_kernel(
    part_ptr,  # fp32 (NUM_PARTIALS, P)
    count_ptr,  # int32 (P,)
    loss_ptr,  # out: fp32 0-dim loss
    scale_ptr,  # out: fp32 0-dim backward scale GRAD_SCALE / (C N + 1e-16) (+ NaN probe)
    stats_ptr,  # out: fp32 (4,): mask fraction, uncertainty mean, min, max
    P, C, num_voxels,  # num_voxels = B * V
    BLOCK_P: tl.constexpr,
):
    """Single program: fixed-order reduction of the partials (deterministic, no atomics)."""
    sq = tl.zeros([BLOCK_P], dtype=tl.float32)
    u_sum = tl.zeros([BLOCK_P], dtype=tl.float32)
    u_min = tl.full([BLOCK_P], float("inf"), dtype=tl.float32)
    u_max = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
    count = tl.zeros([BLOCK_P], dtype=tl.int64)
    start = 0
    while start < P:  # fixed order, chunk by chunk
        offs = start + tl.arange(0, BLOCK_P)
        ok = offs < P
        sq += tl.load(part_ptr + 0 * P + offs, mask=ok, other=0.0)
        u_sum += tl.load(part_ptr + 1 * P + offs, mask=ok, other=0.0)
        u_min = tl.minimum(u_min, tl.load(part_ptr + 2 * P + offs, mask=ok, other=float("inf")))
        u_max = tl.maximum(u_max, tl.load(part_ptr + 3 * P + offs, mask=ok, other=float("-inf")))
        count += tl.load(count_ptr + offs, mask=ok, other=0).to(tl.int64)
        start += BLOCK_P
    n = tl.sum(count, axis=0).to(tl.float32)
    u_total = tl.sum(u_sum, axis=0)
    probe = u_total * 0.0  # 0, or NaN when a logit was NaN or +-Inf (it poisoned its voxel's u)
    denom = C * n + 1e-16  # empty mask: 0 / 1e-16 = 0 exactly
    tl.store(loss_ptr, tl.sum(sq, axis=0) / denom + probe)
    grad_scale = tl.where(C == 2, 4.0, 2.0)  # the forward stored g / 4 (C = 2) or g / 2: see the forward kernel
    tl.store(scale_ptr, grad_scale / denom + probe)
    tl.store(stats_ptr + 0, n / num_voxels)
    tl.store(stats_ptr + 1, u_total / num_voxels)
    tl.store(stats_ptr + 2, tl.min(u_min, axis=0) + probe)
    tl.store(stats_ptr + 3, tl.max(u_max, axis=0) + probe)


@triton.jit
def uamt_loss_scale_grad_kernel(
    g_ptr,  # unnormalised gradient, dense (any layout; addressed as its flat storage)
    out_ptr,  # out: gradient, same dtype and strides as g
    scale_ptr,  # fp32 0-dim, GRAD_SCALE / (C N + 1e-16) (+ NaN probe)
    grad_out_ptr,  # 0-dim dL_total / dloss
    numel,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    factor = tl.load(scale_ptr) * tl.load(grad_out_ptr).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (g * factor).to(out_ptr.dtype.element_ty), mask=ok)



# ---------------------------------------------------------------------------------------------
# Launchers (inputs are validated by uamt_fast.ops.consistency; these check only what a launch needs)
# ---------------------------------------------------------------------------------------------


def _grad_buffer(student: torch.Tensor, need_grad: bool) -> torch.Tensor:
    """The student-gradient buffer: the student's dtype and layout when that layout is dense and
    voxel-flattenable (contiguous, channels_last_3d), else contiguous; (0,) without gradient.
    Shared by the real and the fake kernel so torch.compile sees the strides the kernel writes."""
    if not need_grad:
        return student.new_empty(0)
    grad = class_vectors.empty_like(student)
    try:
        grad.view(*student.shape[:2], -1)
        return grad
    except RuntimeError:  # dense but not flattenable (e.g. permuted spatial dims)
        return class_vectors.empty_like(student, memory_format=torch.contiguous_format)


def uncertainty_loss_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mc_logits: torch.Tensor,
    threshold: Optional[torch.Tensor],
    threshold_value: float,
    need_grad: bool,
    *,
    config: Optional[LaunchConfig] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the fused forward. Returns ``(loss, stats, grad_unscaled, bwd_scale)``.

    ``loss`` fp32 0-dim; ``stats`` fp32 (4,) = mask fraction, uncertainty mean, min, max;
    ``grad_unscaled`` like ``student`` (empty (0,) when ``need_grad`` is False); ``bwd_scale`` fp32
    0-dim. ``threshold`` (0-dim tensor on the logits' device) wins over ``threshold_value``.
    ``config`` overrides the launch config of the table (``launch_config.config_for``): the sweep's seam.
    """
    check_triton_can_take("uamt_fast kernels", student, teacher, mc_logits)
    cv = class_vectors
    T, B, C = mc_logits.shape[:3]
    s3, q3, mc4 = cv.voxel_view(student, 1), cv.voxel_view(teacher, 1), cv.voxel_view(mc_logits, 2)
    V = s3.shape[2]
    device = student.device
    cfg = config or config_for("loss_fwd", mc_logits.dtype, cv.classes_last(mc4), C, T, B * V)
    grid = (triton.cdiv(V, cfg.block), B)
    num_programs = grid[0] * grid[1]

    grad = _grad_buffer(student, need_grad)
    g3 = grad.view(B, C, -1) if need_grad else grad.view(1, 1, 0)
    partials = cv.empty(NUM_PARTIALS, num_programs, device=device, dtype=torch.float32)
    counts = cv.empty(num_programs, device=device, dtype=torch.int32)
    loss = cv.empty((), device=device, dtype=torch.float32)
    bwd_scale = cv.empty((), device=device, dtype=torch.float32)
    stats = cv.empty(4, device=device, dtype=torch.float32)
    thr_from_ptr = threshold is not None

    uamt_uncertainty_loss_fwd_kernel[grid](
        s3, *s3.stride(),
        q3, *q3.stride(),
        mc4, *mc4.stride(),
        g3, *g3.stride(),
        partials, counts,
        threshold if thr_from_ptr else loss, float(threshold_value),
        V, T=T, C=C, THR_FROM_PTR=thr_from_ptr, WRITE_GRAD=need_grad,
        S_LAYOUT=cv.layout_code(s3), Q_LAYOUT=cv.layout_code(q3), G_LAYOUT=cv.layout_code(g3) if need_grad else 0,
        MC_LAYOUT=cv.layout_code(mc4), BLOCK_V=cfg.block, APPROX=nvidia_arch(device), MASKED=V < cfg.block,
        WIDE=cv.wide(s3, q3, g3, mc4), num_warps=cfg.num_warps,
    )
    uamt_loss_finalize_kernel[(1,)](
        partials, counts, loss, bwd_scale, stats, num_programs, C, B * V, BLOCK_P=FINALIZE_BLOCK, num_warps=4
    )
    return loss, stats, grad, bwd_scale


def uncertainty_loss_backward(
    grad_unscaled: torch.Tensor, bwd_scale: torch.Tensor, grad_output: torch.Tensor, *,
    config: Optional[LaunchConfig] = None,
) -> torch.Tensor:
    """``grad_unscaled * grad_output * bwd_scale`` in one pass; output has grad_unscaled's dtype and layout.
    ``config`` overrides the table's launch config (``block`` = elements per program)."""
    if grad_unscaled.numel() == 0:
        raise RuntimeError(
            "uamt_fast: backward through uncertainty_consistency_loss, but its forward ran without "
            "gradient (student_logits did not require grad, or grad mode was off)"
        )
    check_triton_can_take("uamt_fast kernels", grad_unscaled, bwd_scale, grad_output)
    out = class_vectors.empty_like(grad_unscaled)  # grad_unscaled is dense, so out has its strides
    n = grad_unscaled.numel()
    cfg = config or config_for("loss_bwd", grad_unscaled.dtype, False, 0, 0, n)
    uamt_loss_scale_grad_kernel[(triton.cdiv(n, cfg.block),)](
        grad_unscaled, out, bwd_scale, grad_output, n, BLOCK=cfg.block, num_warps=cfg.num_warps
    )
    return out


# ---------------------------------------------------------------------------------------------
# Wiring: the torch.library ops (what torch.compile keeps in its graph), the eager autograd.Function
# (the same launchers without the dispatcher), and fused_uncertainty_loss, which picks one
# ---------------------------------------------------------------------------------------------

_TWICE = (b"uamt_fast.uncertainty_consistency_loss: trying to differentiate twice: the fused kernels compute the "
          b"student gradient, not a graph of it, so there is no double backward (create_graph=True and then a "
          b"backward through the gradient). The reference math (uamt_fast.reference.uncertainty_consistency_loss, "
          b"plain autograd) has one")
_DelayedError = getattr(getattr(torch._C, "_functions", None), "DelayedError", None)


def differentiable_once(backward, *args) -> torch.Tensor:
    """``backward(*args)``, the student gradient; under ``create_graph=True`` (grad mode on in
    backward) it comes with a graph whose backward raises ``RuntimeError`` ("trying to differentiate
    twice"), as ``torch.autograd.function.once_differentiable`` gives.

    ``once_differentiable`` attaches that graph only when an incoming gradient requires grad; with
    ``torch.autograd.grad(loss, student, create_graph=True)`` none does, and it would return a
    gradient with no graph: a gradient penalty built on it would silently treat the loss's part as
    a constant. The fused gradient depends on the student (through the buffer saved in forward) in
    every case, so here the graph is attached whenever one is being built. Inside torch.compile
    tracing the backward is traced as is (AOTAutograd has no double backward of its own)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return backward(*args)
    with torch.no_grad():
        grad = backward(*args)
    if _DelayedError is None:  # torch without the private node: refuse now rather than return no graph
        raise RuntimeError(_TWICE.decode())
    return _DelayedError(_TWICE, 1)(grad.requires_grad_())


@torch.library.custom_op("uamt_fast::uncertainty_consistency_loss", mutates_args=())
def uncertainty_consistency_loss_op(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mc_logits: torch.Tensor,
    threshold: Optional[torch.Tensor],
    threshold_value: float,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward; outputs ``(loss, stats, grad_unscaled, bwd_scale)`` (see uncertainty_loss_forward)."""
    return uncertainty_loss_forward(student, teacher, mc_logits, threshold, threshold_value, need_grad)


@uncertainty_consistency_loss_op.register_fake
def _(student, teacher, mc_logits, threshold, threshold_value, need_grad):
    scalar = student.new_empty((), dtype=torch.float32)
    return scalar, student.new_empty(4, dtype=torch.float32), _grad_buffer(student, need_grad), torch.empty_like(scalar)


@torch.library.custom_op("uamt_fast::uncertainty_consistency_loss_backward", mutates_args=())
def uncertainty_consistency_loss_backward_op(
    grad_unscaled: torch.Tensor, bwd_scale: torch.Tensor, grad_output: torch.Tensor
) -> torch.Tensor:
    """``grad_unscaled * grad_output * bwd_scale``."""
    return uncertainty_loss_backward(grad_unscaled, bwd_scale, grad_output)


@uncertainty_consistency_loss_backward_op.register_fake
def _(grad_unscaled, bwd_scale, grad_output):
    return torch.empty_like(grad_unscaled)


def _setup_context(ctx, inputs, output):
    _, _, grad_unscaled, bwd_scale = output
    ctx.save_for_backward(grad_unscaled, bwd_scale)


def _backward(ctx, grad_loss, grad_stats, grad_grad, grad_scale):
    grad_unscaled, bwd_scale = ctx.saved_tensors
    grad_student = None
    if grad_loss is not None:  # (double backward raises, see differentiable_once)
        grad_student = differentiable_once(uncertainty_consistency_loss_backward_op, grad_unscaled, bwd_scale,
                                           grad_loss)
    # One gradient per input: student, teacher (target, detached), mc_logits, threshold, value, need_grad.
    return grad_student, None, None, None, None, None


uncertainty_consistency_loss_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerFusedLoss(torch.autograd.Function):
    """The fused kernels for an eager caller: the launchers called directly, without the custom-op
    dispatcher around them (the same kernels and bits; a quarter of the host time per call, see
    benchmarks/host_cost.py). torch.compile sees the registered ``torch.ops.uamt_fast`` op instead."""

    @staticmethod
    def forward(ctx, student, teacher, mc, thr_tensor, thr_value, need_grad):
        loss, stats, grad_unscaled, bwd_scale = uncertainty_loss_forward(
            student, teacher, mc, thr_tensor, thr_value, need_grad
        )
        ctx.save_for_backward(grad_unscaled, bwd_scale)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        # Differentiable once: under create_graph=True the gradient's graph raises when differentiated
        # (torch's once_differentiable would return it graph-less there; see differentiable_once).
        grad_unscaled, bwd_scale = ctx.saved_tensors
        grad = differentiable_once(uncertainty_loss_backward, grad_unscaled, bwd_scale, grad_loss)
        return grad, None, None, None, None, None


def fused_uncertainty_loss(
    student: torch.Tensor, teacher: torch.Tensor, mc_logits: torch.Tensor, threshold: Optional[torch.Tensor],
    threshold_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, stats)`` of the fused kernels, differentiable (once) in ``student``: through the registered
    op inside ``torch.compile`` tracing, else through the eager ``autograd.Function``. The arguments are
    checked already (``uamt_fast.ops.consistency``); ``threshold`` (a 0-dim tensor on the logits'
    device, or None) wins over ``threshold_value``. ``stats`` (fp32 (4,): mask fraction, uncertainty
    mean, min, max) carries no gradient."""
    need_grad = torch.is_grad_enabled() and student.requires_grad
    args = (student, teacher, mc_logits, threshold, threshold_value, need_grad)
    if torch.compiler.is_compiling():
        loss, stats, _, _ = torch.ops.uamt_fast.uncertainty_consistency_loss(*args)
    else:
        loss, stats = _EagerFusedLoss.apply(*args)
    return loss, stats.detach()
