"""train.py: schedules, batched teacher passes, checkpoint/resume, NaN stop, bad input, a CLI run.

Everything runs on tiny synthetic data (V-Net n_filters=4, 16^3 crops, no torch.compile) so the whole
file stays well under the suite's budget on 2 CPU cores. The trainer runs here as it does for a CPU
user: the public fused ops take their CPU path (the reference math), not the Triton interpreter that
conftest.py switches on (tests/ops/test_uncertainty_loss.py and tests/ops/test_ema.py cover the kernels; the
interpreter needs ~15 s per loss call at these sizes). One torch thread: on a shared 2-core machine
two OpenMP threads per process were measured 5x slower than one.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
from uamt_fast import train
import uamt_fast
from uamt_fast import data, files, reference
from uamt_fast.training import run_folder
from uamt_fast.nets.vnet import VNet

TINY = ["--n-filters", "4", "--patch", "16", "16", "16", "--labeled", "2", "--no-compile", "--device", "cpu",
        "--log-every", "5", "--save-every", "5", "--eval-stride-xy", "16", "--eval-stride-z", "16"]


# Subprocesses: no interpreter, one thread (see the module docstring).
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("trainer_on_cpu")  # tests/conftest.py


def run_cli(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=ENV, check=False)


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


# ----------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("iteration", [0, 1, 149, 150, 151, 2499, 2500, 2501, 4999, 5000, 5999])
def test_schedule_is_the_released_one(iteration):
    """Paper defaults: lr 0.01 / 10 every 2500, lambda = 0.1 * rampup(i // 150, 40), H ramped to ln 2 over 6000."""
    lr, weight, threshold = train.schedule(train.Config(), iteration)
    assert lr == pytest.approx(0.01 * 0.1 ** (iteration // 2500), rel=1e-12)
    phase = 1.0 - min(iteration // 150, 40) / 40
    assert weight == pytest.approx(0.1 * math.exp(-5 * phase * phase), rel=1e-12)
    phase = 1.0 - iteration / 6000
    assert threshold == pytest.approx((0.75 + 0.25 * math.exp(-5 * phase * phase)) * math.log(2), rel=1e-12)


def test_schedule_end_points_and_scaling():
    cfg = train.Config()
    assert (cfg.lr_step, cfg.consistency_period) == (2500, 150)
    assert train.schedule(cfg, 2499)[0] == pytest.approx(0.01) and train.schedule(cfg, 2500)[0] == pytest.approx(0.001)
    assert train.schedule(cfg, 5999)[1] == pytest.approx(0.1 * reference.sigmoid_rampup(39, 40))
    assert train.schedule(cfg, 6000)[1:] == pytest.approx((0.1, math.log(2)))
    # a shorter run: the ramps still span it (same values at the same fraction of the run), the lr does not decay
    short = train.Config(iterations=600)
    assert (short.lr_step, short.consistency_period) == (2500, 15)
    for i in (0, 15, 249, 250, 599):
        assert train.schedule(short, i)[1:] == pytest.approx(train.schedule(cfg, i * 10)[1:])
        assert train.schedule(short, i)[0] == 0.01
    explicit = train.Config(iterations=600, lr_step=100, consistency_period=7)
    assert (explicit.lr_step, explicit.consistency_period) == (100, 7)
    assert train.schedule(explicit, 100)[0] == pytest.approx(0.001)


# ----------------------------------------------------------------------------- teacher passes
def test_batched_teacher_passes_equal_sequential_passes():
    """One forward of (T+1)*B with ghost batch norm == T+1 forwards of B (and any chunking in between),
    with the same noise (one seeded draw) and the same dropout masks (fixed per row of the stacked batch)."""
    passes, b = 5, 2
    teacher = VNet(n_filters=4).train()
    x = torch.randn(b, 1, 32, 32, 16)  # not 16^3: a 2x2x1 bottleneck keeps 8 values per BN channel (well conditioned)
    # Dropout3d masks fixed by seed per (layer, stacked row): whichever forward a pass goes through,
    # its rows get the same masks. Channels: 4 * 16 after the encoder, 4 after the decoder.
    gen = torch.Generator().manual_seed(1)
    masks = [(torch.rand(passes * b, c, 1, 1, 1, generator=gen) > 0.5).float() * 2 for c in (64, 4)]
    rows = {"offset": 0, "layer": 0}

    def dropout(h):
        n = h.shape[0]
        mask = masks[rows["layer"] % 2][rows["offset"] : rows["offset"] + n]
        rows["layer"] += 1
        return h * mask

    def forward(h):  # the teacher_forward handed to teacher_passes: tracks which stacked rows it sees
        out = teacher(h)
        rows["offset"] += h.shape[0]
        return out

    teacher._dropout = dropout
    results = {}
    for chunks in (1, 2, passes):
        rows["offset"] = rows["layer"] = 0
        torch.manual_seed(7)  # the noise draw
        with torch.no_grad():
            results[chunks] = train.teacher_passes(forward, teacher, x, passes, chunks, 0.1, 0.2)
        assert rows["offset"] == passes * b
    assert results[1].shape == (passes, b, 2, 32, 32, 16)
    # not bit-equal: ghost BN reduces in another order than nn.BatchNorm3d (~1e-5 after 20 BN layers)
    torch.testing.assert_close(results[1], results[passes], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results[2], results[passes], rtol=1e-4, atol=1e-4)
    # not vacuous: the passes differ (noise and masks), and ghost BN matters (one plain BN over all rows differs)
    assert (results[1][0] - results[1][1]).abs().max() > 1e-3
    rows["offset"] = rows["layer"] = 0
    torch.manual_seed(7)
    with torch.no_grad():
        teacher.bn_groups = 1
        noisy = x.unsqueeze(0) + reference.teacher_noise(x.expand(passes, *x.shape), 0.1, 0.2)
        plain = teacher(noisy.flatten(0, 1)).unflatten(0, (passes, b))
    assert (plain - results[passes]).abs().max() > 1e-3


def test_teacher_noise_is_clamped_gaussian_per_pass():
    torch.manual_seed(0)
    seen = []
    x = torch.zeros(2, 1, 16, 16, 16)
    train.teacher_passes(lambda h: seen.append(h) or h.repeat(1, 2, 1, 1, 1), VNet(n_filters=4), x, 3, 1, 0.1, 0.2)
    noise = seen[0].unflatten(0, (3, 2))
    assert noise.abs().max() <= 0.2 and 0.09 < noise.std() < 0.11
    assert not torch.equal(noise[0], noise[1])


# ----------------------------------------------------------------------------- one step of each method
@pytest.mark.parametrize("flags", [
    {"method": "uamt"}, {"method": "uamt", "consistency_on": "all", "teacher_chunks": 3},
    {"method": "mt"}, {"method": "supervised", "dropout": False},
])
def test_train_step_methods(tiny_root, flags):
    cfg = train.Config(data=str(tiny_root), n_filters=4, patch=(16, 16, 16), eval_stride_xy=16, labeled=2, device="cpu",
                       compile=False, iterations=10, **flags)
    parts = train.build(cfg)
    before = {k: v.clone() for k, v in parts.student.state_dict().items()}
    terms, stats = train.train_step(parts, 0)
    assert torch.isfinite(terms).all() and torch.isfinite(stats).all()
    assert not torch.equal(before["block_one.conv.0.weight"], parts.student.block_one.conv[0].weight)
    if cfg.method == "supervised":
        assert parts.teacher is None and terms[2] == 0
        return
    # alpha = 0 at step 0: the EMA makes the teacher a copy of the student (global step passed through)
    for t, s in zip(parts.teacher.parameters(), parts.student.parameters()):
        assert torch.equal(t, s)
    if cfg.method == "mt":
        assert stats[0] == 1  # no mask
    else:
        assert 0 < stats[0] <= 1 and 0 < stats[1] < math.log(2) + 1e-6


def test_fused_ops_match_reference_ops(tiny_root):
    """--reference-ops swaps in uamt_fast.reference's loss and per-tensor EMA loop; the public ops (here
    their CPU path, over a flat parameter buffer) give the same two steps: terms, stats and weights."""
    out = {}
    for ref in (False, True):
        cfg = train.Config(data=str(tiny_root), n_filters=4, patch=(16, 16, 16), eval_stride_xy=16, labeled=2, device="cpu",
                           compile=False, reference_ops=ref)
        parts = train.build(cfg)
        assert (uamt_fast.flat_parameters(parts.teacher) is None) == ref
        steps = [torch.cat(train.train_step(parts, i)) for i in range(2)]
        out[ref] = torch.stack(steps), parts.student.state_dict(), parts.teacher.state_dict()
    torch.testing.assert_close(out[False][0], out[True][0], rtol=1e-5, atol=1e-7)
    for fused, reference_ in zip(out[False][1:], out[True][1:]):
        for k, v in fused.items():
            torch.testing.assert_close(v, reference_[k], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- checkpoints
def test_resume_reproduces_the_uninterrupted_run(tiny_root, tmp_path):
    """N iterations == N/2, stop, --resume, N/2 more: identical weights, BN buffers and optimizer state."""
    common = ["--data", tiny_root, *TINY, "--iterations", "8", "--save-every", "3"]
    assert train.main([*map(str, common), "--out", str(tmp_path / "a")]) == 0
    assert train.main([*map(str, common), "--out", str(tmp_path / "b"), "--stop-at", "4"]) == 0
    assert not (tmp_path / "b" / "student.pt").exists()
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["iteration"] == 4
    assert train.main(["--resume", str(tmp_path / "b")]) == 0
    for name in ("student.pt", "teacher.pt"):
        a, b = weights(tmp_path / "a" / name), weights(tmp_path / "b" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs after resume"
    opt_a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["optimizer"]["state"]
    opt_b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(opt_a[i]["momentum_buffer"], opt_b[i]["momentum_buffer"]) for i in opt_a)
    log = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log if "loss_ce" in r] == [5, 8]  # logs every 5, and at the end


def test_resume_refuses_to_change_the_run(tiny_root, tmp_path, capsys):
    args = ["--data", str(tiny_root), *TINY, "--iterations", "4", "--stop-at", "2", "--out", str(tmp_path)]
    assert train.main(args) == 0
    assert train.main(["--resume", str(tmp_path), "--lr", "0.5"]) == 2
    assert "--lr" in capsys.readouterr().err
    assert train.main(["--resume", str(tmp_path / "nowhere")]) == 2


def test_atomic_save_survives_a_crash_mid_save(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    good = {"iteration": 3, "w": torch.arange(10.0)}
    files.atomic_save(good, path)

    def crash(obj, f, *a, **k):  # half a file written, then the process "dies"
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    save = torch.save
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_save({"iteration": 4}, path)
    monkeypatch.setattr(torch, "save", save)
    back = torch.load(path, weights_only=True)
    assert back["iteration"] == 3 and torch.equal(back["w"], good["w"])
    assert list(tmp_path.iterdir()) == [path]


def test_atomic_save_survives_a_killed_process(tmp_path):
    """A process that dies (os._exit: no cleanup, no exception handling) halfway through writing the new
    checkpoint leaves the old one loadable."""
    path = tmp_path / "checkpoint.pt"
    files.atomic_save({"iteration": 1, "w": torch.ones(1000)}, path)
    pid = os.fork()
    if pid == 0:  # the child: start saving, die mid-write
        def dying_save(obj, f, *a, **k):
            f.write(b"x" * 100)
            f.flush()
            os._exit(9)

        torch.save = dying_save
        files.atomic_save({"iteration": 2}, path)
        os._exit(0)  # not reached
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9
    back = torch.load(path, weights_only=True)
    assert back["iteration"] == 1 and torch.equal(back["w"], torch.ones(1000))
    (stale,) = [p for p in tmp_path.iterdir() if p != path]  # the dead writer's temporary file
    assert stale.name.startswith(".checkpoint.pt.") and stale.name.endswith(".tmp")
    with run_folder.RunLock(tmp_path, "--resume"):  # the next holder of the folder removes it
        assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", files.LOCK_NAME]


def test_ctrl_c_saves_a_checkpoint_and_exits(tiny_root, tmp_path, monkeypatch):
    """SIGINT mid-iteration: the iteration finishes, a checkpoint is saved, exit code 130, --resume continues."""
    step = train.train_step

    def interrupted_step(parts, iteration):
        if iteration == 2:
            signal.raise_signal(signal.SIGINT)  # as if Ctrl-C arrived during the third iteration
        return step(parts, iteration)

    monkeypatch.setattr(train, "train_step", interrupted_step)
    args = ["--data", str(tiny_root), *TINY, "--iterations", "6", "--out", str(tmp_path)]
    assert train.main(args) == 130
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["iteration"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    monkeypatch.setattr(train, "train_step", step)
    assert train.main(["--resume", str(tmp_path), "--threads", "1"]) == 0 and (tmp_path / "student.pt").exists()


# ----------------------------------------------------------------------------- NaN stop
def test_nan_loss_stops_with_iteration_and_term(tiny_root, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    dice_loss = reference.dice_loss

    def poisoned(logits, labels, *args, **kwargs):  # the Dice term of iteration 7 (1-based) goes NaN
        calls["n"] += 1
        loss = dice_loss(logits, labels, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 7 else loss

    monkeypatch.setattr(reference, "dice_loss", poisoned)
    args = ["--data", str(tiny_root), *TINY, "--iterations", "12", "--out", str(tmp_path), "--log-every", "4"]
    assert train.main(args) == 1
    err = capsys.readouterr().err
    assert "non-finite dice loss at iteration 7" in err
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["iteration"] == 5  # the last good checkpoint; the one due at 10 was never written
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())
    assert not (tmp_path / "student.pt").exists() and not (tmp_path / "eval.json").exists()


# ----------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def broken_root(tmp_path_factory) -> Path:
    """A data set whose second training case is a truncated h5 file."""
    root = tmp_path_factory.mktemp("broken_la")
    data.write_synthetic_la(root, n_train=3, n_test=1, shape=(32, 24, 16), seed=0)
    h5 = root / "2018LA_Seg_Training Set" / data.read_list(root, "train")[1] / "mri_norm2.h5"
    h5.write_bytes(h5.read_bytes()[:200])
    return root


BAD_INPUT = {  # flags -> words the one error line must contain
    "missing data": (["--data", "{tiny}/nowhere"], ["nowhere"]),
    "no data": ([], ["--data"]),
    "truncated h5": (["--data", "{broken}"], ["mri_norm2.h5"]),
    "unknown method": (["--method", "pseudo-label"], ["--method", "pseudo-label"]),
    "unknown consistency-on": (["--consistency-on", "labeled"], ["--consistency-on", "labeled"]),
    "unknown flag": (["--bogus"], ["--bogus"]),
    "bad number": (["--iterations", "many"], ["--iterations", "many"]),
    "too many labeled": (["--labeled", "99"], ["--labeled 99: need", "5"]),
    "patch not multiple of 16": (["--patch", "24", "16", "16"], ["--patch", "24"]),
    "patch larger than the volumes": (["--patch", "48", "16", "16"], ["patch", "48"]),
    "eval of a non-checkpoint": (["--eval", "{tiny}/train.list"], ["--eval", "train.list"]),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_exits_2_with_one_line(case, tiny_root, broken_root, tmp_path, capsys):
    flags, words = BAD_INPUT[case]
    flags = [f.format(tiny=tiny_root, broken=broken_root) for f in flags]
    if "--data" not in flags and case != "no data":
        flags = ["--data", str(tiny_root), *flags]
    assert train.main([*TINY, *flags, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("train.py: error: "), err
    assert all(w in err for w in words), err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_bad_input_through_the_real_command_line(broken_root, tmp_path):
    """The same through ``python train.py``: exit code 2, one line on stderr, no traceback."""
    proc = run_cli("--data", broken_root, *TINY, "--out", tmp_path / "run")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "unreadable HDF5 file" in proc.stderr


# ----------------------------------------------------------------------------- evaluation at reduced resolution
def test_downsample_case_pools_image_and_label():
    image = np.arange(4 * 4 * 5, dtype=np.float32).reshape(4, 4, 5)
    label = np.zeros((4, 4, 5), np.uint8)
    label[:2, :2, :2] = 1  # a full block -> 1
    label[2:, 2:, :2] = [[[1, 0], [1, 0]], [[0, 0], [1, 1]]]  # 4 of 8 -> 1 (ties go to foreground)
    label[:2, 2:, :2] = [[[1, 0], [0, 0]], [[0, 0], [1, 1]]]  # 3 of 8 -> 0
    small = data.downsample(data.Case("c", image, label), 2)
    assert small.image.shape == small.label.shape == (2, 2, 2)  # the odd last slice is dropped
    assert small.image[0, 0, 0] == pytest.approx(image[:2, :2, :2].mean())
    assert small.label[:, :, 0].tolist() == [[1, 0], [0, 1]] and small.label[:, :, 1].sum() == 0


def test_reduced_resolution_evaluation_scores_full_resolution_labels(tmp_path):
    """A model that segments perfectly at half resolution, upsampled back, scores high against the
    full-resolution label: the upsampling is aligned (a one-voxel shift would cost ~10 Dice points here)."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in (40, 36, 33)], indexing="ij"))
    label = (((grid - np.array([19, 17, 15])[:, None, None, None]) ** 2).sum(0) < 9**2).astype(np.uint8)
    case = data.Case("sphere", label.astype(np.float32) * 2 - 1, label)

    class Oracle(torch.nn.Module):  # the image is +-1 at the label: logits (-x, x) segment it exactly
        def forward(self, x):
            return torch.cat([-x, x], dim=1) * 10

    cfg = train.Config(patch=(16, 16, 16), downsample=2, eval_stride_xy=8, eval_stride_z=8)
    result = train.evaluate(Oracle(), cfg, [case], tmp_path)
    assert result["mean"]["dice"] > 0.95 and result["nan_cases"] == 0
    assert json.loads((tmp_path / "eval.json").read_text())["cases"][0]["case"] == "sphere"


# ----------------------------------------------------------------------------- the real command line
def test_cli_run_writes_the_documented_run_folder(tiny_root, tmp_path):
    run = tmp_path / "run"
    proc = run_cli("--data", tiny_root, *TINY, "--iterations", "20", "--out", run)
    assert proc.returncode == 0, proc.stderr
    assert "Dice(%)" in proc.stdout and "mean (2)" in proc.stdout
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["iterations"] == 20 and config["config"]["seed"] == 1337
    assert {"torch", "python", "device"} <= config["environment"].keys()
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss_ce" in r]
    assert [r["iteration"] for r in steps] == [5, 10, 15, 20]
    assert {"lr", "loss_dice", "loss_consistency", "consistency_weight", "threshold", "mask_fraction",
            "uncertainty_mean", "it_per_s"} <= steps[0].keys()
    assert all(math.isfinite(r["loss_ce"]) for r in steps) and log[-1]["it_per_s"] > 0
    for name in ("student.pt", "teacher.pt"):
        model = VNet(n_filters=4)
        model.load_state_dict(weights(run / name))
    result = json.loads((run / "eval.json").read_text())
    assert set(result) == {"cases", "mean", "nan_cases", "source"} and len(result["cases"]) == 2
    assert result["source"]["checkpoint"] == str(run / "student.pt") and len(result["source"]["case_ids"]) == 2
    assert set(result["cases"][0]) == {"case", "dice", "jaccard", "hd95", "asd", "hd95_mm", "asd_mm"}
    assert 0 <= result["mean"]["dice"] <= 1
    # evaluation only, from the saved student: the same numbers
    proc = run_cli("--eval", run / "student.pt", "--data", tiny_root, "--out", tmp_path / "again")
    assert proc.returncode == 0, proc.stderr
    again = json.loads((tmp_path / "again" / "eval_student.json").read_text())
    assert again["mean"] == pytest.approx(result["mean"], nan_ok=True)
