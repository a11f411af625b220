"""The UA-MT backbone: V-Net (Milletari et al. 2016) as configured in the authors' release.

n_filters=16, batch norm, ReLU, no short residuals; encoder stages of 1,2,3,3,3 3x3x3 convs with
stride-2 2x2x2 convs between them; decoder of stride-2 transposed convs, skips *added*; decoder
stages of 3,3,2,1 convs; a 1x1x1 output conv. Optional Dropout3d(p=0.5) after the last encoder
and the last decoder stage (the paper's "Bayesian V-Net"). Module names follow the release, so its
state-dict keys are the released ones. 1 input channel, 2 classes: 9,448,866 parameters.

Additions for fast UA-MT training, all off by default:

- ``mc_dropout(model)``: dropout stays on (Monte Carlo passes) whatever ``model.training`` is.
- ``model.bn_groups = G``: in training mode, batch norm normalises each of G equal chunks of the
  batch with its own statistics ("ghost" batch norm, ``uamt_fast.nets.ghost_norm``; its layers are
  ``GhostBatchNorm3d``). A batch of G stacked stochastic passes then sees exactly what G separate
  forwards would see.
- ``model.full_res_memory_format_(fmt)``: the convs that read or write full-resolution tensors (the
  1-channel input, the 16-channel first and last stages) use memory format ``fmt`` while the rest
  keeps its own (e.g. contiguous full-resolution layers in a channels_last_3d network).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from uamt_fast.nets.ghost_norm import GhostBatchNorm3d, set_bn_groups


def _conv_bn_relu(conv: nn.Module, channels: int) -> list[nn.Module]:
    return [conv, GhostBatchNorm3d(channels), nn.ReLU(inplace=True)]


class ConvBlock(nn.Module):
    """``n_stages`` x (3x3x3 conv, BN, ReLU)."""

    def __init__(self, n_stages: int, c_in: int, c_out: int):
        super().__init__()
        ops = []
        for i in range(n_stages):
            ops += _conv_bn_relu(nn.Conv3d(c_in if i == 0 else c_out, c_out, 3, padding=1), c_out)
        self.conv = nn.Sequential(*ops)

    def forward(self, x):
        return self.conv(x)


class DownsamplingConvBlock(nn.Module):
    """Stride-2 2x2x2 conv, BN, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 2):
        super().__init__()
        self.conv = nn.Sequential(*_conv_bn_relu(nn.Conv3d(c_in, c_out, stride, stride=stride), c_out))

    def forward(self, x):
        return self.conv(x)


