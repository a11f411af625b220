"""benchmarks/profile_step.py: kernel names -> categories (names as the H100 run shows them), the trace
reduction on a hand-made GPU trace, the analytic FLOPs against torch's flop counter, and the CPU mode
end to end (tables and JSON)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[2]
from uamt_fast import train
from benchmarks import profile_step as ps
from uamt_fast import data


pytestmark = pytest.mark.usefixtures("trainer_on_cpu")  # tests/conftest.py


@pytest.mark.parametrize("name, phase, conv_op, category", [
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_ndhwc_kndhwc_ndhwc_tilesize128x128x64_warpgroupsize1x1x1_g1_"
     "execute_segment_k_off_kernel__5x_cudnn", "teacher", "aten::cudnn_convolution", "conv fprop"),
    ("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_ndhwc_kndhwc_ndhwc_tilesize128x64x64_warpgroupsize1x1x1_"
     "g1_strided_execute_kernel__5x_cudnn", "backward", "aten::convolution_backward", "conv dgrad"),
    ("sm80_xmma_wgrad_implicit_gemm_indexed_bf16bf16_bf16f32_f32_ndhwc_kndhwc_ndhwc_tilesize64x64x64_stage4_"
     "warpsize2x2x1_g1_tensor16x8x16_execute_kernel__5x_cudnn", "backward", "aten::convolution_backward", "conv wgrad"),
    ("void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816wgrad_optimized_bf16_128x128_32x3_nhwc_align8>",
     "backward", "aten::convolution_backward", "conv wgrad"),
    ("void implicit_convolve_sgemm<float, float, 128, 5, 5, 3, 3, 3, 1, false, false, true>", "student",
     "aten::cudnn_convolution", "conv fprop"),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false, true, "
     "(cudnnKernelDataType_t)2>", "student", "aten::cudnn_convolution", "conv other (bias, cuDNN transforms)"),
    ("void cudnn::engines_precompiled::nhwcToNchwKernel<float, float, float, true, false>", "backward",
     "aten::convolution_backward", "conv backward (unsplit)"),
    ("triton_per_fused__native_batch_norm_legit_functional_relu_3", "student", "", "batch norm"),
    ("triton_red_fused__native_batch_norm_legit_functional_convolution_7", "teacher", "", "batch norm"),
    ("triton_red_fused_var_mean_4", "teacher", "", "batch norm"),
    ("triton_poi_fused_add_mul_relu_rsqrt_sub_12", "teacher", "", "batch norm"),
    ("triton_poi_fused__to_copy_add_convolution_9", "student", "", "other inductor kernels"),
    ("triton_per_fused__log_softmax_nll_loss_forward_2", "student", "", "other inductor kernels"),
    ("_uncertainty_loss_fwd_kernel", "student", "", "fused UA-MT ops"),
    ("_finalize_kernel", "student", "", "fused UA-MT ops"),
    ("_scale_grad_kernel", "backward", "", "fused UA-MT ops"),
    ("_ema_update_kernel", "ema", "", "EMA"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
     "TensorListMetadata<3>, at::native::(anonymous namespace)::FusedSgdMathFunctor<float, 3>, float*, double>",
     "optimizer", "", "optimizer"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::array<char*, 1ul> >",
     "optimizer", "", "optimizer"),
    ("void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<at::native::direct_copy_kernel_"
     "cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda(float)#1}> >", "data", "",
     "data sampling"),
    ("void at::native::elementwise_kernel<128, 2, ...>", "ema", "", "EMA"),
    ("void at::native::elementwise_kernel<128, 2, ...>", "student", "", "other eager kernels"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, ...>", "student",
     "aten::cudnn_convolution", "conv other (bias, cuDNN transforms)"),
    ("void cudnn::bn_fw_tr_1C11_kernel_NCHW<float, float, int, 512, true, 1, true>", "student", "", "batch norm"),
    ("Memcpy HtoD (Pageable -> Device)", "data", "", "copies"),
    ("Memset (Device)", "", "", "copies"),
    ("aten::mkldnn_convolution", "student", "aten::mkldnn_convolution", "conv fprop"),
    ("aten::convolution_backward", "backward", "aten::convolution_backward", "conv backward (unsplit)"),
])
def test_classify_kernel_names(name, phase, conv_op, category):
    assert category in ps.CATEGORIES
    assert ps.classify(name, phase, conv_op) == category


def _x(cat, name, ts, dur, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "pid": 1, "args": args}


def test_reduction_of_a_gpu_trace():
    """A hand-made Chrome trace in kineto's format: kernels linked to their launch by correlation id, the
    launch to its phase range and conv op (Input Dims), the backward on the autograd thread."""
    w, x_t, x_s = [4, 1, 3, 3, 3], [18, 1, 32, 32, 32], [4, 1, 32, 32, 32]
    trace = {"traceEvents": [
        _x("user_annotation", "uamt:teacher", 0, 100),
        _x("user_annotation", "uamt:backward", 100, 100),
        _x("user_annotation", "ProfilerStep#1", 0, 200),
        _x("cpu_op", "aten::convolution", 9, 12, **{"Input Dims": [x_t, w, [4], [], [], [], [], [], []]}),
        _x("cpu_op", "aten::cudnn_convolution", 10, 10, **{"Input Dims": [x_t, w, [], [], [], [], [], []]}),
        _x("cuda_runtime", "cudaLaunchKernel", 12, 1, correlation=7),
        _x("kernel", "sm90_xmma_fprop_implicit_gemm_bf16", 20, 50, tid=7, correlation=7),
        _x("cuda_driver", "cuLaunchKernel", 60, 1, correlation=9),
        _x("kernel", "triton_per_fused__native_batch_norm_legit_functional_relu_0", 80, 10, tid=7, correlation=9),
        _x("cpu_op", "aten::convolution_backward", 110, 20, tid=2,
           **{"Input Dims": [[4, 4, 32, 32, 32], x_s, w, [], [], [], [], [], [], [], []]}),
        _x("cuda_runtime", "cudaLaunchKernel", 115, 1, tid=2, correlation=8),
        _x("kernel", "sm90_xmma_wgrad_implicit_gemm_bf16", 120, 30, tid=7, correlation=8),
        _x("gpu_memcpy", "Memcpy DtoD (Device -> Device)", 160, 5, tid=7, correlation=10),
        _x("cuda_runtime", "cudaStreamSynchronize", 170, 1),
    ]}
    acts = ps.device_activities(trace, cpu=False)
    assert [(a.phase, a.conv_op) for a in acts] == [("teacher", "aten::cudnn_convolution"), ("teacher", ""),
                                                    ("backward", "aten::convolution_backward"), ("", "")]
    assert ps.host_syncs(trace) == 1
    cfg = train.Config(n_filters=4, patch=(32, 32, 32))
    layers = ps.conv_layers(4, (32, 32, 32))
    r = ps.reduce_profile(acts, 1, layers, cfg, 2, matmul_tflops=100.0, copy_gbps=1000.0, n_params=1000,
                          ms_per_iter=1.0)
    cats = {c["category"]: c["ms"] for c in r["categories"]}
    assert cats == pytest.approx({"conv fprop": 0.05, "conv wgrad": 0.03, "batch norm": 0.01, "copies": 0.005,
                                  "idle (no kernel running)": 0.05})  # span 20..165 us, busy 95 us
    assert r["span_ms"] == pytest.approx(0.145) and r["busy_ms"] == pytest.approx(0.095)
    first = next(g for g in r["layers"] if g["group"] == "block_one")
    assert (first["teacher_ms"], first["bwd_ms"], first["fwd_ms"]) == pytest.approx((0.05, 0.03, 0.0))
    assert sum(g["measured_ms"] for g in r["layers"]) == pytest.approx(0.08)
    assert r["floor"]["ms"] > 0 and r["floor"]["pct_of_floor_speed"] == pytest.approx(100 * r["floor"]["ms"])
    assert r["top_kernels"][0]["kernel"].startswith("sm90_xmma_fprop")


def test_analytic_flops_match_the_flop_counter(tmp_path):
    """The per-layer FLOPs summed over the step's passes == FlopCounterMode over one eager train_step."""
    data.write_synthetic_la(tmp_path, n_train=5, n_test=1, shape=(40, 40, 32), seed=1)
    cfg = train.Config(data=str(tmp_path), n_filters=4, patch=(32, 32, 32), labeled=2, device="cpu", compile=False)
    parts = train.build(cfg)
    with FlopCounterMode(display=False) as counter:
        train.train_step(parts, 0)
    layers = ps.conv_layers(cfg.n_filters, cfg.patch)
    assert len(layers) == 30
    analytic = sum(ps.layer_work(layer, kind, crops, 4)[0] for layer in layers for kind, crops in ps.step_passes(cfg))
    assert analytic == counter.get_total_flops()


def test_cpu_mode_writes_the_tables(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "profile"
    assert ps.main(["--cpu", "--out", str(out), "--iterations", "1", "--trace", "--", "--teacher-chunks", "3"]) == 0
    result = json.loads((out / "profile.json").read_text())
    assert result["cpu"] and result["config"]["teacher_chunks"] == 3 and result["iterations"] == 1
    cats = {c["category"]: c["ms"] for c in result["categories"]}
    for c in ("conv fprop", "conv backward (unsplit)", "batch norm", "optimizer", "EMA", "data sampling"):
        assert cats.get(c, 0) > 0, c
    assert {g["group"] for g in result["layers"]} >= {"block_one", "block_nine", "out_conv"}
    assert all(g["measured_ms"] > 0 for g in result["layers"])
    assert 0 < result["floor"]["pct_of_floor_speed"] and result["first_iter_s"] > 0 and result["ms_per_iter"] > 0
    md = (out / "profile.md").read_text()
    assert "CPU wiring check" in md and "| conv layers |" in md and "% of the floor's speed" in md
    assert (out / "trace.json.gz").stat().st_size > 0
