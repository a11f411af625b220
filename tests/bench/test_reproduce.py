"""benchmarks/reproduce.py (the paper's tables, the ACDC rows) and the train.py parts it relies on: --method mt-dice,
--data repeated, old configs with one data root."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from uamt_fast import data, figures, reference
from uamt_fast.data import __main__ as data_cli  # python -m uamt_fast.data
from uamt_fast.data import acdc
from uamt_fast.data.acdc_split import PATIENTS
from uamt_fast.data.prepare import prepare
from uamt_fast.nets.vnet import VNet

REPO = Path(__file__).resolve().parents[2]
from uamt_fast import train  # noqa: E402
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
    assert data_cli.main(["pack", str(source), str(parts), "--train", "18", "--test", "1", "--max-part-mib", "0.5"]) == 0
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


LA_ROWS = [k for k, r in reproduce.ROWS.items() if r.family == "la"]
ACDC_ROWS = ["acdc-uamt-3", "acdc-uamt-7", "acdc-uamt-3-ln2", "acdc-uamt-7-ln2", "acdc-sup-3", "acdc-sup-7",
             "acdc-sup-all"]


def test_rows_and_arguments_are_checked(tiny_root):
    with pytest.raises(ValueError, match=r"unknown \['nonsense'\]"):
        reproduce.parse_args(["--data", "x", "--rows", "uamt,nonsense"])
    with pytest.raises(ValueError):
        reproduce.parse_args(["--rows", "uamt"])
    args = reproduce.parse_args(["--data", str(tiny_root), "--cpu", "--", "--n-filters", "2"])
    assert args.iterations == 200 and args.train_args == ["--n-filters", "2"] and args.row_list == LA_ROWS


@pytest.fixture(scope="module")
def acdc_root(tmp_path_factory):
    """``prepare --preset acdc`` of a synthetic raw ACDC folder: SSL4MIS's first 8 training patients (7 labeled,
    1 unlabeled) and 1 test patient, 24 x 24 x 4 volumes."""
    tmp = tmp_path_factory.mktemp("acdc_reproduce")
    acdc.write_synthetic(tmp / "src", "raw", patients=(*PATIENTS["train"][:8], PATIENTS["test"][0]), shape=(24, 24, 4))
    prepare(tmp / "src", tmp / "prepared", "acdc")
    return tmp / "prepared"


def test_a_call_takes_one_family_of_rows_and_its_data(acdc_root, tiny_root):
    args = reproduce.parse_args(["--data", str(acdc_root), "--rows", "acdc"])
    assert args.row_list == ACDC_ROWS and args.family == "acdc" and args.iterations == 30000  # the preset's
    assert reproduce.parse_args(["--data", str(acdc_root), "--rows", "acdc-uamt-3", "--cpu"]).iterations == 300
    with pytest.raises(ValueError, match=r"^--rows uamt,acdc-uamt-7: LA rows \(uamt\) need the LA release .* and ACDC "
                                         r"rows \(acdc-uamt-7\) need a set prepared with .*--preset acdc; give one "
                                         "family a call"):
        reproduce.parse_args(["--data", str(acdc_root), "--rows", "uamt,acdc-uamt-7"])
    with pytest.raises(ValueError, match=f"^--rows acdc-uamt-7: .*; --data {tiny_root} is the LA release"):
        reproduce.parse_args(["--data", str(tiny_root), "--rows", "acdc-uamt-7"])
    with pytest.raises(ValueError, match=f"^--rows all: .*; --data {acdc_root} is an ACDC set .*give --rows acdc$"):
        reproduce.parse_args(["--data", str(acdc_root)])
    command, _ = reproduce.train_command(reproduce.parse_args(
        ["--data", str(acdc_root), "--rows", "acdc-sup-all", "--cpu", "--out", "/nonexistent"]), "acdc-sup-all", 0)
    flags = " ".join(command)  # SSL4MIS's fully supervised batch (24 labeled, 0 unlabeled), halved on the CPU
    assert "--method supervised --batch-labeled 24 --batch-unlabeled 0 --labeled-patients 70" in flags
    assert flags.endswith("--patch 64 64 1 --threads 1 --batch-labeled 12")  # (train.py: the last flag wins)
    command, _ = reproduce.train_command(reproduce.parse_args(
        ["--data", str(acdc_root), "--rows", "acdc-uamt-7-ln2", "--out", "/nonexistent"]), "acdc-uamt-7-ln2", 0)
    assert "--labeled-patients 7 --threshold-bound ln-2" in " ".join(command)  # SSL4MIS's bound, as published


def test_the_acdc_table_prints_the_literature_values_and_dashes_for_the_unsourced(tmp_path):
    finished_run(tmp_path, "acdc-uamt-3", eval_mean={"dice": 0.5, "jaccard": 0.4, "hd95": 9.0, "asd": 3.0,
                                                     "hd95_mm": 20.0, "asd_mm": None})
    table, problems = reproduce.markdown_table(tmp_path, ACDC_ROWS, 1, 30000, cpu=False)
    header, lines = table.splitlines()[0], {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()}
    assert not problems and header.count("| literature |") == 4 and "| 95HD mm | ASD mm |" in header
    assert lines["acdc-uamt-3"].split(" | ")[5:15] == ["50.00", "46.04", "40.00", "35.97", "9.00", "20.08", "3.00",
                                                       "7.75", "20.00", "—"]  # ours, literature; mm: ours only
    for row in ("acdc-uamt-7", "acdc-uamt-7-ln2"):
        assert lines[row].split(" | ")[6:13:2] == ["81.65", "70.64", "6.88", "2.02"]
    for row in ("acdc-sup-3", "acdc-sup-7", "acdc-sup-all"):  # no sourced value under this protocol
        assert lines[row].split(" | ")[6:13:2] == ["—"] * 4
    assert "CrossMatch" in table and "SSL4MIS" in table and "labeled / unlabeled: patients" in table
    assert "ramps to ln 2 for 4 classes" in table


@pytest.mark.slow
def test_an_acdc_row_trains_at_cpu_scale_and_writes_the_table_and_its_panel(acdc_root, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # (as the LA run above: the reference math on the CPU)
    out = tmp_path / "out"
    argv = ["--data", str(acdc_root), "--rows", "acdc-uamt-7", "--cpu", "--iterations", "2", "--out", str(out),
            "--figures-cases", "1", "--", "--patch", "16", "16", "1", "--n-filters", "2", "--batch-labeled", "2",
            "--batch-unlabeled", "2", "--mc-passes", "2", "--reference-ops"]
    assert reproduce.main(argv) == 0, capsys.readouterr()
    config = json.loads((out / "acdc-uamt-7" / "seed0" / "config.json").read_text())["config"]
    assert (config["dims"], config["labeled_patients"], config["labeled"], config["iterations"]) == (2, 7, 14, 2)
    evaluation = json.loads((out / "acdc-uamt-7" / "seed0" / "eval.json").read_text())
    assert evaluation["source"]["settings"]["dims"] == 2 and len(evaluation["mean_per_class"]) == 3  # RV, Myo, LV
    table = (out / "results.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| acdc-uamt-7 |"))
    assert "| 1/1 |" in row and "| 81.65 |" in row and "| 2.02 |" in row and "reduced CPU scale" in table
    assert "| UA-MT | 7 | 1 (benchmark: 63) |" in row  # 8 training patients here: 1 unlabeled, not SSL4MIS's 63
    if importlib.util.find_spec("matplotlib") is None:
        return
    test_id = data.read_list(acdc_root, "test")[0]  # (--figures-cases 1)
    drawn = {p.name: p.stat().st_size for p in (out / "figures").iterdir()}
    assert sorted(drawn) == ["curves-acdc-uamt-7.png", f"panel-{test_id}.png"] and all(drawn.values()), drawn
    width = int.from_bytes((out / "figures" / f"panel-{test_id}.png").read_bytes()[16:20], "big")  # PNG IHDR
    assert width == round(figures.PANEL_INCHES * figures.DPI * 3)  # image | the row's prediction | uncertainty


# ----------------------------------------------------------------------------- broken run files
def finished_run(out, row, model=None, eval_text=None, eval_mean=None):
    """A finished run folder of ``row`` (seed 0) as train.py leaves it: eval.json, metrics.jsonl, student.pt."""
    folder = reproduce.run_dir(out, row, 0)
    folder.mkdir(parents=True)
    mean = eval_mean or {"dice": 0.8, "jaccard": 0.7, "hd95": None, "asd": 2.0}  # None: strict JSON for NaN
    (folder / "eval.json").write_text(eval_text if eval_text is not None else json.dumps({"mean": mean}))
    (folder / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "lr": 0.01, "loss_ce": 0.5}) + "\n"
                                          + json.dumps({"iteration": 1, "train_seconds": 3.0}) + "\n")
    cfg = {"n_filters": 2, "dropout": True, "patch": (16, 16, 16), "downsample": 1, "eval_stride_xy": 16,
           "eval_stride_z": 8, "eval_batch": 4}
    torch.save({"model": (model if model is not None else VNet(n_filters=2).state_dict()), "config": cfg},
               folder / "student.pt")
    return folder


class Crafted:
    """Unpickled by a plain torch.load, it would run code: here, write the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.mark.parametrize("broken", ["crafted pickle", "truncated"])
