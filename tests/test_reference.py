"""The reference UA-MT math: hand-computed golden values, and the released code's own formulation as a second oracle."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uamt_fast import reference as ref

LN2 = math.log(2)


# --- schedules ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("x, length, expected", [
    (0, 40, math.exp(-5)), (20, 40, math.exp(-1.25)), (40, 40, 1.0), (100, 40, 1.0), (-3, 40, math.exp(-5)),
    (0, 0, 1.0), (7, 0, 1.0), (3000, 6000, math.exp(-1.25)),
])
def test_sigmoid_rampup(x, length, expected):
    assert ref.sigmoid_rampup(x, length) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("iteration, expected", [
    (0, 0.1 * math.exp(-5)), (149, 0.1 * math.exp(-5)), (150, 0.1 * math.exp(-5 * (1 - 1 / 40) ** 2)),
    (3000, 0.1 * math.exp(-5 * 0.5 ** 2)), (5999, 0.1 * math.exp(-5 * (1 - 39 / 40) ** 2)), (6000, 0.1), (9000, 0.1),
])
def test_consistency_weight(iteration, expected):
    assert ref.consistency_weight(iteration) == pytest.approx(expected, rel=1e-12)


def test_uncertainty_threshold_ramps_from_three_quarters_to_ln_c():
    assert ref.uncertainty_threshold(0, 6000) == pytest.approx((0.75 + 0.25 * math.exp(-5)) * LN2, rel=1e-12)
    assert ref.uncertainty_threshold(3000, 6000) == pytest.approx((0.75 + 0.25 * math.exp(-1.25)) * LN2, rel=1e-12)
    assert ref.uncertainty_threshold(6000, 6000) == pytest.approx(LN2, rel=1e-12)
    assert ref.uncertainty_threshold(6000, 6000, num_classes=3) == pytest.approx(math.log(3), rel=1e-12)
    values = [ref.uncertainty_threshold(i, 6000) for i in range(0, 6001, 100)]
    assert values == sorted(values)


@pytest.mark.parametrize("iteration, expected", [(0, 0.01), (2499, 0.01), (2500, 0.001), (4999, 0.001), (5000, 1e-4)])
def test_learning_rate(iteration, expected):
    assert ref.learning_rate(iteration) == pytest.approx(expected, rel=1e-12)


def test_teacher_noise_is_clamped_gaussian():
    x = torch.zeros(200_000)
    g = torch.Generator().manual_seed(3)
    n = ref.teacher_noise(x, generator=g)
    assert n.shape == x.shape and n.dtype == x.dtype
    assert n.abs().max() <= 0.2 and (n.abs() == 0.2).any()  # clamped, and the clamp is reached
    assert n.std().item() == pytest.approx(0.1 * 0.9745, rel=0.02)  # std of N(0, 0.01) clamped at 2 sigma
    assert torch.equal(n, ref.teacher_noise(x, generator=torch.Generator().manual_seed(3)))


# --- uncertainty ------------------------------------------------------------------------------------------------
def test_predictive_entropy_golden():
    # T=2 passes, B=1, C=2, 2 voxels. Voxel 0: both passes certain of class 0 (p = 1 - 1e-9);
    # voxel 1: the passes disagree completely, mean softmax = (0.5, 0.5).
    big = 30.0
    logits = torch.tensor([[[[big, 0.0], [0.0, big]]], [[[big, big], [0.0, 0.0]]]], dtype=torch.float64)
    u = ref.predictive_entropy(logits)
    assert u.shape == (1, 2)
    mu0 = torch.softmax(torch.tensor([big, 0.0], dtype=torch.float64), 0)
    expected0 = -(mu0 * torch.log(mu0 + 1e-6)).sum()
    assert u[0, 0].item() == pytest.approx(expected0.item(), rel=1e-12)
    assert u[0, 1].item() == pytest.approx(-math.log(0.5 + 1e-6), rel=1e-12)


@pytest.mark.parametrize("shape", [(1, 2, 5), (3, 2, 4, 6), (8, 2, 3, 4, 5), (2, 16, 3, 3)])
def test_predictive_entropy_general_shapes(shape):
    T, B, C = 3, shape[0], shape[1]
    logits = torch.randn((T,) + shape, dtype=torch.float64)
    u = ref.predictive_entropy(logits)
    assert u.shape == (B,) + shape[2:]
    mu = np.mean(np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(2, keepdims=True), axis=0)
    np.testing.assert_allclose(u.numpy(), -(mu * np.log(mu + 1e-6)).sum(1), rtol=1e-12)
    assert (u <= math.log(C) + 1e-12).all() and (u >= -1e-5).all()


def released_uncertainty(model_out_fn, unlabeled, T=8):
    """The released code: T/2 forwards of the batch repeated twice, reshaped, softmax mean, entropy."""
    b = unlabeled.shape[0]
    preds = torch.zeros([2 * b * T // 2 * 1, 2] + list(unlabeled.shape[2:]), dtype=unlabeled.dtype)
    preds = preds.reshape(T * b, 2, *unlabeled.shape[2:])
    repeated = unlabeled.repeat(2, 1, 1, 1, 1)
    for i in range(T // 2):
        preds[2 * b * i: 2 * b * (i + 1)] = model_out_fn(repeated, i)
    preds = F.softmax(preds, dim=1).reshape(T, b, 2, *unlabeled.shape[2:]).mean(0)
    return -1.0 * torch.sum(preds * torch.log(preds + 1e-6), dim=1, keepdim=True)


def test_entropy_matches_the_released_loop():
    b, T = 2, 8
    x = torch.randn(b, 1, 3, 4, 5, dtype=torch.float64)
    passes = torch.randn(T, b, 2, 3, 4, 5, dtype=torch.float64)  # what each (pass, sample) forward returns

    def model_out(batch, i):  # forward i of the doubled batch returns passes 2i and 2i+1
        return torch.cat([passes[2 * i], passes[2 * i + 1]])

    expected = released_uncertainty(model_out, x, T)
    torch.testing.assert_close(ref.predictive_entropy(passes), expected[:, 0], rtol=1e-12, atol=0)


# --- consistency ------------------------------------------------------------------------------------------------
def released_consistency(student, teacher, uncertainty, threshold):
    """losses.softmax_mse_loss + the masked mean of train_LA_meanteacher_certainty_unlabel.py (C=2)."""
    dist = (F.softmax(student, dim=1) - F.softmax(teacher, dim=1)) ** 2
    mask = (uncertainty < threshold).float()
    return torch.sum(mask * dist) / (2 * torch.sum(mask) + 1e-16)


def test_consistency_matches_the_released_code():
    s = torch.randn(2, 2, 6, 5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 2, 6, 5, 4, dtype=torch.float64)
    # passes that agree more or less, so some voxels are certain and some are not
    mc = 3 * torch.randn(1, 2, 2, 6, 5, 4, dtype=torch.float64) + torch.randn(8, 2, 2, 6, 5, 4, dtype=torch.float64)
    H = ref.uncertainty_threshold(1000, 6000)
    u = ref.predictive_entropy(mc).unsqueeze(1)
    loss = ref.uncertainty_consistency_loss(s, t, mc, H)
    expected = released_consistency(s, t, u.float().double(), H)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    assert 0 < (u < H).double().mean() < 1  # the mask is neither empty nor full here


def test_consistency_golden_and_gradient_only_to_student():
    # one voxel kept (u small), one dropped (u large); C=2, B=1
    s = torch.tensor([[[0.0, 1.0], [0.0, -1.0]]], dtype=torch.float64, requires_grad=True)  # (1, 2, 2)
    t = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]], dtype=torch.float64, requires_grad=True)
    mc = torch.tensor([[[[9.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64)  # T=1: voxel 0 certain, voxel 1 uniform
    loss = ref.uncertainty_consistency_loss(s, t, mc, threshold=0.5)
    p0 = 0.5
    q0 = 1 / (1 + math.exp(-2.0))
    expected = 2 * (p0 - q0) ** 2 / (2 * 1 + 1e-16)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    assert t.grad is None
    assert torch.all(s.grad[..., 1] == 0)  # the masked-out voxel gets no gradient
    assert s.grad[..., 0].abs().sum() > 0


def test_consistency_empty_mask_is_exactly_zero():
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = ref.uncertainty_consistency_loss(s, torch.randn(2, 3, 4, 4), torch.randn(2, 2, 3, 4, 4), threshold=1e-9)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(s.grad == 0)


# --- supervised -------------------------------------------------------------------------------------------------
def test_dice_loss_golden():
    logits = torch.zeros(1, 2, 2, 2, dtype=torch.float64)  # p1 = 0.5 everywhere
    labels = torch.tensor([[[1, 0], [0, 0]]])
    expected = 1 - (2 * 0.5 + 1e-5) / (4 * 0.25 + 1 + 1e-5)
    assert ref.dice_loss(logits, labels).item() == pytest.approx(expected, rel=1e-12)
    perfect = torch.stack([(1 - labels) * 40.0, labels * 40.0], dim=1).double()
    assert ref.dice_loss(perfect, labels).item() == pytest.approx(0.0, abs=1e-9)


def test_supervised_loss_is_half_ce_plus_dice():
    logits = torch.randn(2, 2, 4, 4, 4, dtype=torch.float64)
    labels = torch.randint(0, 2, (2, 4, 4, 4))
    ce = F.cross_entropy(logits, labels)
    p1 = F.softmax(logits, 1)[:, 1]
    y = labels.double()
    dice = 1 - (2 * (p1 * y).sum() + 1e-5) / ((p1 * p1).sum() + (y * y).sum() + 1e-5)
    torch.testing.assert_close(ref.supervised_loss(logits, labels), 0.5 * (ce + dice), rtol=1e-12, atol=0)


# --- EMA --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("step, alpha", [(None, 0.99), (0, 0.0), (1, 0.5), (9, 0.9), (99, 0.99), (1000, 0.99)])
def test_ema_alpha_warm_up(step, alpha):
    assert ref.ema_alpha(0.99, step) == pytest.approx(alpha, rel=1e-12)


def test_ema_update_parameters_only():
    teacher = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    student = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    student[1].running_mean.fill_(5.0)
    before = [p.detach().clone() for p in teacher.parameters()]
    ref.ema_update_(teacher, student, 0.99, step=9)
    for t0, t, s in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s, rtol=1e-6, atol=1e-7)
    assert torch.all(teacher[1].running_mean == 0)  # buffers are the teacher's own
    ref.ema_update_(teacher, student, 0.99, step=0)  # alpha 0: teacher = student
    for t, s in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(t, s)
