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
trainer's default) and B=4 ("consistency on all"); and SSL4MIS's 2D ACDC step (``train.py --dims 2``, a
24 x 1 x 256 x 256 input of 12 labeled + 12 unlabeled slices): T=8, C=4, 256x256 with B=12 (the unlabeled
half, SSL4MIS's and the acdc preset's) and B=24 (all); three input kinds:

- ``fp32``, ``bf16``: all three inputs contiguous in that dtype;
- ``trainer``: what ``train.py`` hands the loss on CUDA. Under bf16 autocast the V-Net's last layer is
  a Conv3d, so the student, the teacher target and the T passes all arrive as bf16; with
  channels_last_3d (on by default on CUDA; cuDNN keeps the input's memory format) each crop is
  channels-last, the target and the passes are views (pass 0 and passes 1..T) of the one
  (T+1, B, C, *S) teacher output, and the threshold is a 0-dim device tensor. 2D: the U-Net's last layer
  is a Conv2d, the slices channels_last.

Modes ``fwd`` (a training forward: the student requires grad) and ``fwd+bwd``
(``torch.autograd.grad`` of the loss w.r.t. the student, peak memory recorded).

Bytes that must move (the floor of any implementation): the forward reads the T passes, the
teacher and the student once; forward + backward also writes the student gradient once.
Entropy reads the passes and writes a (B, *S) fp32 map.
"""
from __future__ import annotations

import functools

import pytest
import torch

from benchmarks import measure
from uamt_fast import reference

T = 8
# (classes, full-scale spatial shape, --bench-tiny's: wiring only, the fused rows may run in the interpreter) by
# problem: the paper's 3D LA step and SSL4MIS's 2D ACDC step (code/train_uncertainty_aware_mean_teacher_2D.py:
# --patch_size 256 256, num_classes 4, batch 24 of which --labeled_bs 12).
PROBLEMS = {"3d": (2, (112, 112, 80), (16, 16, 8)), "2d": (4, (256, 256), (16, 16))}
BATCHES = [("3d", 2), ("3d", 4), ("2d", 12), ("2d", 24)]  # (problem, B): the unlabeled half, and all
INPUT_KINDS = {"fp32": torch.float32, "bf16": torch.bfloat16, "trainer": torch.bfloat16}

_COMPILED = {}
_INPUTS: dict = {}  # the input sets of the last (batch, kind, shape, device): rows of one problem share them


def _compiled(fn):
    # One compiled callable per function; dynamic=False: each shape gets its own static kernels,
    # as a trainer with a fixed crop would.
    if fn not in _COMPILED:
        # 12 input signatures a function (4 batches x 3 kinds): past dynamo's default limit of 8 recompiles it
        # would run the rest eagerly, rows labelled "compile" timing the plain reference
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def spatial(bench, problem: str = "3d") -> tuple[int, ...]:
    return PROBLEMS[problem][2 if bench.tiny else 1]


def shape_name(batch: int, spatial_dims, classes: int = 2) -> str:
    return f"T{T} B{batch} C{classes} {'x'.join(map(str, spatial_dims))}"


def threshold(classes: int) -> float:
    """Mid-run H of C classes: 0.75 ln C < H < ln C."""
    return reference.uncertainty_threshold(3000, 6000, classes)


def make_inputs(batch: int, spatial_dims, kind: str, device, seed: int, classes: int = 2):
    """(student, teacher, mc, threshold): student, teacher and T-pass logits that share a per-voxel
    signal, so the uncertainty map has structure and the mask keeps part of the voxels (neither empty
    nor full). ``kind``: a key of INPUT_KINDS (``trainer``: the layout described in the module docstring)."""
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = INPUT_KINDS[kind]
    shape = (batch, classes, *spatial_dims)
    base = 2.0 * torch.randn(shape, generator=g, device=device)
    passes = base + torch.randn((T + 1, *shape), generator=g, device=device)
    passes[0] = base + 0.5 * torch.randn(shape, generator=g, device=device)  # pass 0: the target
    student = base + 0.5 * torch.randn(shape, generator=g, device=device)
    if kind == "trainer":
        cl = torch.channels_last_3d if len(spatial_dims) == 3 else torch.channels_last
        passes = passes.flatten(0, 1).to(dtype).contiguous(memory_format=cl).unflatten(0, (T + 1, batch))
        teacher, mc = passes[0], passes[1:]
        student = student.to(dtype).contiguous(memory_format=cl).requires_grad_()
        return student, teacher, mc, torch.full((), threshold(classes), device=device)
    passes = passes.to(dtype)
    return student.to(dtype).requires_grad_(), passes[0].clone(), passes[1:].clone(), threshold(classes)


def input_sets(bench, batch: int, kind: str, problem: str = "3d") -> list[tuple]:
    """Rotated input sets of one problem (together several times the L2 cache on a GPU), made once
    and shared by every row of that problem."""
    if kind == "trainer" and not (bench.cuda or bench.interpreted):
        pytest.skip("trainer rows: on the CPU train.py hands the loss fp32 contiguous tensors (no autocast, "
                    "no channels_last_3d), which the fp32 rows time already")
    classes, shape = PROBLEMS[problem][0], spatial(bench, problem)
    key = (batch, kind, shape, classes, bench.device)
    if key not in _INPUTS:
        _INPUTS.clear()  # one problem's inputs at a time: the paper-shape sets are hundreds of MB
        first = make_inputs(batch, shape, kind, bench.device, seed=0, classes=classes)
        n = measure.rotation_count(_loss_bytes(*first[:3], backward=False), bench.device)
        _INPUTS[key] = [first] + [make_inputs(batch, shape, kind, bench.device, seed=k, classes=classes)
                                  for k in range(1, n)]
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
@pytest.mark.parametrize("problem, batch", BATCHES)
def test_uncertainty_loss(benchmark, bench, problem, batch, kind, mode, provider):
    op = _op(provider, bench, batch in (2, 12) and kind == "trainer", reference.uncertainty_consistency_loss,
             "uncertainty_consistency_loss")
    sets = input_sets(bench, batch, kind, problem)
    nbytes = _loss_bytes(*sets[0][:3], backward=mode == "fwd+bwd")
    if mode == "fwd":
        def fn(s, t, mc, thr):
            return op(s, t, mc, thr)
    else:
        def fn(s, t, mc, thr):
            return torch.autograd.grad(op(s, t, mc, thr), s)

    shape = shape_name(batch, spatial(bench, problem), PROBLEMS[problem][0])
    bench.run(benchmark, group=f"loss {mode} {shape} {kind}", provider=provider, fn=fn, arg_sets=sets,
              bytes_moved=nbytes, baseline=provider != "fused", kernel=provider == "fused", kernel_time=True,
              peak=mode == "fwd+bwd", op="uncertainty_consistency_loss", mode=mode, batch=batch, dtype=kind,
              shape=shape)


@pytest.mark.parametrize("provider", ["reference", "compile", "fused"])
@pytest.mark.parametrize("kind", list(INPUT_KINDS))
@pytest.mark.parametrize("problem, batch", BATCHES)
def test_predictive_entropy(benchmark, bench, problem, batch, kind, provider):
    op = _op(provider, bench, batch in (2, 12) and kind == "trainer", reference.predictive_entropy,
             "predictive_entropy")
    if provider == "fused":  # (a rank-5 (T, B, C, H, W) tensor: the op asks 2D callers to say so)
        op = functools.partial(op, spatial_dims=len(spatial(bench, problem)))
    sets = [(s[2],) for s in input_sets(bench, batch, kind, problem)]
    mc = sets[0][0]
    out_bytes = batch * mc[0, 0, 0].numel() * 4  # the (B, *S) fp32 uncertainty map
    nbytes = mc.numel() * mc.element_size() + out_bytes
    shape = shape_name(batch, spatial(bench, problem), PROBLEMS[problem][0])
    bench.run(benchmark, group=f"entropy {shape} {kind}", provider=provider, fn=op, arg_sets=sets,
              bytes_moved=nbytes, baseline=provider != "fused", kernel=provider == "fused", kernel_time=True,
              op="predictive_entropy", mode="fwd", batch=batch, dtype=kind, shape=shape)
