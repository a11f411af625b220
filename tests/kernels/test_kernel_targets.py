"""Every kernel compiles for every GPU family users have, checked on the CPU; and GPUs Triton does not run
get the reference math, with one warning.

Compile: each kernel (loss forward, its finalize, the backward scale, the entropy, the EMA), in each
dtype it takes (fp32, bf16, fp16; the finalize reads fp32 partials only), at the launch table's configs
and C = 2 (T = 8, the paper's, in the trainer's bf16; T = 2 in fp32 and fp16, the same code unrolled
less, to keep the compile short), with ``triton.compile(ASTSource(...), target=GPUTarget(...))`` (the
structure suite's ``compile_variant``, specialised like a runtime launch), for

- NVIDIA sm_70 (V100), sm_75 (T4, RTX 20), sm_80 (A100), sm_86 (RTX 30, A10), sm_89 (RTX 40, L4),
  sm_90 (H100, H200), sm_100 (B200), sm_120 (RTX 50), each with its own APPROX (the capability: the
  packed 16-bit conversions are sm_80+ only, and sm_75 must compile without them): to a cubin, through
  the ptxas bundled with Triton;
- AMD gfx90a (MI200) and gfx942 (MI300) with the portable math (APPROX = 0): to an hsaco, through the
  AMD backend bundled with Triton (its LLVM, lld and the ROCm device libraries ``ocml.bc`` / ``ockl.bc``
  ship in the wheel; with the Triton installed here the compile goes all the way, no ROCm install is
  needed. A Triton without the AMD backend skips these with the reason).

plus, for sm_75 (no packed 16-bit conversions) and gfx942 (the portable math), the code paths other
inputs take: channels_last (interleaved pairs for C = 2, one-element loads for C = 3), C = 3 softmax,
bf16 passes with an fp32 student, masked loads (a volume smaller than one block) with int64 offsets.
(The C x T > 64 pass loop is compiled for sm_90 by tests/kernels/test_kernel_structure.py.) One subprocess
compiles them all over the CPU cores, once per session: about 30 s on 2 busy cores with an empty Triton
cache, seconds with a warm one.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

import uamt_fast
from uamt_fast import reference
from uamt_fast.kernels import device
from uamt_fast.kernels import predictive_entropy as entropy_kernels
from uamt_fast.kernels import uncertainty_loss as loss_kernels
from uamt_fast.ops import consistency, ema

ROOT = Path(__file__).resolve().parents[2]
NVIDIA = (70, 75, 80, 86, 89, 90, 100, 120)
AMD = ("gfx90a", "gfx942")
DTYPES = ("fp32", "bf16", "fp16")


def _targets() -> list[tuple]:
    return [("cuda", cc, 32) for cc in NVIDIA] + [("hip", arch, 64) for arch in AMD]


def _variants() -> list[dict]:
    def v(target, kernel, dtype, C=0, T=0, suffix="", **extra):
        shape = f" C={C} T={T}" if C else ""
        return dict(name=f"{target[0]}:{target[1]} {kernel} {dtype}{shape}{suffix}", kernel=kernel, dtype=dtype, C=C,
                    T=T, target=list(target), **extra)

    out = []
    for target in _targets():
        for dtype in DTYPES:  # the paper's T = 8 in the trainer's bf16; T = 2 (the same code, unrolled less) else
            T = 8 if dtype == "bf16" else 2
            out += [v(target, "loss_fwd", dtype, 2, T), v(target, "entropy", dtype, 2, T), v(target, "loss_bwd", dtype),
                    v(target, "ema", dtype, ema_dtype=dtype)]
        out.append(v(target, "finalize", "fp32"))
    for target in (("cuda", 75, 32), ("hip", "gfx942", 64)):  # sm_75: no packed conversions; AMD: portable math
        out += [
            v(target, "loss_fwd", "bf16", 2, 8, " channels_last", classes_last=True),
            v(target, "entropy", "bf16", 2, 8, " channels_last", classes_last=True),
            v(target, "loss_fwd", "bf16", 3, 4, " channels_last", classes_last=True),
            v(target, "loss_fwd", "fp16", 3, 4),
            v(target, "loss_fwd", "bf16", 2, 8, " fp32 student", student="fp32"),
            v(target, "loss_fwd", "bf16", 2, 8, " masked wide", masked=True, wide=True),
            v(target, "entropy", "fp16", 3, 4, " masked wide", masked=True, wide=True),
        ]
    return out


@functools.lru_cache(maxsize=1)
def _structure_suite():
    spec = importlib.util.spec_from_file_location("_kernel_structure", ROOT / "tests" / "kernels" / "test_kernel_structure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile_one(variant: dict) -> dict:
    start = time.perf_counter()
    try:
        out = _structure_suite().compile_variant(variant)
    except Exception as e:  # noqa: BLE001 - reported per variant, with the compiler's message
        out = {**variant, "error": f"{type(e).__name__}: {e}"[-3000:]}
    return {**out, "seconds": round(time.perf_counter() - start, 2)}


def _compile_all() -> dict:
    import triton

    backends = Path(triton.__file__).parent / "backends"
    have = {"cuda": (backends / "nvidia" / "bin" / "ptxas").is_file(), "hip": (backends / "amd" / "lib").is_dir()}
    todo = [x for x in _variants() if have[x["target"][0]]]
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        done = list(pool.map(_compile_one, todo))
    return {"triton": triton.__version__, "have": have, "results": done}


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["by_name"] = {r["name"]: r for r in report["results"]}
    return report


@pytest.mark.parametrize("target", [f"{b}:{a}" for b, a, _ in _targets()])
def test_every_kernel_compiles_for_every_gpu_family(compiled, target):
    backend = target.split(":")[0]
    if not compiled["have"][backend]:
        pytest.skip(f"Triton {compiled['triton']} here has no {backend} backend toolchain (ptxas / AMD libs)")
    mine = [r for r in compiled["results"] if r["name"].startswith(target + " ")]
    expected = [v["name"] for v in _variants() if v["name"].startswith(target + " ")]
    assert sorted(r["name"] for r in mine) == sorted(expected)
    failed = {r["name"]: r["error"] for r in mine if "error" in r}
    assert not failed, failed
    binary = "cubin" if backend == "cuda" else "hsaco"
    for r in mine:
        assert binary in r["stages"] and r["binary_bytes"] > 0, r["name"]
    kernels = {r["kernel"] for r in mine}
    assert kernels == {"loss_fwd", "finalize", "loss_bwd", "entropy", "ema"}
    assert {r["dtype"] for r in mine if r["kernel"] != "finalize"} == set(DTYPES)


# ---------------------------------------------------------------------------------------------
# GPUs Triton does not run: the reference math, one warning (the capability faked on any machine)
# ---------------------------------------------------------------------------------------------


class OnFakeGpu(torch.Tensor):
    """A CPU tensor that says it is on ``cuda:0``, where the routing reads it (``device``, ``is_cuda``,
    ``is_cpu``); its math runs on the CPU, and its results are of this class too."""

    is_cuda, is_cpu = True, False
    device = torch.device("cuda", 0)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend a GPU: ``fake_gpu(capability=(6, 1))`` (NVIDIA) or ``fake_gpu(arch="gfx906:sramecc+:xnack-")`` (ROCm)."""
    device.forget_gpus()

    def fake(capability=None, arch=None, name="Fake GPU"):
        device.forget_gpus()
        monkeypatch.setattr(torch.version, "hip", "6.2" if arch else None)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability or (9, 0))
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda index=None: type("Props", (), {"gcnArchName": arch or "", "name": name})())
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    yield fake
    device.forget_gpus()  # nothing decided about the fake GPU outlives the test


