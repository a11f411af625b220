"""The ACDC pipeline learns: a synthetic folder in each of the two forms users have (the challenge's raw
``patientXXX/`` folders and SSL4MIS's preprocessed h5 release; a ring-shaped myocardium around the LV, a crescent
RV, 1.5 x 1.5 x 10 mm) goes through the real commands (``python -m uamt_fast.data prepare --preset acdc``, then
``train.py`` with the preset's UA-MT protocol at reduced scale: a narrow U-Net on 32 x 32 slices, 100 iterations,
2 labeled patients) and the final checkpoint scores every class (RV, Myo, LV) on SSL4MIS's test patient well
above chance. Chance for a class is the Dice of labelling every voxel with it, 2p / (1 + p) for a class that
covers a fraction p of the test volumes: no predictor that ignores the image does better.

The two forms hold the same arrays (SSL4MIS's h5 is the raw form min-max'ed and transposed), so their runs must
score identically; only the raw form knows the voxel size, so only its eval.json has distances in mm.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from uamt_fast import data, train
from uamt_fast.data import acdc
from uamt_fast.data.__main__ import main as data_main

REDUCED = ["--labeled-patients", "2", "--n-filters", "4", "--patch", "32", "32", "1", "--batch-labeled", "4",
           "--batch-unlabeled", "4", "--iterations", "100", "--no-compile", "--device", "cpu", "--threads", "1",
           "--log-every", "50", "--save-every", "1000"]
CLASSES = {"1": "RV", "2": "Myo", "3": "LV"}

pytestmark = pytest.mark.usefixtures("trainer_on_cpu_module")  # tests/conftest.py


@pytest.fixture(scope="module")
def runs(tmp_path_factory, trainer_on_cpu_module):
    """Per form: its prepared set and the eval.json of its reduced UA-MT run."""
    tmp, result = tmp_path_factory.mktemp("acdc_learns"), {}
    for form in ("raw", "h5"):
        acdc.write_synthetic(tmp / f"src_{form}", form, shape=(32, 32, 6))
        assert data_main(["prepare", str(tmp / f"src_{form}"), str(tmp / f"prepared_{form}"), "--preset",
                          "acdc"]) == 0
        assert train.main(["--data", str(tmp / f"prepared_{form}"), *REDUCED, "--out", str(tmp / f"run_{form}")]) == 0
        result[form] = (tmp / f"prepared_{form}", json.loads((tmp / f"run_{form}" / "eval.json").read_text()))
    return result


def chance_dice(root, ids) -> dict[str, float]:
    """Per class, the Dice of labelling every voxel of the test volumes with it (scored per volume, averaged)."""
    labels = [case.label for case in data.load_cases([root], ids)]
    return {c: float(np.mean([2 * np.mean(y == int(c)) / (1 + np.mean(y == int(c))) for y in labels]))
            for c in CLASSES}


@pytest.mark.parametrize("form", ["raw", "h5"])
def test_a_reduced_uamt_run_scores_every_class_well_above_chance(runs, form):
    root, result = runs[form]
    ids = data.read_list([root], "test")
    assert result["source"]["case_ids"] == ids == acdc.volume_ids((11,))  # SSL4MIS's test patient, both frames
    assert result["source"]["settings"]["dims"] == 2 and result["class_names"] == CLASSES == data.label_names(root)
    chance = chance_dice(root, ids)
    for c, name in CLASSES.items():
        dice = result["mean_per_class"][c]["dice"]
        assert dice > 0.6 and dice > chance[c] + 0.3, (name, dice, chance[c])


def test_both_forms_score_identically_and_only_the_raw_form_in_mm(runs):
    (_, raw), (_, h5) = runs["raw"], runs["h5"]
    for c in CLASSES:
        for metric in ("dice", "jaccard", "hd95", "asd"):
            assert raw["mean_per_class"][c][metric] == h5["mean_per_class"][c][metric]
    assert {"hd95_mm", "asd_mm"} <= set(raw["mean"]) and not {"hd95_mm", "asd_mm"} & set(h5["mean"])
    # 1.5 x 1.5 x 10 mm voxels: an in-plane distance in mm is 1.5x its voxels, never less
    assert raw["mean"]["hd95_mm"] >= 1.5 * raw["mean"]["hd95"] - 1e-9


def test_a_model_trained_on_the_h5_form_predicts_a_raw_frame_at_its_own_spacing(runs, tmp_path):
    """The h5 release keeps no voxel size, so predict's spacing check has nothing to hold a scan to: a raw frame
    at 1.5 x 1.5 x 10 mm is taken (as 1 x 1 x 1 it would have been refused as 10x off), and its mask is in the
    frame's geometry and scores every class above 0.6 Dice against the frame's own label."""
    import nibabel

    from uamt_fast import predict

    frame = runs["raw"][0].parent / "src_raw" / "training" / "patient011" / "patient011_frame01.nii.gz"
    assert predict.main([str(runs["h5"][0].parent / "run_h5"), str(frame), "--out", str(tmp_path / "masks"),
                         "--device", "cpu"]) == 0
    mask, source = nibabel.load(str(tmp_path / "masks" / frame.name)), nibabel.load(str(frame))
    assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)
    truth = np.asarray(nibabel.load(str(frame).replace(".nii.gz", "_gt.nii.gz")).dataobj)
    predicted = np.asarray(mask.dataobj)
    for c in CLASSES:
        p, t = predicted == int(c), truth == int(c)
        assert 2 * np.sum(p & t) / (np.sum(p) + np.sum(t)) > 0.6, c


def test_val_every_logs_val_curves_and_changes_nothing_else(runs, tmp_path, capsys):
    """--val-every scores SSL4MIS's val patient into metrics.jsonl (curves only): the training lines, the
    checkpoint and the final evaluation are those of the run without it, bit for bit."""
    root = runs["raw"][0]
    out = tmp_path / "run"
    assert train.main(["--data", str(root), *REDUCED, "--val-every", "50", "--out", str(out)]) == 0
    assert "iter 50/100 | val Dice" in capsys.readouterr().out
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [line for line in lines if "val_dice" in line]
    assert [line["iteration"] for line in val] == [50, 100]
    assert set(val[-1]) == {"iteration", "val_dice", "val_hd95", "val_dice_RV", "val_dice_Myo", "val_dice_LV",
                            "val_seconds"}
    assert val[-1]["val_dice"] == pytest.approx(np.mean([val[-1][f"val_dice_{n}"] for n in CLASSES.values()]))
    assert val[-1]["val_dice"] > 0.6  # (the val patient, never the test one)
    without = [json.loads(line) for line in (root.parent / "run_raw" / "metrics.jsonl").read_text().splitlines()]
    speed = {"it_per_s", "train_seconds"}
    assert [{k: v for k, v in line.items() if k not in speed} for line in lines if "val_dice" not in line] == \
        [{k: v for k, v in line.items() if k not in speed} for line in without]
    assert json.loads((out / "eval.json").read_text())["mean"] == runs["raw"][1]["mean"]


def test_val_every_without_a_val_list_or_with_a_test_case_in_it_is_one_line(runs, tmp_path, capsys):
    root = runs["raw"][0]
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    (copy / "val.list").unlink()
    assert train.main(["--data", str(copy), *REDUCED, "--val-every", "50", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--val-every 50: case list not found:" in err and "val.list" in err and "\n" not in err
    (copy / "val.list").write_text("patient011_frame01\n")  # SSL4MIS's test patient
    assert train.main(["--data", str(copy), *REDUCED, "--val-every", "50", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert "case patient011_frame01 is in both val.list and test.list" in err and "\n" not in err
    assert not (tmp_path / "a" / "checkpoint.pt").exists() and not (tmp_path / "b" / "checkpoint.pt").exists()


def test_predict_reads_ssl4mis_h5_volumes_in_their_own_axes(runs, tmp_path):
    """SSL4MIS's volume files are (Z, Y, X): predict reads them as prepare stores them and writes each mask in the
    file's own order, so it lines up voxel for voxel with the file's label (read as-is, slices along X, the
    masks would not: the mistake this test guards)."""
    import h5py
    import nibabel

    from uamt_fast import predict

    source = runs["h5"][0].parent / "src_h5"
    out = tmp_path / "masks"
    assert predict.main([str(runs["h5"][0].parent / "run_h5"), str(source), "--out", str(out), "--device", "cpu"]) == 0
    volumes = sorted(f"{p.stem}.nii.gz" for p in (source / "data").glob("*.h5"))
    assert sorted(p.name for p in out.glob("*.nii.gz")) == volumes and len(volumes) == 12  # 6 patients, 2 frames
    with h5py.File(source / "data" / "patient011_frame02.h5", "r") as f:
        truth = np.asarray(f["label"])
    predicted = np.asarray(nibabel.load(str(out / "patient011_frame02.nii.gz")).dataobj)
    assert predicted.shape == truth.shape == (6, 32, 32)
    for c in CLASSES:
        p, t = predicted == int(c), truth == int(c)
        assert 2 * np.sum(p & t) / (np.sum(p) + np.sum(t)) > 0.6, c
    record = json.loads((out / "predictions.json").read_text())
    entry = next(e for e in record["cases"] if e["case"] == "patient011_frame02")
    assert entry["preprocessing"]["axes_original"].startswith("(Z, Y, X)")


@pytest.mark.parametrize("form, words", [("raw", "ACDC patient folders"), ("h5", "SSL4MIS ACDC h5 files (data/*.h5)")])
def test_a_source_folder_given_to_train_says_how_to_prepare_it(runs, form, words, tmp_path, capsys):
    source = runs[form][0].parent / f"src_{form}"
    assert train.main(["--data", str(source), *REDUCED, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--data {source}: {words}, not the training layout; prepare it first: python -m uamt_fast.data " \
           f"prepare {source} OUT --preset acdc" in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_a_set_prepared_before_the_protocol_was_recorded_still_brings_it(runs, tmp_path):
    from uamt_fast.training.build import make_config

    copy = tmp_path / "old"
    shutil.copytree(runs["raw"][0], copy)
    record = json.loads((copy / data.RECORD_NAME).read_text())
    record["train"] = {k: record["train"][k] for k in ("patch", "eval_stride_xy", "eval_stride_z", "batch_labeled",
                                                       "batch_unlabeled")}  # as the first acdc preset wrote it
    (copy / data.RECORD_NAME).write_text(json.dumps(record))
    cfg, _ = make_config({"data": [str(copy)], "labeled_patients": 2})
    assert (cfg.dims, cfg.iterations, cfg.lr_schedule, cfg.consistency_period) == (2, 30000, "poly", 150)
