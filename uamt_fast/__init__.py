"""uamt_fast: fast uncertainty-aware mean teacher (UA-MT, Yu et al., MICCAI 2019) on one GPU."""
import os as _os

# Source-checkout shim. The repo-root kernels/ folder is installed as `uamt_fast.kernels`
# (pyproject package-dir). In a git checkout there is no uamt_fast/kernels/, so we add the repo
# root to this package's search path; `uamt_fast.kernels` then resolves to ../kernels.
# In an installed wheel uamt_fast/kernels/ exists and this is a no-op. Side effect in a checkout
# only: uamt_fast.tests / uamt_fast.benchmarks also become importable names (harmless).
_here = _os.path.dirname(__file__)
if not _os.path.isdir(_os.path.join(_here, "kernels")):
    __path__.append(_os.path.normpath(_os.path.join(_here, _os.pardir)))

from uamt_fast import deprecation  # noqa: E402
from uamt_fast.ops.consistency import ConsistencyStats, predictive_entropy, uncertainty_consistency_loss  # noqa: E402
from uamt_fast.ops.ema import ema_update_, flat_parameters, flatten_parameters_  # noqa: E402
from uamt_fast.nets.ghost_norm import GhostBatchNorm2d, GhostBatchNorm3d, ghost_batch_norm_, set_bn_groups  # noqa: E402
from uamt_fast.nets.unet import UNet2D  # noqa: E402
from uamt_fast.nets.vnet import VNet, mc_dropout  # noqa: E402

deprecation.install()  # the old flat module paths (uamt_fast.metrics, ...) for one release

__all__ = [
    "VNet",
    "UNet2D",
    "mc_dropout",
    "uncertainty_consistency_loss",
    "predictive_entropy",
    "ConsistencyStats",
    "ema_update_",
    "flatten_parameters_",
    "flat_parameters",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "ghost_batch_norm_",
    "set_bn_groups",
]
__version__ = "0.1.0"
