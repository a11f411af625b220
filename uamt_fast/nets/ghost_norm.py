"""Per-pass ("ghost") batch norm, 2D and 3D: G stochastic passes stacked in one batch are normalised as G forwards.

UA-MT's teacher runs T noisy MC-dropout passes plus a target pass. Stacking them in one batch is
fast, but plain batch norm would then normalise every pass with the statistics of all of them
(and move the running statistics by that mix). With ``groups = G`` these layers split the batch
into G equal chunks in training mode and normalise each with its own statistics: exactly what G
separate forwards compute. In eval mode (with running statistics) they are plain batch norm.

    model = MyUNet2d()                       # any model built with nn.BatchNorm2d / nn.BatchNorm3d
    ghost_batch_norm_(model)                 # once: its batch norms become GhostBatchNorm2d / 3d
    set_bn_groups(model, T + 1)              # before the stacked teacher forward
    logits = model(x.repeat(T + 1, 1, 1, 1)).unflatten(0, (T + 1, B))
    set_bn_groups(model, 1)                  # plain batch norm again
"""
from __future__ import annotations

import torch
import torch.nn as nn

from uamt_fast.ops.scalars import integer_value


class _GhostBatchNorm:
    """The per-chunk forward shared by the 2D and 3D classes (mixed in before ``nn.BatchNormNd``)."""

    groups: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.groups
        if g == 1 or not (self.training or self.running_mean is None):
            return super().forward(x)
        self._check_input_dim(x)
        if x.shape[0] % g:
            raise ValueError(f"{type(self).__name__}: batch of {x.shape[0]} is not divisible into groups={g}")
        xg = x.unflatten(0, (g, x.shape[0] // g))  # (G, b, C, *spatial), any memory layout
        dims = (1, *range(3, xg.dim()))
        var, mean = torch.var_mean(xg.float(), dim=dims, correction=0, keepdim=True)
        if self.training and self.track_running_stats:
            self._update_running_stats(mean, var, n=xg[0].numel() // xg.shape[2])
        shape = (1, 1, -1) + (1,) * (xg.dim() - 3)
        y = (xg - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.flatten(0, 1).to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        """Once per forward, by the chunk average (unbiased variance): what one forward whose batch
        statistics are the mean of the chunks' would do, so the G passes count as one step."""
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average, as nn.BatchNorm does
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        chunk_mean = mean.flatten(2).mean(0).flatten()
        chunk_var = var.flatten(2).mean(0).flatten() * (n / max(n - 1, 1))
        self.running_mean.lerp_(chunk_mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(chunk_var.to(self.running_var.dtype), factor)


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training-mode statistics are taken per chunk of the batch.

    With ``groups == 1`` (the default) it is exactly ``nn.BatchNorm2d``. With ``groups = G`` the
    batch is split into G equal chunks; each is normalised by its own mean and (biased) variance,
    and the running statistics move once by the chunk average (unbiased variance). Same
    constructor, parameters and state-dict keys as ``nn.BatchNorm2d``.
    """


class GhostBatchNorm3d(_GhostBatchNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` whose training-mode statistics are taken per chunk of the batch.

    With ``groups == 1`` (the default) it is exactly ``nn.BatchNorm3d``. With ``groups = G`` the
    batch is split into G equal chunks; each is normalised by its own mean and (biased) variance,
    and the running statistics move once by the chunk average (unbiased variance). Same
    constructor, parameters and state-dict keys as ``nn.BatchNorm3d``.
    """


_GHOST_OF = {nn.BatchNorm2d: GhostBatchNorm2d, nn.BatchNorm3d: GhostBatchNorm3d}


def ghost_batch_norm_(model: nn.Module) -> nn.Module:
    """Turn every ``nn.BatchNorm2d`` / ``nn.BatchNorm3d`` of ``model`` into its ghost version, in place.

    The modules keep their identity, parameters, buffers and state-dict keys (only their class
    changes, to a subclass that adds nothing but the per-chunk forward), so optimizers and
    :func:`uamt_fast.flatten_parameters_` made before keep working. Subclasses of batch norm other
    than these two are left alone. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"ghost_batch_norm_: expected an nn.Module, got {type(model).__name__}")
    for m in model.modules():
        ghost = _GHOST_OF.get(type(m))
        if ghost is not None:
            m.__class__ = ghost
    return model


def set_bn_groups(model: nn.Module, groups: int) -> int:
    """Set ``groups`` on every ghost batch norm of ``model``; returns how many there are.

    Raises ``ValueError`` for groups < 1, and if ``model`` has no ghost batch norm while groups > 1
    (stacked passes would silently share their statistics: call :func:`ghost_batch_norm_` first).
    """
    groups = integer_value(groups, "set_bn_groups: expected a positive integer")
    if groups < 1:
        raise ValueError(f"set_bn_groups: expected a positive integer, got {groups}")
    layers = [m for m in model.modules() if isinstance(m, _GhostBatchNorm)]
    if groups > 1 and not layers:
        raise ValueError("set_bn_groups: the model has no GhostBatchNorm2d/3d layers; call ghost_batch_norm_(model) "
                         "first, or its stacked passes would share batch-norm statistics")
    for m in layers:
        m.groups = groups
    return len(layers)


__all__ = ["GhostBatchNorm2d", "GhostBatchNorm3d", "ghost_batch_norm_", "set_bn_groups"]
