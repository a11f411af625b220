"""A voxel's C classes as C vectors: the building blocks the loss and entropy kernels share.

Device side (``@triton.jit``, inlined into ``uncertainty_loss.py``'s and ``predictive_entropy.py``'s kernels):

- ``block_voxels``: which voxels a program computes and which it owns (the last block moved back to
  end at V, so no load or store needs a mask); ``load_classes`` / ``store`` / ``voxel_offsets``: the
  class vectors of one (B, C, V) tensor in any of the four layouts below;
- ``to_fp32`` / ``cvt_store`` / ``negate_stored``: the conversions (bf16 pairs two per register and
  packed 16-bit stores on NVIDIA);
- ``softmax_terms`` / ``sigmoid_terms`` / ``nan_probe``: one softmax per voxel (C = 2: a sigmoid) and
  the probe that turns any NaN or +-Inf logit into a NaN uncertainty;
- ``uncertainty``: the predictive entropy ``u = -sum_c mu_c ln(mu_c + 1e-6)`` of the T passes
  (``_pass_sums``, the sums of their softmax, then ``_entropy``), one function for both kernels, so
  the loss's uncertainty and the entropy map have the same bits.

Host side (what the launchers need to call the kernels): ``voxel_view`` (a logits tensor as a
(..., C, V) view), ``layout_code`` (its ``*_LAYOUT`` constexpr), ``classes_last`` (the launch
table's layout), ``wide`` (int64 offsets), and ``empty`` / ``empty_like``, where every output
buffer of the launchers comes from.

Structure (what makes the kernels run at memory speed; ``tests/kernels/test_kernel_structure.py`` compiles
them for sm_90 on the CPU and checks each point in the TTGIR, PTX and SASS):

- The class axis never leaves a thread. A voxel's C logits are C separate [BLOCK_V] vectors, a
  tuple unrolled by ``tl.static_range`` over the constexpr C; softmax, entropy, squared difference
  and gradient are elementwise between vectors of one layout. No tensor has a class dimension, so
  the compiler cannot spread classes over warps (as a [C, BLOCK_V] tile was, for bf16: every pass's
  class reductions then went through shared memory behind barriers). The only cross-thread step is
  the loss kernel's per-program partials reduction at the end: one multi-operand ``tl.reduce``.
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
- C = 2 is a sigmoid: ``softmax_1 = 1 / (1 + 2^((x_0 - x_1) log2 e))``, one exp and one reciprocal
  per pass, one accumulator (``mu_0 = 1 - mu_1``); other C take one reciprocal per softmax and a
  multiply per class. On NVIDIA the exp, log and reciprocal are the hardware's ``ex2`` / ``lg2`` /
  ``rcp`` approximations (APPROX; see ``_exp2``); the interpreter and ROCm run the same formulas
  with Triton's portable math.

Strides. Every logits tensor is addressed as (B, C, V) with a batch, class and voxel stride (mc
has a pass stride in front), so a channels_last_3d student (class stride 1, voxel stride C), a
batch slice or a W slice with a step is read in place, without a copy. Spatial dims that cannot be
merged into one voxel stride (e.g. a slice along W that keeps part of it) are copied with
``.contiguous()`` first (``voxel_view``): that costs one extra read + write of that tensor. Offsets
are int32 unless some tensor's sample spans 2^31 elements (``wide``: the kernels' WIDE).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from uamt_fast.kernels import launch_config

ENTROPY_EPS = tl.constexpr(1e-6)  # inside the log, as released
# How a (B, C, V) tensor's class vectors lie in memory: the kernels' *_LAYOUT constexprs (``layout_code``).
VEC = tl.constexpr(0)  # voxel stride 1: each class vector a contiguous run (vector loads, packed conversions)
PAIRS = tl.constexpr(1)  # C = 2, class stride 1, voxel stride 2 (channels_last_3d): one interleaved run
STRIDED = tl.constexpr(2)  # class stride 1, voxel stride C (channels_last_3d, C != 2): one element per class and voxel
GENERIC = tl.constexpr(3)  # any other voxel stride (e.g. a W slice with step 2), read through the runtime stride
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
UNROLL_MAX_LOADS = tl.constexpr(launch_config.UNROLL_MAX_LOADS)  # C * T up to which the pass loop is unrolled


# ---------------------------------------------------------------------------------------------
# Device building blocks
#
# A voxel's C class logits are C separate [BLOCK_V] vectors (tuples unrolled by tl.static_range
# over the constexpr C), never one [C, BLOCK_V] tile: every op over classes is then elementwise
# between vectors of the same layout, so it stays in the thread that owns the voxel, whatever
# layout the compiler picks. The T passes are unrolled too (constexpr T), so the whole program is
# straight-line code and every load can be issued before the first exp.
# ---------------------------------------------------------------------------------------------


@triton.jit
def load_classes(ptr, class_stride, offs, ok, C: tl.constexpr, LAYOUT: tl.constexpr, MASKED: tl.constexpr):
    """The C class vectors of one tensor, as loaded (in the tensor's dtype; ``to_fp32`` converts
    them where they are used, so the loads of all passes can be issued first).

    PAIRS (C = 2, class stride 1, voxel stride 2: channels_last_3d): ``offs`` / ``ok`` are the
    flat offsets of the program's 2 * BLOCK_V interleaved elements; one contiguous (vector) load,
    returned as a 1-tuple (``to_fp32`` splits it). Otherwise ``offs`` / ``ok`` are per voxel and
    class c is read at ``ptr + c * class_stride + offs`` (pointer increments: no int32 product
    ``c * class_stride`` can overflow). MASKED: lanes outside ``ok`` are not read (their values are
    undefined, and every use of them is masked); otherwise every offset is in bounds (``block_voxels``)
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
def block_voxels(pid_v, V, N: tl.constexpr, BLOCK_V: tl.constexpr, MASKED: tl.constexpr, WIDE: tl.constexpr):
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
def store(ptr, value, mine, MASKED: tl.constexpr):
    """Store a block's values: masked to the owned lanes if MASKED, else all (see ``block_voxels``)."""
    if MASKED:
        tl.store(ptr, value, mask=mine)
    else:
        tl.store(ptr, value)


