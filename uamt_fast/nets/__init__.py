"""The networks: the paper's V-Net (``vnet``), SSL4MIS's 2D U-Net (``unet``) and the per-pass (ghost) batch norm
(``ghost_norm``) that lets the teacher's stochastic passes run stacked in one batch."""
from uamt_fast.nets.ghost_norm import GhostBatchNorm2d, GhostBatchNorm3d, ghost_batch_norm_, set_bn_groups
from uamt_fast.nets.unet import UNet2D
from uamt_fast.nets.vnet import MAX_FILTERS, VNet, mc_dropout

__all__ = ["MAX_FILTERS", "GhostBatchNorm2d", "GhostBatchNorm3d", "UNet2D", "VNet", "ghost_batch_norm_", "mc_dropout",
           "set_bn_groups"]
