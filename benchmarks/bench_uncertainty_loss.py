"""Uncertainty-masked consistency loss and predictive entropy: fused kernel vs reference ops.

Providers (one row each, grouped by problem):

- ``reference``: ``uamt_fast.reference`` eager, the op sequence of the released UA-MT code: softmax
  of the T passes, mean, ``log(mu + 1e-6)``, sum, compare with the threshold, softmax MSE, masked
  sums. It runs in the logits' dtype, as the released code would on such tensors.
- ``compile``: ``torch.compile(dynamic=False)`` of that same reference (GPU only: an inductor
  CPU compile costs minutes on a small CI machine).
- ``fused``: ``uamt_fast.uncertainty_consistency_loss`` / ``uamt_fast.predictive_entropy``, the
  Triton kernels (GPU only).

Each GPU row has two numbers (``conftest.BenchSession.run``): the kernel time from CUDA-graph replay
(what a compiled training step pays; %copy and the first speedup are on it) and the eager
wall-clock per call, host included (what an eager caller pays).

Problems: the paper's shapes T=8, C=2, 112x112x80 with B=2 (consistency on the unlabeled half, the
trainer's default) and B=4 ("consistency on all"); three input kinds:

- ``fp32``, ``bf16``: all three inputs contiguous in that dtype;
- ``trainer``: what ``train.py`` hands the loss on CUDA. Under bf16 autocast the V-Net's last layer is
  a Conv3d, so the student, the teacher target and the T passes all arrive as bf16; with
  channels_last_3d (on by default on CUDA; cuDNN keeps the input's memory format) each crop is
  channels-last, the target and the passes are views (pass 0 and passes 1..T) of the one
  (T+1, B, C, *S) teacher output, and the threshold is a 0-dim device tensor.

Modes ``fwd`` (a training forward: the student requires grad) and ``fwd+bwd``
(``torch.autograd.grad`` of the loss w.r.t. the student, peak memory recorded).

Bytes that must move (the floor of any implementation): the forward reads the T passes, the
teacher and the student once; forward + backward also writes the student gradient once.
Entropy reads the passes and writes a (B, *S) fp32 map.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import measure
from uamt_fast import reference

T, C = 8, 2
PAPER_SPATIAL = (112, 112, 80)
TINY_SPATIAL = (16, 16, 8)  # --bench-tiny: wiring only (the fused rows may run in the interpreter)
THRESHOLD = reference.uncertainty_threshold(3000, 6000)  # mid-run H: 0.75 ln2 < H < ln2
INPUT_KINDS = {"fp32": torch.float32, "bf16": torch.bfloat16, "trainer": torch.bfloat16}

_COMPILED = {}
_INPUTS: dict = {}  # the input sets of the last (batch, kind, shape, device): rows of one problem share them


def _compiled(fn):
    # One compiled callable per function; dynamic=False: each shape gets its own static kernels,
    # as a trainer with a fixed crop would.
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def spatial(bench) -> tuple[int, ...]:
    return TINY_SPATIAL if bench.tiny else PAPER_SPATIAL


def shape_name(batch: int, spatial_dims) -> str:
    return f"T{T} B{batch} C{C} {'x'.join(map(str, spatial_dims))}"


def make_inputs(batch: int, spatial_dims, kind: str, device, seed: int):
    """(student, teacher, mc, threshold): student, teacher and T-pass logits that share a per-voxel
    signal, so the uncertainty map has structure and the mask keeps part of the voxels (neither empty
    nor full). ``kind``: a key of INPUT_KINDS (``trainer``: the layout described in the module docstring)."""
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = INPUT_KINDS[kind]
    shape = (batch, C, *spatial_dims)
    base = 2.0 * torch.randn(shape, generator=g, device=device)
    passes = base + torch.randn((T + 1, *shape), generator=g, device=device)
    passes[0] = base + 0.5 * torch.randn(shape, generator=g, device=device)  # pass 0: the target
    student = base + 0.5 * torch.randn(shape, generator=g, device=device)
    if kind == "trainer":
        cl = torch.channels_last_3d
        passes = passes.flatten(0, 1).to(dtype).contiguous(memory_format=cl).unflatten(0, (T + 1, batch))
        teacher, mc = passes[0], passes[1:]
        student = student.to(dtype).contiguous(memory_format=cl).requires_grad_()
        return student, teacher, mc, torch.full((), THRESHOLD, device=device)
    passes = passes.to(dtype)
    return student.to(dtype).requires_grad_(), passes[0].clone(), passes[1:].clone(), THRESHOLD


def input_sets(bench, batch: int, kind: str) -> list[tuple]:
    """Rotated input sets of one problem (together several times the L2 cache on a GPU), made once
    and shared by every row of that problem."""
    if kind == "trainer" and not (bench.cuda or bench.interpreted):
        pytest.skip("trainer rows: on the CPU train.py hands the loss fp32 contiguous tensors (no autocast, "
                    "no channels_last_3d), which the fp32 rows time already")
    key = (batch, kind, spatial(bench), bench.device)
    if key not in _INPUTS:
        _INPUTS.clear()  # one problem's inputs at a time: the paper-shape sets are hundreds of MB
        first = make_inputs(batch, spatial(bench), kind, bench.device, seed=0)
        n = measure.rotation_count(_loss_bytes(*first[:3], backward=False), bench.device)
        _INPUTS[key] = [first] + [make_inputs(batch, spatial(bench), kind, bench.device, seed=k) for k in range(1, n)]
    return _INPUTS[key]


def _loss_bytes(student, teacher, mc, backward: bool) -> int:
    read = sum(x.numel() * x.element_size() for x in (student, teacher, mc))
    return read + (student.numel() * student.element_size() if backward else 0)


def _op(provider: str, bench, wiring_row: bool, reference_fn, fused_name: str):
    if provider == "reference":
        return reference_fn
    if provider == "compile":
        if not bench.cuda:
            pytest.skip("compile rows run on CUDA only (an inductor CPU compile of each shape takes minutes on CI)")
        return _compiled(reference_fn)
    bench.require_cuda(f"fused {fused_name}", wiring_row)
    import uamt_fast

    return getattr(uamt_fast, fused_name)


@pytest.mark.parametrize("provider", ["reference", "compile", "fused"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("kind", list(INPUT_KINDS))
@pytest.mark.parametrize("batch", [2, 4])
def test_uncertainty_loss(benchmark, bench, batch, kind, mode, provider):
    op = _op(provider, bench, batch == 2 and kind == "trainer", reference.uncertainty_consistency_loss,
             "uncertainty_consistency_loss")
    sets = input_sets(bench, batch, kind)
    nbytes = _loss_bytes(*sets[0][:3], backward=mode == "fwd+bwd")
    if mode == "fwd":
        def fn(s, t, mc, thr):
            return op(s, t, mc, thr)
    else:
        def fn(s, t, mc, thr):
            return torch.autograd.grad(op(s, t, mc, thr), s)

    shape = shape_name(batch, spatial(bench))
    bench.run(benchmark, group=f"loss {mode} {shape} {kind}", provider=provider, fn=fn, arg_sets=sets,
              bytes_moved=nbytes, baseline=provider != "fused", kernel=provider == "fused", kernel_time=True,
              peak=mode == "fwd+bwd", op="uncertainty_consistency_loss", mode=mode, batch=batch, dtype=kind,
              shape=shape)


@pytest.mark.parametrize("provider", ["reference", "compile", "fused"])
@pytest.mark.parametrize("kind", list(INPUT_KINDS))
@pytest.mark.parametrize("batch", [2, 4])
def test_predictive_entropy(benchmark, bench, batch, kind, provider):
    op = _op(provider, bench, batch == 2 and kind == "trainer", reference.predictive_entropy, "predictive_entropy")
    sets = [(s[2],) for s in input_sets(bench, batch, kind)]
    mc = sets[0][0]
    out_bytes = batch * mc[0, 0, 0].numel() * 4  # the (B, *S) fp32 uncertainty map
    nbytes = mc.numel() * mc.element_size() + out_bytes
    shape = shape_name(batch, spatial(bench))
    bench.run(benchmark, group=f"entropy {shape} {kind}", provider=provider, fn=op, arg_sets=sets,
              bytes_moved=nbytes, baseline=provider != "fused", kernel=provider == "fused", kernel_time=True,
              op="predictive_entropy", mode="fwd", batch=batch, dtype=kind, shape=shape)
