"""prepare's default ``--preset auto``: a plan made from the data set by nnU-Net v2's rules (uamt_fast.data.planning).

A synthetic MSD folder as a user brings one: 0.8 x 0.8 x 2.5 mm on oblique LPS affines, a different shape per
case, raw CT intensities (air -1000, soft tissue, two organs, bone at 1200; a strip outside the field of view at
0), two training images without a label (unlabeled) and two test scans with labels; a second folder of MR-like
scans (background 0). Through the real command line with no preset flag: the plan printed and recorded, CT and MR
normalisation against a hand computation on the stored voxels, and train.py / predict taking the plan as their
defaults. The planning rules themselves (anisotropy, patch, strides) on hand-made fingerprints.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

nibabel = pytest.importorskip("nibabel")
pytest.importorskip("monai")

from uamt_fast import data, predict, train
from uamt_fast.data import __main__ as data_cli  # python -m uamt_fast.data
from uamt_fast.data import planning

ROOT = Path(__file__).resolve().parents[2]
SPACING = (0.8, 0.8, 2.5)
# (case id, role, shape, spacing): the last unlabeled image is on a slightly different grid, so one case is resampled
CASES = [(f"scan_{k:02d}", "labeled", shape, SPACING) for k, shape in
         enumerate([(40, 36, 18), (44, 38, 20), (42, 40, 16), (46, 36, 22), (40, 42, 18), (48, 38, 20)])] + [
    ("scan_06", "unlabeled", (44, 44, 19), SPACING), ("scan_07", "unlabeled", (42, 36, 21), (0.9, 0.9, 2.4)),
    ("scan_08", "test", (40, 40, 18), SPACING), ("scan_09", "test", (46, 38, 20), SPACING)]
TINY = ["--n-filters", "2", "--no-compile", "--device", "cpu", "--threads", "1", "--save-every", "1000"]


def lps_oblique(spacing, degrees: float = 10.0) -> np.ndarray:
    """LPS axes (x and y flipped), rotated about z (oblique), anisotropic spacing, an offset."""
    t = np.deg2rad(degrees)
    rotation = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ rotation @ np.diag(spacing)
    affine[:3, 3] = (60.0, 40.0, -30.0)
    return affine


def volume(seed: int, shape, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """(image, label in {0, 1, 2}): a body ellipsoid holding two organ balls. CT: int16 HU in air, a bone rod, and
    a 2-voxel strip at 0 (outside the field of view) in every other case; MR: float32 on a background of 0."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    centre = np.array(shape) / 2 + rng.uniform(-1, 1, 3)
    radii = np.array(shape) * (0.42 if modality == "CT" else 0.3)
    body = (((grid - centre) / radii) ** 2).sum(-1) < 1
    label = np.zeros(shape, np.uint8)
    for c, offset in ((1, (-6, -4, 0)), (2, (6, 4, 0))):
        ball = (((grid - centre - offset) / (4.0, 4.0, 2.5)) ** 2).sum(-1) < 1
        label[ball & body] = c
    if modality == "CT":
        image = np.where(body, 40 + rng.normal(0, 20, shape), -1000 + rng.normal(0, 5, shape))
        image[label == 1] = 100 + rng.normal(0, 20, (label == 1).sum())
        image[label == 2] = 180 + rng.normal(0, 20, (label == 2).sum())
        image[int(centre[0]), int(centre[1]) - 8: int(centre[1]) - 6, :] = 1200  # bone
        if seed % 2 == 0:
            image[:2] = 0  # outside the scanner's field of view
        return np.rint(image).astype(np.int16), label
    image = np.where(body, 300 + rng.normal(0, 40, shape), 0.0)
    image[label == 1] += 150
    image[label == 2] += 250
    return image.astype(np.float32), label


def write_msd(root: Path, modality: str, cases=CASES) -> Path:
    """An MSD folder: ``training`` entries (those without "label" are unlabeled images), imagesTs + labelsTs."""
    training, test = [], []
    for seed, (case_id, role, shape, spacing) in enumerate(cases):
        image, label = volume(seed, shape, modality)
        affine = lps_oblique(spacing)
        images, labels = ("imagesTs", "labelsTs") if role == "test" else ("imagesTr", "labelsTr")
        for folder, array in ((images, image), (labels, label)):
            if folder != "labelsTr" or role == "labeled":
                (root / folder).mkdir(parents=True, exist_ok=True)
                nibabel.save(nibabel.Nifti1Image(array, affine), str(root / folder / f"{case_id}.nii.gz"))
        entry = {"image": f"./imagesTr/{case_id}.nii.gz"}
        if role == "test":
            test.append(f"./imagesTs/{case_id}.nii.gz")
        else:
            training.append(entry | ({"label": f"./labelsTr/{case_id}.nii.gz"} if role == "labeled" else {}))
    meta = {"name": "own data", "modality": {"0": modality}, "labels": {"0": "background", "1": "left", "2": "right"},
            "numTraining": len(training), "training": training, "test": test}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def oriented(path: Path) -> np.ndarray:
    """A NIfTI file's voxels in RAS axis order, by nibabel's own orientation (no resampling)."""
    img = nibabel.load(str(path))
    return nibabel.apply_orientation(np.asarray(img.dataobj).astype(np.float32), nibabel.io_orientation(img.affine))


