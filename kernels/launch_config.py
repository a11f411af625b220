"""Launch configurations of the loss / entropy kernels: a fixed table, then a rule; no runtime autotuning.

The same input (kernel, dtype, layout, C, T, size) always gets the same config, so the same bits
(the block size fixes the order of the loss's partial sums). ``config_for`` looks the key up in
``TABLE`` (filled from ``python -m benchmarks.kernel_sweep`` on a GPU, which prints its best
configs in exactly this form) and falls back to ``default_config``, a rule derived from the sm_90
compile analysis (``tests/kernels/test_kernel_structure.py``):

- loss forward / entropy: one 128-bit load per class and pass per thread for contiguous inputs
  (4 fp32 or 8 bf16/fp16 voxels per thread), 4 warps, so a program is 512 (fp32) or 1,024
  (16-bit) voxels. The loads of the unrolled passes are independent, all issued before any is
  used: at T=8, C=2 up to 16 x 16 B = 256 B per thread, 32 kB per program, several times per SM
  what Little's law asks at H100 bandwidth (3 TB/s x ~1 us / 132 SMs ~ 25 kB). ptxas interleaves
  part of them with the math to save registers; tests/kernels/test_kernel_structure.py checks from the
  SASS that the bytes in flight per SM still exceed 40 kB. The voxels per thread halve while the
  loads in flight plus the C accumulators exceed VALUES_PER_THREAD values (the paper's bf16 case
  sits at the budget: (16 + 2) x 8 = 144). Beyond UNROLL_MAX_LOADS (C * T) the passes are a loop,
  with C loads in flight. Channels-last inputs (class stride 1) get the same voxels per thread:
  C = 2 read as interleaved pairs (two 128-bit loads per pass: the trainer's bf16 case has 70 kB in
  flight per SM at 1,024 voxels against 48 kB at 512), other C one element per class and voxel (8
  bf16 voxels per thread rather than 4 halve the per-program work per voxel: 0.67 instead of 0.75
  of an H200's copy time in issue slots at C = 3, T = 4; tests/kernels/test_kernel_structure.py).
- backward scale: an elementwise pass, 16 elements per thread at 8 warps (four 128-bit accesses
  per operand for fp32, two for 16-bit).
- small problems (fewer than MIN_PROGRAMS programs of the big block) halve the block until there
  are that many programs or one voxel per thread is left.

The interpreter (CPU tests) gets small blocks so every test spans several programs with a ragged tail.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from uamt_fast.kernels.device import TRITON_INTERPRET

KERNELS = ("loss_fwd", "loss_bwd", "entropy")
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
LAYOUTS = ("contig", "classes_last")  # class stride != 1 (NCDHW), class stride 1 (channels_last_3d)
SMALL_VOXELS = 1 << 18  # voxels (B * V) below which a problem is "small"
UNROLL_MAX_LOADS = 64  # C * T up to which the kernels unroll the pass loop (a loop of T beyond: compile time)
VALUES_PER_THREAD = 144  # budget of loaded + accumulated values per thread (registers; see default_config)
MIN_PROGRAMS = 264  # two programs per SM of an H100 (132 SMs): below this the default block shrinks


@dataclass(frozen=True)
class LaunchConfig:
    """``block``: voxels per program (loss forward, entropy) or elements per program (backward)."""

    block: int
    num_warps: int

    def __post_init__(self):
        if self.block < 1 or self.block & (self.block - 1):
            raise ValueError(f"LaunchConfig.block: expected a power of two >= 1, got {self.block}")
        if self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"LaunchConfig.num_warps: expected a power of two from 1 to 32, got {self.num_warps}")


# (kernel, dtype, layout, C, T, size) -> config. T is 0 for loss_bwd (no passes), C too.
# Empty until a GPU sweep fills it: every key then uses default_config. Paste the sweep's
# "launcher table" block here.
TABLE: dict[tuple[str, str, str, int, int, str], LaunchConfig] = {}


def config_key(kernel: str, dtype: torch.dtype, classes_last: bool, num_classes: int, num_passes: int,
               voxels: int) -> tuple[str, str, str, int, int, str]:
    """The table key of one launch; ``voxels`` is B * V (elements for loss_bwd)."""
    if kernel not in KERNELS:
        raise ValueError(f"config_key: kernel must be one of {KERNELS}, got {kernel!r}")
    size = "small" if voxels < SMALL_VOXELS else "large"
    layout = LAYOUTS[1] if classes_last else LAYOUTS[0]
    if kernel == "loss_bwd":
        return (kernel, DTYPE_NAMES[dtype], LAYOUTS[0], 0, 0, size)
    return (kernel, DTYPE_NAMES[dtype], layout, num_classes, num_passes, size)


def default_config(key: tuple[str, str, str, int, int, str], voxels: int) -> LaunchConfig:
    """The rule of the module docstring, for keys the table does not have."""
    kernel, dtype, _, num_classes, num_passes, _ = key
    if TRITON_INTERPRET:
        return LaunchConfig(256 if kernel == "loss_bwd" else 32, 4)
    elem_bytes = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}[dtype]
    if kernel == "loss_bwd":
        return LaunchConfig(4096 if elem_bytes >= 4 else 8192, 8)
    num_warps = 4
    per_thread = 16 // elem_bytes  # voxels: one 128-bit load per class and pass (C = 2 pairs: two)
    in_flight = num_classes * (num_passes if num_classes * num_passes <= UNROLL_MAX_LOADS else 1)
    while per_thread > 1 and (in_flight + num_classes) * per_thread > VALUES_PER_THREAD:  # loads + accumulators
        per_thread //= 2
    block = per_thread * 32 * num_warps
    while block > 32 * num_warps and voxels < MIN_PROGRAMS * block:  # few voxels: more, smaller programs
        block //= 2
    return LaunchConfig(block, num_warps)


def config_for(kernel: str, dtype: torch.dtype, classes_last: bool, num_classes: int, num_passes: int,
               voxels: int) -> LaunchConfig:
    """The launch config of one kernel launch: ``TABLE`` entry, else ``default_config``."""
    key = config_key(kernel, dtype, classes_last, num_classes, num_passes, voxels)
    if TRITON_INTERPRET:
        return default_config(key, voxels)
    return TABLE.get(key) or default_config(key, voxels)
