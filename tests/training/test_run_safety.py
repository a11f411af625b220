"""train.py is safe to point at any file or folder: checkpoints never run code, odd files get one line and
exit code 2, a run folder is never written over, an evaluation never replaces another, eval.json is strict JSON.

Tiny synthetic data and a 4-filter V-Net on the CPU, as in tests/training/test_train.py.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
from uamt_fast import train  # noqa: E402
from trainer_cli import ENV, TINY, Payload, one_error_line  # noqa: E402
from uamt_fast.training import checkpoints  # noqa: E402
from uamt_fast.data import __main__ as data_cli  # python -m uamt_fast.data
from uamt_fast import data, figures, files

pytestmark = pytest.mark.usefixtures("trainer_on_cpu")  # tests/conftest.py


@pytest.fixture(scope="module")
def run(tiny_root, tmp_path_factory) -> Path:
    """A finished 2-iteration run."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert train.main(["--data", str(tiny_root), *TINY, "--out", str(out)]) == 0
    return out


# ----------------------------------------------------------------------------- checkpoints never run code
def test_hostile_checkpoint_is_refused_by_eval_resume_and_the_loading_functions(run, tiny_root, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save(state | {"config": state["config"] | {"note": Payload(marker)}}, evil)

    assert train.main(["--eval", str(evil), "--out", str(tmp_path / "e")]) == 2
    one_error_line(capsys, "refused", "evil.pt", "nothing in it was run")
    folder = tmp_path / "evil_run"  # the same file as a run folder's student.pt and checkpoint.pt
    folder.mkdir()
    torch.save({"model": Payload(marker), "config": state["config"]}, folder / "student.pt")
    torch.save(state | {"student": Payload(marker)}, folder / "checkpoint.pt")
    assert train.main(["--eval", str(folder)]) == 2
    one_error_line(capsys, "refused")
    assert train.main(["--resume", str(folder)]) == 2
    one_error_line(capsys, "refused", "--resume")
    for load in (checkpoints.read, checkpoints.load_vnet, lambda p: train.load_model(p, torch.device("cpu"))):
        with pytest.raises(checkpoints.CheckpointError, match="refused"):
            load(evil)
    assert figures.main(["panels", "--data", str(tiny_root), "--checkpoint", str(evil), "--out", str(tmp_path)]) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists()


def test_hostile_checkpoint_through_the_real_command_line(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": Payload(marker)}, tmp_path / "evil.pt")
    proc = subprocess.run([sys.executable, "train.py", "--eval", str(tmp_path / "evil.pt")], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "refused" in proc.stderr and not marker.exists()


def _odd_files(run: Path, tmp: Path) -> dict:
    student = torch.load(run / "student.pt", weights_only=True)
    conv = "block_one.conv.0.weight"
    files = {
        "no n_filters": ({"model": {"x": torch.zeros(1)}, "config": {}}, ["n_filters"]),
        "no config": ({"model": student["model"]}, ["config"]),
        "no weights": ({"config": student["config"]}, ["neither", "model"]),
        "foreign weights": ({"model": {"x": torch.zeros(1)}, "config": student["config"]}, ["does not fit", "missing"]),
        "wrong shape": ({"model": student["model"] | {conv: torch.zeros(3)}, "config": student["config"]},
                        [conv, "shape"]),
        "unknown config field": ({"model": student["model"], "config": student["config"] | {"bogus": 1}}, ["bogus"]),
        "not a dict": (torch.zeros(3), ["dict"]),
    }
    paths = {}
    for name, (obj, words) in files.items():
        path = tmp / (name.replace(" ", "_") + ".pt")
        torch.save(obj, path)
        paths[name] = (path, words)
    truncated = tmp / "truncated.pt"
    truncated.write_bytes((run / "student.pt").read_bytes()[:300])
    text = tmp / "notes.pt"
    text.write_text("not a checkpoint\n")
    paths |= {"truncated": (truncated, ["truncated"]), "text file": (text, ["notes.pt"]),
              "missing file": (tmp / "nowhere.pt", ["no such file"]),
              "folder without student.pt": (tmp, ["student.pt"])}
    return paths


def test_odd_files_to_eval_give_one_line_and_exit_2(run, tmp_path, capsys):
    for name, (path, words) in _odd_files(run, tmp_path).items():
        assert train.main(["--eval", str(path), "--out", str(tmp_path / "e")]) == 2, name
        one_error_line(capsys, "--eval", *words)


def test_odd_checkpoint_to_resume_gives_one_line(run, tmp_path, capsys):
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    for name, bad, words in [("no optimizer", {k: v for k, v in state.items() if k != "optimizer"}, ["optimizer"]),
                             ("wrong student", state | {"student": {"x": torch.zeros(1)}}, ["student", "does not fit"]),
                             ("bad sampler", state | {"sampler": {"x": 1}}, ["sampler"])]:
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        torch.save(bad, folder / "checkpoint.pt")
        assert train.main(["--resume", str(folder)]) == 2, name
        one_error_line(capsys, "--resume", *words)


# ----------------------------------------------------------------------------- runs and evaluations are never replaced
def test_out_holding_a_run_is_refused_unless_overwrite(tiny_root, run, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert train.main(["--data", str(tiny_root), *TINY, "--out", str(run)]) == 2
    one_error_line(capsys, "already holds a run", "--resume", "--overwrite")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    again = tmp_path / "again"
    assert train.main(["--data", str(tiny_root), *TINY, "--out", str(again)]) == 0
    (again / "notes.txt").write_text("mine")
    assert train.main(["--data", str(tiny_root), *TINY, "--out", str(again), "--overwrite", "--iterations", "4"]) == 0
    log = [json.loads(line) for line in (again / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log if "loss_ce" in r] == [2, 4]  # the new run only, not appended to the old
    assert (again / "notes.txt").read_text() == "mine"  # files that are not the run's are left alone
    assert train.main(["--resume", str(again), "--overwrite"]) == 2
    one_error_line(capsys, "--overwrite")


def test_bad_data_leaves_no_empty_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main([*TINY, "--out", str(out)]) == 2  # no --data: refused before a folder is made
    one_error_line(capsys, "--data is required")
    assert train.main(["--data", str(tmp_path / "missing"), *TINY, "--out", str(out)]) == 2
    capsys.readouterr()
    assert not out.exists()
    out.write_text("not a folder")
    assert train.main(["--data", str(tmp_path), *TINY, "--out", str(out)]) == 2
    one_error_line(capsys, "is a file")


def test_resume_of_a_finished_run_is_refused_and_of_one_stopped_in_its_evaluation_only_evaluates(run, tmp_path,
                                                                                                   capsys):
    assert train.main(["--resume", str(run)]) == 2
    one_error_line(capsys, "finished", "--eval")
    stopped = tmp_path / "stopped"  # killed during the final evaluation: checkpoint at the end, no eval.json
    shutil.copytree(run, stopped)
    (stopped / "eval.json").unlink()
    metrics_before = (stopped / "metrics.jsonl").read_text()
    assert train.main(["--resume", str(stopped)]) == 0
    assert (stopped / "eval.json").is_file() and not (stopped / "eval-2.json").exists()
    assert (stopped / "metrics.jsonl").read_text() == metrics_before  # no speed line for 0 iterations


def test_eval_writes_a_new_file_with_its_source_and_never_replaces_one(tiny_root, run, capsys):
    own = (run / "eval.json").read_text()
    for expected in ("eval_teacher.json", "eval_teacher-2.json"):
        assert train.main(["--eval", str(run / "teacher.pt"), "--data", str(tiny_root)]) == 0
        result = json.loads((run / expected).read_text())
        assert result["source"]["checkpoint"] == str(run / "teacher.pt")
        assert result["source"]["data"] == [str(tiny_root)] and result["source"]["case_ids"] == data.read_list(tiny_root, "test")
        assert result["source"]["settings"]["patch"] == [16, 16, 16]
    assert (run / "eval.json").read_text() == own
    assert train.main(["--eval", str(run), "--data", str(tiny_root)]) == 0  # a run folder: its student.pt
    assert json.loads((run / "eval_student.json").read_text())["source"]["checkpoint"] == str(run / "student.pt")


def test_eval_json_is_strict_json_with_null_for_undefined_distances(tmp_path):
    label = np.zeros((20, 20, 20), np.uint8)
    label[5:15, 5:15, 5:15] = 1
    case = data.Case("c", label.astype(np.float32), label)

    class Empty(torch.nn.Module):  # predicts background everywhere: surface distances are undefined
        def forward(self, x):
            return torch.cat([x * 0 + 1, x * 0], dim=1)

    cfg = train.Config(patch=(16, 16, 16), eval_stride_xy=8, eval_stride_z=8)
    train.evaluate(Empty(), cfg, [case], tmp_path)

    def reject(token):
        raise AssertionError(f"bare {token} in eval.json")

    result = json.loads((tmp_path / "eval.json").read_text(), parse_constant=reject)
    assert result["cases"][0]["hd95"] is None and result["mean"]["asd"] is None and result["nan_cases"] == 1


def test_demo_run_keeps_its_data_and_can_be_evaluated_again(tmp_path, capsys):
    out = tmp_path / "demo"
    small = ["--n-filters", "2", "--patch", "16", "16", "16", "--iterations", "1", "--eval-stride-xy", "16",
             "--eval-stride-z", "16", "--no-compile", "--device", "cpu"]
    assert train.main(["--demo", *small, "--out", str(out)]) == 0
    assert (out / train.DEMO_DATA_DIR / "test.list").is_file()
    assert train.main(["--eval", str(out / "student.pt")]) == 0  # no --data: the run's own demo data
    assert (out / "eval_student.json").is_file()
    moved = tmp_path / "moved"
    moved.mkdir()
    (out / "student.pt").rename(moved / "student.pt")
    assert train.main(["--eval", str(moved / "student.pt")]) == 0  # its saved (absolute) data path still works
    (saved,) = json.loads((out / "config.json").read_text())["config"]["data"]
    os.rename(saved, saved + "_gone")
    assert train.main(["--eval", str(moved / "student.pt")]) == 2
    one_error_line(capsys, "--data", "python -m uamt_fast.data synth", "--seed 0")


def test_help_shows_defaults_and_the_usage_examples():
    proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    assert "(default: 6000)" in proc.stdout and "(default: 112 112 80)" in proc.stdout
    assert "python train.py --demo" in proc.stdout and "--overwrite" in proc.stdout
    assert "MISSING" not in proc.stdout  # --data has a default_factory, not a default to show


@pytest.mark.parametrize("command, defaults", [("pack", ["--unlabeled", "--test", "--max-part-mib"]),
                                               ("synth", ["--train", "--test", "--shape", "--seed"])])
def test_data_cli_help_shows_every_default_and_examples(command, defaults, capsys):
    with pytest.raises(SystemExit) as stop:
        data_cli.main([command, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    entries = dict(re.findall(r"^  (--[\w-]+)(.*?)(?=^  -|^\S|\Z)", out, re.M | re.S))  # option -> its help
    for flag in defaults:
        assert "(default:" in " ".join(entries[flag].split()), (flag, entries[flag])
    assert "python -m uamt_fast.data synth" in out and "--max-part-mib 60" in out


def test_overwrite_with_eval_is_refused_not_ignored(run, capsys):
    assert train.main(["--eval", str(run), "--overwrite"]) == 2
    one_error_line(capsys, "--overwrite", "--eval")


# ----------------------------------------------------------------------------- no link followed, no data removed
def test_links_planted_in_the_run_folder_are_never_written_through(tiny_root, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"the user's own file")
    out = tmp_path / "run"
    out.mkdir()
    for name in ("config.json.tmp", "checkpoint.pt.tmp", "student.pt.tmp", "eval.json.tmp"):
        (out / name).symlink_to(victim)
    assert train.main(["--data", str(tiny_root), *TINY, "--out", str(out)]) == 0
    assert victim.read_bytes() == b"the user's own file"
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "student.pt", "eval.json"):
        assert (out / name).is_file() and not (out / name).is_symlink(), name
    again = tmp_path / "again"
    again.mkdir()
    (again / "run.lock").symlink_to(victim)
    assert train.main(["--data", str(tiny_root), *TINY, "--out", str(again)]) == 2
    one_error_line(capsys, "symbolic link", "run.lock")
    assert victim.read_bytes() == b"the user's own file"
    (again / "run.lock").unlink()
    (again / "metrics.jsonl").symlink_to(victim)  # refused as a run's file; with --overwrite the link itself goes
    assert train.main(["--data", str(tiny_root), *TINY, "--out", str(again)]) == 2
    assert train.main(["--data", str(tiny_root), *TINY, "--out", str(again), "--overwrite"]) == 0
    assert victim.read_bytes() == b"the user's own file" and not (again / "metrics.jsonl").is_symlink()
    capsys.readouterr()
    (again / "link.jsonl").symlink_to(victim)
    with pytest.raises(files.FolderError, match="symbolic link"):  # the log's appends: O_NOFOLLOW
        files.append_line(again / "link.jsonl", "x\n")
    assert victim.read_bytes() == b"the user's own file"
    hard = tmp_path / "hard"  # a hard link at the lock's name: the lock would truncate the user's file
    hard.mkdir()
    os.link(victim, hard / "run.lock")
    assert train.main(["--data", str(tiny_root), *TINY, "--out", str(hard)]) == 2
    one_error_line(capsys, "hard links", "run.lock")
    assert victim.read_bytes() == b"the user's own file"


def test_overwrite_never_removes_the_data_it_was_given(tmp_path, capsys):
    out = tmp_path / "R"
    demo = out / "demo_data"
    data.write_synthetic_la(demo, n_train=3, n_test=1, shape=(24, 24, 16), seed=1)
    before = {str(p.relative_to(demo)): p.read_bytes() for p in demo.rglob("*") if p.is_file()}
    for folder in (out, demo, demo / "runs"):  # the run folder holds, is, or lies inside the data
        assert train.main(["--data", str(demo), *TINY, "--out", str(folder), "--overwrite"]) == 2
        one_error_line(capsys, "--overwrite would remove files where the run's data lives")
    assert {str(p.relative_to(demo)): p.read_bytes() for p in demo.rglob("*") if p.is_file()} == before