def source_file(src: Path, case_id: str, role: str, kind: str = "images") -> Path:
    return src / f"{kind}{'Ts' if role == 'test' else 'Tr'}" / f"{case_id}.nii.gz"


def stored_image(out: Path, case_id: str) -> np.ndarray:
    with h5py.File(data.case_file(out, case_id), "r") as f:
        return f["image"][()]


def nonzero_box(array: np.ndarray) -> list[list[int]]:
    hits = np.nonzero(array)
    return [[int(h.min()), int(h.max()) + 1] for h in hits]


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    """The CT folder prepared through ``python -m uamt_fast.data prepare SRC OUT`` (no preset flag)."""
    base = tmp_path_factory.mktemp("plan_ct")
    src, out = write_msd(base / "src", "CT"), base / "prepared"
    proc = subprocess.run([sys.executable, "-m", "uamt_fast.data", "prepare", str(src), str(out), "--workers", "1"],
                          capture_output=True, text=True, check=False, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    return src, out, json.loads((out / data.RECORD_NAME).read_text()), proc.stdout


@pytest.fixture(scope="module")
def mr(tmp_path_factory):
    """MR-like scans (background 0, the head a small part of the volume), prepared in-process."""
    base = tmp_path_factory.mktemp("plan_mr")
    cases = [c for c in CASES if c[0] in ("scan_00", "scan_01", "scan_02", "scan_08")]
    src, out = write_msd(base / "src", "MRI", cases), base / "prepared"
    assert data_cli.main(["prepare", str(src), str(out), "--workers", "1"]) == 0
    return src, out, json.loads((out / data.RECORD_NAME).read_text())


def test_prepare_with_no_preset_flag_plans_from_the_data_and_records_how(ct):
    src, out, record, stdout = ct
    plan = record["plan"]
    assert record["preset"] == "auto" and record["num_classes"] == 3
    assert data.read_list(out, "test") == ["scan_08", "scan_09"] and data.read_unlabeled(out) == ["scan_06", "scan_07"]
    assert plan["spacing"] == {"value": pytest.approx(SPACING), "how": "median spacing per axis"}  # z not thin enough
    assert plan["crop"]["value"] == "nonzero" and "crop_to_nonzero" in plan["crop"]["how"]
    norm = plan["normalization"]
    assert norm["value"]["kind"] == "ct_normalization" and "CTNormalization" in norm["how"]
    assert "0.5/99.5 percentiles" in norm["how"] and "foreground mean" in norm["how"]
    # the median of the cropped shapes at the target spacing (scan_07: 42 x 36 x 21 at 0.9 x 0.9 x 2.4 mm -> 47 x 40
    # x 20), 43 x 39 x 19.5 -> 32 x 32 x 16, within 112*112*80; strides half the window
    assert plan["patch"]["median_resampled_shape"] == [43, 39, 19.5]
    assert plan["patch"]["value"] == [32, 32, 16] and "rounded down to multiples of 16" in plan["patch"]["how"]
    assert plan["strides"]["value"] == {"eval_stride_xy": 16, "eval_stride_z": 8}
    assert "tile_step_size 0.5" in plan["strides"]["how"]
    assert plan["batch"]["value"] == {"batch_labeled": 2, "batch_unlabeled": 2}
    assert record["train"] == {"patch": [32, 32, 16], "eval_stride_xy": 16, "eval_stride_z": 8, "batch_labeled": 2,
                               "batch_unlabeled": 2}
    # the fingerprint reads the training cases (labeled and unlabeled), never a test case
    found = plan["fingerprint"]
    assert sorted(found["per_case"]) == [c[0] for c in CASES if c[1] != "test"]
    assert found["per_case"]["scan_00"] == {"spacing": pytest.approx(SPACING), "shape": [40, 36, 18],
                                            "shape_after_crop": [38, 36, 18]}  # the 2-voxel strip at 0 cropped
    counts = sum(np.bincount(np.asarray(nibabel.load(str(source_file(src, c[0], c[1], "labels"))).dataobj).ravel(),
                             minlength=3) for c in CASES if c[1] == "labeled")
    assert found["label_counts"] == {str(v): int(n) for v, n in enumerate(counts)}
    # the fingerprint's progress (a line a training case), then the plan in a few lines, before the per-case work
    lines = stdout.splitlines()
    assert lines[0] == "fingerprint of the 8 training cases (read once each):"
    assert [x.split()[:2] for x in lines[1:9]] == [[f"[{k + 1}/8]", c[0]] for k, c in enumerate(CASES[:8])]
    assert lines[9].startswith("plan from 8 training cases") and len([x for x in lines if x.startswith("  ")]) == 6
    assert lines.index("preparing 10 cases:") > 9
    assert any(x.startswith("  patch     32x32x16: ") for x in lines)
    assert all(case["spacing"] == pytest.approx(SPACING, abs=1e-4) for case in record["cases"].values())


def test_ct_normalization_equals_a_hand_computation(ct):
    """Stored voxels = (clip(raw, p0.5, p99.5) - mean) / std with the data set's foreground numbers, and those
    numbers are the foreground statistics of the labeled training cases (each case weighing the same)."""
    src, out, record, _ = ct
    value = record["plan"]["normalization"]["value"]
    foreground = [oriented(source_file(src, i, r))[oriented(source_file(src, i, r, "labels")) > 0]
                  for i, r, _, _ in CASES if r == "labeled"]
    weights = np.concatenate([np.full(f.size, 1.0 / f.size) for f in foreground])
    pooled = np.concatenate(foreground)
    mean = sum(f.mean(dtype=np.float64) for f in foreground) / len(foreground)
    std = math.sqrt(sum(((f.astype(np.float64) - mean) ** 2).mean() for f in foreground) / len(foreground))
    lo, hi = (np.percentile(pooled, q, weights=weights, method="inverted_cdf") for q in (0.5, 99.5))
    assert value["mean"] == pytest.approx(mean, abs=0.5) and value["std"] == pytest.approx(std, abs=0.5)
    assert value["clip"] == pytest.approx([lo, hi], abs=3.0) and value["clip"][1] < 1200  # the bone is clipped
    for case_id, role, _, spacing in CASES:
        if spacing != SPACING:
            continue  # (resampled: no voxel-for-voxel hand computation)
        raw = oriented(source_file(src, case_id, role))
        box = record["cases"][case_id]["crop_box"]
        assert box == nonzero_box(raw)  # crop_to_nonzero on the raw intensities
        raw = raw[tuple(slice(a, b) for a, b in box)]
        expected = (np.clip(raw, *value["clip"]) - value["mean"]) / value["std"]
        np.testing.assert_allclose(stored_image(out, case_id), expected, rtol=1e-5, atol=1e-4)


def test_mr_zscore_per_case_over_the_nonzero_voxels_equals_a_hand_computation(mr):
    src, out, record = mr
    norm = record["plan"]["normalization"]
    assert norm["value"] == {"kind": "zscore_normalization", "use_mask_for_norm": True}  # the head: < 3/4 of the volume
    assert "channel 'MRI'" in norm["how"] and "use_mask_for_norm" in norm["how"]
    assert record["plan"]["fingerprint"]["median_relative_size_after_cropping"] < 0.75
    for case_id, case in record["cases"].items():  # training and test cases alike: each its own statistics
        raw = oriented(source_file(src, case_id, case["role"]))
        raw = raw[tuple(slice(a, b) for a, b in case["crop_box"])]
        inside = raw != 0
        mean, std = raw[inside].mean(dtype=np.float64), raw[inside].std(dtype=np.float64)
        assert case["intensity"] == {"kind": "zscore_normalization", "over": "voxels != 0",
                                     "mean": pytest.approx(mean), "std": pytest.approx(std)}
        expected = np.where(inside, (raw - mean) / std, 0.0)
        np.testing.assert_allclose(stored_image(out, case_id), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("trainer_on_cpu")
def test_train_and_predict_take_the_plan_as_their_defaults(ct, tmp_path):
    """train.py with no patch, labeled or test flag runs and evaluates with the plan's patch, strides and batch;
    predict gives a test scan exactly the stored preprocessing and writes its mask on the scan's own grid."""
    src, out, record, _ = ct
    run = tmp_path / "run"
    assert train.main(["--data", str(out), "--iterations", "2", "--log-every", "1", *TINY, "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())["config"]
    assert {k: config[k] for k in record["train"]} == record["train"]
    assert [c["case"] for c in json.loads((run / "eval.json").read_text())["cases"]] == ["scan_08", "scan_09"]
    image = source_file(src, "scan_09", "test")
    assert predict.main([str(run), str(image), "--out", str(tmp_path / "masks"), "--device", "cpu"]) == 0
    mask, source = nibabel.load(str(tmp_path / "masks" / "scan_09.nii.gz")), nibabel.load(str(image))
    assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)
    args = predict.make_parser().parse_args([str(run), str(image), "--out", "x"])
    model = predict.load_model_and_data(args, torch.device("cpu"))
    scan = predict.find_scans([image])[0]
    predict.check_scan(scan, model)
    np.testing.assert_array_equal(predict.read_scan(scan, model).image, stored_image(out, "scan_09"))


# ----------------------------------------------------------------------------- the rules, on hand-made fingerprints
@pytest.mark.parametrize("z_spacings, z_size, expected_z, triggered", [
    # 5 mm slices against 0.8 mm in-plane (> 3x) and 20 slices x 3 < 200 voxels in-plane: the 10th percentile
    ([4.0, 5.0, 5.0, 5.0, 6.0, 5.0, 3.0, 5.0, 5.0, 5.0], 20, 3.9, True),
    ([4.0, 5.0, 5.0, 5.0, 6.0, 5.0, 3.0, 5.0, 5.0, 5.0], 80, 5.0, False),  # 80 slices x 3 >= 200: the median
    ([2.0, 2.0, 2.4, 2.0, 2.0], 20, 2.0, False),  # 2 mm is not > 3 x 0.8 mm: the median
    ([0.5, 0.5, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0], 20, 0.8 + 1e-5, True),  # never finer than the other axes
])
def test_target_spacing_takes_the_anisotropic_axis_from_its_10th_percentile(z_spacings, z_size, expected_z,
                                                                            triggered):
    spacings = [[0.8, 0.8, z] for z in z_spacings]
    shapes = [[200, 210, z_size]] * len(z_spacings)
    spacing, how = planning.target_spacing(spacings, shapes)
    assert spacing[:2] == [0.8, 0.8] and spacing[2] == pytest.approx(expected_z, abs=1e-9)
    assert ("axis 2 anisotropic" in how) == triggered and how.startswith("median spacing per axis")


@pytest.mark.parametrize("median, patch", [
    ((130, 130, 60), [128, 128, 48]),  # 786,432 voxels: within the budget, the median shape rounded down
    ((10.0, 40.0, 8.0), [16, 32, 16]),  # never below 16
    # 192 x 176 x 96 = 3.2 M voxels: 16 off the axis of largest patch / median ratio each round
    ((200, 180, 100), [128, 112, 64]),
])
def test_patch_is_the_median_shape_shrunk_to_the_paper_voxel_budget(median, patch):
    got, how = planning.patch_size(median)
    assert got == patch and math.prod(got) <= planning.VOXEL_BUDGET and all(p % 16 == 0 for p in got)
    assert ("shrunk by 16" in how) == (median == (200, 180, 100))


@pytest.mark.parametrize("patch, strides", [((112, 112, 80), (48, 32)), ((32, 48, 16), (16, 8)),
                                            ((96, 64, 128), (32, 64))])
def test_strides_are_half_the_window_in_whole_16_voxel_cells(patch, strides):
    got, _ = planning.sliding_window_strides(patch)
    assert (got["eval_stride_xy"], got["eval_stride_z"]) == strides


@pytest.mark.parametrize("change, message", [
    (lambda record: record.pop("plan"), "field plan is None; expected the object prepare --preset auto writes"),
    (lambda record: record["plan"].pop("spacing"), "field plan.spacing is None"),
    (lambda record: record["plan"]["normalization"]["value"].update(std="wide"), "field plan.normalization.value"),
    (lambda record: record["plan"]["patch"].update(value=[32, 32]), "field plan.patch.value is [32, 32]"),
    (lambda record: record["train"].update(batch_labeled=0), "field train.batch_labeled is 0; expected an integer"),
])
def test_a_broken_auto_record_is_refused_naming_the_field(ct, tmp_path, change, message):
    """predict rebuilds an auto set's preprocessing from its plan: a record without a usable one is refused."""
    record = json.loads(json.dumps(ct[2]))
    change(record)
    (tmp_path / data.RECORD_NAME).write_text(json.dumps(record))
    with pytest.raises(data.DataError, match=message.replace("[", r"\[")):
        data.read_record(tmp_path)
