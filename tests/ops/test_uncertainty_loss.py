"""Fused uncertainty-masked consistency loss and predictive entropy vs the float64 reference.

On a CPU-only machine these run the real Triton kernels through the interpreter (conftest sets
TRITON_INTERPRET=1), so shapes stay tiny; block sizes under the interpreter are small enough that
every case spans several programs with a ragged last block. Every kernel output is allocated
NaN-filled (int buffers: INT32_MIN) so an element the kernels forget to write shows up.

Relative error: |a - b| / |b| for the loss; max |a - b| / max |b| for gradients and maps.
"""
from __future__ import annotations

import math

import pytest
import torch
from uamt_fast.kernels import class_vectors, launch_config
from uamt_fast.kernels import predictive_entropy as entropy_kernels
from uamt_fast.kernels import uncertainty_loss as kernels

import uamt_fast
from uamt_fast.ops import consistency
from uamt_fast import reference

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or consistency.TRITON_ON_CPU),
    reason="needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it on CPU-only machines)",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MARGIN = 1e-5  # no voxel's uncertainty within this of the threshold (the mask jumps there)
TOL = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    def poison(x):
        return x.fill_(torch.iinfo(torch.int32).min if x.dtype == torch.int32 else math.nan)

    monkeypatch.setattr(class_vectors, "empty", lambda *a, **k: poison(torch.empty(*a, **k)))
    monkeypatch.setattr(class_vectors, "empty_like", lambda *a, **k: poison(torch.empty_like(*a, **k)))


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def make_logits(B, C, T, spatial, dtypes=(torch.float32,) * 3):
    """Fresh (student, teacher, mc) with uncertainties spread over [0, ln C]: a per-voxel "opinion"
    of random confidence plus pass-to-pass noise."""
    s_dt, t_dt, mc_dt = dtypes
    confidence = 4.0 * torch.rand(1, B, 1, *spatial)
    opinion = confidence * torch.randn(1, B, C, *spatial)
    mc = opinion + 0.7 * torch.randn(T, B, C, *spatial)
    student = opinion[0] + torch.randn(B, C, *spatial)
    teacher = opinion[0] + 0.5 * torch.randn(B, C, *spatial)
    return (student.to(DEVICE, s_dt).requires_grad_(), teacher.to(DEVICE, t_dt), mc.to(DEVICE, mc_dt))


def safe_threshold(mc, quantile=0.5):
    """A threshold near the ``quantile`` of the float64 uncertainties, at least MARGIN from each."""
    u = reference.predictive_entropy(mc.detach().double()).flatten().sort().values
    mids = (u[1:] + u[:-1]) / 2
    ok = (u[1:] - u[:-1]) > 2 * MARGIN
    target = u[int(quantile * (len(u) - 1))]
    candidates = mids[ok]
    return float(candidates[(candidates - target).abs().argmin()])


def reference64(student, teacher, mc, threshold, grad_output=1.0):
    """Float64 reference loss, student gradient and stats (same rounded inputs as the kernel)."""
    s = student.detach().double().requires_grad_()
    loss = reference.uncertainty_consistency_loss(s, teacher.double(), mc.double(), threshold)
    loss.backward(torch.tensor(grad_output, dtype=torch.float64))
    u = reference.predictive_entropy(mc.double())
    stats = torch.stack([(u < threshold).double().mean(), u.mean(), u.min(), u.max()])
    return loss.detach(), s.grad, stats


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if b.dim() == 0:
        return (abs(a - b) / abs(b)).item() if b != 0 else abs(a - b).item()
    return ((a - b).abs().max() / b.abs().max()).item()


def run(student, teacher, mc, threshold, grad_output=1.0):
    student.grad = None
    loss, stats = uamt_fast.uncertainty_consistency_loss(student, teacher, mc, threshold, return_stats=True)
    (loss * grad_output).backward()
    return loss, student.grad, torch.stack(list(stats))


