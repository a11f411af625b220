"""MC-dropout uncertainty over the sliding windows: the predictive entropy of the mean of T dropout passes.

``H = -sum_c mu_c ln(mu_c + 1e-6)`` (``predictive_entropy``, ``uamt_fast.reference``'s formula) of the mean
softmax ``mu`` of T stochastic forwards (dropout on, batch norm in eval mode on its running statistics).
``mc_dropout_mean`` stacks the T passes of each window in one batch, as the trainer stacks its teacher
passes (``MeanOfPasses``), inside one ``uamt_fast.evaluation.inference.sliding_window_predict``; the mean of
T whole sliding-window passes (``uamt_fast.figures.uncertainty_map``) is the same average (either way each
window of each pass draws its own dropout masks). The windows' means are combined as the masks' softmax is
(``blend``: the plain average or the Gaussian weights, whose fainter window borders benchmarks/blend_seams.py
measures), so the uncertainty written beside a mask is blended as the mask is. For a 2D model (``slice_size``)
the passes run slice by slice as its mask is predicted (``inference.predict_volume``, the one dispatch point).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from uamt_fast.evaluation.inference import InferenceSettings, predict_volume
from uamt_fast.nets.vnet import mc_dropout

PASSES_PER_FORWARD = 16  # passes of a window stacked into one forward (unless the windows' batch is larger)


def predictive_entropy(mean: torch.Tensor) -> torch.Tensor:
    """``-sum_c mu_c ln(mu_c + 1e-6)`` over the class axis 0 of a mean softmax ``mu`` (C, ...)."""
    return -(mean * torch.log(mean + 1e-6)).sum(0)


class MeanOfPasses(nn.Module):
    """``passes`` stochastic forwards of each window batched as the trainer batches its teacher passes (dropout
    masks drawn per batch element; batch norm in eval mode, on its running statistics), at most ``per_forward``
    patches a forward. Returns the log of the mean softmax, which ``sliding_window_predict``'s softmax turns
    back into that mean (softmax(log mu) = mu / sum mu = mu)."""

    def __init__(self, net: nn.Module, passes: int, per_forward: int):
        super().__init__()
        self.net, self.passes, self.per_forward = net, passes, per_forward

    def forward(self, x):  # x: (n, 1, *patch), patch 3D or 2D
        n, total = x.shape[0], 0.0
        chunk = max(1, self.per_forward // n)
        for first in range(0, self.passes, chunk):
            p = min(chunk, self.passes - first)
            logits = self.net(x.repeat(p, *(1,) * (x.dim() - 1)))  # (p * n, C, *patch), pass-major
            total = total + torch.softmax(logits.float(), 1).unflatten(0, (p, n)).sum(0)
        return torch.log(total / self.passes)


def mc_dropout_mean(net: nn.Module, image: np.ndarray | torch.Tensor, passes: int, patch_size, stride_xy: int,
                    stride_z: int, num_classes: int, batch_size: int, autocast_dtype: torch.dtype | None = None,
                    downsample: int = 1, blend: str = "mean", slice_size=None) -> torch.Tensor:
    """The mean softmax (C, X, Y, Z) of ``passes`` MC-dropout passes of ``net`` over ``image``: dropout on for the
    call (``uamt_fast.nets.vnet.mc_dropout``), each window's (a 2D model's: each slice's) passes stacked, up to
    ``max(batch_size, min(passes, 16))`` patches a forward; the other arguments as in ``InferenceSettings``
    (``slice_size`` (h, w): a 2D model, slice by slice)."""
    with mc_dropout(net):
        per_forward = max(batch_size, min(passes, PASSES_PER_FORWARD))  # the windows' batch, or the passes
        settings = InferenceSettings(tuple(patch_size), stride_xy, stride_z, num_classes, max(1, batch_size // passes),
                                     autocast_dtype, downsample, blend,
                                     None if slice_size is None else tuple(slice_size))
        return predict_volume(MeanOfPasses(net, passes, per_forward), image, settings)[1]


__all__ = ["MeanOfPasses", "PASSES_PER_FORWARD", "mc_dropout_mean", "predictive_entropy"]
