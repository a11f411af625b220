"""Fused UA-MT uncertainty-masked consistency loss (forward + student gradient) and predictive entropy.

Math (per voxel ``v`` of sample ``b``; ``x_t`` = logits of stochastic teacher pass ``t``, ``s`` =
student logits, ``q`` = softmax(teacher logits); all in fp32)::

    mu_v   = (1/T) sum_t softmax(x_t,v)                    mean prediction of the T passes
    u_v    = -sum_c mu_vc ln(mu_vc + 1e-6)                  predictive entropy (the uncertainty)
    m_v    = 1[u_v < H]                                     keep the confident voxels
    p_v    = softmax(s_v),  d_v = p_v - q_v
    loss   = sum_v m_v sum_c d_vc^2 / (C N + 1e-16),        N = sum_v m_v (voxels, not voxels x classes)
    dL/ds_vj = 2 m_v p_vj (d_vj - sum_k d_vk p_vk) / (C N + 1e-16)

Kernels, top to bottom:

- ``_uncertainty_loss_fwd_kernel``: grid (voxel blocks, B). Reads every input element exactly once
  (the T passes, the student, the teacher), writes the *unnormalised* student gradient
  ``g = 2 m p (d - <d, p>)`` divided by GRAD_SCALE (4 for C = 2, else 2: an exact power of two, put
  back by the backward scale) and one row of per-program partials: masked squared-difference sum,
  mask count, uncertainty sum / min / max. Any NaN or +-Inf logit of a voxel makes its u NaN (the
  sigmoid / softmax of NaN and +Inf is NaN already; ``x * 0`` probes catch the rest, one fma each),
  and the NaN u reaches the program's u sum, from which the finalize poisons the loss, the scale
  and the stats (a NaN u alone would just fail ``u < H`` and drop out of the mask: a silent finite loss).
- ``_finalize_kernel``: one program reduces the partials in a fixed order (no float atomics, so a
  given input gives a bit-identical loss on every run) and writes the loss, the backward scale
  ``GRAD_SCALE / (C N + 1e-16)`` and the stats (mask fraction, uncertainty mean / min / max).
- ``_scale_grad_kernel`` (backward): ``grad_student = g * grad_output * scale``, one light pass.
- ``_predictive_entropy_kernel``: the same per-voxel entropy, written as a (B, V) fp32 map.

Instructions (the kernels are memory-bound only if they issue few enough instructions per byte:
``tests/test_kernel_structure.py::test_instruction_budget`` counts them in the sm_90 SASS and
``python -m benchmarks.instruction_budget`` prints the table). C = 2 is a sigmoid:
``softmax_1 = 1 / (1 + 2^((x_0 - x_1) log2 e))``, one exp and one reciprocal per pass, one
accumulator (``mu_0 = 1 - mu_1``); other C take one reciprocal per softmax and a multiply per class.
On NVIDIA the exp, log and reciprocal are the hardware's ``ex2`` / ``lg2`` / ``rcp`` approximations
(APPROX; 2^-22 relative or absolute error, see ``_exp2``), bf16 pairs are converted two per
register, and no load carries a mask (the last block of a row is moved back to end at V, see
``_block_voxels``), so no load is zero-filled; offsets are int32 unless some tensor's sample spans
2^31 elements (WIDE). The interpreter and ROCm run the same formulas with Triton's portable math.

Gradient strategy. The loss is the last op of its branch, so the gradient is produced during the
forward pass (as Liger's cross-entropy does) and only scaled in backward. The alternative, saving a
1-byte mask and recomputing softmax(s), softmax(t) in backward, moves more bytes. At the paper's
shapes (T=8, B=2, C=2, 112x112x80, V = 1,003,520 voxels per sample, fp32; E = B*C*V = 4,014,080
elements per logits tensor, 16.06 MB):

    inputs read once (both strategies):     mc 8*E*4 = 128.5 MB + student 16.1 + teacher 16.1 = 160.6 MB
    (a) gradient in forward (chosen):       fwd write g 16.1 MB; bwd read g 16.1 + write grad 16.1  -> 208.7 MB
    (b) 1-byte mask + recompute in bwd:     fwd write mask 2.0 MB; bwd read s, t 32.1 + mask 2.0
                                            + write grad 16.1                                        -> 212.8 MB

(a) moves fewer bytes, keeps the backward a trivial elementwise kernel, and holds 16 MB between
forward and backward where (b) holds student + teacher + mask (34 MB). With bf16 teacher passes
(fp32 student and teacher) mc is 64.2 MB and (a) moves 144.5 MB. Partials (6 values per program
of 512 to 1,024 voxels) are noise. At ~3 TB/s (H100 device-copy bandwidth, measured by benchmarks/) the
floor for fwd + bwd is 208.7 MB / 3 TB/s ~ 70 us: the kernels are memory-bound (about ten
arithmetic ops and one exp per mc element, far below the H100's compute and SFU rates).

The trainer's mix (train.py under bf16 autocast: student, teacher and passes all bf16) halves
every tensor: 64.2 + 8.0 + 8.0 read and 8.0 written in forward, 16.1 in backward: 104.4 MB, ~35 us.

Structure (what makes the kernels run at memory speed; ``tests/test_kernel_structure.py`` compiles
them for sm_90 on the CPU and checks each point in the TTGIR, PTX and SASS):

- The class axis never leaves a thread. A voxel's C logits are C separate [BLOCK_V] vectors, a
  tuple unrolled by ``tl.static_range`` over the constexpr C; softmax, entropy, squared difference
  and gradient are elementwise between vectors of one layout. No tensor has a class dimension, so
  the compiler cannot spread classes over warps (as a [C, BLOCK_V] tile was, for bf16: every pass's
  class reductions then went through shared memory behind barriers). The only cross-thread step is
  the per-program partials reduction at the end: one multi-operand ``tl.reduce``.
- The T passes are unrolled (constexpr T): straight-line code, every load of every pass issued
  before the first exp, no barrier anywhere before the last load. Past ``UNROLL_MAX_LOADS`` class
  vectors (C * T > 64) a loop over T bounds compile time and registers.
- Contiguous inputs (voxel stride 1, specialised by Triton: layout VEC) are read with 128-bit loads:
  4 fp32 or 8 bf16/fp16 voxels per thread and vector. channels_last_3d inputs (class stride 1) are
  read in place: for C = 2 (PAIRS) a block's interleaved pairs are one contiguous run, loaded with
  128-bit loads and split in-thread by ``tl.reshape`` + ``tl.split`` (the gradient is joined back
  and stored the same way); other C (STRIDED, voxel stride C as a constexpr) read each class with a
  one-element load (the C loads of a warp hit the same lines). Any other voxel stride (GENERIC) is
  read through its runtime stride.
- Launch configs come from ``kernels/launch_config.py``: a fixed table keyed on (kernel, dtype,
  layout, C, T, size) with a rule behind it, so the same input always gets the same config and the
  same bits; ``python -m benchmarks.kernel_sweep`` times the candidates on a GPU and prints the table.
- Two launches for the forward (kernel + single-program finalize) rather than one with an atomic
  "last program" ticket: the finalize reads 5 values per program (a few kB) and costs one small
  launch; the ticket variant needs a persistent zeroed counter per device (hidden state that
  concurrent streams and CUDA graphs would share) and release/acquire ordering that no CPU test
  can check. Not built; ``kernel_sweep`` times the finalize alone, the most it could save.

Strides. Every logits tensor is addressed as (B, C, V) with a batch, class and voxel stride (mc
has a pass stride in front), so a channels_last_3d student (class stride 1, voxel stride C), a
batch slice or a W slice with a step is read in place, without a copy. Spatial dims that cannot be
merged into one voxel stride (e.g. a slice along W that keeps part of it) are copied with
``.contiguous()`` first: that costs one extra read + write of that tensor.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from uamt_fast.kernels import launch_config
# TRITON_INTERPRET: the kernels run on CPU tensors through the Triton interpreter (what CI does).
from uamt_fast.kernels.device import TRITON_INTERPRET, check_triton_can_take, nvidia_arch
from uamt_fast.kernels.launch_config import LaunchConfig, config_for

ENTROPY_EPS = tl.constexpr(1e-6)  # inside the log, as released
MASK_EPS = 1e-16  # added to C * N, as released
NUM_PARTIALS = 4  # float partials per program: masked sq sum, u sum (NaN-poisoned), u min, u max
# How a (B, C, V) tensor's class vectors lie in memory: the kernels' *_LAYOUT constexprs.
VEC = tl.constexpr(0)  # voxel stride 1: each class vector a contiguous run (vector loads, packed conversions)
PAIRS = tl.constexpr(1)  # C = 2, class stride 1, voxel stride 2 (channels_last_3d): one interleaved run
STRIDED = tl.constexpr(2)  # class stride 1, voxel stride C (channels_last_3d, C != 2): one element per class and voxel
GENERIC = tl.constexpr(3)  # any other voxel stride (e.g. a W slice with step 2), read through the runtime stride
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
UNROLL_MAX_LOADS = tl.constexpr(launch_config.UNROLL_MAX_LOADS)  # C * T up to which the pass loop is unrolled

# Launch parameters of the loss forward, entropy and backward come from kernels/launch_config.py
# (a fixed table keyed on dtype, layout, C, T and size; launchers take an explicit override).
FINALIZE_BLOCK = 4 if TRITON_INTERPRET else 1024  # partials per step of the single finalize program

# Every output buffer of the launchers comes from these two; tests swap in NaN-filled versions to
# prove that the kernels write every element.
_empty = torch.empty
_empty_like = torch.empty_like


# ---------------------------------------------------------------------------------------------
# Triton kernels
#
# A voxel's C class logits are C separate [BLOCK_V] vectors (tuples unrolled by tl.static_range
# over the constexpr C), never one [C, BLOCK_V] tile: every op over classes is then elementwise
# between vectors of the same layout, so it stays in the thread that owns the voxel, whatever
# layout the compiler picks. The T passes are unrolled too (constexpr T), so the whole program is
# straight-line code and every load can be issued before the first exp.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load_classes(ptr, class_stride, offs, ok, C: tl.constexpr, LAYOUT: tl.constexpr, MASKED: tl.constexpr):
    """The C class vectors of one tensor, as loaded (in the tensor's dtype; ``_to_fp32`` converts
    them where they are used, so the loads of all passes can be issued first).

    PAIRS (C = 2, class stride 1, voxel stride 2: channels_last_3d): ``offs`` / ``ok`` are the
    flat offsets of the program's 2 * BLOCK_V interleaved elements; one contiguous (vector) load,
    returned as a 1-tuple (``_to_fp32`` splits it). Otherwise ``offs`` / ``ok`` are per voxel and
    class c is read at ``ptr + c * class_stride + offs`` (pointer increments: no int32 product
    ``c * class_stride`` can overflow). MASKED: lanes outside ``ok`` are not read (their values are
    undefined, and every use of them is masked); otherwise every offset is in bounds (``_block_voxels``)
    and the loads carry no mask, hence no zero fill of the destination registers either."""
    xs = ()
    for _ in tl.static_range(1 if LAYOUT == PAIRS else C):
        if MASKED:
            xs = xs + (tl.load(ptr + offs, mask=ok),)
        else:
            xs = xs + (tl.load(ptr + offs),)
        ptr += class_stride
    return xs


@triton.jit
def _block_voxels(pid_v, V, N: tl.constexpr, BLOCK_V: tl.constexpr, MASKED: tl.constexpr, WIDE: tl.constexpr):
    """``(offs, mine)``: the N = BLOCK_V voxel indices program ``pid_v`` computes (N = 2 BLOCK_V: the
    element indices of its voxels' interleaved pairs), and which of them it owns (counts, sums).
    MASKED (V < BLOCK_V): the block starts at ``pid_v * BLOCK_V`` and owns the indices below V (the
    loads and stores are masked). Otherwise the last block is moved back to end at V, so every index
    is in bounds and no load or store needs a mask; it owns only the indices from ``pid_v * BLOCK_V``
    on, and stores the voxels before them again with the same bits as the previous block (each
    voxel's values depend on its own inputs only). int32 indices unless WIDE (an element offset of
    some tensor within one sample reaches 2^31: the launcher decides)."""
    per_voxel: tl.constexpr = N // BLOCK_V
    if WIDE:
        pid_v = pid_v.to(tl.int64)
        lanes = tl.arange(0, N).to(tl.int64)
    else:
        lanes = tl.arange(0, N)
    start = pid_v * BLOCK_V
    if MASKED:
        offs = per_voxel * start + lanes
        return offs, offs < per_voxel * V
    else:
        offs = per_voxel * tl.minimum(start, V - BLOCK_V) + lanes
        return offs, offs >= per_voxel * start


@triton.jit
def _store(ptr, value, mine, MASKED: tl.constexpr):
    """Store a block's values: masked to the owned lanes if MASKED, else all (see ``_block_voxels``)."""
    if MASKED:
        tl.store(ptr, value, mask=mine)
    else:
        tl.store(ptr, value)


@triton.jit
def _voxel_offsets(offs, voxel_stride, C: tl.constexpr, LAYOUT: tl.constexpr):
    """Element offsets of voxels ``offs`` in a VEC / STRIDED / GENERIC tensor (PAIRS: see ``_load_classes``)."""
    if LAYOUT == STRIDED:
        return offs * C  # the constexpr stride: shifts and adds, not a 64-bit multiply per voxel
    else:
        return offs * voxel_stride  # VEC: the stride is the constant 1 (Triton specialises it)


@triton.jit
def _cvt_fp32(x, PACKED: tl.constexpr, APPROX: tl.constexpr):
    """``x.to(fp32)``. PACKED (``x`` came from vector loads) bf16 on NVIDIA: two values per 32-bit register
    at once (a shift for the low half, an and for the high half: the generic lowering spends a permute and
    a shift on the high half; on separately loaded values the generic one-shift conversion is cheaper)."""
    if APPROX and PACKED and x.dtype == tl.bfloat16:
        return tl.inline_asm_elementwise("{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xffff0000; }", "=r,=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=2)
    else:
        return x.to(tl.float32)


@triton.jit
def _cvt_store(x, dtype: tl.constexpr, PACKED: tl.constexpr, APPROX: tl.constexpr):
    """fp32 ``x`` as ``dtype`` (round to nearest even). PACKED (stored with vector stores) 16-bit on
    NVIDIA: one packed conversion per two values (``cvt.rn.{bf16,f16}x2.f32``, after any select on the
    fp32 values)."""
    if APPROX >= 80 and PACKED and dtype == tl.bfloat16:  # (cvt.rn.{bf16,f16}x2.f32: sm_80 and later)
        return tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,r,r", [x], dtype=tl.bfloat16,
                                         is_pure=True, pack=2)
    elif APPROX >= 80 and PACKED and dtype == tl.float16:
        return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,r,r", [x], dtype=tl.float16,
                                         is_pure=True, pack=2)
    else:
        return x.to(dtype)