def check_against_reference(student, teacher, mc, threshold, grad_output=1.0):
    loss, grad, stats = run(student, teacher, mc, threshold, grad_output)
    ref_loss, ref_grad, ref_stats = reference64(student, teacher, mc, threshold, grad_output)
    tol = max(TOL[x.dtype] for x in (student, teacher, mc))
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad.dtype == student.dtype and grad.shape == student.shape
    assert torch.isfinite(grad).all()
    assert rel_err(loss, ref_loss) <= tol, (loss.item(), ref_loss.item())
    assert rel_err(grad, ref_grad) <= tol
    num_voxels = student.numel() // student.shape[1]
    assert round(stats[0].item() * num_voxels) == round(ref_stats[0].item() * num_voxels)  # the same mask
    assert rel_err(stats[1:], ref_stats[1:]) <= tol
    assert 0 < stats[0] < 1, "this case should keep some voxels and drop others"
    return loss, grad


# ---------------------------------------------------------------------------------------------
# numerics vs reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "B, C, T, spatial",
    [
        (2, 2, 8, (3, 5, 7)),  # the paper's C and T, odd 3D volume (105 voxels: 2 blocks, ragged)
        (2, 3, 4, (5, 6, 7)),  # C = 3 (padded class block of 4)
        (1, 16, 2, (3, 4, 5)),  # C = 16
        (3, 2, 1, (4, 5, 6)),  # T = 1
        (2, 4, 3, (9, 11)),  # 2D
        (2, 5, 2, (37,)),  # 1D, C = 5
        (1, 16, 5, (2, 3, 7)),  # C * T = 80 > UNROLL_MAX_LOADS: the pass loop instead of the unrolled passes
    ],
)
def test_matches_float64_reference(B, C, T, spatial):
    student, teacher, mc = make_logits(B, C, T, spatial)
    check_against_reference(student, teacher, mc, safe_threshold(mc), grad_output=0.37)


@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float32, torch.bfloat16, torch.bfloat16),  # AMP: bf16 teacher passes, fp32 student
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32, torch.float16),
        (torch.float64, torch.float32, torch.float64),
        (torch.float16, torch.float16, torch.float16),
    ],
    ids=["f32-bf16-bf16", "bf16", "f16-f32-f16", "f64-f32-f64", "f16"],
)
@pytest.mark.parametrize("C", [3, 16])
def test_low_precision_and_mixed_dtypes(dtypes, C):
    student, teacher, mc = make_logits(2, C, 4 if C < 16 else 2, (3, 4, 5) if C < 16 else (2, 3, 4), dtypes)
    check_against_reference(student, teacher, mc, safe_threshold(mc), grad_output=2.5)


def test_trainer_layout_bf16_channels_last_passes():
    """train.py's mix: bf16 student, teacher and passes, all channels_last_3d (class stride 1), the
    student a batch slice of the labeled + unlabeled output, mc an unflattened batch of passes."""
    B, C, T, S = 2, 2, 8, (3, 4, 5)
    student, teacher, mc = make_logits(2 * B, C, T + 1, S, (torch.bfloat16,) * 3)
    out = mc.flatten(0, 1).to(memory_format=torch.channels_last_3d).unflatten(0, (T + 1, 2 * B))[:, B:]
    teacher, mc = out[0], out[1:]
    student = student.detach().to(memory_format=torch.channels_last_3d)[B:].requires_grad_()
    for x in (student, teacher, mc):
        assert x.stride(-4) == 1 and class_vectors.classes_last(class_vectors.voxel_view(x, x.dim() - 4))
    _, grad = check_against_reference(student, teacher, mc, safe_threshold(mc), grad_output=0.5)
    assert grad.is_contiguous(memory_format=torch.channels_last_3d)


def test_channels_last_student_is_read_in_place_and_gets_a_channels_last_gradient():
    student, teacher, mc = make_logits(2, 3, 3, (3, 4, 5))
    student = student.detach().to(memory_format=torch.channels_last_3d).requires_grad_()
    teacher = teacher.to(memory_format=torch.channels_last_3d)
    for x in (student, teacher):  # (B, C, V) view with class stride 1, voxel stride C: no copy
        view = class_vectors.voxel_view(x, 1)
        assert view.data_ptr() == x.data_ptr() and view.stride() == (x.shape[1] * 60, 1, x.shape[1])
    _, grad = check_against_reference(student, teacher, mc, safe_threshold(mc))
    assert grad.is_contiguous(memory_format=torch.channels_last_3d)