def test_a_refused_student_pt_is_reported_and_the_other_rows_are_drawn(tiny_root, tmp_path, capsys, broken):
    pytest.importorskip("matplotlib")
    out, marker = tmp_path / "out", tmp_path / "code-ran"
    finished_run(out, "bayes-8")
    folder = finished_run(out, "uamt", model=Crafted(marker) if broken == "crafted pickle" else None)
    student = folder / "student.pt"
    if broken == "truncated":
        student.write_bytes(student.read_bytes()[: student.stat().st_size // 2])
    argv = ["--data", str(tiny_root), "--rows", "bayes-8,uamt", "--out", str(out), "--figures-cases", "1"]
    assert reproduce.main(argv) == 1
    captured = capsys.readouterr()
    problems = [line for line in captured.err.splitlines() if line.startswith("PROBLEM: ")]
    assert len(problems) == 1 and problems[0].startswith(f"PROBLEM: figures: uamt left out of the panels: checkpoint "
                                                         f"{student}: "), captured.err
    assert ("refused" if broken == "crafted pickle" else "truncated") in problems[0]
    assert "Traceback" not in captured.err and not marker.exists()  # nothing from the file was run
    assert problems[0].removeprefix("PROBLEM: ") in (out / "results.md").read_text()
    test_id = data.read_list(tiny_root, "test")[0]
    assert (out / "figures" / f"panel-{test_id}.png").is_file() and (out / "figures" / "curves-uamt.png").is_file()
    uamt = next(line for line in (out / "results.md").read_text().splitlines() if line.startswith("| uamt |"))
    assert "| 1/1 |" in uamt and "| 80.00 |" in uamt  # the scores of its eval.json still count


def test_an_unreadable_eval_json_is_a_row_reported_as_failed_not_a_traceback(tmp_path):
    out = tmp_path / "out"
    finished_run(out, "bayes-8")
    finished_run(out, "uamt", eval_text='{"mean": {"dice": 0.8')  # cut while written
    result = subprocess.run([sys.executable, "-m", "benchmarks.reproduce", "--out", str(out), "--rows", "bayes-8,uamt",
                             "--table-only"], capture_output=True, text=True, cwd=REPO)
    eval_json = reproduce.run_dir(out, "uamt", 0) / "eval.json"
    assert result.returncode == 1 and result.stderr.startswith(f"PROBLEM: uamt seed 0: not counted: {eval_json} is "
                                                               "not a readable train.py eval.json (JSONDecodeError: ")
    assert result.stderr.count("\n") == 1, result.stderr  # one line, no traceback
    table = (out / "results.md").read_text()
    uamt = next(line for line in table.splitlines() if line.startswith("| uamt |"))
    assert "| 0/1 (1 unreadable, see below) |" in uamt and f"Problem: uamt seed 0: not counted: {eval_json}" in table
    bayes = next(line for line in table.splitlines() if line.startswith("| bayes-8 |"))
    assert "| 1/1 |" in bayes and "| 80.00 |" in bayes and "| — |" in bayes and "| 3.00 |" in bayes  # null 95HD: —


# The paper's tables as printed (Dice, Jaccard, ASD, 95HD): ../shared/paper/TABLES.md where present, else this copy.
PAPER_TABLES = REPO.parent / "shared" / "paper" / "TABLES.md"
PRINTED = """
| Vanilla V-Net | 16 | 0 | 84.13 | 73.26 | 4.75 | 17.93 |
| Bayesian V-Net | 16 | 0 | 86.03 | 76.06 | 3.51 | 14.26 |
| Vanilla V-Net | 80 | 0 | 90.25 | 82.40 | 1.91 | 8.29 |
| Bayesian V-Net | 80 | 0 | 91.14 | 83.82 | 1.52 | 5.75 |
| Self-training | 16 | 64 | 86.92 | 77.28 | 2.21 | 9.19 |
| DAN | 16 | 64 | 87.52 | 78.29 | 2.42 | 9.01 |
| ASDNet | 16 | 64 | 87.90 | 78.85 | 2.08 | 9.24 |
| TCSE | 16 | 64 | 88.15 | 79.20 | 2.44 | 9.57 |
| UA-MT-UN (consistency on unlabeled only) | 16 | 64 | 88.83 | 80.13 | 3.12 | 10.04 |
| UA-MT | 16 | 64 | 88.88 | 80.21 | 2.26 | 7.32 |
| MT | 16 | 64 | 88.23 | 79.29 | 2.73 | 10.64 |
| MT-Dice | 16 | 64 | 88.32 | 79.37 | 2.76 | 10.50 |
| Bayesian V-Net | 8 | 0 | 79.99 | 68.12 | 5.48 | 21.11 |
| UA-MT | 8 | 72 | 84.25 | 73.48 | 3.36 | 13.84 |
| Bayesian V-Net | 24 | 0 | 88.52 | 79.70 | 2.60 | 10.45 |
| UA-MT | 24 | 56 | 90.16 | 82.18 | 2.73 | 8.90 |
"""


def paper_rows() -> list[tuple[str, int, tuple]]:
    """(method, labeled, (Dice, Jaccard, 95HD, ASD)) of every row of the paper's Tables 1 and 2."""
    text = PAPER_TABLES.read_text() if PAPER_TABLES.is_file() else PRINTED
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[1].isdigit():
            dice, jaccard, asd, hd95 = cells[3:]
            rows.append((cells[0].split(" (")[0], int(cells[1]), (dice, jaccard, hd95, asd)))
    return rows


def test_the_table_prints_the_paper_value_of_every_row(tmp_path):
    rows = paper_rows()
    assert len(set(rows)) == 16  # 10 in Table 1, 7 in Table 2, UA-MT 16 + 64 in both (once in the fallback copy)
    table, _ = reproduce.markdown_table(tmp_path, LA_ROWS, 1, 6000, cpu=False)
    assert "†" not in table and "not transcribed" not in table
    lines = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()}
    matched = set()
    for method, labeled, values in rows:
        key = next((k for k, r in reproduce.ROWS.items() if r.name.split(" (")[0] == method and r.labeled == labeled),
                   None)
        if key is None:  # Table 1's other methods: in the note
            assert method in reproduce.OTHER_METHODS and f"{method} {' / '.join(values)}" in table, method
            continue
        matched.add(key)
        paper = lines[key].split(" | ")[6:13:2]  # the four paper columns
        assert paper == list(values), (key, paper, values)
    assert matched == set(LA_ROWS)  # every LA row the runner trains has its paper values
