"""What an adversarial pass over train.py found, each through the real command line: nothing the trainer reads
runs code (the compile cache included), one run per folder at a time, no checkpoint with non-finite weights,
every numeric flag in its range, one line and exit 2 instead of a traceback, the data a run resumes on is its
own, and a resumed log has each iteration once.

Tiny synthetic data and a 4-filter V-Net on the CPU, as in tests/training/test_run_safety.py.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
from uamt_fast import train  # noqa: E402
from trainer_cli import ENV, TINY, Payload, one_error_line  # noqa: E402
from uamt_fast.training import checkpoints, run_folder  # noqa: E402
from uamt_fast import data

pytestmark = pytest.mark.usefixtures("trainer_on_cpu")  # tests/conftest.py


def metrics(out: Path) -> list[int]:
    return [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss_ce" in line]


# ----------------------------------------------------------------------------- 1. the compile cache runs no code
def crafted_cache_artifacts(marker: Path) -> bytes:
    """A file in torch's portable compile-artifacts format whose 'inductor' entry is a pickle that runs code:
    ``torch.compiler.load_cache_artifacts`` unpickles it on load."""
    from torch.utils._appending_byte_serializer import _ENCODING_VERSION, BytesWriter

    w = BytesWriter()
    w.write_uint64(_ENCODING_VERSION)
    w.write_str("inductor")
    w.write_uint64(1)
    w.write_str("key")
    w.write_bytes(pickle.dumps(Payload(marker)))
    return w.to_bytes()


def test_a_crafted_compile_cache_file_never_runs(tiny_root, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "pwned"
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    blob = crafted_cache_artifacts(marker)
    for name in (f"artifacts-torch{torch.__version__}-cpu.bin", "artifacts.bin"):
        (cache / name).write_bytes(blob)
    compile_ = torch.compile  # dynamo's eager backend: the CLI path without minutes of inductor C++ compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: compile_(*a, **{**k, "mode": None}, backend="eager"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    torch._dynamo.reset()
    try:
        code = train.main(["--data", str(tiny_root), *TINY, "--compile", "--compile-cache", str(cache),
                           "--out", str(tmp_path / "run")])
    finally:
        torch._dynamo.reset()
    assert code == 0, capsys.readouterr().err
    assert not marker.exists()
    assert sorted(p.name for p in cache.iterdir()) == sorted(["inductor", "artifacts.bin",
                                                                f"artifacts-torch{torch.__version__}-cpu.bin"])


def test_a_compile_cache_others_can_write_is_refused(tiny_root, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "shared_cache"
    cache.mkdir()
    cache.chmod(0o777)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    out = tmp_path / "run"
    assert train.main(["--data", str(tiny_root), *TINY, "--compile", "--compile-cache", str(cache),
                       "--out", str(out)]) == 2
    one_error_line(capsys, "--compile-cache", "777", "chmod go-w")
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ and not out.exists()


# ----------------------------------------------------------------------------- 2. one run per folder at a time
def start(args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_two_concurrent_starts_into_one_folder_exactly_one_runs(tiny_root, tmp_path):
    out = tmp_path / "run"
    args = ["--data", str(tiny_root), *TINY, "--iterations", "6", "--out", str(out)]
    procs = [start(args + ["--seed", str(seed)]) for seed in (1, 2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    (err,) = [err for code, _, err in results if code == 2]
    assert err.count("\n") == 1 and ("pid" in err or "already holds a run" in err), err
    assert metrics(out) == [2, 4, 6]  # one run's log, not two interleaved
    (winner,) = [i for i, (code, _, _) in enumerate(results) if code == 0]
    assert json.loads((out / "config.json").read_text())["config"]["seed"] == winner + 1


def test_a_start_that_lost_the_race_leaves_the_winners_folder_alone(tiny_root, tmp_path, monkeypatch, capsys):
    """The folder did not exist when this start looked, another start created and locked it before this one's
    claim: the loser must not tidy it away as its own empty run folder (it removed the winner's lock and folder)."""
    from uamt_fast import files

    out, claim, holder = tmp_path / "run", run_folder.claim, []

    def another_start_wins_first(folder, *args, **kwargs):
        folder.mkdir()
        holder.append(files.FolderLock(folder, "--out", "train.py"))  # the winner, as another open of the lock
        return claim(folder, *args, **kwargs)

    monkeypatch.setattr(run_folder, "claim", another_start_wins_first)
    assert train.main(["--data", str(tiny_root), *TINY, "--out", str(out)]) == 2
    one_error_line(capsys, "in progress", f"pid {os.getpid()}")
    assert (out / files.LOCK_NAME).is_file() and (out / files.LOCK_NAME).read_text() == f"{os.getpid()} train.py\n"
    holder[0].release()


def test_a_running_run_cannot_be_claimed_or_resumed_and_a_killed_one_leaves_no_stale_lock(tiny_root, tmp_path,
                                                                                          capsys):
    out = tmp_path / "run"
    proc = start(["--data", str(tiny_root), *TINY, "--iterations", "100000", "--save-every", "3", "--out", str(out)])
    try:
        deadline = time.time() + 240
        while not (out / "checkpoint.pt").is_file():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.2)
        assert train.main(["--data", str(tiny_root), *TINY, "--out", str(out), "--overwrite"]) == 2
        one_error_line(capsys, "in progress", f"pid {proc.pid}")
        assert train.main(["--resume", str(out), "--stop-at", "100000"]) == 2
        one_error_line(capsys, "--resume", "in progress", f"pid {proc.pid}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    done = torch.load(out / "checkpoint.pt", weights_only=True)["iteration"]
    assert train.main(["--resume", str(out), "--stop-at", str(done + 2)]) == 0  # kill -9: the kernel dropped the lock


def test_resume_after_kill_9_logs_every_iteration_once(tiny_root, tmp_path):
    out = tmp_path / "run"
    proc = start(["--data", str(tiny_root), *TINY, "--iterations", "100000", "--log-every", "1", "--save-every", "4",
                  "--out", str(out)])
    deadline = time.time() + 240
    while not ((out / "checkpoint.pt").is_file() and (out / "metrics.jsonl").is_file()
               and len(metrics(out)) % 4 >= 2):  # killed between two checkpoints, with lines logged past the last
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = torch.load(out / "checkpoint.pt", weights_only=True)["iteration"]
    logged = metrics(out)
    assert logged[-1] > done  # the situation that used to log iterations twice
    stop = logged[-1] + 3
    assert train.main(["--resume", str(out), "--stop-at", str(stop)]) == 0
    assert metrics(out) == list(range(1, stop + 1))


# ----------------------------------------------------------------------------- 3. no checkpoint holds NaN
@pytest.mark.parametrize("flag, value", [("--lr", "nan"), ("--lr", "inf"), ("--lr", "1e400"), ("--momentum", "nan"),
                                         ("--weight-decay", "nan"), ("--consistency", "nan"), ("--ema-decay", "nan"),
                                         ("--noise-std", "-inf")])
def test_non_finite_float_flags_are_refused_before_anything_is_made(tiny_root, tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    assert train.main(["--data", str(tiny_root), *TINY, f"{flag}={value}", "--out", str(out)]) == 2
    one_error_line(capsys, flag, "finite")
    assert not out.exists()


def test_a_diverging_run_never_saves_weights_that_are_not_finite(tiny_root, tmp_path, monkeypatch, capsys):
    """The 4th SGD step writes a NaN into a weight (as lr=nan, or an overflowing update, does) while the loss it
    came from was finite: the checkpoint due right after it is refused, the one of iteration 2 stays."""
    step, calls = torch.optim.SGD.step, []

    def breaking_step(self, *a, **k):
        out = step(self, *a, **k)
        calls.append(1)
        if len(calls) == 4:
            with torch.no_grad():
                self.param_groups[0]["params"][3].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", breaking_step)
    out = tmp_path / "run"
    assert train.main(["--data", str(tiny_root), *TINY, "--iterations", "8", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "non-finite student weight" in err and "after iteration 4" in err, err
    assert f"last good checkpoint: {out / 'checkpoint.pt'} (iteration 2)" in err, err
    state = checkpoints.read(out / "checkpoint.pt")
    assert state["iteration"] == 2
    assert checkpoints.first_nonfinite(state["student"]) is None and checkpoints.first_nonfinite(state["teacher"]) is None
    assert not (out / "student.pt").exists()


def test_a_checkpoint_with_a_nan_weight_is_refused_naming_the_tensor(tiny_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--data", str(tiny_root), *TINY, "--out", str(out)]) == 0
    student = torch.load(out / "student.pt", weights_only=True)
    student["model"]["block_five.conv.0.weight"].view(-1)[7] = float("nan")
    torch.save(student, tmp_path / "nan.pt")
    assert train.main(["--eval", str(tmp_path / "nan.pt"), "--data", str(tiny_root)]) == 2
    one_error_line(capsys, "nan.pt", "block_five.conv.0.weight", "NaN")


# ----------------------------------------------------------------------------- 4. every numeric flag in its range
@pytest.mark.parametrize("flag, value", [("--consistency", "-1"), ("--consistency-period", "-5"),
                                         ("--noise-clip", "-1"), ("--noise-std", "-1"), ("--ema-decay", "2"),
                                         ("--ema-decay", "-0.5"), ("--momentum", "1"), ("--lr", "0"), ("--lr", "1e300"),
                                         ("--weight-decay", "-1"), ("--n-filters", "100000"), ("--downsample", "64"),
                                         ("--mc-passes", "0"), ("--seed", "-1"), ("--figures-cases", "-1"),
                                         ("--eval-stride-xy", "32"), ("--consistency-rampup", "-1")])
def test_out_of_range_flags_are_refused_with_their_range(tiny_root, tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    assert train.main(["--data", str(tiny_root), *TINY, f"{flag}={value}", "--out", str(out)]) == 2
    one_error_line(capsys, flag)
    assert not out.exists()


def test_help_states_the_range_of_every_numeric_flag():
    helps = {a.dest: " ".join(a.help.split()) for a in train.make_parser()._actions if a.help}
    for field in train.dataclasses.fields(train.Config):
        if field.type in ("int", "float"):
            assert field.name in train.RANGES, field.name
            assert helps[field.name].endswith(f"(valid: {train.RANGES[field.name]})"), (field.name, helps[field.name])


# ----------------------------------------------------------------------------- 5. one line and exit 2, never a traceback
def test_no_cuda_and_odd_outputs_give_one_line(tiny_root, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert train.main(["--data", str(tiny_root), *TINY, "--data-device", "cuda", "--out", str(tmp_path / "a")]) == 2
    one_error_line(capsys, "--data-device cuda")
    (tmp_path / "file").write_text("x")
    assert train.main(["--data", str(tiny_root), *TINY, "--out", str(tmp_path / "file" / "run")]) == 2
    one_error_line(capsys, "--out", "file")


def test_downsample_larger_than_a_volume_is_one_line(tmp_path, capsys):
    thin = data.write_synthetic_la(tmp_path / "thin", n_train=3, n_test=1, shape=(48, 48, 12), seed=1)
    assert train.main(["--data", str(thin), *TINY, "--downsample", "16", "--out", str(tmp_path / "r")]) == 2
    one_error_line(capsys, "--downsample 16", "shape (48, 48, 12)")


@pytest.mark.parametrize("field, value, words", [("eval_stride_xy", "x", ["eval-stride-xy", "int"]),
                                                 ("n_filters", 1e9, ["n_filters", "128"]),
                                                 ("n_filters", 10**9, ["n_filters", "128"]),
                                                 ("lr", float("nan"), ["--lr"]),
                                                 ("patch", "112", ["patch"]),
                                                 ("dropout", "yes", ["dropout"])])
def test_every_config_field_read_from_a_checkpoint_is_bounded(tiny_root, tmp_path, capsys, field, value, words):
    out = tmp_path / "run"
    assert train.main(["--data", str(tiny_root), *TINY, "--out", str(out)]) == 0
    for name in ("student.pt", "checkpoint.pt"):
        state = torch.load(out / name, weights_only=True)
        torch.save(state | {"config": state["config"] | {field: value}}, out / name)
    assert train.main(["--eval", str(out / "student.pt"), "--data", str(tiny_root)]) == 2
    one_error_line(capsys, "student.pt", *words)
    (out / "eval.json").unlink()
    assert train.main(["--resume", str(out)]) == 2
    one_error_line(capsys, "--resume", *words)


def test_a_full_disk_is_one_line_and_the_last_checkpoint_survives(tiny_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    save, calls = torch.save, []

    def filling_save(obj, f, *a, **k):  # the second checkpoint meets a full disk
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f.name))
        return save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", filling_save)
    assert train.main(["--data", str(tiny_root), *TINY, "--iterations", "6", "--out", str(out)]) == 2
    err = one_error_line(capsys, "No space left on device", "--resume", "(iteration 2)")
    assert "checkpoint.pt" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["iteration"] == 2
    assert not list(out.glob("*.tmp"))


def test_eval_into_a_folder_that_cannot_be_written_stops_before_the_evaluation(tiny_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--data", str(tiny_root), *TINY, "--out", str(out)]) == 0
    capsys.readouterr()
    # /proc refuses new files even to root (chmod does not stop root, which CI may be)
    assert train.main(["--eval", str(out), "--data", str(tiny_root), "--out", "/proc"]) == 2
    captured = capsys.readouterr()
    assert "evaluated" not in captured.out and "cannot write" in captured.err, captured
    if os.getuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        assert train.main(["--eval", str(out), "--data", str(tiny_root), "--out", str(locked)]) == 2
        one_error_line(capsys, "cannot write")


# ----------------------------------------------------------------------------- 6. the data a run trains on is its own
def test_resume_on_other_data_is_refused_and_moved_data_is_recorded(tiny_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--data", str(tiny_root), *TINY, "--iterations", "4", "--stop-at", "2", "--out", str(out)]) == 0
    other = tmp_path / "other"
    data.write_synthetic_la(other, n_train=5, n_test=2, shape=(32, 24, 16), seed=9)
    (other / "train.list").write_text("\n".join(reversed(data.read_list(other, "train"))) + "\n")
    assert train.main(["--resume", str(out), "--data", str(other)]) == 2
    one_error_line(capsys, "--resume", "train.list differs", "line 1")
    moved = tmp_path / "moved"
    os.rename(tiny_root, moved)  # the same data in a new place: allowed, and config.json says where it is now
    try:
        assert train.main(["--resume", str(out), "--data", str(moved)]) == 0
    finally:
        os.rename(moved, tiny_root)
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["data"] == [str(moved)] and len(record["resumed"]) == 1
    assert record["data_split"]["train"] == data.read_list(tiny_root, "train")


def test_case_ids_that_are_paths_or_in_both_lists_stop_training(tiny_root, tmp_path, capsys):
    bad = tmp_path / "bad"
    data.write_synthetic_la(bad, n_train=5, n_test=2, shape=(32, 24, 16), seed=3)
    train_ids = data.read_list(bad, "train")
    (bad / "test.list").write_text(f"{train_ids[-1]}\n")
    assert train.main(["--data", str(bad), *TINY, "--out", str(tmp_path / "r1")]) == 2
    one_error_line(capsys, train_ids[-1])
    (bad / "test.list").write_text("../../../etc\n")
    assert train.main(["--data", str(bad), *TINY, "--out", str(tmp_path / "r2")]) == 2
    one_error_line(capsys, "../../../etc")
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


# ----------------------------------------------------------------------------- the run folder module itself
def test_the_lock_is_exclusive_and_names_its_holder(tmp_path):
    with run_folder.RunLock(tmp_path, "--out"):
        with pytest.raises(run_folder.RunFolderError, match=f"pid {os.getpid()}"):
            run_folder.RunLock(tmp_path, "--out")
    run_folder.RunLock(tmp_path, "--out").release()  # released: free again


def test_drop_metrics_after_keeps_lines_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"iteration": i, "loss_ce": 1.0}) + "\n" for i in (2, 4, 6, 8))
                    + '{"iteration": 10, "loss_')  # the last line cut short by a kill
    assert run_folder.drop_metrics_after(path, 4) == 3
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [2, 4]


@pytest.mark.parametrize("args, words", [(["--seeds", "0"], ["--seeds", "[1, 1000]"]),
                                         (["--parallel", "-1"], ["--parallel"]),
                                         (["--iterations", "nan"], ["--iterations"]),
                                         (["--figures-cases", "-1"], ["--figures-cases"])])
def test_the_runner_states_and_checks_its_ranges(tmp_path, capsys, args, words):
    from benchmarks import reproduce

    assert reproduce.main([*args, "--out", str(tmp_path / "runs"), "--table-only"]) == 2
    one_error_line(capsys, *words, prefix="error: ")
    (tmp_path / "file").write_text("x")
    assert reproduce.main(["--out", str(tmp_path / "file"), "--table-only"]) == 2
    one_error_line(capsys, "--out", "is a file", prefix="error: ")