def test_strided_inputs():
    B, C, T, S = 2, 3, 3, (4, 5, 6)
    student, teacher, mc = make_logits(2 * B, C, T, S)
    student = student.detach()[B:].requires_grad_()  # batch slice (unlabeled half): a view
    teacher = teacher.transpose(2, 4).contiguous().transpose(2, 4)[B:]  # dense, D/W swapped: copied
    mc = torch.randn(T, B, C, *S[:-1], S[-1] + 3, device=DEVICE)[..., 1:-2]  # W slice: not flattenable
    assert class_vectors.voxel_view(student, 1).data_ptr() == student.data_ptr()
    assert not mc.is_contiguous()
    check_against_reference(student, teacher, mc, safe_threshold(mc))
    # Permuted spatial dims: dense but not flattenable; the gradient buffer falls back to contiguous.
    student2 = student.detach().permute(0, 1, 4, 3, 2).contiguous().permute(0, 1, 4, 3, 2).requires_grad_()
    assert not student2.is_contiguous()
    check_against_reference(student2, teacher, mc, safe_threshold(mc))


@pytest.mark.parametrize("C", [2, 3])
def test_generic_voxel_stride_is_read_in_place(C):
    """A W slice with step 2 merges into one voxel stride of 2 (class stride != 1): the GENERIC layout,
    read through the runtime strides (C = 2 is not the interleaved PAIRS case here)."""
    student, teacher, mc = make_logits(2, C, 3, (4, 5, 12))
    student = student.detach()[..., ::2].requires_grad_()
    teacher, mc = teacher[..., ::2], mc[..., ::2]
    for x, lead in ((student, 1), (teacher, 1), (mc, 2)):
        view = class_vectors.voxel_view(x, lead)
        assert view.data_ptr() == x.data_ptr() and view.stride(-1) == 2
        assert class_vectors.layout_code(view) == class_vectors.GENERIC.value
    check_against_reference(student, teacher, mc, safe_threshold(mc), grad_output=0.7)


@pytest.mark.parametrize("C, layout", [(2, "contiguous"), (2, "channels_last"), (3, "channels_last")])
def test_wide_offsets_give_the_same_bits(monkeypatch, C, layout):
    """WIDE (int64 element offsets, chosen by the launcher from 2^31 elements per sample on) computes
    the same bits as the int32 offsets; forced here on a small input."""
    student, teacher, mc = make_logits(2, C, 4, (3, 5, 7))
    if layout == "channels_last":
        student = student.detach().to(memory_format=torch.channels_last_3d).requires_grad_()
        teacher = teacher.to(memory_format=torch.channels_last_3d)
        mc = mc.flatten(0, 1).to(memory_format=torch.channels_last_3d).unflatten(0, mc.shape[:2])
    h = safe_threshold(mc)
    narrow = [run(student, teacher, mc, h), uamt_fast.predictive_entropy(mc)]
    assert not class_vectors.wide(class_vectors.voxel_view(mc, 2))
    monkeypatch.setattr(class_vectors, "wide", lambda *views: True)
    wide = [run(student, teacher, mc, h), uamt_fast.predictive_entropy(mc)]
    for a, b in zip((*narrow[0], narrow[1]), (*wide[0], wide[1])):
        assert torch.equal(a, b)


def test_launcher_picks_wide_offsets_past_two_to_the_31():
    big = torch.empty_strided((1, 2, 2**30), (2**31, 1, 2), device="meta")  # interleaved pairs: 2^31 elements
    assert class_vectors.wide(big) and not class_vectors.wide(big[..., : 2**30 - 1])
    # the class stride reaches it
    assert class_vectors.wide(torch.empty_strided((1, 3, 4), (0, 2**30, 1), device="meta"))


