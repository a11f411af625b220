"""train.py's speed levers: each flag gives the default step's numbers on the CPU.

Same set-up as tests/training/test_train.py: tiny synthetic data, V-Net n_filters=4, 16^3 crops, one torch thread,
the public fused ops on their CPU path. torch.compile is checked with dynamo's "eager" backend (the
same tracing and guards as inductor, none of inductor's minutes of C++ compilation on a CPU): it must
give the uncompiled step bit for bit.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
from uamt_fast import train
from uamt_fast.nets.vnet import VNet


pytestmark = pytest.mark.usefixtures("trainer_on_cpu")  # tests/conftest.py


def run_steps(root, n=2, **flags):
    """``n`` steps from the same seed; returns (terms and stats per step, student weights, teacher weights)."""
    cfg = train.Config(**(dict(data=str(root), n_filters=4, patch=(32, 32, 16), labeled=2, device="cpu",
                               compile=False, iterations=10) | flags))
    parts = train.build(cfg)
    steps = torch.stack([torch.cat(train.train_step(parts, i)) for i in range(n)])
    return steps, parts.student.state_dict(), parts.teacher.state_dict()


def assert_same_run(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a[0][:, :3], b[0][:, :3], rtol=rtol, atol=atol)  # CE, Dice, consistency
    # mask fraction, mean uncertainty: a voxel at the threshold may flip under rounding (1/8192 of the mask each)
    torch.testing.assert_close(a[0][:, 3:], b[0][:, 3:], rtol=0, atol=1e-3 if atol else 0)
    for got, want in zip(a[1:], b[1:]):
        assert got.keys() == want.keys()
        for k in got:
            torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def test_sgd_implementations_give_the_same_weights(tiny_root):
    """--sgd fused / foreach / loop: the same SGD (momentum, weight decay) to rounding."""
    want = run_steps(tiny_root, sgd="auto")
    for sgd in ("fused", "foreach", "loop"):
        assert_same_run(run_steps(tiny_root, sgd=sgd), want)


def test_sgd_flag_reaches_the_optimizer(tiny_root):
    cfg = dict(data=str(tiny_root), n_filters=4, patch=(16, 16, 16), eval_stride_xy=16, labeled=2, device="cpu",
               compile=False)
    defaults = {s: train.build(train.Config(**cfg, sgd=s)).optimizer.defaults for s in ("fused", "foreach", "loop")}
    assert defaults["fused"]["fused"] and not defaults["fused"]["foreach"]
    assert defaults["foreach"]["foreach"] and not defaults["foreach"]["fused"]
    assert defaults["loop"]["foreach"] is False and not defaults["loop"]["fused"]


def test_full_res_contiguous_changes_layouts_not_values(tiny_root):
    """--full-res-contiguous in a channels_last_3d net: the full-resolution convs get contiguous weights
    and activations, the rest stays channels_last_3d; outputs equal to conv rounding; whole steps too."""
    torch.manual_seed(0)
    net = VNet(n_filters=4, dropout=False).to(memory_format=torch.channels_last_3d)  # batch statistics, no dropout
    x = torch.randn(2, 1, 32, 32, 16)
    want = net(x)
    seen = {}
    for name in ("block_one", "block_two", "block_nine", "out_conv"):
        getattr(net, name).register_forward_hook(lambda m, i, o, name=name: seen.update({name: o}))
    net.full_res_memory_format_(torch.contiguous_format)
    got = net(x)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)  # another conv algorithm: rounding, ~20 BN layers deep
    assert net.block_one.conv[0].weight.is_contiguous() and net.out_conv.weight.is_contiguous()
    assert not net.block_two.conv[0].weight.is_contiguous()  # still channels_last_3d
    assert seen["block_one"].is_contiguous() and seen["out_conv"].is_contiguous() and got.is_contiguous()
    two = seen["block_two"]
    assert two.is_contiguous(memory_format=torch.channels_last_3d) and not two.is_contiguous()
    # Whole steps: another conv algorithm rounds differently, and ~20 batch norms deep in an untrained net
    # that grows to ~1e-3 in the weights after two steps. The yardstick is the rounding difference of the
    # existing --no-channels-last switch (all layers contiguous): the new switch stays within 3x of it.
    base = run_steps(tiny_root, channels_last=True)
    mixed = run_steps(tiny_root, channels_last=True, full_res_contiguous=True)
    contiguous = run_steps(tiny_root, channels_last=False)
    assert_same_run(mixed, base, rtol=1e-2, atol=2e-3)
    for k in base[1]:
        assert (mixed[1][k] - base[1][k]).abs().max() <= 3 * (contiguous[1][k] - base[1][k]).abs().max() + 1e-6, k


def test_new_flags_on_the_command_line():
    given = train.parse_args(["--compile-mode", "reduce-overhead", "--compile-blocks", "--no-cudnn-benchmark",
                              "--sgd", "foreach", "--full-res-contiguous", "--compile-cache", ""])
    cfg = train.Config(**given)
    assert (cfg.compile_mode, cfg.compile_blocks, cfg.cudnn_benchmark, cfg.sgd, cfg.full_res_contiguous,
            cfg.compile_cache) == ("reduce-overhead", True, False, "foreach", True, "")
    with pytest.raises(ValueError, match="--compile-mode"):
        train.Config(compile_mode="fast")
    with pytest.raises(ValueError, match="--sgd"):
        train.Config(sgd="adam")


@pytest.fixture
def eager_compile(monkeypatch, tmp_path):
    """torch.compile with dynamo's eager backend (counted); inductor's cache folder left to the test."""
    calls = {"compiles": 0}
    compile_ = torch.compile

    def counting_compile(*args, **kwargs):
        calls["compiles"] += 1
        kwargs.pop("mode", None)  # the eager backend takes no mode
        return compile_(*args, **kwargs, backend="eager")

    monkeypatch.setattr(torch, "compile", counting_compile)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    torch._dynamo.reset()
    yield calls
    torch._dynamo.reset()


@pytest.mark.parametrize("blocks", [False, True], ids=["whole-model", "regional"])
def test_compiled_step_equals_the_eager_step(tiny_root, tmp_path, eager_compile, monkeypatch, blocks):
    """--compile [--compile-blocks]: the traced step gives the eager step's numbers exactly, and the compile
    cache folder becomes inductor's, created private to this user (inductor runs code from it)."""
    want = run_steps(tiny_root, n=1)
    cache = tmp_path / "cache"
    got = run_steps(tiny_root, n=1, compile=True, compile_blocks=blocks, compile_cache=str(cache))
    assert_same_run(got, want, rtol=0, atol=0)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache / "inductor")
    assert (cache / "inductor").stat().st_mode & 0o777 == 0o700
    # whole model: the student's loss function and the teacher; regional: every block of both models
    assert eager_compile["compiles"] == (2 * len(list(VNet().children())) if blocks else 2)


