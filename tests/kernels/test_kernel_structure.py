"""The GPU build of the kernels, checked on the CPU: compile for Hopper (sm_90) and read the code.

The interpreter that runs the kernels in CI never compiles them, and most sessions have no GPU, so
these tests are the guard of the kernels' performance structure. Each kernel is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` at the launchers' default
configs (``kernels/launch_config.py``) and specialised like a runtime launch (16-byte-aligned
pointers, unit voxel stride or unit class stride, 16-divisible strides), then:

- class axis inside a thread: every distributed tensor in the TTGIR is 1-D (the C classes of a
  voxel are C separate [BLOCK_V] vectors of one layout), and nothing before the final partials
  reduction goes through shared memory (no ``convert_layout`` / ``local_alloc``);
- no barrier in the pass loop: every ``bar.sync`` of the PTX comes after the last global load,
  and the count does not grow with T;
- vector loads: contiguous inputs are read with 128-bit ``ld.global.v4`` only, one per class and
  pass (and student, teacher) per thread at the default config; the gradient is stored the same way;
- no spills: ``cuobjdump --dump-resource-usage`` of the cubin (ptxas bundled with Triton) reports
  no local memory, and the register count leaves room for several programs per SM;
- instruction budget: the warp-instructions each voxel costs (SASS, loops counted T times) over
  the issue rate of an H100 / H200, against the bytes each voxel moves over the card's copy
  bandwidth: at most 0.5 on an H200 at the paper's T = 8, C = 2 in every dtype and layout, 0.75
  for the other C and T (see ``issue_over_memory``; ``python -m benchmarks.instruction_budget``
  prints the table).

The compile runs in a subprocess (this process runs the interpreter, which never compiles), in
parallel over the CPU cores, once per session; Triton's cache makes reruns fast.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DTYPES = ("fp32", "bf16", "fp16")
ELEM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


# ---------------------------------------------------------------------------------------------
# the compile side (runs in the subprocess: ``python tests/kernels/test_kernel_structure.py``)
# ---------------------------------------------------------------------------------------------


def _variants() -> list[dict]:
    """Every kernel to compile: name, which kernel, dtypes, (C, T), layout. Each dtype at the paper's
    C = 2, T = 8; C = 3 and C = 16 (at T = 2: the unrolled compile of 16 x 8 takes long) on some."""
    def v(kernel, dtype, C=0, T=0, suffix="", **extra):
        shape = f" C={C} T={T}" if C else ""
        return dict(name=f"{kernel} {dtype}{shape}{suffix}", kernel=kernel, dtype=dtype, C=C, T=T, **extra)

    out = [v(kernel, dtype, 2, 8) for kernel in ("loss_fwd", "entropy") for dtype in DTYPES]
    out += [v("loss_fwd", "bf16", 3, 4), v("loss_fwd", "fp16", 16, 2), v("entropy", "fp32", 3, 4),
            v("entropy", "bf16", 16, 2)]
    out += [v("loss_bwd", dtype) for dtype in DTYPES]
    out += [
        v("loss_fwd", "bf16", 2, 2),  # barriers vs T
        v("loss_fwd", "bf16", 16, 8),  # C * T > UNROLL_MAX_LOADS: the pass loop
        v("loss_fwd", "bf16", 2, 8, " channels_last", classes_last=True),  # C = 2 interleaved: paired loads
        v("entropy", "bf16", 2, 8, " channels_last", classes_last=True),
        v("loss_fwd", "fp32", 2, 8, " channels_last", classes_last=True),
        v("loss_fwd", "bf16", 3, 4, " channels_last", classes_last=True),  # C = 3: strided per-class loads
        # SSL4MIS's 2D ACDC step (train.py --dims 2): C = 4, T = 8; bf16 channels_last on a GPU, fp32 contiguous
        v("loss_fwd", "bf16", 4, 8, " channels_last", classes_last=True),
        v("entropy", "bf16", 4, 8, " channels_last", classes_last=True),
        v("loss_fwd", "fp32", 4, 8), v("entropy", "fp32", 4, 8),
        v("loss_fwd", "bf16", 2, 8, " fp32 student", student="fp32"),
        v("finalize", "fp32"),
        v("ema", "fp32"),
    ]
    return out


def compile_variant(variant: dict) -> dict:
    """Compile one variant of ``_variants()`` (or of tests/kernels/test_kernel_targets.py's, which name a target) and
    return it with its config, resources, TTGIR, PTX and SASS (cross-target: the stages and binary size)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from uamt_fast.kernels import class_vectors as CV
    from uamt_fast.kernels import ema_update as E
    from uamt_fast.kernels import launch_config as L
    from uamt_fast.kernels import predictive_entropy as PE
    from uamt_fast.kernels import uncertainty_loss as K

    kernel, dtype, C, T = variant["kernel"], variant["dtype"], variant["C"], variant["T"]
    classes_last = variant.get("classes_last", False)
    # sm_90 unless the variant names a target (tests/kernels/test_kernel_targets.py): ("cuda", capability, 32) or
    # ("hip", "gfx...", 64); the kernels' APPROX is the NVIDIA capability, 0 on AMD (kernels/device.nvidia_arch)
    target = tuple(variant.get("target", ("cuda", 90, 32)))
    approx = target[1] if target[0] == "cuda" else 0
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    paper_voxels = 2 * 112 * 112 * 80
    cfg = None
    if kernel in ("loss_fwd", "loss_bwd", "entropy"):
        cfg = L.config_for(kernel, torch_dtype, classes_last, C, T, paper_voxels * (2 if kernel == "loss_bwd" else 1))
    # stride arguments: unit stride along voxels (contiguous) or classes (channels_last) is
    # specialised to the constant 1 as at runtime; the other strides are 16-divisible there
    unit_stride = "sc" if classes_last else "sv"
    common = {"APPROX": approx, "MASKED": variant.get("masked", False), "WIDE": variant.get("wide", False)}
    if kernel == "loss_fwd":
        fn = K.uamt_uncertainty_loss_fwd_kernel
        layout = (CV.PAIRS if C == 2 else CV.STRIDED).value if classes_last else CV.VEC.value
        constexprs = {"T": T, "C": C, "THR_FROM_PTR": True, "WRITE_GRAD": True, "BLOCK_V": cfg.block, **common,
                      "S_LAYOUT": layout, "Q_LAYOUT": layout, "G_LAYOUT": layout, "MC_LAYOUT": layout}
        constexprs.update({f"{p}_{unit_stride}": 1 for p in ("s", "q", "mc", "g")})
        pointers = {"s_ptr": variant.get("student", dtype), "q_ptr": variant.get("student", dtype),
                    "g_ptr": variant.get("student", dtype), "mc_ptr": dtype, "count_ptr": "i32"}
        num_warps = cfg.num_warps
    elif kernel == "entropy":
        fn = PE.uamt_predictive_entropy_kernel
        constexprs = {"T": T, "C": C, "BLOCK_V": cfg.block, f"mc_{unit_stride}": 1, **common,
                      "MC_LAYOUT": (CV.PAIRS if C == 2 else CV.STRIDED).value if classes_last else CV.VEC.value}
        pointers, num_warps = {"mc_ptr": dtype}, cfg.num_warps
    elif kernel == "loss_bwd":
        fn, constexprs = K.uamt_loss_scale_grad_kernel, {"BLOCK": cfg.block}
        pointers, num_warps = {"g_ptr": dtype, "out_ptr": dtype}, cfg.num_warps
    elif kernel == "finalize":
        fn, constexprs = K.uamt_loss_finalize_kernel, {"BLOCK_P": K.FINALIZE_BLOCK}
        pointers, num_warps = {"count_ptr": "i32"}, 4
    else:
        fn, constexprs = E.uamt_ema_update_kernel, {"BLOCK": E.BLOCK}
        ema_dtype = variant.get("ema_dtype", "fp32")  # teacher and student buffers (fp32 in train.py)
        pointers, num_warps = {"teacher_ptr": ema_dtype, "student_ptr": ema_dtype}, E.NUM_WARPS
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            signature[name] = "*" + pointers.get(name, "fp32")
        else:
            signature[name] = "fp32" if name in ("thr_value", "alpha", "one_minus_alpha") else "i32"
        runtime_int = name in ("P", "C", "num_voxels") or (classes_last and name.endswith("_sv"))  # e.g. sv = C
        if signature[name] != "fp32" and not runtime_int:
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget(*target), options={"num_warps": num_warps})
    if "target" in variant:  # the cross-target compile: what came out, not the SASS
        return {**variant, "stages": sorted(compiled.asm), "binary_bytes": len(compiled.asm.get("cubin", b"") or
                                                                                compiled.asm.get("hsaco", b""))}
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(tools / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    line = next(x for x in usage.splitlines() if "REG:" in x)
    resources = {f.split(":")[0]: int(f.split(":")[1]) for f in line.split() if f.split(":")[-1].isdigit()}
    return {**variant, "config": None if cfg is None else [cfg.block, cfg.num_warps], "resources": resources,
            "ttgir": compiled.asm["ttgir"], "ptx": compiled.asm["ptx"], "sass": sass}


def _compile_all() -> list[dict] | None:
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").is_file():
        return None
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        return list(pool.map(compile_variant, _variants()))


# ---------------------------------------------------------------------------------------------
# the instruction budget (also used by benchmarks/instruction_budget.py)
# ---------------------------------------------------------------------------------------------

# Issue rate: one warp-instruction per scheduler per clock, 4 schedulers per SM; 132 SMs at the
# 1.98 GHz boost clock (H100 SXM and H200 SXM alike).
SMS, SCHEDULERS_PER_SM, CLOCK_HZ = 132, 4, 1.98e9
# Device-copy bandwidth (bytes/s): H100 as measured by benchmarks/ (benchmarks/results/2026-11-27-h100),
# H200 the same fraction of its 4.8 TB/s peak.
COPY_BANDWIDTH = {"H100": 3.0e12, "H200": 4.3e12}
PAPER_BUDGET, OTHER_BUDGET = 0.5, 0.75  # issue time / memory time on an H200


def sass_instructions(sass: str) -> list[str]:
    """The instructions of a cuobjdump listing, up to the last EXIT (not the padding after it)."""
    lines = [x for x in sass.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/", x)]
    last_exit = max(i for i, x in enumerate(lines) if re.search(r"\bEXIT\b", x))
    return lines[: last_exit + 1]


def backward_branches(sass: str) -> list[tuple[int, int]]:
    """``(branch, target)`` instruction indices of the loops: branches to an earlier instruction."""
    lines = sass_instructions(sass)
    address = [int(re.search(r"/\*([0-9a-f]{4,})\*/", x).group(1), 16) for x in lines]
    loops = []
    for i, x in enumerate(lines):
        branch = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", x)
        if branch and int(branch.group(1), 16) < address[i]:
            loops.append((i, address.index(int(branch.group(1), 16))))
    return loops


def dynamic_instructions(sass: str, trips: int) -> int:
    """Warp-instructions one warp executes: the listing once (a forward branch skips work, so this
    bounds it from above), plus ``trips - 1`` more times the body of each loop (a backward branch:
    only the pass loop past UNROLL_MAX_LOADS, which runs T times)."""
    return len(sass_instructions(sass)) + sum((trips - 1) * (i - j + 1) for i, j in backward_branches(sass))


def bytes_per_voxel(k: dict) -> int:
    """Bytes each voxel moves: the T passes' C logits; for the loss also the student and teacher
    read and the gradient written (the student's dtype); for the entropy the fp32 map written."""
    passes = k["T"] * k["C"] * ELEM_BYTES[k["dtype"]]
    if k["kernel"] == "loss_fwd":
        return passes + 3 * k["C"] * ELEM_BYTES[k.get("student", k["dtype"])]
    return passes + 4


def warp_instructions_per_voxel(k: dict) -> float:
    block, num_warps = k["config"]
    return dynamic_instructions(k["sass"], k["T"]) / (block / num_warps)


def issue_over_memory(k: dict, card: str) -> float:
    """Issue time / memory time of one voxel: warp-instructions / (SMs x schedulers x clock) over
    bytes / copy bandwidth. Above 1 the kernel cannot reach the copy bandwidth whatever its schedule."""
    issue_s = warp_instructions_per_voxel(k) / (SMS * SCHEDULERS_PER_SM * CLOCK_HZ)
    return issue_s / (bytes_per_voxel(k) / COPY_BANDWIDTH[card])


def budget(k: dict) -> float:
    return PAPER_BUDGET if (k["C"], k["T"]) == (2, 8) else OTHER_BUDGET


# ---------------------------------------------------------------------------------------------
# the checks
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 = its (and 3.6's) default
    done = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if report is None:
        pytest.skip("this Triton install has no bundled ptxas")
    return {k["name"]: k for k in report}


def _names(kind: str) -> list[str]:
    return [v["name"] for v in _variants() if v["kernel"] == kind]


def _global_loads(ptx: str) -> list[str]:
    return [re.sub(r"\.(nc|L1::evict_\w+|L2::\w+)", "", x) for x in re.findall(r"ld\.global(?:\.[\w:]+)*", ptx)]


def _barrier_lines(ptx: str) -> list[int]:
    return [i for i, line in enumerate(ptx.splitlines()) if re.search(r"\b(bar|barrier)\.sync\b", line)]


def _last_load_line(ptx: str) -> int:
    return max(i for i, line in enumerate(ptx.splitlines()) if "ld.global" in line)


@pytest.mark.parametrize("name", _names("loss_fwd") + _names("entropy"))
def test_class_axis_stays_in_one_thread(compiled, name):
    """The class axis is never split across threads: every distributed layout is 1-D (C separate
    per-class vectors), or 2-D [BLOCK_V, 2] with the class pair inside one thread (the interleaved
    C = 2 reshape / split: sizePerThread 2, one thread and one warp along it). And no layout
    conversion or shared-memory buffer comes before the last load (the pass loop and the class
    math); after it, an output whose store layout differs from the loads' (fp32 entropy map or
    gradient from 16-bit inputs) may be converted once per program."""
    ttgir = compiled[name]["ttgir"]
    layouts = re.findall(r"#ttg\.blocked<\{sizePerThread = \[([\d, ]+)\], threadsPerWarp = \[([\d, ]+)\], "
                         r"warpsPerCTA = \[([\d, ]+)\]", ttgir)
    assert layouts, name
    for layout in layouts:
        per_thread, threads, warps = ([int(x) for x in part.split(",")] for part in layout)
        assert len(per_thread) == 1 or (len(per_thread) == 2 and per_thread[1] == 2 and threads[1] == 1
                                        and warps[1] == 1), (name, layout)
    body = ttgir[: ttgir.rindex("tt.load")]
    for op in ("ttg.convert_layout", "ttg.local_alloc", "ttg.local_store", "ttg.local_load"):
        assert op not in body, (name, op)


@pytest.mark.parametrize("name", _names("loss_fwd") + _names("entropy"))
def test_no_barrier_before_the_last_load(compiled, name):
    """Every bar.sync comes after the last global load: none inside the pass loop (unrolled or not)."""
    ptx = compiled[name]["ptx"]
    assert all(i > _last_load_line(ptx) for i in _barrier_lines(ptx)), name


def test_barrier_count_does_not_grow_with_passes(compiled):
    two, eight = (len(_barrier_lines(compiled[f"loss_fwd bf16 C=2 T={t}"]["ptx"])) for t in (2, 8))
    assert two == eight, (two, eight)


@pytest.mark.parametrize("name", [n for n in _names("loss_fwd") + _names("entropy") if n.endswith(("T=8", "T=4", "T=2"))])
def test_contiguous_inputs_are_read_with_vector_loads(compiled, name):
    """At the default config each thread owns block / (32 * num_warps) voxels; every class vector
    of every pass (and of student and teacher) is read as ceil(bytes / 16) 128-bit loads, or one
    narrower vector load when a thread owns fewer than 16 bytes."""
    k = compiled[name]
    kernel, dtype, C, T = k["kernel"], k["dtype"], k["C"], k["T"]
    block, num_warps = k["config"]
    per_thread_bytes = block // (32 * num_warps) * ELEM_BYTES[dtype]
    unrolled = C * T <= 64  # kernels/launch_config.UNROLL_MAX_LOADS; a loop's loads appear once in the text
    vectors = C * (T if unrolled else 1) + (2 * C if kernel == "loss_fwd" else 0)
    width = "v4.b32" if per_thread_bytes >= 16 else {8: "v2.b32", 4: "b32", 2: "b16"}[per_thread_bytes]
    expected = Counter({f"ld.global.{width}": vectors * max(1, per_thread_bytes // 16)})
    expected["ld.global.b32"] += 1 if kernel == "loss_fwd" else 0  # the 0-dim threshold
    assert Counter(_global_loads(k["ptx"])) == expected, (k["name"], k["config"])


SASS_LOAD_BYTES = {"LDG.E.128": 16, "LDG.E.64": 8, "LDG.E": 4, "LDG.E.U16": 2, "LDG.E.S16": 2}
MIN_BYTES_IN_FLIGHT_PER_SM = 40 * 1024  # Little's law: ~3.35 TB/s x ~1 us / 132 SMs ~ 25 kB, with margin


@pytest.mark.parametrize("name", _names("loss_fwd") + _names("entropy"))
def test_enough_bytes_in_flight_per_sm(compiled, name):
    """What the hardware runs (SASS, after ptxas's own scheduling): the global loads a thread issues
    before its first exp (the first use of loaded data) times the threads of the programs that fit
    an SM by registers (64 warps, 32 programs at most) must cover the memory latency at full
    bandwidth. ptxas interleaves loads and math to save registers, so this is not all T * C loads."""
    k = compiled[name]
    instructions = [x for x in k["sass"].splitlines() if re.search(r"/\*[0-9a-f]{4}\*/", x)]
    first_exp = next(i for i, x in enumerate(instructions) if "MUFU.EX2" in x)
    per_thread = 0
    for x in instructions[:first_exp]:
        load = re.search(r"LDG\.E(\.\w+)*", x)
        if load:
            per_thread += SASS_LOAD_BYTES[re.sub(r"\.(CONSTANT|EL|EF|LU|STRONG\.\w+)", "", load.group(0))]
    num_warps = k["config"][1]
    registers = -(-k["resources"]["REG"] // 8) * 8  # allocated in units of 8 per thread
    programs = min(65536 // (registers * 32 * num_warps), 64 // num_warps, 32)
    in_flight = per_thread * 32 * num_warps * programs
    assert in_flight >= MIN_BYTES_IN_FLIGHT_PER_SM, (name, per_thread, programs, in_flight)


@pytest.mark.parametrize("name", _names("loss_fwd") + _names("entropy"))
def test_instruction_budget(compiled, name):
    """Issue time / memory time on an H200 (the constants above): <= 0.5 at the paper's T = 8, C = 2
    (fp32, bf16, fp16, channels_last, bf16 passes with an fp32 student), <= 0.75 for the other C, T.
    The pass loop past UNROLL_MAX_LOADS is the only loop (counted T times); all else runs at most once."""
    k = compiled[name]
    loops = len(backward_branches(k["sass"]))
    assert loops == (1 if k["C"] * k["T"] > 64 else 0), (name, loops)
    ratio = issue_over_memory(k, "H200")
    assert ratio <= budget(k), (name, round(warp_instructions_per_voxel(k), 2), bytes_per_voxel(k), round(ratio, 3))


def test_gradient_is_stored_with_vector_stores(compiled):
    for dtype in DTYPES:
        ptx = compiled[f"loss_fwd {dtype} C=2 T=8"]["ptx"]
        assert len(re.findall(r"st\.global\.v4", ptx)) == 2, dtype  # one 128-bit store per class
    for dtype in DTYPES:
        ptx = compiled[f"loss_bwd {dtype}"]["ptx"]
        loads, stores = re.findall(r"ld\.global\.v4", ptx), re.findall(r"st\.global\.v4", ptx)
        assert loads and len(loads) == len(stores), dtype


def test_channels_last_is_read_in_place_with_vector_loads_for_two_classes(compiled):
    """Class stride 1 (channels_last_3d). C = 2: each tensor (and pass) is one contiguous run of
    interleaved pairs, read with 128-bit loads, the gradient stored the same way. Other C: one
    strided load per class (a warp's loads of the C classes touch the same cache lines)."""
    for name, tensors, stores in (("loss_fwd bf16 C=2 T=8 channels_last", 10, 1),
                                  ("loss_fwd fp32 C=2 T=8 channels_last", 10, 1),
                                  ("entropy bf16 C=2 T=8 channels_last", 8, None)):
        k = compiled[name]
        block, num_warps = k["config"]
        per_thread_bytes = 2 * block // (32 * num_warps) * ELEM_BYTES[k["dtype"]]
        loads = Counter(_global_loads(k["ptx"]))
        assert loads["ld.global.v4.b32"] == tensors * per_thread_bytes // 16, (name, loads)
        if stores is not None:  # the gradient (the entropy map is fp32 per voxel, not interleaved)
            assert len(re.findall(r"st\.global\.v4", k["ptx"])) == stores * per_thread_bytes // 16, name
    k = compiled["loss_fwd bf16 C=3 T=4 channels_last"]
    block, num_warps = k["config"]
    loads = Counter(_global_loads(k["ptx"]))
    assert loads["ld.global.b16"] == 3 * (4 + 2) * block // (32 * num_warps), loads


def test_mixed_dtypes_convert_once_after_the_pass_loop(compiled):
    """bf16 passes with an fp32 student: the two load layouts differ (8 vs 4 per access), so one
    conversion is allowed, after the last load (not in the pass loop)."""
    ptx = compiled["loss_fwd bf16 C=2 T=8 fp32 student"]["ptx"]
    assert all(i > _last_load_line(ptx) for i in _barrier_lines(ptx))


@pytest.mark.parametrize("name", [v["name"] for v in _variants()])
def test_no_spills_and_room_for_several_programs_per_sm(compiled, name):
    k = compiled[name]
    assert k["resources"]["LOCAL"] == 0 and k["resources"]["STACK"] == 0, (name, k["resources"])
    threads = 32 * (k["config"][1] if k["config"] else 4)
    programs_per_sm = 65536 // (max(k["resources"]["REG"], 24) * threads)
    assert programs_per_sm >= 2, (name, k["resources"], k["config"])  # >= 2 programs resident per SM


if __name__ == "__main__":  # the compile subprocess
    print(json.dumps(_compile_all()))
