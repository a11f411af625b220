"""Reference UA-MT math in plain PyTorch: the definitions every fast path is tested against.

Each function reproduces the authors' released code (github.com/yulequan/UA-MT,
``code/train_LA_meanteacher_certainty_unlabel.py``, ``code/utils/{ramps,losses}.py``), quirks
included, with shapes generalised: any batch B, any class count C >= 2, any number of stochastic
passes T >= 1, and 2D or 3D spatial dims (written ``*S`` below). Logits are channel-first.

These functions are also the CPU path of the public ops and the ``--reference-ops`` path of the
trainer, so they stay obvious rather than fast.
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F

from uamt_fast.kernels.device import check_writes  # imports torch only

ENTROPY_EPS = 1e-6  # inside the log of the predictive entropy, as released
MASK_EPS = 1e-16  # added to the masked-mean denominator, as released
DICE_SMOOTH = 1e-5


def sigmoid_rampup(x: float, length: float) -> float:
    """``exp(-5 (1 - clip(x / length, 0, 1))^2)``; 1 when ``length`` is 0 (Laine & Aila 2017)."""
    if length == 0:
        return 1.0
    phase = 1.0 - min(max(x / length, 0.0), 1.0)
    return float(math.exp(-5.0 * phase * phase))


def consistency_weight(iteration: int, weight: float = 0.1, rampup: float = 40.0, period: int = 150) -> float:
    """``lambda(i) = weight * sigmoid_rampup(i // period, rampup)``: 0.1, ramped over 40 "epochs" of 150 iterations."""
    return weight * sigmoid_rampup(iteration // period, rampup)


def uncertainty_threshold(iteration: int, max_iterations: int, num_classes: int = 2) -> float:
    """``H(i) = (0.75 + 0.25 * sigmoid_rampup(i, I)) * ln(C)``: from 0.75 ln C up to the maximal entropy ln C."""
    return (0.75 + 0.25 * sigmoid_rampup(iteration, max_iterations)) * math.log(num_classes)


def learning_rate(iteration: int, base_lr: float = 0.01, step: int = 2500, gamma: float = 0.1) -> float:
    """``lr(i) = base_lr * gamma ** (i // step)``: 0.01, divided by 10 every 2500 iterations."""
    return base_lr * gamma ** (iteration // step)


def teacher_noise(x: torch.Tensor, std: float = 0.1, clip: float = 0.2, generator: torch.Generator | None = None):
    """``clamp(N(0, std^2), -clip, clip)``, shaped like ``x``; the teacher sees ``x + noise``."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.clamp(noise * std, -clip, clip)


def predictive_entropy(mc_logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of T stochastic passes, logits ``(T, B, C, *S)`` -> ``(B, *S)``.

    ``mu = mean_t softmax(logits_t)`` over classes, ``u = -sum_c mu_c * ln(mu_c + 1e-6)``.
    """
    mu = F.softmax(mc_logits, dim=2).mean(dim=0)
    return -torch.sum(mu * torch.log(mu + ENTROPY_EPS), dim=1)


def softmax_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``(softmax(s) - softmax(t))^2`` per class and voxel, ``(B, C, *S)``; the teacher is detached."""
    return (F.softmax(student_logits, dim=1) - F.softmax(teacher_logits.detach(), dim=1)) ** 2


def uncertainty_consistency_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mc_logits: torch.Tensor, threshold
) -> torch.Tensor:
    """Uncertainty-masked consistency (the paper's Eq. 3, normalised as released).

    With ``p = softmax(student)``, ``q = softmax(teacher)``, ``u = predictive_entropy(mc_logits)``
    and ``m_v = 1[u_v < H]``::

        loss = sum_v m_v sum_c (p_vc - q_vc)^2 / (C * sum_v m_v + 1e-16)

    Gradients flow to ``student_logits`` only. An empty mask gives exactly 0.
    """
    num_classes = student_logits.shape[1]
    with torch.no_grad():
        mask = (predictive_entropy(mc_logits) < threshold).to(student_logits.dtype).unsqueeze(1)
    dist = softmax_mse(student_logits, teacher_logits)
    return torch.sum(mask * dist) / (num_classes * torch.sum(mask) + MASK_EPS)


def uncertainty_consistency_loss_with_stats(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mc_logits: torch.Tensor, threshold
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, stats)`` as the fused kernels give them: the reference path of the public
    ``uamt_fast.uncertainty_consistency_loss`` (CPU tensors without the Triton interpreter, other devices).

    The loss of :func:`uncertainty_consistency_loss` in fp32 (inputs of any float dtype are cast;
    fp32 ones are not copied); ``stats`` fp32 (4,): mask fraction, uncertainty mean, min and max, no
    gradient. As in the kernels, any NaN or +-Inf logit (student, teacher or a pass) makes the loss,
    every student-gradient entry and the uncertainty stats NaN: a NaN uncertainty alone would just
    drop out of the mask and leave a finite loss. ``threshold``: a float or a 0-dim tensor.
    """
    student, teacher, mc = student_logits.float(), teacher_logits.float(), mc_logits.float()
    loss = uncertainty_consistency_loss(student, teacher, mc, threshold)
    with torch.no_grad():
        # 0 when every logit is finite, else NaN (x * 0 is NaN for NaN and +-Inf).
        nan_probe = sum((x * 0.0).sum(dtype=torch.float32) for x in (student, teacher, mc))
        u = predictive_entropy(mc)
        stats = torch.stack(
            [(u < threshold).float().mean(), u.mean() + nan_probe, u.min() + nan_probe, u.max() + nan_probe]
        )
    # Adds 0 to the loss and to each gradient entry for finite logits, NaN to all of them otherwise.
    return loss + (student * nan_probe).sum(), stats


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int | None = None) -> torch.Tensor:
    """Mean voxel-wise cross-entropy, logits ``(B, C, *S)``, integer labels ``(B, *S)``.

    ``ignore_index`` (nnU-Net's ignore label, ``uamt_fast.data.IGNORE_LABEL``): voxels with that label are left
    out; the mean is over the others, and 0 (no gradient) when every voxel is ignored.
    """
    if ignore_index is None:
        return F.cross_entropy(logits, labels.long())
    total = F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp_min(1).to(total.dtype)


def dice_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int | None = None) -> torch.Tensor:
    """Soft Dice over the whole batch, as released for C = 2, averaged over the foreground classes 1..C-1::

    dice_c = 1 - (2 sum(p_c y_c) + 1e-5) / (sum(p_c^2) + sum(y_c^2) + 1e-5),  p = softmax(logits), y_c = [labels == c]

    ``ignore_index``: the sums run over the voxels whose label is not ``ignore_index`` only.
    """
    p = F.softmax(logits, dim=1)
    if ignore_index is not None:
        p = p * (labels != ignore_index).unsqueeze(1).to(p.dtype)  # y_c is already 0 there
    losses = []
    for c in range(1, logits.shape[1]):
        pc, y = p[:, c], (labels == c).to(p.dtype)
        intersect = torch.sum(pc * y)
        losses.append(1.0 - (2.0 * intersect + DICE_SMOOTH) / (torch.sum(pc * pc) + torch.sum(y * y) + DICE_SMOOTH))
    return losses[0] if len(losses) == 1 else torch.stack(losses).mean()


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int | None = None) -> torch.Tensor:
    """``0.5 * (cross_entropy + dice)`` on the labeled crops; ``ignore_index``: those voxels enter neither."""
    return 0.5 * (cross_entropy(logits, labels, ignore_index) + dice_loss(logits, labels, ignore_index))


def ema_alpha(decay: float, step: int | None = None) -> float:
    """``alpha = min(1 - 1/(step + 1), decay)`` (warm-up) when ``step`` is given, else ``decay``."""
    return decay if step is None else min(1.0 - 1.0 / (step + 1), decay)


def _parameters(x) -> list[torch.Tensor]:
    return list(x.parameters()) if isinstance(x, torch.nn.Module) else list(x)


def _describe(role: str, x, i: int) -> str:
    """"teacher parameter '0.weight'" for a module's i-th parameter, else "teacher tensor i"."""
    if isinstance(x, torch.nn.Module):
        return f"{role} parameter '{[name for name, _ in x.named_parameters()][i]}'"
    return f"{role} tensor {i}"


@torch.no_grad()
def ema_update_(teacher, student, decay: float, step: int | None = None) -> None:
    """``theta' <- alpha theta' + (1 - alpha) theta`` over parameters only, the released per-tensor loop.

    ``teacher``/``student`` are modules or equal-length parameter iterables. Batch-norm buffers
    are not touched: the teacher keeps its own. Aliasing is refused with a ``ValueError``, as on
    the fast paths (``uamt_fast.ema_update_``): a teacher tensor sharing memory with a student tensor
    (the same module or tensor on both sides included) or with another teacher tensor, or whose
    elements share memory locations. (The released loop would silently compute something else:
    ``t.mul_(a).add_(t, alpha=1 - a)`` is ``(2a - a^2) t``.)
    """
    alpha = ema_alpha(decay, step)
    if teacher is student:
        raise ValueError("reference.ema_update_: teacher and student are the same object; the teacher must be "
                         "a separate copy (e.g. copy.deepcopy(student))")
    t_params, s_params = _parameters(teacher), _parameters(student)
    check_writes("reference.ema_update_", t_params, s_params, lambda role, i: _describe(
        *(("teacher", teacher) if role == "written" else ("student", student)), i))
    for t, s in zip(t_params, s_params, strict=True):
        t.mul_(alpha).add_(s, alpha=1.0 - alpha)


__all__ = [
    "sigmoid_rampup",
    "consistency_weight",
    "uncertainty_threshold",
    "learning_rate",
    "teacher_noise",
    "predictive_entropy",
    "softmax_mse",
    "uncertainty_consistency_loss",
    "uncertainty_consistency_loss_with_stats",
    "cross_entropy",
    "dice_loss",
    "supervised_loss",
    "ema_alpha",
    "ema_update_",
    "softmax_dice_consistency",
]


def softmax_dice_consistency(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """The "MT-Dice" consistency: a soft Dice loss between student and teacher softmax, averaged over classes.

    The released ``softmax_dice_loss`` (``code/utils/losses.py``, with its ``dice_loss1``: plain sums in the
    denominator, not squares), our reading of the paper's MT-Dice row. With ``p = softmax(student)``,
    ``q = softmax(teacher)`` (detached) and sums over the batch and every voxel::

        loss = 1/C sum_c [1 - (2 sum_v p_vc q_vc + 1e-5) / (sum_v p_vc + sum_v q_vc + 1e-5)]

    A scalar; 0 when p == q is one-hot, and no uncertainty mask.
    """
    p = F.softmax(student_logits, dim=1).movedim(1, 0).flatten(1)  # (C, B * prod(S))
    q = F.softmax(teacher_logits.detach(), dim=1).movedim(1, 0).flatten(1)
    dice = (2.0 * (p * q).sum(1) + DICE_SMOOTH) / (p.sum(1) + q.sum(1) + DICE_SMOOTH)
    return (1.0 - dice).mean()