def test_every_ablation_row_is_a_valid_config():
    """benchmarks/train_step.py's rows: each is train.py flags that build a Config, and each lever flag has a row."""
    from benchmarks import train_step

    levers = {"compile_mode", "compile_blocks", "cudnn_benchmark", "sgd", "full_res_contiguous", "teacher_chunks",
              "compile", "fused_loss", "fused_ema", "data_device", "channels_last", "amp"}
    seen = set()
    for name, overrides in train_step.VARIANTS.items():
        overrides = {k: (9 if v is None else v) for k, v in overrides.items()}
        train.Config(**overrides)
        seen |= set(overrides)
    assert levers <= seen, levers - seen
    assert train_step.ORDER[:3] == ("reference", "reference+cudnn.benchmark", "ours")  # both references in budget
    rows = [{"variant": "reference", "ms_per_iter": 200.0, "it_per_s": 5.0, "first_iter_s": 9.0, "start": "eager"},
            {"variant": "ours", "ms_per_iter": 20.0, "it_per_s": 50.0, "first_iter_s": 30.0, "start": "cold"}]
    result = train_step.summarize(rows, {"reference": int(2.4e12)}, 700.0, {"torch_threads": 16}, [], [1] * 40,
                                  [1] * 16, {"patch": (112, 112, 80), "n_filters": 16}, True, {"ms": 5.0})
    ours = result["rows"][1]
    assert ours["speedup_vs_reference"] == 10 and ours["pct_of_floor_speed"] == 25
    assert ours["mfu_pct"] == pytest.approx(100 * 2.4e12 / 0.02 / 1e12 / 700)
    table = train_step.format_table(result)
    assert "%floor" in table and "1st it s" in table and "cold" in table
