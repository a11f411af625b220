"""Uncertainty-masked consistency loss and predictive entropy: fused kernel vs reference ops.

Providers (one row each, grouped by problem):

- ``reference``: ``uamt_fast.reference`` eager, the op sequence of the released UA-MT code: softmax
  of the T passes, mean, ``log(mu + 1e-6)``, sum, compare with the threshold, softmax MSE, masked
  sums. It runs in the logits' dtype, as the released code would on such tensors.
- ``compile``: ``torch.compile(dynamic=False)`` of that same reference (GPU only: an inductor
  CPU compile costs minutes on a small CI machine).
- ``fused``: ``uamt_fast.uncertainty_consistency_loss`` / ``uamt_fast.predictive_entropy``, the
  Triton kernels (GPU only).

Problems: the paper's shapes T=8, C=2, 112x112x80 with B=2 (consistency on the unlabeled half) and
B=4 ("consistency on all"), fp32 and bf16 logits (all three inputs in that dtype); modes ``fwd``
(a training forward: the student requires grad) and ``fwd+bwd`` (``torch.autograd.grad`` of the
loss w.r.t. the student, peak memory recorded).

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
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

_COMPILED = {}


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


def make_inputs(batch: int, spatial_dims, dtype, device, seed: int):
    """Student, teacher and T-pass logits that share a per-voxel signal, so the uncertainty map has
    structure and the mask keeps part of the voxels (neither empty nor full)."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, C, *spatial_dims)
    base = 2.0 * torch.randn(shape, generator=g, device=device)
    mc = (base + torch.randn((T, *shape), generator=g, device=device)).to(dtype)
    teacher = (base + 0.5 * torch.randn(shape, generator=g, device=device)).to(dtype)
    student = (base + 0.5 * torch.randn(shape, generator=g, device=device)).to(dtype).requires_grad_()
    return student, teacher, mc


def _loss_bytes(student, teacher, mc, backward: bool) -> int:
    read = sum(x.numel() * x.element_size() for x in (student, teacher, mc))
    return read + (student.numel() * student.element_size() if backward else 0)


def _loss_op(provider: str, bench, wiring_row: bool):
    if provider == "reference":
        return reference.uncertainty_consistency_loss
    if provider == "compile":
        if not bench.cuda:
            pytest.skip("compile rows run on CUDA only (an inductor CPU compile of each shape takes minutes on CI)")
        return _compiled(reference.uncertainty_consistency_loss)
    bench.require_cuda("fused loss", wiring_row)
    import uamt_fast

    return uamt_fast.uncertainty_consistency_loss


@pytest.mark.parametrize("provider", ["reference", "compile", "fused"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("batch", [2, 4])
def test_uncertainty_loss(benchmark, bench, batch, dtype_name, mode, provider):
    op = _loss_op(provider, bench, wiring_row=batch == 2 and dtype_name == "bf16")
    dims = spatial(bench)
    first = make_inputs(batch, dims, DTYPES[dtype_name], bench.device, seed=0)
    nbytes = _loss_bytes(*first, backward=mode == "fwd+bwd")
    sets = [first] + [make_inputs(batch, dims, DTYPES[dtype_name], bench.device, seed=k)
                      for k in range(1, measure.rotation_count(nbytes, bench.device))]

    if mode == "fwd":
        def fn(s, t, mc):
            return op(s, t, mc, THRESHOLD)
    else:
        def fn(s, t, mc):
            return torch.autograd.grad(op(s, t, mc, THRESHOLD), s)

    bench.run(benchmark, group=f"loss {mode} {shape_name(batch, dims)} {dtype_name}", provider=provider, fn=fn,
              arg_sets=sets, bytes_moved=nbytes, baseline=provider != "fused", kernel=provider == "fused",
              peak=mode == "fwd+bwd",
              op="uncertainty_consistency_loss", mode=mode, batch=batch, dtype=dtype_name,
              shape=shape_name(batch, dims))


@pytest.mark.parametrize("provider", ["reference", "fused"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("batch", [2, 4])
def test_predictive_entropy(benchmark, bench, batch, dtype_name, provider):
    if provider == "fused":
        bench.require_cuda("fused entropy", wiring_row=batch == 2 and dtype_name == "bf16")
        import uamt_fast

        op = uamt_fast.predictive_entropy
    else:
        op = reference.predictive_entropy
    dims = spatial(bench)
    mc = make_inputs(batch, dims, DTYPES[dtype_name], bench.device, seed=0)[2]
    out_bytes = batch * mc[0, 0, 0].numel() * 4  # the (B, *S) fp32 uncertainty map
    nbytes = mc.numel() * mc.element_size() + out_bytes
    sets = [(mc,)] + [(make_inputs(batch, dims, DTYPES[dtype_name], bench.device, seed=k)[2],)
                      for k in range(1, measure.rotation_count(nbytes, bench.device))]
    bench.run(benchmark, group=f"entropy {shape_name(batch, dims)} {dtype_name}", provider=provider, fn=op,
              arg_sets=sets, bytes_moved=nbytes, baseline=provider != "fused", kernel=provider == "fused",
              op="predictive_entropy",
              mode="fwd", batch=batch, dtype=dtype_name, shape=shape_name(batch, dims))

