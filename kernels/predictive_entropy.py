"""Predictive entropy of T stochastic passes: the loss kernel's first stage on its own, with its launcher
and its wiring into PyTorch (``torch.ops.uamt_fast.predictive_entropy``, no gradient).

Per voxel ``u = -sum_c mu_c ln(mu_c + 1e-6)``, ``mu = (1/T) sum_t softmax(x_t)`` (fp32 whatever the
input dtype; the same bits as the uncertainty inside ``uncertainty_loss.py``'s forward kernel: both
are ``class_vectors.uncertainty``). A NaN or +-Inf logit makes its voxel's u NaN.

- ``uamt_predictive_entropy_kernel``, grid (voxel blocks, B): reads every element of the passes
  (T, B, C, V) once, in any layout ``class_vectors.voxel_view`` gives (contiguous, channels_last_3d
  read in place); writes the (B, V) fp32 map once. At the paper's shapes (T = 8, B = 2, C = 2,
  112 x 112 x 80, fp32): 128.5 MB read + 8.0 MB written = 136.5 MB, ~46 us at 3 TB/s.
- ``predictive_entropy_forward``: the launcher (views, layout code, launch config, output buffer).
- ``predictive_entropy_op``: the registered op ``torch.compile`` keeps in its graph (with its fake
  kernel); ``fused_predictive_entropy`` calls it inside tracing and the launcher directly otherwise.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from uamt_fast.kernels import class_vectors
from uamt_fast.kernels.class_vectors import block_voxels, store, uncertainty
from uamt_fast.kernels.device import check_triton_can_take, nvidia_arch
from uamt_fast.kernels.launch_config import LaunchConfig, config_for


@triton.jit
def uamt_predictive_entropy_kernel(
    mc_ptr,  # teacher passes (T, B, C, V)
    mc_st, mc_sb, mc_sc, mc_sv,
    u_ptr,  # out: fp32 (B, V) contiguous
    V,
    T: tl.constexpr,
    C: tl.constexpr,
    MC_LAYOUT: tl.constexpr,  # VEC, PAIRS, STRIDED or GENERIC (see load_classes)
    BLOCK_V: tl.constexpr,
    APPROX: tl.constexpr,  # NVIDIA: 10 major + minor (hardware ex2 / lg2 / rcp, see class_vectors); 0: portable math
    MASKED: tl.constexpr,  # V < BLOCK_V: masked loads and stores (see block_voxels)
    WIDE: tl.constexpr,  # int64 element offsets (see block_voxels)
):
    pid_b = tl.program_id(1).to(tl.int64)
    offs_v, mine = block_voxels(tl.program_id(0), V, BLOCK_V, BLOCK_V, MASKED, WIDE)
    u = uncertainty(mc_ptr + pid_b * mc_sb, mc_st, mc_sc, mc_sv, tl.program_id(0), V, C, T, MC_LAYOUT, BLOCK_V, APPROX,
                    MASKED, WIDE)
    store(u_ptr + pid_b * V + offs_v, u, mine, MASKED)


def predictive_entropy_forward(mc_logits: torch.Tensor, *, config: Optional[LaunchConfig] = None) -> torch.Tensor:
    """(T, B, C, *S) logits -> (B, *S) fp32 entropy of the mean softmax. ``config`` overrides the table's."""
    check_triton_can_take("uamt_fast kernels", mc_logits)
    cv = class_vectors
    T, B, C = mc_logits.shape[:3]
    mc4 = cv.voxel_view(mc_logits, 2)
    V = mc4.shape[3]
    out = cv.empty((B, *mc_logits.shape[3:]), device=mc_logits.device, dtype=torch.float32)
    cfg = config or config_for("entropy", mc_logits.dtype, cv.classes_last(mc4), C, T, B * V)
    uamt_predictive_entropy_kernel[(triton.cdiv(V, cfg.block), B)](
        mc4, *mc4.stride(), out, V, T=T, C=C, MC_LAYOUT=cv.layout_code(mc4), BLOCK_V=cfg.block,
        APPROX=nvidia_arch(mc_logits.device),
        MASKED=V < cfg.block, WIDE=cv.wide(mc4), num_warps=cfg.num_warps,
    )
    return out


@torch.library.custom_op("uamt_fast::predictive_entropy", mutates_args=())
def predictive_entropy_op(mc_logits: torch.Tensor) -> torch.Tensor:
    """(T, B, C, *S) -> (B, *S) fp32 entropy of the mean softmax over the T passes (no gradient)."""
    return predictive_entropy_forward(mc_logits)


@predictive_entropy_op.register_fake
def _(mc_logits):
    return mc_logits.new_empty((mc_logits.shape[1], *mc_logits.shape[3:]), dtype=torch.float32)


def fused_predictive_entropy(mc_logits: torch.Tensor) -> torch.Tensor:
    """The (B, *S) fp32 map of checked (T, B, C, *S) logits: the registered op inside ``torch.compile``
    tracing, else the launcher directly (no dispatcher around an eager launch)."""
    if torch.compiler.is_compiling():
        return torch.ops.uamt_fast.predictive_entropy(mc_logits)
    return predictive_entropy_forward(mc_logits)