@pytest.mark.parametrize("gpu, runs", [
    (dict(capability=(6, 1), name="GeForce GTX 1080"), False),
    (dict(capability=(6, 0), name="Tesla P100"), False),
    (dict(capability=(7, 0), name="Tesla V100"), True),
    (dict(capability=(7, 5), name="Tesla T4"), True),
    (dict(capability=(12, 0), name="GeForce RTX 5090"), True),
    (dict(arch="gfx906:sramecc+:xnack-", name="AMD Instinct MI50"), False),
    (dict(arch="gfx908:sramecc+:xnack-", name="AMD Instinct MI100"), False),
    (dict(arch="gfx1030", name="AMD Radeon RX 6800"), False),
    (dict(arch="gfx90a:sramecc+:xnack-", name="AMD Instinct MI250X"), True),
    (dict(arch="gfx942:sramecc+:xnack-", name="AMD Instinct MI300X"), True),
    (dict(arch="gfx1100", name="AMD Radeon RX 7900 XTX"), True),
])
def test_gpus_triton_does_not_run_get_the_reference_math_with_one_warning(fake_gpu, gpu, runs):
    fake_gpu(**gpu)
    x = torch.zeros(2).as_subclass(OnFakeGpu)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):  # every op call asks; the verdict and its warning come once per device
            assert consistency.uses_kernels(x) is runs
            assert ema.uses_kernel(x) is runs
            assert device.triton_can_take(x) is runs
    mine = [w for w in caught if "uamt_fast" in str(w.message)]
    if runs:
        assert not mine
    else:
        assert len(mine) == 1 and issubclass(mine[0].category, RuntimeWarning)
        assert gpu["name"] in str(mine[0].message) and "reference PyTorch math" in str(mine[0].message)
        with pytest.raises(RuntimeError, match="cannot run a Triton kernel"):
            device.check_triton_can_take("uamt_fast kernels", x)  # the launchers refuse it outright


