"""Which tensors a Triton kernel can take: tensors on a GPU Triton runs (NVIDIA from compute capability 7.0,
AMD CDNA2-4 and RDNA3-4), and CPU tensors while the Triton interpreter is on; and which tensors an in-place
update may write: none whose memory overlaps itself or another operand.

The one place that answers both, for the public ops (``uamt_fast.ops.consistency``, ``uamt_fast.ops.ema``), which
route a tensor to the kernels or to the reference math, for the launchers, which refuse what no kernel
can read, and for ``uamt_fast.reference.ema_update_``, which refuses the same aliasing as the fast paths.
Imports torch only, so it can be asked before (or without) importing Triton.
"""
from __future__ import annotations

import os
import warnings

import torch

# Read once, as Triton reads it when it is imported: a compiled kernel cannot take CPU tensors.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The GPUs whose tensors run the kernels. NVIDIA: compute capability 7.0 (V100) and later, Triton's
# floor (torch.compile's inductor states the same); tests/kernels/test_kernel_targets.py compiles every kernel
# for sm_70 to sm_120. AMD: the families Triton's AMD backend targets, CDNA2 to CDNA4 (MI200, MI300,
# MI350: gfx90a, gfx942, gfx950) and RDNA3 / RDNA4 (gfx11*, gfx12*); gfx90a and gfx942 are compiled
# in the same test. Any other GPU (a Pascal card, an MI50 or MI100, RDNA2) gets the reference math.
MIN_CUDA_CAPABILITY = (7, 0)
ROCM_ARCHS = ("gfx90a", "gfx942", "gfx950")
ROCM_ARCH_FAMILIES = ("gfx11", "gfx12")

__all__ = ["TRITON_INTERPRET", "triton_can_take", "check_triton_can_take", "gpu_runs_triton", "nvidia_arch",
           "forget_gpus", "memory_span", "internal_overlap", "check_writes"]

_gpu_verdicts: dict[tuple[str, int], tuple[bool, str]] = {}