class UpsamplingDeconvBlock(nn.Module):
    """Stride-2 2x2x2 transposed conv, BN, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 2):
        super().__init__()
        self.conv = nn.Sequential(*_conv_bn_relu(nn.ConvTranspose3d(c_in, c_out, stride, stride=stride), c_out))

    def forward(self, x):
        return self.conv(x)


# The widest first stage a checkpoint's config may ask for: 128 filters is 64x the paper's 9.5 M weights
# (0.6 G). The bound keeps a hostile or corrupt config (n_filters=1e9) from allocating terabytes.
MAX_FILTERS = 128


class VNet(nn.Module):
    """V-Net of UA-MT. Input ``(B, in_channels, D, H, W)`` with D, H, W multiples of 16; output logits
    ``(B, num_classes, D, H, W)``.

    Args:
        in_channels: image channels (1 for LA MRI).
        num_classes: output classes (2: background, left atrium).
        n_filters: width of the first stage; stage k has ``n_filters * 2**k`` channels.
        dropout: Dropout3d(p=0.5) after the last encoder and decoder stages ("Bayesian V-Net").
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, n_filters: int = 16, dropout: bool = True):
        super().__init__()
        if in_channels < 1 or num_classes < 2 or not 1 <= n_filters <= MAX_FILTERS:
            raise ValueError(
                f"VNet: expected in_channels >= 1, num_classes >= 2, 1 <= n_filters <= {MAX_FILTERS}; "
                f"got {in_channels}, {num_classes}, {n_filters}"
            )
        f = n_filters
        self.block_one = ConvBlock(1, in_channels, f)
        self.block_one_dw = DownsamplingConvBlock(f, 2 * f)
        self.block_two = ConvBlock(2, 2 * f, 2 * f)
        self.block_two_dw = DownsamplingConvBlock(2 * f, 4 * f)
        self.block_three = ConvBlock(3, 4 * f, 4 * f)
        self.block_three_dw = DownsamplingConvBlock(4 * f, 8 * f)
        self.block_four = ConvBlock(3, 8 * f, 8 * f)
        self.block_four_dw = DownsamplingConvBlock(8 * f, 16 * f)
        self.block_five = ConvBlock(3, 16 * f, 16 * f)
        self.block_five_up = UpsamplingDeconvBlock(16 * f, 8 * f)
        self.block_six = ConvBlock(3, 8 * f, 8 * f)
        self.block_six_up = UpsamplingDeconvBlock(8 * f, 4 * f)
        self.block_seven = ConvBlock(3, 4 * f, 4 * f)
        self.block_seven_up = UpsamplingDeconvBlock(4 * f, 2 * f)
        self.block_eight = ConvBlock(2, 2 * f, 2 * f)
        self.block_eight_up = UpsamplingDeconvBlock(2 * f, f)
        self.block_nine = ConvBlock(1, f, f)
        self.out_conv = nn.Conv3d(f, num_classes, 1)
        self.has_dropout = dropout
        self.dropout_p = 0.5
        self.mc_dropout = False  # dropout on even in eval mode (Monte Carlo passes)
        self.in_channels, self.num_classes, self.n_filters = in_channels, num_classes, n_filters
        self.layer_formats = None  # (full-resolution format, the rest's format), set by full_res_memory_format_

    # The modules whose convs read or write full-resolution tensors.
    FULL_RES = ("block_one", "block_one_dw", "block_eight_up", "block_nine", "out_conv")

    def full_res_memory_format_(self, memory_format: torch.memory_format) -> VNet:
        """Put the ``FULL_RES`` modules' weights in ``memory_format``; the others keep theirs. The forward
        then converts at the two boundaries, both half-resolution tensors (``block_one_dw``'s output and
        ``block_eight_up``'s input: a quarter of a full-resolution activation's bytes each). Changes
        no value, only which conv kernels run. Call it before anything holds views of the weights
        (``flatten_parameters_``)."""
        w = self.block_two.conv[0].weight
        rest = torch.channels_last_3d if w.is_contiguous(memory_format=torch.channels_last_3d) and \
            not w.is_contiguous() else torch.contiguous_format
        for name in self.FULL_RES:
            getattr(self, name).to(memory_format=memory_format)
        self.layer_formats = (memory_format, rest)
        return self

    @property
    def bn_groups(self) -> int:
        return self.block_one.conv[1].groups

    @bn_groups.setter
    def bn_groups(self, groups: int) -> None:
        set_bn_groups(self, groups)

    def _dropout(self, x):
        if not self.has_dropout:
            return x
        return F.dropout3d(x, self.dropout_p, training=self.training or self.mc_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"VNet: expected input (B, {self.in_channels}, D, H, W), got {tuple(x.shape)}")
        if any(s % 16 for s in x.shape[2:]):
            raise ValueError(f"VNet: spatial dims must be multiples of 16 (four stride-2 stages), got {tuple(x.shape[2:])}")
        full, rest = self.layer_formats or (None, None)
        if full is not None:
            x = x.contiguous(memory_format=full)
        x1 = self.block_one(x)
        x2 = self.block_one_dw(x1)
        x2 = self.block_two(x2 if rest is None else x2.contiguous(memory_format=rest))
        x3 = self.block_three(self.block_two_dw(x2))
        x4 = self.block_four(self.block_three_dw(x3))
        x5 = self._dropout(self.block_five(self.block_four_dw(x4)))

        x6 = self.block_six(self.block_five_up(x5) + x4)
        x7 = self.block_seven(self.block_six_up(x6) + x3)
        x8 = self.block_eight(self.block_seven_up(x7) + x2)
        if full is not None:
            x8 = x8.contiguous(memory_format=full)
        x9 = self._dropout(self.block_nine(self.block_eight_up(x8) + x1))
        return self.out_conv(x9)


@contextlib.contextmanager
def mc_dropout(model: nn.Module, enabled: bool = True):
    """Keep dropout on inside the block (Monte Carlo passes), independent of train/eval mode.

    Works for VNet (its ``mc_dropout`` flag) and for any model built from ``nn.Dropout*`` modules
    (they are put in training mode for the block and restored after).
    """
    vnets = [m for m in model.modules() if isinstance(m, VNet)]
    drops = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    saved = [m.mc_dropout for m in vnets], [m.training for m in drops]
    try:
        for m in vnets:
            m.mc_dropout = enabled
        for m in drops:
            m.train(enabled or m.training)
        yield model
    finally:
        for m, s in zip(vnets, saved[0]):
            m.mc_dropout = s
        for m, s in zip(drops, saved[1]):
            m.train(s)