@triton.jit
def voxel_offsets(offs, voxel_stride, C: tl.constexpr, LAYOUT: tl.constexpr):
    """Element offsets of voxels ``offs`` in a VEC / STRIDED / GENERIC tensor (PAIRS: see ``load_classes``)."""
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
def cvt_store(x, dtype: tl.constexpr, PACKED: tl.constexpr, APPROX: tl.constexpr):
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
def negate_stored(x, x_fp32, APPROX: tl.constexpr):
    """``-x`` for ``x = cvt_store(x_fp32)``: 16-bit on NVIDIA, the two sign bits of a packed pair flipped
    (exact); otherwise ``-x_fp32`` converted again (the interpreter's bf16 negation is not a sign flip)."""
    if APPROX and (x.dtype == tl.bfloat16 or x.dtype == tl.float16):
        return tl.inline_asm_elementwise("xor.b32 $0, $1, 0x80008000;", "=r,r", [x], dtype=x.dtype, is_pure=True,
                                         pack=2)
    else:
        return (-x_fp32).to(x.dtype)


@triton.jit
def to_fp32(xs, C: tl.constexpr, LAYOUT: tl.constexpr, APPROX: tl.constexpr):
    """The loaded class vectors of ``load_classes`` as a C-tuple of fp32 [BLOCK_V] vectors. PAIRS:
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
# tests/ops/test_uncertainty_loss.py bounds what the approximations can change (mask flips).


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
def softmax_terms(xs, C: tl.constexpr, APPROX: tl.constexpr, bias=0.0):
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
def sigmoid_terms(x0, x1, APPROX: tl.constexpr):
    """C = 2: softmax_1 = 1 / (1 + e^(x0 - x1)) (softmax_0 = 1 - softmax_1), one exp and one
    reciprocal. Returns ``(softmax_1, a)`` with ``a = (x0 - x1) log2(e)``: non-finite exactly when
    a logit is (or when finite logits differ by more than 2.3e38), so ``a * 0`` is the NaN probe."""
    a = (x0 - x1) * LOG2E
    return _rcp(1.0 + _exp2(a, APPROX), APPROX), a


@triton.jit
def nan_probe(probe, xs, C: tl.constexpr):
    """``probe + sum_c x_c * 0`` (one fma per logit): stays 0 for finite logits, NaN for any NaN or +-Inf."""
    for c in tl.static_range(C):
        probe = tl.fma(xs[c], 0.0, probe)
    return probe


@triton.jit
def _add_pass(acc, probe, xs, C: tl.constexpr, LAYOUT: tl.constexpr, APPROX: tl.constexpr, FIRST: tl.constexpr):
    """One pass: ``acc_c += softmax(x)_c`` for the loaded class vectors ``xs``; ``probe`` += NaN probe.
    C = 2 keeps one accumulator (class 1; class 0 is T - acc). FIRST: ``acc`` and ``probe`` are
    not read (the first unrolled pass starts them: no additions of 0)."""
    xs = to_fp32(xs, C, LAYOUT, APPROX)
    if C == 2:
        p1, a = sigmoid_terms(xs[0], xs[1], APPROX)
        if FIRST:
            return (p1,), a * 0.0
        else:
            return (acc[0] + p1,), tl.fma(a, 0.0, probe)
    else:
        es, r = softmax_terms(xs, C, APPROX)
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
            return out, nan_probe(probe, xs, C)


@triton.jit
def _pass_sums(mc_ptr, mc_st, mc_sc, offs, ok, C: tl.constexpr, T: tl.constexpr, LAYOUT: tl.constexpr,
               BLOCK_V: tl.constexpr, APPROX: tl.constexpr, MASKED: tl.constexpr):
    """``(acc, probe)``: per voxel the sums over the T passes at ``mc_ptr + t * mc_st`` (classes and
    voxels addressed as in ``load_classes``) of their softmax, ``acc_c = T mu_c`` (C = 2: class 1
    only), and their NaN probe (0, or NaN where a logit is NaN or +-Inf).

    Up to UNROLL_MAX_LOADS class vectors (C * T), all T passes are loaded first and then reduced:
    every load is issued before the first use of any, so all are in flight together. Beyond, a
    loop of T (C loads in flight) bounds compile time, code size and registers."""
    if C * T <= UNROLL_MAX_LOADS:
        passes = ()
        for _ in tl.static_range(T):
            passes = passes + (load_classes(mc_ptr, mc_sc, offs, ok, C, LAYOUT, MASKED),)
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
                xs = xs + (to_fp32(passes[t], C, LAYOUT, APPROX),)
            probe = xs[0][0] * 0.0
            for t in tl.static_range(T):
                for c in tl.static_range(1 if t == 0 else 0, C):
                    probe = tl.fma(xs[t][c], 0.0, probe)
            es, r = softmax_terms(xs[0], C, APPROX, probe)
            acc = ()
            for c in tl.static_range(C):
                acc = acc + (es[c] * r,)
            for t in tl.static_range(1, T):
                es, r = softmax_terms(xs[t], C, APPROX)
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
            acc, probe = _add_pass(acc, probe, load_classes(mc_ptr, mc_sc, offs, ok, C, LAYOUT, MASKED), C, LAYOUT,
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
def uncertainty(mc_ptr, mc_st, mc_sc, mc_sv, pid_v, V, C: tl.constexpr, T: tl.constexpr, LAYOUT: tl.constexpr,
                BLOCK_V: tl.constexpr, APPROX: tl.constexpr, MASKED: tl.constexpr, WIDE: tl.constexpr):
    """The predictive entropy ``u`` of the T passes of one sample at ``mc_ptr`` (pass, class and voxel
    strides ``mc_st``, ``mc_sc``, ``mc_sv``), for the voxels of block ``pid_v`` as ``block_voxels`` gives
    them: ``_pass_sums`` then ``_entropy``, so the loss and the entropy kernel get the same bits. NaN
    where a logit is NaN or +-Inf."""
    if LAYOUT == PAIRS:
        flat, flat_mine = block_voxels(pid_v, V, 2 * BLOCK_V, BLOCK_V, MASKED, WIDE)
        acc, probe = _pass_sums(mc_ptr, mc_st, 1, flat, flat_mine, C, T, PAIRS, BLOCK_V, APPROX, MASKED)
    else:
        offs_v, mine = block_voxels(pid_v, V, BLOCK_V, BLOCK_V, MASKED, WIDE)
        acc, probe = _pass_sums(mc_ptr, mc_st, mc_sc, voxel_offsets(offs_v, mc_sv, C, LAYOUT), mine, C, T, LAYOUT,
                                BLOCK_V, APPROX, MASKED)
    return _entropy(acc, probe, C, T, APPROX)



# ---------------------------------------------------------------------------------------------
# Host side: the launchers' views, layout codes, offset width and output buffers
# ---------------------------------------------------------------------------------------------

# Every output buffer of the launchers comes from these two (looked up here at each call); tests swap
# in NaN-filled versions to prove that the kernels write every element.
empty = torch.empty
empty_like = torch.empty_like


def voxel_view(x: torch.Tensor, lead: int) -> torch.Tensor:
    """``x`` of shape (*lead dims, C, *S) as (*lead dims, C, V): a view when the spatial dims merge
    into one stride (contiguous, channels_last_3d, batch slices), else a contiguous copy."""
    try:
        return x.view(*x.shape[: lead + 1], -1)
    except RuntimeError:
        return x.contiguous().view(*x.shape[: lead + 1], -1)


def classes_last(x3: torch.Tensor) -> bool:
    """Class stride 1 and voxel stride > 1 (channels_last_3d): per-class loads are strided."""
    return x3.stride(-2) == 1 and x3.shape[-1] > 1 and x3.stride(-1) > 1


def _paired(x3: torch.Tensor) -> bool:
    """Two classes interleaved (class stride 1, voxel stride 2): read as one contiguous run. Below
    2^30 voxels per sample, so the kernel's ``2 * V`` bound of the run fits an int32."""
    return (x3.shape[-2] == 2 and x3.stride(-2) == 1 and (x3.stride(-1) == 2 or x3.shape[-1] == 1)
            and x3.shape[-1] < 2**30)


def wide(*views: torch.Tensor) -> bool:
    """Whether some element offset within one sample (and pass) of these (..., C, V) views, or twice the
    voxel count (the interleaved pairs' index), needs int64: the kernels' WIDE."""
    reach = max(max(2 * x.shape[-1], 1 + sum((n - 1) * st for n, st in zip(x.shape[-2:], x.stride()[-2:])))
                for x in views)
    return reach >= 2**31


def layout_code(x3: torch.Tensor) -> int:
    """The kernels' *_LAYOUT code of a (..., C, V) view: VEC (voxel stride 1), PAIRS (see ``_paired``),
    STRIDED (class stride 1, voxel stride C), else GENERIC."""
    if _paired(x3):
        return PAIRS.value
    if x3.stride(-1) == 1 or x3.shape[-1] == 1:
        return VEC.value
    return STRIDED.value if x3.stride(-2) == 1 and x3.stride(-1) == x3.shape[-2] else GENERIC.value
