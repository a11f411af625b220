"""train.py --tensorboard: the scalars of metrics.jsonl, as TensorBoard events; the JSONL stays the record."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
from uamt_fast import train  # noqa: E402
from uamt_fast.training import metrics_log  # noqa: E402

TINY = ["--n-filters", "4", "--patch", "16", "16", "16", "--labeled", "2", "--no-compile", "--device", "cpu",
        "--log-every", "2", "--save-every", "2", "--eval-stride-xy", "16", "--eval-stride-z", "16"]

pytestmark = pytest.mark.usefixtures("trainer_on_cpu")  # tests/conftest.py


def scalars(folder: Path) -> dict:
    """{(tag, step): value} of every scalar event under ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}


def jsonl_scalars(path: Path) -> dict:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return {(k, line["iteration"]): float(v) for line in lines for k, v in line.items() if k != "iteration"}


def test_tensorboard_events_hold_the_scalars_of_metrics_jsonl(tiny_root, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert train.main(["--data", str(tiny_root), *TINY, "--iterations", "4", "--out", str(out), "--tensorboard"]) == 0
    expected = jsonl_scalars(out / "metrics.jsonl")  # 2 log lines + the final speed line
    assert {"loss_ce", "loss_consistency", "mask_fraction", "train_seconds"} <= {k for k, _ in expected}
    written = scalars(out / metrics_log.TENSORBOARD_DIR)
    assert written.keys() == expected.keys()
    assert all(written[k] == pytest.approx(v, rel=1e-6) for k, v in expected.items())


def test_a_resumed_run_logs_each_iteration_once(tiny_root, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    argv = ["--data", str(tiny_root), *TINY, "--iterations", "6", "--out", str(out), "--tensorboard"]
    assert train.main([*argv, "--stop-at", "4"]) == 0
    with open(out / "metrics.jsonl", "a") as f:  # as a run killed after logging iteration 5 would have left it
        f.write(json.dumps({"iteration": 5, "lr": 0.01, "loss_ce": 9.0}) + "\n")
    killed = metrics_log.require_tensorboard()(str(out / metrics_log.TENSORBOARD_DIR))
    killed.add_scalar("loss_ce", 9.0, 5)
    killed.close()
    assert train.main(["--resume", str(out), "--data", str(tiny_root)]) == 0
    written = scalars(out / metrics_log.TENSORBOARD_DIR)
    assert sorted(step for tag, step in written if tag == "loss_ce") == [2, 4, 6]
    assert written.keys() == jsonl_scalars(out / "metrics.jsonl").keys()


def test_without_tensorboard_the_flag_is_one_line_before_any_work(tiny_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    out = tmp_path / "run"
    assert train.main(["--data", str(tiny_root), *TINY, "--iterations", "2", "--out", str(out), "--tensorboard"]) == 2
    err = capsys.readouterr().err
    assert err == ("train.py: error: --tensorboard needs the tensorboard package: pip install "
                   "'uamt_fast[tensorboard]' (or: pip install tensorboard)\n")
    assert not out.exists()
