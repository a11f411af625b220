"""The 2D backbone: the U-Net of SSL4MIS's 2D trainers (HiLab-git/SSL4MIS ``code/networks/unet.py``, ``UNet``,
as ``net_factory(net_type="unet")`` builds it; that file credits PyMIC).

Five stages of 16-32-64-128-256 features. Each stage is a ConvBlock: 3x3 conv, BN, LeakyReLU, dropout,
3x3 conv, BN, LeakyReLU, with element-wise dropout p = 0.05, 0.1, 0.2, 0.3, 0.5 in the encoder's stages
and none in the decoder's. Downsampling is a 2x2 max pool before the block; upsampling a 1x1 conv to the
skip's width and 2x bilinear interpolation, concatenated *after* the skip, then a ConvBlock; the output
is a 3x3 conv. Module names, construction order and default initialisation follow SSL4MIS, so its state
dicts load with ``strict=True`` and the same seed draws the same initial weights. 1 input channel,
4 classes (ACDC): 1,813,764 parameters in 82 tensors (2 classes: 1,813,474).

The additions of the V-Net (``uamt_fast.nets.vnet``), with the same contract:

- ``mc_dropout(model)`` (``uamt_fast.nets.vnet``): dropout stays on whatever ``model.training`` is (the
  dropout layers here are ``nn.Dropout`` modules, which the context manager switches).
- ``model.bn_groups = G``: in training mode each of G equal chunks of the batch is normalised with its own
  statistics (``GhostBatchNorm2d``), so G stacked stochastic passes see what G separate forwards see.
- ``model.full_res_memory_format_(fmt)``: the convs that read or write full-resolution tensors use
  memory format ``fmt`` while the rest keeps its own.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from uamt_fast.nets.ghost_norm import GhostBatchNorm2d, set_bn_groups
from uamt_fast.nets.vnet import MAX_FILTERS

# SSL4MIS UNet's params["dropout"]: the encoder stages' dropout; its Decoder builds every UpBlock with
# dropout_p=0.0.
ENCODER_DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)


class ConvBlock(nn.Module):
    """3x3 conv, BN, LeakyReLU, dropout(p), 3x3 conv, BN, LeakyReLU (SSL4MIS ``ConvBlock``: its Sequential is
    ``conv_conv``, so the parameters are ``conv_conv.{0,1,4,5}``; a dropout of p = 0 is an ``nn.Identity``)."""

    def __init__(self, c_in: int, c_out: int, dropout_p: float):
        super().__init__()
        # LeakyReLU in place: batch norm's backward reads its input, not its output, so nothing needs the
        # overwritten values (SSL4MIS allocates a new tensor; the values are the same).
        self.conv_conv = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1), GhostBatchNorm2d(c_out), nn.LeakyReLU(inplace=True),
            nn.Dropout(dropout_p) if dropout_p > 0 else nn.Identity(),
            nn.Conv2d(c_out, c_out, 3, padding=1), GhostBatchNorm2d(c_out), nn.LeakyReLU(inplace=True),
        )

    def forward(self, x):
        return self.conv_conv(x)


class DownBlock(nn.Module):
    """2x2 max pool, then a ConvBlock (SSL4MIS ``DownBlock``: ``maxpool_conv.1`` is the block)."""

    def __init__(self, c_in: int, c_out: int, dropout_p: float):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), ConvBlock(c_in, c_out, dropout_p))

    def forward(self, x, memory_format: torch.memory_format | None = None):
        """``memory_format``: the layout the block's conv reads (the pooled tensor is converted, a quarter of
        the input's bytes); None keeps the input's."""
        pooled = self.maxpool_conv[0](x)
        if memory_format is not None:
            pooled = pooled.contiguous(memory_format=memory_format)
        return self.maxpool_conv[1](pooled)


class UpBlock(nn.Module):
    """1x1 conv from ``c_in`` to ``c_skip`` channels, 2x bilinear upsampling (align_corners=True), concatenated
    after the skip, then a ConvBlock without dropout. SSL4MIS ``UpBlock`` with its default ``bilinear=True``:
    its ``Decoder`` never passes ``params["bilinear"]`` (False in ``UNet``) on, so the released weights hold
    ``conv1x1`` and no transposed conv."""

    def __init__(self, c_in: int, c_skip: int, c_out: int):
        super().__init__()
        self.conv1x1 = nn.Conv2d(c_in, c_skip, 1)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = ConvBlock(2 * c_skip, c_out, 0.0)

    def forward(self, x, skip):
        return self.conv(torch.cat([skip, self.up(self.conv1x1(x))], dim=1))  # skip first, as SSL4MIS concatenates


class Encoder(nn.Module):
    """``in_conv`` and ``down1`` .. ``down4``; returns the five stages' outputs, full resolution first."""

    def __init__(self, in_channels: int, features: list[int], dropout: tuple[float, ...]):
        super().__init__()
        self.in_conv = ConvBlock(in_channels, features[0], dropout[0])
        self.down1 = DownBlock(features[0], features[1], dropout[1])
        self.down2 = DownBlock(features[1], features[2], dropout[2])
        self.down3 = DownBlock(features[2], features[3], dropout[3])
        self.down4 = DownBlock(features[3], features[4], dropout[4])

    def forward(self, x, rest_format: torch.memory_format | None = None) -> list[torch.Tensor]:
        x0 = self.in_conv(x)
        x1 = self.down1(x0, rest_format)  # the layout changes after the pool: half resolution
        x2 = self.down2(x1)
        x3 = self.down3(x2)
        return [x0, x1, x2, x3, self.down4(x3)]