def test_kernel_approx_follows_the_gpu(fake_gpu, monkeypatch):
    """APPROX (kernels/device.nvidia_arch): the NVIDIA capability as 10 major + minor, 0 on ROCm."""
    monkeypatch.setattr(device, "TRITON_INTERPRET", False)
    fake_gpu(capability=(8, 6))
    assert device.nvidia_arch(torch.device("cuda", 0)) == 86
    fake_gpu(arch="gfx942")
    assert device.nvidia_arch(torch.device("cuda", 0)) == 0
    assert device.nvidia_arch(torch.device("cpu")) == 0


def test_the_public_ops_take_the_reference_path_on_such_a_gpu(fake_gpu, monkeypatch):
    """End to end through the public ops: a tensor on an unsupported GPU is never handed to a launcher;
    the reference math gives the result."""
    fake_gpu(capability=(6, 1))

    def no_launch(*args, **kwargs):
        pytest.fail("a kernel launcher was called for a GPU Triton does not run")

    for module, launchers in ((loss_kernels, ("uncertainty_loss_forward", "uncertainty_loss_backward")),
                              (entropy_kernels, ("predictive_entropy_forward",))):
        for name in launchers:
            monkeypatch.setattr(module, name, no_launch)
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(1, 2, 3, 4, 5, generator=g), torch.randn(1, 2, 3, 4, 5, generator=g)
    mc = torch.randn(2, 1, 2, 3, 4, 5, generator=g)
    on_gpu = [x.as_subclass(OnFakeGpu) for x in (student, teacher, mc)]
    on_gpu[0].requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = uamt_fast.uncertainty_consistency_loss(*on_gpu, 0.5)
        loss.backward()
        u = uamt_fast.predictive_entropy(on_gpu[2])
    expected = reference.uncertainty_consistency_loss(student, teacher, mc, 0.5)
    assert torch.equal(loss.as_subclass(torch.Tensor), expected)
    assert on_gpu[0].grad is not None
    assert torch.equal(u.as_subclass(torch.Tensor), reference.predictive_entropy(mc))


if __name__ == "__main__":  # the compile subprocess
    print(json.dumps(_compile_all()))
