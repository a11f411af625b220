"""benchmarks/reproduce.py (the paper's tables) and the train.py parts it relies on: --method mt-dice,
--data repeated, old configs with one data root."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from uamt_fast import data, reference

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train  # noqa: E402
from benchmarks import reproduce  # noqa: E402

TINY = ["--", "--patch", "32", "32", "16", "--n-filters", "2", "--eval-stride-xy", "32", "--eval-stride-z", "16",
        "--mc-passes", "2", "--log-every", "1", "--reference-ops"]


def test_softmax_dice_consistency_is_the_released_per_class_loop():
    s, t = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64), torch.randn(2, 3, 4, 5, 6, dtype=torch.float64)
    p, q = F.softmax(s, 1), F.softmax(t, 1)
    released = sum(1 - (2 * (p[:, c] * q[:, c]).sum() + 1e-5) / (p[:, c].sum() + q[:, c].sum() + 1e-5)
                   for c in range(3)) / 3  # losses.softmax_dice_loss with dice_loss1
    assert torch.allclose(reference.softmax_dice_consistency(s, t), released, rtol=1e-12)
    one_hot = torch.eye(3, dtype=torch.float64)[torch.randint(3, (2, 4, 5))].movedim(-1, 1) * 50
    assert reference.softmax_dice_consistency(one_hot, one_hot) < 1e-12
    s.requires_grad_(True)
    reference.softmax_dice_consistency(s, t.requires_grad_(True)).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


def test_config_takes_one_or_several_data_roots():
    assert train.Config(data="/a").data == ["/a"]  # config.json of runs before --data could repeat
    assert train.Config(data="").data == []
    assert train.Config(data=["/a", "/b"]).data == ["/a", "/b"]
    assert train.parse_args(["--data", "/a", "--data", "/b"])["data"] == ["/a", "/b"]
    with pytest.raises(ValueError, match="mt-dice"):
        train.Config(method="dice")


def test_mt_dice_step_uses_the_dice_consistency(tmp_path):
    root = data.write_synthetic_la(tmp_path, n_train=4, n_test=1, shape=(40, 40, 20), seed=1)
    cfg = train.Config(data=[str(root)], method="mt-dice", labeled=2, patch=(32, 32, 16), n_filters=2, mc_passes=2)
    parts = train.build(cfg)
    terms, stats = train.train_step(parts, 0)
    assert torch.isfinite(terms).all() and terms[2] > 0 and stats[0] == 1  # consistency on every voxel


@pytest.mark.slow
def test_cpu_reproduction_resumes_and_writes_the_table_with_the_paper_column(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # train.py on CPU tensors: the reference math, not the
    # Triton interpreter (conftest sets it for the kernel tests; a minute an iteration here)
    parts = tmp_path / "parts"
    source = data.write_synthetic_la(tmp_path / "synth", n_train=18, n_test=1, shape=(64, 64, 32), seed=0)
    assert data.main(["pack", str(source), str(parts), "--train", "18", "--test", "1", "--max-part-mib", "0.5"]) == 0
    roots = [str(p) for p in sorted(parts.glob("part*"))]
    assert len(roots) >= 2
    out = tmp_path / "out"
    argv = [a for r in roots for a in ("--data", r)] + ["--cpu", "--rows", "bayes-8,uamt", "--iterations", "2",
                                                        "--parallel", "2", "--out", str(out), "--figures-cases", "1"]
    # A killed run: the UA-MT run stopped after iteration 1 with its checkpoint (in-process: one start-up less).
    command, mode = reproduce.train_command(reproduce.parse_args(argv + TINY), "uamt", 0)
    assert mode == "fresh" and train.main(command[2:] + ["--stop-at", "1"]) == 0
    assert (out / "uamt" / "seed0" / "checkpoint.pt").is_file() and not (out / "uamt" / "seed0" / "eval.json").exists()
    assert reproduce.main(argv + TINY) == 0  # bayes-8 from scratch, uamt resumed from its checkpoint, in parallel
    printed = capsys.readouterr().out
    assert "0 finished already, 2 to run" in printed and "(resume)" in printed and "(fresh)" in printed
    for row in ("bayes-8", "uamt"):
        config = json.loads((out / row / "seed0" / "config.json").read_text())["config"]
        assert config["data"] == [str(Path(r).resolve()) for r in roots] and config["seed"] == reproduce.SEED0
        assert "mean" in json.loads((out / row / "seed0" / "eval.json").read_text())
    assert json.loads((out / "uamt" / "seed0" / "config.json").read_text())["config"]["consistency_on"] == "all"
    table = (out / "results.md").read_text()
    header = table.splitlines()[0]
    assert header.count("| paper |") == 4 and "Dice %" in header and "train time (s)" in header
    uamt = next(line for line in table.splitlines() if line.startswith("| uamt |"))
    assert "| 88.88 |" in uamt and "| 1/1 |" in uamt and "reduced CPU scale" in table
    assert reproduce.main(argv + ["--table-only"]) == 0  # nothing left to run
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "figures" / "curves-uamt.png").is_file() and (out / "figures" / "panel-synth0018.png").is_file()


def test_rows_and_arguments_are_checked(capsys):
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--data", "x", "--rows", "uamt,nonsense"])
    assert "unknown ['nonsense']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--rows", "uamt"])
    args = reproduce.parse_args(["--data", "x", "--cpu", "--", "--n-filters", "2"])
    assert args.iterations == 200 and args.train_args == ["--n-filters", "2"] and args.row_list == list(reproduce.ROWS)
