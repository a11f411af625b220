"""Your own data, end to end: an nnU-Net or MSD folder of NIfTI volumes -> ``prepare`` -> ``train.py`` -> per-class
scores well above chance; and the real LA cases exported to NIfTI and prepared back train exactly as the h5
release does (the same metrics.jsonl and eval.json with the same seed).

The synthetic folders come from tests/data/test_prepare.py (non-identity affines, anisotropic spacing, an unlabeled
case); the trainer runs on the CPU at reduced sizes, as in tests/training/test_multiclass.py.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nibabel")
pytest.importorskip("monai")

ROOT = Path(__file__).resolve().parents[2]
import test_prepare  # noqa: E402  (its synthetic NIfTI folders)
from uamt_fast import train  # noqa: E402
from uamt_fast import data  # noqa: E402
from uamt_fast.data import __main__ as data_cli  # python -m uamt_fast.data

pytestmark = pytest.mark.usefixtures("trainer_on_cpu")  # tests/conftest.py

SMALL = ["--n-filters", "4", "--no-compile", "--device", "cpu", "--save-every", "1000", "--lr", "0.05"]


def prepare(src: Path, out: Path, *flags) -> dict:
    assert data_cli.main(["prepare", str(src), str(out), *flags]) == 0
    return json.loads((out / "dataset.json").read_text())


@pytest.mark.slow
def test_an_nnunet_folder_with_three_classes_trains_to_per_class_dice_well_above_chance(tmp_path):
    src = test_prepare.write_nnunet(tmp_path / "nnunet", n_labeled=6, n_unlabeled=2)  # LPS, 0.8 x 0.8 x 2 mm
    record = prepare(src, tmp_path / "prepared", "--preset", "none", "--test-count", "2", "--channel", "FLAIR")
    assert record["num_classes"] == 3 and data.read_unlabeled(tmp_path / "prepared") == ["case006", "case007"]
    out = tmp_path / "run"
    assert train.main(["--data", str(tmp_path / "prepared"), *SMALL, "--labeled", "2", "--patch", "32", "32", "16",
                       "--eval-stride-xy", "16", "--eval-stride-z", "8", "--iterations", "100", "--log-every", "50",
                       "--out", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert [c["case"] for c in result["cases"]] == data.read_list(tmp_path / "prepared", "test")
    for c, m in result["mean_per_class"].items():  # chance: each ball is ~1.5% of the volume
        assert m["dice"] > 0.6, (c, m)
    spacing = record["cases"][result["cases"][0]["case"]]["spacing"]
    assert spacing == pytest.approx([0.8, 0.8, 2.0])  # anisotropic: the mm distances are not a scaled copy
    assert result["mean"]["hd95_mm"] != pytest.approx(result["mean"]["hd95"] * 0.8)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "threshold" in line]
    assert all(0.75 * math.log(3) - 1e-9 <= r["threshold"] <= math.log(3) + 1e-9 for r in log)  # U_max = ln C


@pytest.mark.slow
def test_an_msd_ct_folder_prepared_with_the_pancreas_preset_trains(tmp_path):
    src = test_prepare.write_msd(tmp_path / "msd", ids=("image0001", "image0002", "image0005", "image0006"))
    record = prepare(src, tmp_path / "prepared", "--preset", "pancreas")  # oblique 1.2 x 0.9 x 2.5 mm -> 1 mm
    assert record["train"]["patch"] == [96, 96, 96]  # the preset's; too big for these toy volumes: flags win
    out = tmp_path / "run"
    assert train.main(["--data", str(tmp_path / "prepared"), *SMALL, "--labeled", "2", "--patch", "32", "16", "32",
                       "--eval-stride-xy", "16", "--eval-stride-z", "16", "--iterations", "60", "--log-every", "30",
                       "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["num_classes"] == 2 and cfg["patch"] == [32, 16, 32]
    assert json.loads((out / "eval.json").read_text())["mean"]["dice"] > 0.5


@pytest.mark.slow
@pytest.mark.real_data
def test_real_la_cases_through_nifti_and_prepare_train_exactly_as_the_h5_release(tmp_path, la_root):
    ids = data.read_list(la_root, "train")[:3] + data.read_list(la_root, "test")[:1]
    cases = {c.id: c for c in data.load_cases(la_root, ids)}
    train_ids, test_id = sorted(ids[:3]), ids[3]  # prepare lists the labeled cases sorted
    h5 = tmp_path / "h5"  # the release layout with just these cases, in that order (links, not copies)
    (h5 / data.IMAGES_DIR).mkdir(parents=True)
    for case_id in ids:
        os.symlink(la_root / data.IMAGES_DIR / case_id, h5 / data.IMAGES_DIR / case_id)
    (h5 / "train.list").write_text("".join(f"{i}\n" for i in train_ids))
    (h5 / "test.list").write_text(f"{test_id}\n")

    affine = np.diag([0.625, 0.625, 0.625, 1.0])
    msd, training = tmp_path / "msd", []
    for case_id in ids:
        images, labels = ("imagesTs", "labelsTs") if case_id == test_id else ("imagesTr", "labelsTr")
        test_prepare.save(msd / images / f"{case_id}.nii.gz", cases[case_id].image, affine)
        test_prepare.save(msd / labels / f"{case_id}.nii.gz", cases[case_id].label, affine)
        if case_id != test_id:
            training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
    (msd / "dataset.json").write_text(json.dumps({"modality": {"0": "MRI"}, "training": training,
                                                  "labels": {"0": "background", "1": "left atrium"},
                                                  "test": [f"./imagesTs/{test_id}.nii.gz"]}))
    prepared = tmp_path / "prepared"
    prepare(msd, prepared, "--preset", "la")
    for case_id in ids:  # the same arrays, bit for bit
        back, want = data.load_case(prepared, case_id), cases[case_id]
        assert np.array_equal(back.label, want.label) and np.array_equal(back.image.view(np.uint32),
                                                                          want.image.view(np.uint32))

    runs = {}
    for name, root in (("h5", h5), ("prepared", prepared)):
        runs[name] = tmp_path / f"run_{name}"
        assert train.main(["--data", str(root), *SMALL, "--labeled", "2", "--downsample", "2", "--n-filters", "2",
                           "--patch", "32", "32", "32", "--eval-stride-xy", "32", "--eval-stride-z", "32",
                           "--iterations", "4", "--log-every", "2", "--out", str(runs[name])]) == 0

    def log(run):
        return [{k: v for k, v in json.loads(line).items() if k not in ("it_per_s", "train_seconds")}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    def scores(run):
        return {k: v for k, v in json.loads((run / "eval.json").read_text()).items() if k != "source"}

    assert log(runs["h5"]) == log(runs["prepared"])
    assert scores(runs["h5"]) == scores(runs["prepared"])
