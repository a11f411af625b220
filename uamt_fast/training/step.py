"""One UA-MT iteration (``train_step``) and its parts: the teacher's stochastic passes, the student's losses,
the schedules of the learning rate, the consistency weight and the uncertainty threshold.

One iteration: sample 2 labeled + 2 unlabeled crops -> the EMA teacher makes T=8 noisy MC-dropout passes plus
one target pass, batched into one forward with per-pass ("ghost") batch norm -> the student forward -> 0.5 (CE
+ Dice) on the labeled crops + lambda(i) * uncertainty-masked consistency (fused Triton loss) -> SGD step ->
EMA of the teacher (one fused launch). Nothing here waits for the device. A --dims 2 run is the same step on
4D batches (B, 1, X, Y) of slices: the 2D U-Net, the same fused loss and EMA.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

import uamt_fast
from uamt_fast import reference
from uamt_fast.training.config import Config
from uamt_fast.training.state import Parts

TERMS = ("cross-entropy", "dice", "consistency")  # the loss terms, in the order train_step returns them


def teacher_passes(teacher_forward, teacher: nn.Module, x: torch.Tensor, passes: int, chunks: int,
                   noise_std: float, noise_clip: float) -> torch.Tensor:
    """``passes`` noisy stochastic teacher predictions of ``x`` (B, 1, *S) -> logits (passes, B, C, *S).

    Each pass sees its own noise clamp(N(0, std^2), +-clip) (drawn here, all at once, on x's device) and
    its own dropout masks. The passes go through the network in ``chunks`` forward calls; a forward of
    p stacked passes uses ghost batch norm (``bn_groups = p``), so each pass is normalised by its own
    batch statistics exactly as in a forward of its own.
    """
    noisy = x.unsqueeze(0) + reference.teacher_noise(x.expand(passes, *x.shape), noise_std, noise_clip)  # (P, B, 1, *S)
    out = []
    for group in torch.tensor_split(noisy, min(chunks, passes)):  # group: (p, B, 1, *S)
        teacher.bn_groups = group.shape[0]
        out.append(teacher_forward(group.flatten(0, 1)).unflatten(0, group.shape[:2]))  # (p, B, C, *S)
    return torch.cat(out) if len(out) > 1 else out[0]


def student_losses(student, images, labels, target, mc_logits, weight, threshold, *,
                   n_labeled: int, method: str, consistency_on: str, fused_loss: bool,
                   ignore_index: int | None = None):
    """Student forward and the UA-MT objective.

    images (B, 1, *S), labels (B, *S) with the labeled rows first; target (b, C, *S) and mc_logits
    (T, b, C, *S) from the teacher for the b rows that get consistency; weight lambda and threshold H
    are 0-dim device tensors. Returns the total loss, the terms (CE, Dice, consistency) and the
    uncertainty statistics (mask fraction, mean uncertainty), all device tensors. ``ignore_index``: labeled
    voxels with this label (not annotated) enter neither CE nor Dice; the consistency term sees every voxel.
    """
    logits = student(images)  # (B, C, *S)
    lab_logits, lab = logits[:n_labeled].float(), labels[:n_labeled]
    ce = reference.cross_entropy(lab_logits, lab, ignore_index)
    dice = reference.dice_loss(lab_logits, lab, ignore_index)
    zero = ce.new_zeros(())
    consistency, mask_fraction, uncertainty = zero, zero, zero
    if method != "supervised":
        s = logits[n_labeled:] if consistency_on == "unlabeled" else logits
        if method == "mt":  # the mean-teacher baseline: softmax MSE over every voxel, no mask
            consistency, mask_fraction = reference.softmax_mse(s.float(), target.float()).mean(), ce.new_ones(())
        elif method == "mt-dice":  # the paper's MT-Dice: soft Dice between the softmaxes, no mask
            consistency, mask_fraction = reference.softmax_dice_consistency(s.float(), target.float()), ce.new_ones(())
        elif fused_loss:
            consistency, stats = uamt_fast.uncertainty_consistency_loss(s, target, mc_logits, threshold, return_stats=True)
            mask_fraction, uncertainty = stats[0], stats[1]
        else:
            consistency = reference.uncertainty_consistency_loss(s.float(), target.float(), mc_logits.float(), threshold)
            u = reference.predictive_entropy(mc_logits.float())
            mask_fraction, uncertainty = (u < threshold).float().mean(), u.mean()
    loss = 0.5 * (ce + dice) + weight * consistency
    return loss, torch.stack([ce, dice, consistency]), torch.stack([mask_fraction, uncertainty])


def schedule(cfg: Config, iteration: int) -> tuple[float, float, float]:
    """(learning rate, consistency weight lambda, uncertainty threshold H) at 0-based ``iteration``.

    The threshold ramps to ln C, the largest entropy of C classes, for any C. SSL4MIS's 2D UA-MT
    (train_uncertainty_aware_mean_teacher_2D.py @06df604) multiplies by np.log(2) whatever its num_classes: on
    ACDC (C = 4, entropies up to ln 4) its mask keeps only voxels below 0.52 .. 0.69 nats, half the range this
    bound allows; we correct it. The reported UA-MT ACDC numbers come from that code, so ``--threshold-bound
    ln-2`` keeps its bound, to compare like with like.
    """
    lr = poly_learning_rate(iteration, cfg.lr, cfg.iterations) if cfg.lr_schedule == "poly" else \
        reference.learning_rate(iteration, cfg.lr, cfg.lr_step)
    weight = reference.consistency_weight(iteration, cfg.consistency, cfg.consistency_rampup, cfg.consistency_period)
    bound_classes = 2 if cfg.threshold_bound == "ln-2" else cfg.num_classes or 2  # (ln 2: SSL4MIS's bound)
    return lr, weight, reference.uncertainty_threshold(iteration, cfg.iterations, bound_classes)


def poly_learning_rate(iteration: int, base_lr: float, iterations: int, power: float = 0.9) -> float:
    """``base_lr (1 - i / iterations) ** 0.9`` at 0-based ``i``: SSL4MIS's 2D trainers set it after step i for
    step i + 1 from the count of steps done, so step i runs at this value (step 0 at base_lr)."""
    return base_lr * (1.0 - iteration / iterations) ** power


def phase(name: str):
    """A named range in a torch.profiler trace (``benchmarks/profile_step.py`` attributes GPU time by it);
    a no-op context when no profiler runs."""
    return torch.profiler.record_function("uamt:" + name) if torch.autograd._profiler_enabled() \
        else contextlib.nullcontext()


def train_step(parts: Parts, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One UA-MT iteration at 0-based ``iteration``; returns (terms (3,), stats (2,)) on the device, no host sync."""
    cfg, dev = parts.cfg, parts.device
    lr, weight, threshold = schedule(cfg, iteration)
    for group in parts.optimizer.param_groups:
        group["lr"] = lr * parts.lr_factor
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and dev.type == "cuda")
    cuda_graphs = cfg.compile_mode == "reduce-overhead" and dev.type == "cuda" and cfg.compile is not False
    if cuda_graphs:  # a new step: the compiled parts' graph outputs of the last one may be overwritten
        torch.compiler.cudagraph_mark_step_begin()

    # data: 2 labeled + 2 unlabeled augmented crops (2D: 12 + 12 slices), labeled rows first
    with phase("data"):
        images, labels = parts.sampler.next()  # (B, 1, *patch) float32, (B, *patch) int64
        images = images.to(dev, non_blocking=True).contiguous(memory_format=parts.memory_format)
        labels = labels.to(dev, non_blocking=True)

    # teacher: T MC-dropout passes + 1 target pass on noisy inputs, no grad, batched
    target = mc_logits = None
    if cfg.method != "supervised":
        x = images[cfg.batch_labeled:] if cfg.consistency_on == "unlabeled" else images
        passes = cfg.mc_passes + 1 if cfg.method == "uamt" else 1
        with phase("teacher"), torch.no_grad(), amp:
            out = teacher_passes(parts.teacher_forward, parts.teacher, x, passes, cfg.teacher_chunks,
                                 cfg.noise_std, cfg.noise_clip)  # (P, b, C, *S)
        target, mc_logits = out[0], out[1:]  # pass 0 is the target, as the released code draws it first

    # student: forward, losses, backward, SGD step
    if cfg.method == "supervised":
        images, labels = images[: cfg.batch_labeled], labels[: cfg.batch_labeled]
    with phase("student"), amp:
        loss, terms, stats = parts.student_losses(
            parts.student if parts.ddp is None else parts.ddp, images, labels, target, mc_logits,
            torch.full((), weight, device=dev), torch.full((), threshold, device=dev),  # fill kernels, no sync
            n_labeled=cfg.batch_labeled, method=cfg.method, consistency_on=cfg.consistency_on,
            fused_loss=cfg.fused_loss, ignore_index=parts.ignore_label)
    with phase("backward"):
        parts.optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with phase("optimizer"):
        parts.optimizer.step()

    # teacher EMA with the warm-up alpha of the global step (alpha = 0 at step 0: teacher := student)
    if parts.teacher is not None:
        with phase("ema"):
            ema = uamt_fast.ema_update_ if cfg.fused_ema else reference.ema_update_
            ema(parts.teacher, parts.student, cfg.ema_decay, step=iteration)
    if cuda_graphs:  # graph outputs live in memory the next replay reuses
        return terms.detach().clone(), stats.detach().clone()
    return terms.detach(), stats.detach()


__all__ = ["TERMS", "phase", "poly_learning_rate", "schedule", "student_losses", "teacher_passes", "train_step"]
