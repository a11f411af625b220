"""Which tensors a Triton kernel can take: CUDA tensors, and CPU tensors while the Triton interpreter is on.

The one place that answers it, for the public ops (``uamt_fast.consistency``, ``uamt_fast.ema``), which
route a tensor to the kernels or to the reference math, and for the launchers, which refuse what no
kernel can read. Imports torch only, so it can be asked before (or without) importing Triton.
"""
from __future__ import annotations

import os

import torch

# Read once, as Triton reads it when it is imported: a compiled kernel cannot take CPU tensors.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

__all__ = ["TRITON_INTERPRET", "triton_can_take", "check_triton_can_take"]


def triton_can_take(x: torch.Tensor, cpu: bool = TRITON_INTERPRET) -> bool:
    """True for a CUDA tensor, and for a CPU tensor when ``cpu`` (the interpreter is on, by default)."""
    return x.is_cuda or (cpu and x.is_cpu)


def check_triton_can_take(op: str, *tensors: torch.Tensor) -> None:
    """Raise ``RuntimeError`` naming ``op`` and the device if a Triton kernel cannot read one of ``tensors``."""
    for x in tensors:
        if not triton_can_take(x):
            raise RuntimeError(
                f"{op}: tensor on {x.device} cannot run a Triton kernel; CUDA tensors run the kernels, CPU "
                "tensors only under TRITON_INTERPRET=1 (the public uamt_fast ops route other tensors to the "
                "reference math)"
            )