@pytest.mark.parametrize("spatial", [(2, 3, 4), (5,)])
def test_volumes_smaller_than_one_block_use_masked_loads(spatial):
    """V < block (the interpreter's 32): the MASKED kernels (loads and stores masked, no moved-back block)."""
    student, teacher, mc = make_logits(2, 2, 3, spatial)
    assert student[0, 0].numel() < launch_config.config_for("loss_fwd", torch.float32, False, 2, 3, 2).block
    check_against_reference(student, teacher, mc, safe_threshold(mc))
    assert rel_err(uamt_fast.predictive_entropy(mc, spatial_dims=len(spatial)),
                   reference.predictive_entropy(mc.double())) <= 1e-5


def test_threshold_as_tensor_equals_float():
    student, teacher, mc = make_logits(2, 2, 3, (3, 4, 5))
    h = safe_threshold(mc)
    loss_f, grad_f, stats_f = run(student, teacher, mc, h)
    for thr in (torch.tensor(h, device=DEVICE), torch.tensor(h, dtype=torch.float64, device=DEVICE)):
        loss_t, grad_t, stats_t = run(student, teacher, mc, thr)
        assert torch.equal(loss_t, loss_f) and torch.equal(grad_t, grad_f) and torch.equal(stats_t, stats_f)


def test_deterministic_bit_identical():
    student, teacher, mc = make_logits(2, 3, 4, (5, 6, 7))
    h = safe_threshold(mc)
    first = run(student, teacher, mc, h)
    second = run(student, teacher, mc, h)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# the hardware approximations of the GPU build (APPROX): how many mask decisions they can move
# ---------------------------------------------------------------------------------------------

# On NVIDIA GPUs the kernels use ex2.approx.ftz, lg2.approx.ftz and rcp.approx.ftz (kernels/
# class_vectors.py, the APPROX branches), which the interpreter cannot run. Their documented
# accuracy (PTX ISA; CUDA's __exp2f / __log2f / __frcp intrinsics): ex2 2 ulp (relative 2^-22),
# lg2 absolute 2^-22 on [0.5, 2] and 2 ulp elsewhere, rcp 1 ulp (relative 2^-23). Taken at twice that:
EX2_REL, LG2_ERR, RCP_REL = 2.0**-21, 2.0**-21, 2.0**-22
MAX_FLIP_FRACTION = 1e-5  # of the voxels, per threshold