@triton.jit
def _negate_stored(x, x_fp32, APPROX: tl.constexpr):
    """``-x`` for ``x = _cvt_store(x_fp32)``: 16-bit on NVIDIA, the two sign bits of a packed pair flipped
    (exact); otherwise ``-x_fp32`` converted again (the interpreter's bf16 negation is not a sign flip)."""
    if APPROX and (x.dtype == tl.bfloat16 or x.dtype == tl.float16):
        return tl.inline_asm_elementwise("xor.b32 $0, $1, 0x80008000;", "=r,r", [x], dtype=x.dtype, is_pure=True,
                                         pack=2)
    else:
        return (-x_fp32).to(x.dtype)


@triton.jit
def _to_fp32(xs, C: tl.constexpr, LAYOUT: tl.constexpr, APPROX: tl.constexpr):
    """The loaded class vectors of ``_load_classes`` as a C-tuple of fp32 [BLOCK_V] vectors. PAIRS:
    converted as loaded, then reshaped to [BLOCK_V, 2] and split (both keep a voxel's pair in its thread)."""
    if LAYOUT == PAIRS:
        x = _cvt_fp32(xs[0], True, APPROX)
        a, b = tl.split(tl.reshape(x, [x.shape[0] // 2, 2]))
        return a, b
    else:
        out = ()
        for c in tl.static_range(C):
            out = out + (_cvt_fp32(xs[c], LAYOUT == VEC, APPROX),)
        return out


# Transcendentals and reciprocals. APPROX (NVIDIA targets: the compute capability as 10 major + minor,
# from kernels/device.nvidia_arch; 0 elsewhere): the hardware's approximations, one MUFU
# instruction each: ex2.approx.ftz (max relative error 2^-22), lg2.approx.ftz (max absolute error
# 2^-22 on [0.5, 2], relative 2^-22 elsewhere) and rcp.approx.ftz (1 ulp). Otherwise (the
# interpreter, AMD) Triton's portable exp2 / log2 / division. The formulas are the same on both;
# tests/test_uncertainty_loss.py bounds what the approximations can change (mask flips).


@triton.jit
def _exp2(x, APPROX: tl.constexpr):
    if APPROX:
        return libdevice.exp2(x)  # __nv_exp2f under FTZ: ex2.approx.ftz.f32
    else:
        return tl.math.exp2(x)


@triton.jit
def _log2(x, APPROX: tl.constexpr):
    if APPROX:
        return libdevice.fast_log2f(x)  # lg2.approx.ftz.f32
    else:
        return tl.math.log2(x)


@triton.jit
def _rcp(x, APPROX: tl.constexpr):
    if APPROX:  # 1 / x in one MUFU.RCP (libdevice's fast_dividef(1, x) adds a multiply by 1)
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def _softmax_terms(xs, C: tl.constexpr, APPROX: tl.constexpr, bias=0.0):
    """Softmax of a tuple of C fp32 class vectors as ``(e, r)``: ``softmax_c = e_c * r``, with
    ``e_c = 2^(x_c log2(e) - m log2(e))`` (m = max_c x_c; one fma per class) and one reciprocal
    ``r = 1 / sum_c e_c`` per voxel. Any NaN or +Inf logit makes every ``e_c`` NaN (an fma of Inf
    and -Inf); a -Inf logit only gives ``e_c = 0`` (probe it separately). ``bias`` (0 or NaN: a NaN
    probe) is added to ``m log2(e)`` in its fma, so a NaN poisons every ``e_c``."""
    m = xs[0]
    for c in tl.static_range(1, C):
        m = tl.maximum(m, xs[c])
    m_log2e = tl.fma(m, LOG2E, bias)
    es = ()
    for c in tl.static_range(C):
        es = es + (_exp2(tl.fma(xs[c], LOG2E, -m_log2e), APPROX),)
    total = es[0]
    for c in tl.static_range(1, C):
        total += es[c]
    return es, _rcp(total, APPROX)


@triton.jit
def _sigmoid_terms(x0, x1, APPROX: tl.constexpr):
    """C = 2: softmax_1 = 1 / (1 + e^(x0 - x1)) (softmax_0 = 1 - softmax_1), one exp and one
    reciprocal. Returns ``(softmax_1, a)`` with ``a = (x0 - x1) log2(e)``: non-finite exactly when
    a logit is (or when finite logits differ by more than 2.3e38), so ``a * 0`` is the NaN probe."""
    a = (x0 - x1) * LOG2E
    return _rcp(1.0 + _exp2(a, APPROX), APPROX), a


@triton.jit
def _nan_probe(probe, xs, C: tl.constexpr):
    """``probe + sum_c x_c * 0`` (one fma per logit): stays 0 for finite logits, NaN for any NaN or +-Inf."""
    for c in tl.static_range(C):
        probe = tl.fma(xs[c], 0.0, probe)
    return probe


@triton.jit
def _add_pass(acc, probe, xs, C: tl.constexpr, LAYOUT: tl.constexpr, APPROX: tl.constexpr, FIRST: tl.constexpr):
    """One pass: ``acc_c += softmax(x)_c`` for the loaded class vectors ``xs``; ``probe`` += NaN probe.
    C = 2 keeps one accumulator (class 1; class 0 is T - acc). FIRST: ``acc`` and ``probe`` are
    not read (the first unrolled pass starts them: no additions of 0)."""
    xs = _to_fp32(xs, C, LAYOUT, APPROX)
    if C == 2:
        p1, a = _sigmoid_terms(xs[0], xs[1], APPROX)
        if FIRST:
            return (p1,), a * 0.0
        else:
            return (acc[0] + p1,), tl.fma(a, 0.0, probe)
    else:
        es, r = _softmax_terms(xs, C, APPROX)
        out = ()
        for c in tl.static_range(C):
            if FIRST:
                out = out + (es[c] * r,)
            else:
                out = out + (tl.fma(es[c], r, acc[c]),)
        if FIRST:
            probe = xs[0] * 0.0
            for c in tl.static_range(1, C):
                probe = tl.fma(xs[c], 0.0, probe)
            return out, probe
        else:
            return out, _nan_probe(probe, xs, C)


@triton.jit
def _pass_sums(mc_ptr, mc_st, mc_sc, offs, ok, C: tl.constexpr, T: tl.constexpr, LAYOUT: tl.constexpr,
               BLOCK_V: tl.constexpr, APPROX: tl.constexpr, MASKED: tl.constexpr):
    """``(acc, probe)``: per voxel the sums over the T passes at ``mc_ptr + t * mc_st`` (classes and
    voxels addressed as in ``_load_classes``) of their softmax, ``acc_c = T mu_c`` (C = 2: class 1
    only), and their NaN probe (0, or NaN where a logit is NaN or +-Inf).

    Up to UNROLL_MAX_LOADS class vectors (C * T), all T passes are loaded first and then reduced:
    every load is issued before the first use of any, so all are in flight together. Beyond, a
    loop of T (C loads in flight) bounds compile time, code size and registers."""
    if C * T <= UNROLL_MAX_LOADS:
        passes = ()
        for _ in tl.static_range(T):
            passes = passes + (_load_classes(mc_ptr, mc_sc, offs, ok, C, LAYOUT, MASKED),)
            mc_ptr += mc_st  # pointer increments: no int32 product t * mc_st can overflow
        if C == 2:
            acc, probe = _add_pass((), 0.0, passes[0], C, LAYOUT, APPROX, True)
            for t in tl.static_range(1, T):
                acc, probe = _add_pass(acc, probe, passes[t], C, LAYOUT, APPROX, False)
        else:
            # The probe of every logit first, folded into the first pass's softmax: that makes the
            # first exp wait for every load, so ptxas issues all of them before it (it otherwise
            # interleaves the strided one-element loads with the math of the earlier passes).
            xs = ()
            for t in tl.static_range(T):
                xs = xs + (_to_fp32(passes[t], C, LAYOUT, APPROX),)
            probe = xs[0][0] * 0.0
            for t in tl.static_range(T):
                for c in tl.static_range(1 if t == 0 else 0, C):
                    probe = tl.fma(xs[t][c], 0.0, probe)
            es, r = _softmax_terms(xs[0], C, APPROX, probe)
            acc = ()
            for c in tl.static_range(C):
                acc = acc + (es[c] * r,)
            for t in tl.static_range(1, T):
                es, r = _softmax_terms(xs[t], C, APPROX)
                out = ()
                for c in tl.static_range(C):
                    out = out + (tl.fma(es[c], r, acc[c]),)
                acc = out
            probe = 0.0  # (in acc)
    else:
        probe = tl.zeros([BLOCK_V], dtype=tl.float32)
        acc = ()
        for _ in tl.static_range(1 if C == 2 else C):
            acc = acc + (tl.zeros([BLOCK_V], dtype=tl.float32),)
        for _ in tl.range(T):
            acc, probe = _add_pass(acc, probe, _load_classes(mc_ptr, mc_sc, offs, ok, C, LAYOUT, MASKED), C, LAYOUT,
                                   APPROX, False)
            mc_ptr += mc_st
    return acc, probe


@triton.jit
def _entropy(acc, probe, C: tl.constexpr, T: tl.constexpr, APPROX: tl.constexpr):
    """``u = -sum_c mu_c ln(mu_c + 1e-6) = -(ln 2 / T) sum_c acc_c log2(acc_c / T + 1e-6)`` per voxel from
    ``_pass_sums``, plus ``probe`` (0 or NaN; added inside the last fma, where it costs nothing). C = 2:
    ``mu_0 = 1 - mu_1``, as ``-ln 2 mu_0 = acc_1 ln 2 / T - ln 2`` and ``mu_0 + 1e-6 = 1 + 1e-6 - acc_1 / T``
    (one fma each)."""
    if C == 2:
        n1 = acc[0] * (-LN2 / T)  # -ln 2 mu_1
        n0 = tl.fma(acc[0], LN2 / T, -LN2)  # -ln 2 mu_0
        l1 = _log2(tl.fma(acc[0], 1.0 / T, ENTROPY_EPS), APPROX)
        l0 = _log2(tl.fma(acc[0], -1.0 / T, 1.0 + ENTROPY_EPS), APPROX)
        return tl.fma(n0, l0, tl.fma(n1, l1, probe))
    else:
        w = probe
        for c in tl.static_range(C):
            w = tl.fma(acc[c], _log2(tl.fma(acc[c], 1.0 / T, ENTROPY_EPS), APPROX), w)
        return w * (-LN2 / T)


@triton.jit
def _partials_combine(sq_a, u_sum_a, u_min_a, u_max_a, count_a, sq_b, u_sum_b, u_min_b, u_max_b, count_b):
    return (sq_a + sq_b, u_sum_a + u_sum_b, tl.minimum(u_min_a, u_min_b), tl.maximum(u_max_a, u_max_b),
            count_a + count_b)


@triton.jit
def _uncertainty_loss_fwd_kernel(
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
    APPROX: tl.constexpr,  # NVIDIA: 10 major + minor (hardware ex2 / lg2 / rcp, see _exp2); 0: portable math
    MASKED: tl.constexpr,  # V < BLOCK_V: masked loads and stores (see _block_voxels)
    WIDE: tl.constexpr,  # int64 element offsets (see _block_voxels)
):
    pid_b = tl.program_id(1).to(tl.int64)
    P = tl.num_programs(0) * tl.num_programs(1)
    prog = pid_b * tl.num_programs(0) + tl.program_id(0)
    offs_v, mine = _block_voxels(tl.program_id(0), V, BLOCK_V, BLOCK_V, MASKED, WIDE)
    flat, flat_mine = _block_voxels(tl.program_id(0), V, 2 * BLOCK_V, BLOCK_V, MASKED, WIDE)  # PAIRS: 2 per voxel

    # 1. Uncertainty of the T passes (NaN where one of their logits is NaN or +-Inf).
    if MC_LAYOUT == PAIRS:
        acc, probe = _pass_sums(mc_ptr + pid_b * mc_sb, mc_st, 1, flat, flat_mine, C, T, PAIRS, BLOCK_V, APPROX,
                                MASKED)
    else:
        acc, probe = _pass_sums(mc_ptr + pid_b * mc_sb, mc_st, mc_sc, _voxel_offsets(offs_v, mc_sv, C, MC_LAYOUT),
                                mine, C, T, MC_LAYOUT, BLOCK_V, APPROX, MASKED)
    u = _entropy(acc, probe, C, T, APPROX)  # (the same bits as _predictive_entropy_kernel's)
    if THR_FROM_PTR:
        thr = tl.load(thr_ptr).to(tl.float32)
    else:
        thr = thr_value

    # 2. Student and teacher softmax p, q; d = p - q; sq = sum_c d_c^2; the gradient's
    #    g_j = 2 p_j (d_j - sum_k d_k p_k), stored as g / GRAD_SCALE (4 for C = 2, else 2: a power of two,
    #    so the rounding is g's own) without its GRAD_SCALE / (C N + eps), which waits for backward.
    if S_LAYOUT == PAIRS:
        s = _load_classes(s_ptr + pid_b * s_sb, 1, flat, flat_mine, C, PAIRS, MASKED)
    else:
        s = _load_classes(s_ptr + pid_b * s_sb, s_sc, _voxel_offsets(offs_v, s_sv, C, S_LAYOUT), mine, C, S_LAYOUT,
                          MASKED)
    if Q_LAYOUT == PAIRS:
        q = _load_classes(q_ptr + pid_b * q_sb, 1, flat, flat_mine, C, PAIRS, MASKED)
    else:
        q = _load_classes(q_ptr + pid_b * q_sb, q_sc, _voxel_offsets(offs_v, q_sv, C, Q_LAYOUT), mine, C, Q_LAYOUT,
                          MASKED)
    s, q = _to_fp32(s, C, S_LAYOUT, APPROX), _to_fp32(q, C, Q_LAYOUT, APPROX)
    if C == 2:
        # d_0 = -d_1, so sq = 2 d_1^2 (the 2 is applied to the program's sum) and
        # g_1 = 2 p_1 (d_1 - d_1 (p_1 - p_0)) = 4 d_1 p_1 p_0 = -g_0.
        p1, a_s = _sigmoid_terms(s[0], s[1], APPROX)
        q1, a_q = _sigmoid_terms(q[0], q[1], APPROX)
        u = tl.fma(a_q, 0.0, tl.fma(a_s, 0.0, u))  # the NaN probe of student and teacher
        d1 = p1 - q1
        sq = d1 * d1
        g_kept = (d1 * tl.fma(-p1, p1, p1),)  # g_1 / 4 (p_1 p_0 = p_1 - p_1^2)
    else:
        es, r = _softmax_terms(s, C, APPROX)
        eq, rq = _softmax_terms(q, C, APPROX)
        u = _nan_probe(_nan_probe(u, s, C), q, C)
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
    #    the program's u sum (_finalize_kernel).
    kept = u < thr  # the mask of the gradient (a stored voxel gets its own value, owned or not) ...
    keep = kept & mine  # ... and of the sums and the count (owned voxels only)

    if WRITE_GRAD:  # unkept voxels get an exact 0
        g_dtype: tl.constexpr = g_ptr.dtype.element_ty
        g_ptr += pid_b * g_sb
        if C == 2:
            g1 = tl.where(kept, g_kept[0], 0.0)
            if G_LAYOUT == PAIRS:  # join the pair back: one contiguous (vector) store
                g01 = _cvt_store(tl.reshape(tl.join(-g1, g1), [2 * BLOCK_V]), g_dtype, True, APPROX)
                _store(g_ptr + flat, g01, flat_mine, MASKED)
            else:
                g1_stored = _cvt_store(g1, g_dtype, G_LAYOUT == VEC, APPROX)
                g_offs = _voxel_offsets(offs_v, g_sv, C, G_LAYOUT)
                _store(g_ptr + g_offs, _negate_stored(g1_stored, g1, APPROX), mine, MASKED)
                _store(g_ptr + g_sc + g_offs, g1_stored, mine, MASKED)
        else:
            g_offs = _voxel_offsets(offs_v, g_sv, C, G_LAYOUT)
            for c in tl.static_range(C):
                _store(g_ptr + g_offs, _cvt_store(tl.where(kept, g_kept[c], 0.0), g_dtype, G_LAYOUT == VEC, APPROX),
                       mine, MASKED)
                g_ptr += g_sc

    # 4. This program's partials (finished by _finalize_kernel in a fixed order): the only
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
def _finalize_kernel(
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
    while start < P:  # fixed order, chunk by chunk (see the note on `while` above)
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
    nan_probe = u_total * 0.0  # 0, or NaN when a logit was NaN or +-Inf (it poisoned its voxel's u)
    denom = C * n + 1e-16  # empty mask: 0 / 1e-16 = 0 exactly
    tl.store(loss_ptr, tl.sum(sq, axis=0) / denom + nan_probe)
    grad_scale = tl.where(C == 2, 4.0, 2.0)  # the forward stored g / 4 (C = 2) or g / 2: see the forward kernel
    tl.store(scale_ptr, grad_scale / denom + nan_probe)
    tl.store(stats_ptr + 0, n / num_voxels)
    tl.store(stats_ptr + 1, u_total / num_voxels)
    tl.store(stats_ptr + 2, tl.min(u_min, axis=0) + nan_probe)
    tl.store(stats_ptr + 3, tl.max(u_max, axis=0) + nan_probe)


@triton.jit
def _scale_grad_kernel(
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


@triton.jit
def _predictive_entropy_kernel(
    mc_ptr,  # teacher passes (T, B, C, V)
    mc_st, mc_sb, mc_sc, mc_sv,
    u_ptr,  # out: fp32 (B, V) contiguous
    V,
    T: tl.constexpr,
    C: tl.constexpr,
    MC_LAYOUT: tl.constexpr,  # VEC, PAIRS, STRIDED or GENERIC (see _load_classes)
    BLOCK_V: tl.constexpr,
    APPROX: tl.constexpr,  # NVIDIA: 10 major + minor (hardware ex2 / lg2 / rcp, see _exp2); 0: portable math
    MASKED: tl.constexpr,  # V < BLOCK_V: masked loads and stores (see _block_voxels)
    WIDE: tl.constexpr,  # int64 element offsets (see _block_voxels)
):
    pid_b = tl.program_id(1).to(tl.int64)
    offs_v, mine = _block_voxels(tl.program_id(0), V, BLOCK_V, BLOCK_V, MASKED, WIDE)
    if MC_LAYOUT == PAIRS:
        flat, flat_mine = _block_voxels(tl.program_id(0), V, 2 * BLOCK_V, BLOCK_V, MASKED, WIDE)
        acc, probe = _pass_sums(mc_ptr + pid_b * mc_sb, mc_st, 1, flat, flat_mine, C, T, PAIRS, BLOCK_V, APPROX,
                                MASKED)
    else:
        acc, probe = _pass_sums(mc_ptr + pid_b * mc_sb, mc_st, mc_sc, _voxel_offsets(offs_v, mc_sv, C, MC_LAYOUT),
                                mine, C, T, MC_LAYOUT, BLOCK_V, APPROX, MASKED)
    u = _entropy(acc, probe, C, T, APPROX)  # NaN where a logit is NaN or +-Inf
    _store(u_ptr + pid_b * V + offs_v, u, mine, MASKED)


# ---------------------------------------------------------------------------------------------
# Launchers (inputs are validated by uamt_fast.ops.consistency; these check only what a launch needs)
# ---------------------------------------------------------------------------------------------


def _check_launchable(*tensors: torch.Tensor) -> None:
    check_triton_can_take("uamt_fast kernels", *tensors)


def _voxel_view(x: torch.Tensor, lead: int) -> torch.Tensor:
    """``x`` of shape (*lead dims, C, *S) as (*lead dims, C, V): a view when the spatial dims merge
    into one stride (contiguous, channels_last_3d, batch slices), else a contiguous copy."""
    try:
        return x.view(*x.shape[: lead + 1], -1)
    except RuntimeError:
        return x.contiguous().view(*x.shape[: lead + 1], -1)


def _grad_buffer(student: torch.Tensor, need_grad: bool) -> torch.Tensor:
    """The student-gradient buffer: the student's dtype and layout when that layout is dense and
    voxel-flattenable (contiguous, channels_last_3d), else contiguous; (0,) without gradient.
    Shared by the real and the fake kernel so torch.compile sees the strides the kernel writes."""
    if not need_grad:
        return student.new_empty(0)
    grad = _empty_like(student)
    try:
        grad.view(*student.shape[:2], -1)
        return grad
    except RuntimeError:  # dense but not flattenable (e.g. permuted spatial dims)
        return _empty_like(student, memory_format=torch.contiguous_format)


def _classes_last(x3: torch.Tensor) -> bool:
    """Class stride 1 and voxel stride > 1 (channels_last_3d): per-class loads are strided."""
    return x3.stride(-2) == 1 and x3.shape[-1] > 1 and x3.stride(-1) > 1


def _paired(x3: torch.Tensor) -> bool:
    """Two classes interleaved (class stride 1, voxel stride 2): read as one contiguous run. Below
    2^30 voxels per sample, so the kernel's ``2 * V`` bound of the run fits an int32."""
    return (x3.shape[-2] == 2 and x3.stride(-2) == 1 and (x3.stride(-1) == 2 or x3.shape[-1] == 1)
            and x3.shape[-1] < 2**30)


def _wide(*views: torch.Tensor) -> bool:
    """Whether some element offset within one sample (and pass) of these (..., C, V) views, or twice the
    voxel count (the interleaved pairs' index), needs int64: the kernels' WIDE."""
    reach = max(max(2 * x.shape[-1], 1 + sum((n - 1) * st for n, st in zip(x.shape[-2:], x.stride()[-2:])))
                for x in views)
    return reach >= 2**31


def _layout(x3: torch.Tensor) -> int:
    """The kernels' *_LAYOUT code of a (..., C, V) view: VEC (voxel stride 1), PAIRS (see ``_paired``),
    STRIDED (class stride 1, voxel stride C), else GENERIC."""
    if _paired(x3):
        return PAIRS.value
    if x3.stride(-1) == 1 or x3.shape[-1] == 1:
        return VEC.value
    return STRIDED.value if x3.stride(-2) == 1 and x3.stride(-1) == x3.shape[-2] else GENERIC.value


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
    _check_launchable(student, teacher, mc_logits)
    T, B, C = mc_logits.shape[:3]
    s3, q3, mc4 = _voxel_view(student, 1), _voxel_view(teacher, 1), _voxel_view(mc_logits, 2)
    V = s3.shape[2]
    device = student.device
    cfg = config or config_for("loss_fwd", mc_logits.dtype, _classes_last(mc4), C, T, B * V)
    grid = (triton.cdiv(V, cfg.block), B)
    num_programs = grid[0] * grid[1]

    grad = _grad_buffer(student, need_grad)
    g3 = grad.view(B, C, -1) if need_grad else grad.view(1, 1, 0)
    partials = _empty(NUM_PARTIALS, num_programs, device=device, dtype=torch.float32)
    counts = _empty(num_programs, device=device, dtype=torch.int32)
    loss = _empty((), device=device, dtype=torch.float32)
    bwd_scale = _empty((), device=device, dtype=torch.float32)
    stats = _empty(4, device=device, dtype=torch.float32)
    thr_from_ptr = threshold is not None

    _uncertainty_loss_fwd_kernel[grid](
        s3, *s3.stride(),
        q3, *q3.stride(),
        mc4, *mc4.stride(),
        g3, *g3.stride(),
        partials, counts,
        threshold if thr_from_ptr else loss, float(threshold_value),
        V, T=T, C=C, THR_FROM_PTR=thr_from_ptr, WRITE_GRAD=need_grad,
        S_LAYOUT=_layout(s3), Q_LAYOUT=_layout(q3), G_LAYOUT=_layout(g3) if need_grad else 0, MC_LAYOUT=_layout(mc4),
        BLOCK_V=cfg.block, APPROX=nvidia_arch(device), MASKED=V < cfg.block, WIDE=_wide(s3, q3, g3, mc4),
        num_warps=cfg.num_warps,
    )
    _finalize_kernel[(1,)](
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
    _check_launchable(grad_unscaled, bwd_scale, grad_output)
    out = _empty_like(grad_unscaled)  # grad_unscaled is dense, so out has its strides
    n = grad_unscaled.numel()
    cfg = config or config_for("loss_bwd", grad_unscaled.dtype, False, 0, 0, n)
    _scale_grad_kernel[(triton.cdiv(n, cfg.block),)](
        grad_unscaled, out, bwd_scale, grad_output, n, BLOCK=cfg.block, num_warps=cfg.num_warps
    )
    return out


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


def predictive_entropy_forward(mc_logits: torch.Tensor, *, config: Optional[LaunchConfig] = None) -> torch.Tensor:
    """(T, B, C, *S) logits -> (B, *S) fp32 entropy of the mean softmax. ``config`` overrides the table's."""
    _check_launchable(mc_logits)
    T, B, C = mc_logits.shape[:3]
    mc4 = _voxel_view(mc_logits, 2)
    V = mc4.shape[3]
    out = _empty((B, *mc_logits.shape[3:]), device=mc_logits.device, dtype=torch.float32)
    cfg = config or config_for("entropy", mc_logits.dtype, _classes_last(mc4), C, T, B * V)
    _predictive_entropy_kernel[(triton.cdiv(V, cfg.block), B)](
        mc4, *mc4.stride(), out, V, T=T, C=C, MC_LAYOUT=_layout(mc4), BLOCK_V=cfg.block,
        APPROX=nvidia_arch(mc_logits.device),
        MASKED=V < cfg.block, WIDE=_wide(mc4), num_warps=cfg.num_warps,
    )
    return out


# ---------------------------------------------------------------------------------------------
# torch.library registration: opaque ops that torch.compile keeps in the graph
# ---------------------------------------------------------------------------------------------


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


@torch.library.custom_op("uamt_fast::predictive_entropy", mutates_args=())
def predictive_entropy_op(mc_logits: torch.Tensor) -> torch.Tensor:
    """(T, B, C, *S) -> (B, *S) fp32 entropy of the mean softmax over the T passes (no gradient)."""
    return predictive_entropy_forward(mc_logits)


@predictive_entropy_op.register_fake
def _(mc_logits):
    return mc_logits.new_empty((mc_logits.shape[1], *mc_logits.shape[3:]), dtype=torch.float32)