class Decoder(nn.Module):
    """``up1`` .. ``up4`` and the 3x3 ``out_conv``: the stages' outputs (full resolution first) -> logits."""

    def __init__(self, features: list[int], num_classes: int):
        super().__init__()
        self.up1 = UpBlock(features[4], features[3], features[3])
        self.up2 = UpBlock(features[3], features[2], features[2])
        self.up3 = UpBlock(features[2], features[1], features[1])
        self.up4 = UpBlock(features[1], features[0], features[0])
        self.out_conv = nn.Conv2d(features[0], num_classes, 3, padding=1)

    def forward(self, stages: list[torch.Tensor], full_format: torch.memory_format | None = None) -> torch.Tensor:
        x0, x1, x2, x3, x4 = stages
        x = self.up3(self.up2(self.up1(x4, x3), x2), x1)
        if full_format is not None:  # up4 writes full resolution: its half-resolution input changes layout
            x = x.contiguous(memory_format=full_format)
        return self.out_conv(self.up4(x, x0))


class UNet2D(nn.Module):
    """U-Net of SSL4MIS's 2D trainers. Input ``(B, in_channels, H, W)`` with H, W multiples of 16; output
    logits ``(B, num_classes, H, W)``. 1 channel, 4 classes, 16 filters: 1,813,764 parameters (82 tensors).

    Args:
        in_channels: image channels (1 for cine MRI).
        num_classes: output classes (4 for ACDC: background, RV, myocardium, LV).
        n_filters: width of the first stage; stage k has ``n_filters * 2**k`` channels (16: SSL4MIS's).
        dropout: the encoder's dropout (p = 0.05, 0.1, 0.2, 0.3, 0.5 by stage, SSL4MIS's); False: none.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 4, n_filters: int = 16, dropout: bool = True):
        super().__init__()
        if in_channels < 1 or num_classes < 2 or not 1 <= n_filters <= MAX_FILTERS:
            raise ValueError(
                f"UNet2D: expected in_channels >= 1, num_classes >= 2, 1 <= n_filters <= {MAX_FILTERS}; "
                f"got {in_channels}, {num_classes}, {n_filters}"
            )
        features = [n_filters * 2**k for k in range(5)]
        self.encoder = Encoder(in_channels, features, ENCODER_DROPOUT if dropout else (0.0,) * 5)
        self.decoder = Decoder(features, num_classes)
        self.has_dropout = dropout
        self.in_channels, self.num_classes, self.n_filters = in_channels, num_classes, n_filters
        self.layer_formats = None  # (full-resolution format, the rest's format), set by full_res_memory_format_

    # The modules whose convs read or write full-resolution tensors.
    FULL_RES = ("encoder.in_conv", "decoder.up4", "decoder.out_conv")

    def full_res_memory_format_(self, memory_format: torch.memory_format) -> UNet2D:
        """Put the ``FULL_RES`` modules' weights in ``memory_format``; the others keep theirs. The forward then
        converts at the two boundaries, both half-resolution tensors (``down1``'s pooled input and ``up4``'s
        input). Changes no value, only which conv kernels run. Call it before anything holds views of the
        weights (``flatten_parameters_``)."""
        w = self.encoder.down1.maxpool_conv[1].conv_conv[0].weight
        rest = torch.channels_last if w.is_contiguous(memory_format=torch.channels_last) and \
            not w.is_contiguous() else torch.contiguous_format
        for name in self.FULL_RES:
            self.get_submodule(name).to(memory_format=memory_format)
        self.layer_formats = (memory_format, rest)
        return self

    @property
    def bn_groups(self) -> int:
        return self.encoder.in_conv.conv_conv[1].groups

    @bn_groups.setter
    def bn_groups(self, groups: int) -> None:
        set_bn_groups(self, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet2D: expected input (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if any(s % 16 for s in x.shape[2:]):
            raise ValueError(f"UNet2D: spatial dims must be multiples of 16 (four 2x2 pools), got {tuple(x.shape[2:])}")
        full, rest = self.layer_formats or (None, None)
        if full is not None:
            x = x.contiguous(memory_format=full)
        return self.decoder(self.encoder(x, rest), full)


__all__ = ["ENCODER_DROPOUT", "UNet2D"]