def _gpu_verdict(device: torch.device) -> tuple[bool, str]:
    """``(runs Triton, what the GPU is)`` of a CUDA / ROCm device, decided once per device; a GPU that
    does not run the kernels is named in one warning, the first time."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (device.type, index)
    verdict = _gpu_verdicts.get(key)
    if verdict is None:
        if torch.version.hip is not None:
            arch = torch.cuda.get_device_properties(index).gcnArchName.split(":")[0]
            verdict = (arch in ROCM_ARCHS or arch.startswith(ROCM_ARCH_FAMILIES), arch)
        else:
            major, minor = torch.cuda.get_device_capability(index)
            verdict = ((major, minor) >= MIN_CUDA_CAPABILITY, f"compute capability {major}.{minor}")
        if not verdict[0]:
            warnings.warn(
                f"uamt_fast: {device.type}:{index} ({torch.cuda.get_device_name(index)}, {verdict[1]}) is a GPU "
                "Triton does not run (NVIDIA from compute capability 7.0, AMD gfx90a / gfx942 / gfx950 / gfx11 / "
                "gfx12); the fused ops use the reference PyTorch math on it",
                RuntimeWarning, stacklevel=4,
            )
        _gpu_verdicts[key] = verdict
    return verdict


def gpu_runs_triton(device: torch.device) -> bool:
    """True for a CUDA / ROCm device whose GPU runs the Triton kernels (see MIN_CUDA_CAPABILITY, ROCM_ARCHS)."""
    return _gpu_verdict(device)[0]


def nvidia_arch(device: torch.device) -> int:
    """The kernels' APPROX: ``10 * major + minor`` of an NVIDIA GPU (its hardware ex2 / lg2 / rcp and, from
    80 on, packed 16-bit conversions), 0 for ROCm, the CPU and the interpreter (Triton's portable math)."""
    if TRITON_INTERPRET or device.type != "cuda" or torch.version.hip is not None:
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    arch = _nvidia_archs.get(index)
    if arch is None:
        major, minor = torch.cuda.get_device_capability(index)
        arch = _nvidia_archs[index] = 10 * major + minor
    return arch


_nvidia_archs: dict[int, int] = {}


def forget_gpus() -> None:
    """Forget what was decided about each GPU (``gpu_runs_triton``, its one warning, ``nvidia_arch``): the
    next call asks the driver again. For tests that fake a GPU's capability."""
    _gpu_verdicts.clear()
    _nvidia_archs.clear()


def triton_can_take(x: torch.Tensor, cpu: bool = TRITON_INTERPRET) -> bool:
    """True for a tensor on a GPU that runs Triton (``gpu_runs_triton``), and for a CPU tensor when
    ``cpu`` (the interpreter is on, by default)."""
    if x.is_cuda:
        return gpu_runs_triton(x.device)
    return cpu and x.is_cpu


def check_triton_can_take(op: str, *tensors: torch.Tensor) -> None:
    """Raise ``RuntimeError`` naming ``op`` and the device if a Triton kernel cannot read one of ``tensors``."""
    for x in tensors:
        if not triton_can_take(x):
            what = f"{x.device} ({_gpu_verdict(x.device)[1]})" if x.is_cuda else str(x.device)
            raise RuntimeError(
                f"{op}: tensor on {what} cannot run a Triton kernel; tensors on GPUs Triton runs (NVIDIA from "
                "compute capability 7.0, AMD gfx90a / gfx942 / gfx950 / gfx11 / gfx12) run the kernels, CPU "
                "tensors only under TRITON_INTERPRET=1 (the public uamt_fast ops route other tensors to the "
                "reference math)"
            )


# ---------------------------------------------------------------------------------------------
# Memory overlap of in-place targets. Decided from data pointers, shapes and strides (never by reading
# elements), so a check costs a few microseconds per tensor whatever its size.
# ---------------------------------------------------------------------------------------------

# torch's own test (0: no overlap, 1: overlap, 2: too hard to tell); exact for dense layouts and
# stride-0 (expanded) dims. Private, so looked up defensively.
_torch_internal_overlap = getattr(torch, "_debug_has_internal_overlap", None)


def memory_span(x: torch.Tensor) -> tuple[int, int, int] | None:
    """``(device key, first byte, one past the last byte)`` of the memory ``x`` addresses; None when it
    addresses none (no elements, or a meta tensor: null data pointer). Strides are never negative in
    torch, so the lowest address is ``data_ptr()``."""
    start, nbytes = x.data_ptr(), x.nbytes
    if not (start and nbytes):
        return None
    if x.is_contiguous():
        return x.get_device(), start, start + nbytes
    extent = sum((n - 1) * st for n, st in zip(x.shape, x.stride()))
    return x.get_device(), start, start + (extent + 1) * x.element_size()


def internal_overlap(x: torch.Tensor) -> bool:
    """True when two elements of ``x`` are one memory location (``expand()``, ``as_strided`` with
    overlapping strides): an in-place write to ``x`` would then write that location twice, and a
    kernel's parallel writes would race.

    Contiguous and dense layouts answer from torch's flags; other strided views from their strides
    (sorted by stride, each dim's stride must exceed the reach of all smaller ones: true of every
    slice or permutation of a dense tensor). Only a layout that rule cannot decide has its element
    offsets enumerated (on the CPU, O(numel) integers; no element of ``x`` is read)."""
    if x.numel() < 2 or x.is_contiguous():
        return False
    status = 2 if _torch_internal_overlap is None else int(_torch_internal_overlap(x))
    if status != 2:
        return status == 1
    reach = 0
    for stride, size in sorted((st, n) for n, st in zip(x.shape, x.stride()) if n > 1):
        if stride <= reach:
            break
        reach += (size - 1) * stride
    else:
        return False
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(x.shape, x.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride
    return torch.unique(offsets).numel() < x.numel()


def check_writes(op: str, written, read=(), describe=None) -> None:
    """Raise ``ValueError`` naming the tensors if an in-place update of ``written`` (a sequence of
    tensors, each updated from ``read``) would alias: a written tensor that overlaps itself, a written
    tensor whose memory overlaps another written tensor's, or one that overlaps a read tensor's (the
    same tensor on both sides included). Read tensors may overlap each other.

    Overlap between two tensors is of their address ranges (``memory_span``): exact for dense tensors,
    conservative for two interleaved strided views of one storage (refused though disjoint). One sort
    of the ranges, no element is read.

    Args:
        op: the public op, first in the message.
        written, read: sequences of tensors.
        describe: ``describe(role, i) -> str`` names the i-th tensor of ``role`` ("written" or "read")
            in the message; by default "written tensor i".
    """
    describe = describe or (lambda role, i: f"{role} tensor {i}")
    spans = []
    for is_written, tensors in ((True, written), (False, read)):
        for i, x in enumerate(tensors):
            span = memory_span(x)
            if span is not None:
                spans.append((*span, is_written, i))
    spans.sort()
    # A range overlaps an earlier-starting one iff it starts before that one's end: keep, per device,
    # the furthest end reached by a written range and by a read range (and whose it is).
    device, w_end, w_i, r_end, r_i = None, 0, 0, 0, 0
    for dev, start, end, is_written, i in spans:
        if dev != device:  # a CPU and a CUDA address may be equal
            device, w_end, r_end = dev, 0, 0
        if start < w_end or (is_written and start < r_end):
            first, second = (("written", w_i), ("written" if is_written else "read", i)) if start < w_end else \
                (("written", i), ("read", r_i))  # the written one first
            harm = "write those elements twice" if second[0] == "written" else "read what it writes"
            raise ValueError(
                f"{op}: {describe(*first)} and {describe(*second)} overlap in memory (the same tensor, or "
                f"views of one storage); the in-place update would {harm}. Pass separate tensors (e.g. "
                "copy.deepcopy the module, .clone() the tensor)"
            )
        if is_written:
            if end > w_end:
                w_end, w_i = end, i
        elif end > r_end:
            r_end, r_i = end, i
    for i, x in enumerate(written):
        if not x.is_contiguous() and internal_overlap(x):
            raise ValueError(
                f"{op}: {describe('written', i)} has elements that share one memory location (shape "
                f"{tuple(x.shape)}, strides {x.stride()}: a view made by expand() or as_strided?); an "
                "in-place update would write them more than once. Pass a tensor that owns its elements, "
                "e.g. .clone()"
            )

