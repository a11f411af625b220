"""Shared test set-up.

On a machine without CUDA the Triton kernels run on CPU tensors through the Triton interpreter.
TRITON_INTERPRET must be set before triton is first imported (``@triton.jit`` reads it), so it is
set here, at collection time, before any test module imports ``uamt_fast.kernels``.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    assert "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1", (
        "triton was imported before tests/conftest.py could set TRITON_INTERPRET=1"
    )
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# The real LA data set (the authors' release layout). CI has it; a fresh clone may not.
LA_ROOT = Path(os.environ.get("UAMT_LA_ROOT", Path(__file__).resolve().parents[2] / "shared" / "data" / "LA"))


@pytest.fixture
def la_root() -> Path:
    if not (LA_ROOT / "train.list").is_file():
        pytest.skip(f"real LA data not found at {LA_ROOT} (set UAMT_LA_ROOT to the folder holding train.list)")
    return LA_ROOT


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