def approx_uncertainty_bound(mc64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, delta)``: the float64 uncertainty of (T, B, C, *S) passes and a bound on how far the
    APPROX arithmetic can move the kernels' u from their exact-function value (first order, per voxel).

    Each pass's softmax p_c = e_c r, r = 1 / sum_k e_k: relative error <= 2 EX2_REL + RCP_REL (C = 2:
    the sigmoid 1 / (1 + e), <= EX2_REL + RCP_REL); so is mu_c's (a mean of such). With
    l_c = log2(mu_c + 1e-6) and u = -ln 2 sum_c mu_c l_c:
    |du| <= ln 2 sum_c (|d mu_c| |l_c + 1 / ln 2| + mu_c |d l_c|), |d l_c| <= LG2_ERR max(1, |l_c|);
    for C = 2, d mu_0 = -d mu_1 (mu_0 = 1 - mu_1): |du| <= ln 2 (|d mu_1| |l_1 - l_0| + sum_c mu_c |d l_c|)."""
    C = mc64.shape[2]
    mu = torch.softmax(mc64, dim=2).mean(0)
    lg = torch.log2(mu + reference.ENTROPY_EPS)
    u = -math.log(2) * (mu * lg).sum(1)
    dlog = LG2_ERR * (mu * lg.abs().clamp_min(1.0)).sum(1)
    if C == 2:
        dmu = mu[:, 1] * (EX2_REL + RCP_REL)
        delta = math.log(2) * (dmu * (lg[:, 1] - lg[:, 0]).abs() + dlog)
    else:
        dmu = mu * (2 * EX2_REL + RCP_REL)
        delta = math.log(2) * ((dmu * (lg + 1 / math.log(2)).abs()).sum(1) + dlog)
    return u, delta


@pytest.mark.parametrize("C, T", [(2, 8), (3, 4)])
def test_approximations_move_a_tiny_bounded_fraction_of_mask_decisions(C, T):
    """The paper's shape (B = 2, C = 2, T = 8, 112 x 112 x 80; and C = 3, T = 4), over the UA-MT
    threshold ramp (0.75 ln C to ln C): only voxels whose float64 u is within the bound of the threshold
    can be decided differently by the APPROX build: at most MAX_FLIP_FRACTION of them per threshold (0 to
    7 of the 2,007,040 at C = 2 in this seed), and toggling every one of them moves the float64 loss
    by less than the fp32 tolerance."""
    torch.manual_seed(19)
    student, teacher, mc = (x.detach().double().cpu() for x in make_logits(2, C, T, (112, 112, 80)))
    u, delta = approx_uncertainty_bound(mc)
    assert delta[u > 0.5 * math.log(C)].max() < 3e-6  # where thresholds are: about 25 ulp of fp32 at ln 2
    dist = ((torch.softmax(student, 1) - torch.softmax(teacher, 1)) ** 2).sum(1)
    for i in (0, 1000, 2000, 3000, 4500, 6000):
        h = reference.uncertainty_threshold(i, 6000, C)
        kept = u < h
        near = (u - h).abs() <= delta
        assert near.sum() <= MAX_FLIP_FRACTION * u.numel(), (i, h, int(near.sum()))
        losses = [(dist * m).sum() / (C * m.sum() + reference.MASK_EPS) for m in (kept, kept | near, kept & ~near)]
        assert max(abs(x - losses[0]) / losses[0] for x in losses[1:]) < TOL[torch.float32], (i, h)


# ---------------------------------------------------------------------------------------------
# mask edge cases
# ---------------------------------------------------------------------------------------------


def test_empty_mask_gives_exact_zero_loss_and_gradient():
    student, teacher, mc = make_logits(2, 2, 3, (3, 4, 5))
    mc = 0.1 * mc  # every voxel uncertain: u close to ln 2
    u_min = reference.predictive_entropy(mc.double()).min().item()
    assert u_min > 0.1
    loss, grad, stats = run(student, teacher, mc, u_min / 2, grad_output=3.0)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert torch.equal(grad, torch.zeros_like(grad))
    assert stats[0].item() == 0.0


def test_full_mask():
    student, teacher, mc = make_logits(2, 3, 3, (3, 4, 5))
    loss, grad, stats = run(student, teacher, mc, math.log(3) + 1.0)
    ref_loss, ref_grad, _ = reference64(student, teacher, mc, math.log(3) + 1.0)
    assert stats[0].item() == 1.0
    assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5


def test_exact_boundary_voxels_are_masked_the_same_in_forward_and_backward():
    """u == H exactly (u < H is strict). Whatever the kernel decides for those voxels, the count
    (loss denominator and mask fraction), the masked sum and the gradient must use the same mask,
    and it must be ``u < H`` for the kernels' own fp32 u. 13 voxels per sample copy one voxel's
    logits, so 26 sit exactly on H."""
    B, C, T, S = 2, 2, 4, (4, 5, 6)
    student, teacher, mc = make_logits(B, C, T, S)
    flat = mc.view(T, B, C, -1)
    median = reference.predictive_entropy(mc.double())[0].flatten().argsort()[flat.shape[-1] // 2]
    flat[:, :, :, 1:40:3] = flat[:, :1, :, median, None]  # voxels 1, 4, ..., 37 of both samples
    u = uamt_fast.predictive_entropy(mc)  # fp32, the kernels' own arithmetic
    h = float(u.view(B, -1)[0, 1])  # exactly representable: the fp32 value itself
    assert (u == h).sum() >= 26
    loss, grad, stats = run(student, teacher, mc, h)
    kept = grad.abs().sum(1) > 0  # the mask the gradient used (p != q at every voxel here)
    assert round(stats[0].item() * kept.numel()) == kept.sum().item()  # ... is the mask that was counted
    assert kept.sum() > 0 and not kept.all()
    assert torch.equal(kept, u < h)
    p, q = torch.softmax(student.detach().double(), 1), torch.softmax(teacher.double(), 1)
    expected = (((p - q) ** 2).sum(1) * kept).sum() / (C * kept.sum())
    assert rel_err(loss, expected) <= 1e-5  # ... and is the mask that was summed


# ---------------------------------------------------------------------------------------------
# NaN / Inf, gradient flow, no-grad
# ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NumPy, in the interpreter
@pytest.mark.parametrize(
    "where, value",
    [("mc", math.nan), ("mc", math.inf), ("student", -math.inf), ("teacher", math.nan), ("student", math.nan)],
)
def test_non_finite_logits_give_nan_loss(where, value):
    student, teacher, mc = make_logits(2, 2, 3, (3, 4, 5))
    tensors = {"student": student.detach().clone(), "teacher": teacher.clone(), "mc": mc.clone()}
    tensors[where].view(-1)[17] = value
    tensors["student"].requires_grad_()
    loss, grad, stats = run(tensors["student"], tensors["teacher"], tensors["mc"], safe_threshold(mc))
    assert torch.isnan(loss)
    assert torch.isnan(grad).any()  # the NaN reaches the optimizer step too
    assert torch.isnan(stats[1:]).all()


def test_teacher_and_mc_requiring_grad_get_no_gradient():
    student, teacher, mc = make_logits(2, 2, 3, (3, 4, 5))
    teacher.requires_grad_()
    mc.requires_grad_()
    loss = uamt_fast.uncertainty_consistency_loss(student, teacher, mc, safe_threshold(mc))
    loss.backward()
    assert student.grad is not None and teacher.grad is None and mc.grad is None


def test_without_grad_the_loss_is_unchanged():
    student, teacher, mc = make_logits(2, 2, 3, (3, 4, 5))
    h = safe_threshold(mc)
    with_grad = uamt_fast.uncertainty_consistency_loss(student, teacher, mc, h)
    with torch.no_grad():
        no_grad = uamt_fast.uncertainty_consistency_loss(student, teacher, mc, h)
    assert torch.equal(with_grad.detach(), no_grad) and not no_grad.requires_grad
    with pytest.raises(RuntimeError, match="without gradient"):
        kernels.uncertainty_loss_backward(torch.empty(0, device=DEVICE), torch.ones(()), torch.ones(()))


# ---------------------------------------------------------------------------------------------
# predictive entropy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "T, B, C, spatial, dtype",
    [(8, 2, 2, (3, 5, 7), torch.float32), (3, 2, 6, (9, 11), torch.float32), (4, 1, 3, (4, 5, 6), torch.bfloat16),
     (2, 2, 16, (3, 7), torch.float16), (9, 1, 8, (5, 7), torch.float32)],  # the last: C * T > 64, the pass loop
)
def test_predictive_entropy_matches_reference(T, B, C, spatial, dtype):
    _, _, mc = make_logits(B, C, T, spatial, (torch.float32, torch.float32, dtype))
    mc = mc.transpose(0, 1).contiguous().transpose(0, 1)  # pass and batch strides swapped
    u = uamt_fast.predictive_entropy(mc, spatial_dims=len(spatial))
    expected = reference.predictive_entropy(mc.double())
    assert u.dtype == torch.float32 and u.shape == (B, *spatial) and not u.requires_grad
    assert rel_err(u, expected) <= TOL[dtype]


# ---------------------------------------------------------------------------------------------
# dispatch, torch.compile
# ---------------------------------------------------------------------------------------------


def test_reference_fallback_path_agrees(monkeypatch):
    student, teacher, mc = make_logits(2, 3, 3, (3, 4, 5), (torch.float32, torch.bfloat16, torch.float32))
    h = safe_threshold(mc)
    fused = run(student, teacher, mc, h, grad_output=0.5)
    monkeypatch.setattr(consistency, "TRITON_ON_CPU", False)
    if DEVICE == "cuda":
        student, teacher, mc = student.detach().cpu().requires_grad_(), teacher.cpu(), mc.cpu()
    fallback = run(student, teacher, mc, h, grad_output=0.5)
    for a, b in zip(fused, fallback):
        assert rel_err(a, b) <= 1e-5
    assert rel_err(uamt_fast.predictive_entropy(mc), reference.predictive_entropy(mc.double())) <= 1e-5
    mc[0, 0, 0, 0, 0, 0] = math.nan
    assert torch.isnan(uamt_fast.uncertainty_consistency_loss(student, teacher, mc, h))


def test_torch_compile_fullgraph_keeps_the_fused_op():
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(student, teacher, mc, threshold):
        loss, stats = uamt_fast.uncertainty_consistency_loss(student, teacher, mc, threshold, return_stats=True)
        return 0.1 * loss, stats.mask_fraction

    compiled = torch.compile(step, fullgraph=True, backend=recording_backend)
    student, teacher, mc = make_logits(2, 2, 3, (3, 4, 5))
    for threshold in (safe_threshold(mc), torch.tensor(safe_threshold(mc, 0.3), device=DEVICE)):
        student.grad = None
        out = compiled(student, teacher, mc, threshold)
        targets = [n.target for n in graphs[-1].graph.nodes if n.op == "call_function"]
        assert torch.ops.uamt_fast.uncertainty_consistency_loss.default in targets or (
            torch.ops.uamt_fast.uncertainty_consistency_loss in targets
        ), targets
        out[0].backward()
        grad = student.grad.clone()
        student.grad = None
        expected = step(student, teacher, mc, threshold)
        expected[0].backward()
        assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])
        assert torch.equal(grad, student.grad)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def _bad_cases():
    s, t, mc = torch.randn(2, 2, 3, 4, 5), torch.randn(2, 2, 3, 4, 5), torch.randn(3, 2, 2, 3, 4, 5)
    return [
        ("teacher shape", dict(teacher_logits=t[:, :, :2]), ValueError, "teacher_logits: expected the student's shape"),
        ("mc shape", dict(mc_logits=mc[:, :1]), ValueError, r"mc_logits: expected \(T, \*student shape\)"),
        ("mc rank", dict(mc_logits=mc[0]), ValueError, "mc_logits: expected"),
        ("one class", dict(student_logits=s[:, :1], teacher_logits=t[:, :1], mc_logits=mc[:, :, :1]),
         ValueError, "C >= 2"),
        ("rank 2", dict(student_logits=s[:, :, 0, 0, 0], teacher_logits=t[:, :, 0, 0, 0],
                        mc_logits=mc[:, :, :, 0, 0, 0]), ValueError, "rank 3 to 5"),
        ("rank 6", dict(student_logits=s[..., None], teacher_logits=t[..., None], mc_logits=mc[..., None]),
         ValueError, "rank 3 to 5"),
        ("int logits", dict(student_logits=s.long()), TypeError, "student_logits: expected a float16"),
        ("bool mc", dict(mc_logits=mc > 0), TypeError, "mc_logits: expected a float16"),
        ("not a tensor", dict(teacher_logits=t.numpy()), TypeError, "teacher_logits: expected a torch.Tensor"),
        ("empty", dict(student_logits=s[:0], teacher_logits=t[:0], mc_logits=mc[:, :0]), ValueError, "non-empty"),
        ("devices", dict(teacher_logits=t.to("meta")), ValueError, "expected one device"),
        ("threshold 0", dict(threshold=0.0), ValueError, "finite positive"),
        ("threshold < 0", dict(threshold=-0.1), ValueError, "finite positive"),
        ("threshold nan", dict(threshold=math.nan), ValueError, "finite positive"),
        ("threshold inf", dict(threshold=torch.tensor(math.inf)), ValueError, "finite positive"),
        ("threshold bool", dict(threshold=True), TypeError, "threshold: expected a float"),
        ("threshold str", dict(threshold="0.5"), TypeError, "threshold: expected a float"),
        ("threshold shape", dict(threshold=torch.tensor([0.5, 0.6])), ValueError, "0-dim"),
        ("threshold int tensor", dict(threshold=torch.tensor(1)), TypeError, "floating-point"),
    ], dict(student_logits=s, teacher_logits=t, mc_logits=mc, threshold=0.5)


@pytest.mark.parametrize("case", [c[0] for c in _bad_cases()[0]])
def test_bad_input_raises_before_any_launch(case):
    cases, good = _bad_cases()
    _, change, error, message = next(c for c in cases if c[0] == case)
    args = {**good, **change}
    if DEVICE == "cuda":
        args = {k: v.cuda() if isinstance(v, torch.Tensor) and v.device.type == "cpu" and k != "threshold" else v
                for k, v in args.items()}
    with pytest.raises(error, match=message):
        uamt_fast.uncertainty_consistency_loss(
            args["student_logits"], args["teacher_logits"], args["mc_logits"], args["threshold"]
        )


def test_predictive_entropy_bad_input():
    with pytest.raises(ValueError, match="rank 4 to 6"):
        uamt_fast.predictive_entropy(torch.randn(2, 2, 5))
    with pytest.raises(ValueError, match="C >= 2"):
        uamt_fast.predictive_entropy(torch.randn(3, 2, 1, 5))
    with pytest.raises(TypeError, match="float16"):
        uamt_fast.predictive_entropy(torch.ones(3, 2, 2, 5, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# launch configs (kernels/launch_config.py)
# ---------------------------------------------------------------------------------------------


def test_launch_config_override_changes_the_grid_not_the_per_voxel_results():
    from uamt_fast.kernels.launch_config import LaunchConfig

    student, teacher, mc = make_logits(2, 2, 3, (3, 5, 7))
    h = safe_threshold(mc)
    default = kernels.uncertainty_loss_forward(student.detach(), teacher, mc, None, h, True)
    small = kernels.uncertainty_loss_forward(student.detach(), teacher, mc, None, h, True,
                                             config=LaunchConfig(16, 2))
    assert torch.equal(default[2], small[2])  # the gradient is per voxel: the same bits
    assert torch.equal(default[1][0], small[1][0])  # the mask fraction: an exact count
    assert rel_err(small[0], default[0]) <= 1e-6  # the loss: partial sums in another grouping
    assert torch.equal(entropy_kernels.predictive_entropy_forward(mc), entropy_kernels.predictive_entropy_forward(
        mc, config=LaunchConfig(8, 1)))
    grad = kernels.uncertainty_loss_backward(default[2], default[3], torch.tensor(2.0, device=DEVICE),
                                             config=LaunchConfig(64, 4))
    assert torch.equal(grad, kernels.uncertainty_loss_backward(default[2], default[3], torch.tensor(2.0, device=DEVICE)))


def test_launch_config_is_a_fixed_function_of_the_key(monkeypatch):
    from uamt_fast.kernels import launch_config as L

    monkeypatch.setattr(L, "TRITON_INTERPRET", False)  # the GPU rule and table, not the interpreter's blocks
    paper = 2 * 112 * 112 * 80
    first = L.config_for("loss_fwd", torch.bfloat16, False, 2, 8, paper)
    assert first == L.config_for("loss_fwd", torch.bfloat16, False, 2, 8, paper) == L.LaunchConfig(1024, 4)
    assert L.config_for("loss_fwd", torch.float32, False, 2, 8, paper) == L.LaunchConfig(512, 4)
    assert L.config_for("loss_fwd", torch.bfloat16, False, 2, 8, 4096).block < first.block  # small: more programs
    key = L.config_key("entropy", torch.float16, True, 3, 4, paper)
    assert key == ("entropy", "fp16", "classes_last", 3, 4, "large")
    monkeypatch.setitem(L.TABLE, key, L.LaunchConfig(2048, 8))
    assert L.config_for("entropy", torch.float16, True, 3, 4, paper) == L.LaunchConfig(2048, 8)
    with pytest.raises(ValueError, match="power of two"):
        L.LaunchConfig(1000, 4)
    with pytest.raises(ValueError, match="num_warps"):
        L.LaunchConfig(1024, 3)
    with pytest.raises(ValueError, match="kernel must be one of"):
        L.config_key("loss", torch.float32, False, 2, 8, paper)
