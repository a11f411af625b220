"""Scalar arguments of the public ops (``threshold``, ``decay``, ``step``): real numbers of any numeric type.

Accepted: Python ints and floats, NumPy scalars (``np.float32``, ``np.int64``, ...), anything registered
as ``numbers.Real`` / ``numbers.Integral``, and 0-dim CPU tensors of a real dtype. Refused with a
``TypeError``: bools (``True`` is an int to Python, never a meaningful decay or step), strings,
complex numbers, tensors with more than one element or on an accelerator (reading one would sync the host).
"""
from __future__ import annotations

import numbers

import torch


def real_value(value, message: str) -> float:
    """``float(value)`` for a real number; else ``TypeError(f"{message}, got <type>")``."""
    if type(value) is float or type(value) is int:  # the common case, without the ABC checks below
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if _is_cpu_scalar_tensor(value) and value.dtype != torch.bool and not value.dtype.is_complex:
        return float(value)
    raise TypeError(f"{message}, got {_describe(value)}")


def integer_value(value, message: str) -> int:
    """``int(value)`` for an integer of any integer type (not a float holding one); else ``TypeError``."""
    if type(value) is int:
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if _is_cpu_scalar_tensor(value) and not (value.dtype.is_floating_point or value.dtype.is_complex
                                             or value.dtype == torch.bool):
        return int(value)
    raise TypeError(f"{message}, got {_describe(value)}")


def _is_cpu_scalar_tensor(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 0 and value.device.type == "cpu"


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}, {value.dtype} on {value.device}"
    return type(value).__name__
