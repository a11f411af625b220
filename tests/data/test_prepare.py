"""prepare: MSD, nnU-Net and NIfTI folders -> the layout train.py reads, with a record of every step.

Synthetic NIfTI volumes (small, non-identity affines: LPS and oblique, anisotropic spacing) through the real
command line (``data.main`` in-process, and once as a subprocess); the real LA data round trip when present.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

nibabel = pytest.importorskip("nibabel")
pytest.importorskip("monai")

from nifti_headers import with_sform  # (tests/ is on sys.path under pytest)
from uamt_fast import data, files
from uamt_fast.data import __main__ as data_cli  # python -m uamt_fast.data
from uamt_fast.data import prepare

SHAPE = (40, 36, 20)
LPS = np.diag([-0.8, -0.8, 2.0, 1.0]) + np.array([[0, 0, 0, 30.0], [0, 0, 0, 25.0], [0, 0, 0, -18.0], [0, 0, 0, 0]])


def oblique(spacing=(1.2, 0.9, 2.5), degrees=20.0) -> np.ndarray:
    """A rotation about z (oblique in-plane axes) times an anisotropic spacing, with an offset."""
    t = np.deg2rad(degrees)
    rotation = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = (-20.0, -15.0, 10.0)
    return affine


def save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(nibabel.Nifti1Image(array, affine), str(path))
    return path


def scan(seed: int, classes: int = 3, shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, label uint8 in 0..classes-1): a body box in air, one ball per foreground class."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    image = rng.normal(0.0, 5.0, shape).astype(np.float32)
    image[4:-4, 4:-4, 2:-2] += 40.0  # the body
    label = np.zeros(shape, np.uint8)
    for c in range(1, classes):
        centre = rng.uniform([12, 10, 6], [28, 26, 14])
        ball = ((grid - centre) ** 2 / np.array([36.0, 36.0, 9.0])).sum(-1) < 1
        label[ball] = c
        image[ball] += 60.0 * c
    return image, label


def write_nnunet(root: Path, n_labeled=4, n_unlabeled=1, channels=("T1", "FLAIR")) -> Path:
    """An nnU-Net v2 raw folder: 3 classes, one file per channel, LPS affine, the last case(s) without label."""
    labels = {"background": 0, "left": 1, "right": 2}
    meta = {"channel_names": {str(k): n for k, n in enumerate(channels)}, "labels": labels,
            "numTraining": n_labeled, "file_ending": ".nii.gz"}
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    for k in range(n_labeled + n_unlabeled):
        image, label = scan(k)
        for c in range(len(channels)):
            save(root / "imagesTr" / f"case{k:03d}_{c:04d}.nii.gz", image * (c + 1), LPS)
        if k < n_labeled:
            save(root / "labelsTr" / f"case{k:03d}.nii.gz", label, LPS)
    return root


def write_msd(root: Path, ids=("image0001", "image0002", "image0025"), test_ids=("image0003",),
              unlabeled=("image0004",)) -> Path:
    """An MSD folder of CT-like scans (HU: air -1000, body ~40, organ ~200) on an oblique anisotropic grid."""
    affine = oblique()
    training, test = [], []
    for k, case_id in enumerate((*ids, *unlabeled, *test_ids)):
        image, label = scan(10 + k, classes=2)
        hu = np.where(image > 20, image + 150.0 * (label > 0), -1000.0).astype(np.float32)
        folder = "imagesTs" if case_id in test_ids else "imagesTr"
        save(root / folder / f"{case_id}.nii.gz", hu, affine)
        if case_id in test_ids:
            save(root / "labelsTs" / f"{case_id}.nii.gz", label, affine)
            test.append(f"./imagesTs/{case_id}.nii.gz")
        elif case_id in unlabeled:
            training.append({"image": f"./imagesTr/{case_id}.nii.gz"})
        else:
            save(root / "labelsTr" / f"{case_id}.nii.gz", label, affine)
            training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
    meta = {"name": "synthetic pancreas", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "pancreas"},
            "numTraining": len(training), "training": training, "test": test}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def run_cli(*args) -> int:
    return data_cli.main(["prepare", *map(str, args)])


def read_h5(root: Path, case_id: str) -> dict:
    with h5py.File(root / data.CASES_DIR / f"{case_id}.h5", "r") as f:  # a prepared set's layout
        return {name: f[name][()] for name in f}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- good input
def test_nnunet_multiclass(tmp_path, capsys):
    src = write_nnunet(tmp_path / "nnunet")
    out = tmp_path / "out"
    assert run_cli(src, out, "--preset", "none", "--channel", "FLAIR", "--test-count", "1", "--seed", "3") == 0
    record = json.loads((out / "dataset.json").read_text())
    assert record["format"] == "uamt_fast.prepared/1" and record["preset"] == "none"
    assert record["num_classes"] == 3 and record["labels"] == {"background": 0, "left": 1, "right": 2}
    assert record["channel"] == "FLAIR" and record["source"]["layout"] == "nnunet"
    assert record["train"] == {"patch": [112, 112, 80], "eval_stride_xy": 18, "eval_stride_z": 4, "batch_labeled": 2,
                               "batch_unlabeled": 2}
    train, test = data.read_list(out, "train"), data.read_list(out, "test")
    unlabeled = (out / "unlabeled.list").read_text().split()
    assert len(train) == 3 and len(test) == 1 and unlabeled == ["case004"] and train == sorted(train)
    assert record["split"]["seed"] == 3 and "--test-count 1" in record["split"]["test"]
    assert {i: c["role"] for i, c in record["cases"].items()} == {
        **{i: "labeled" for i in train}, **{i: "test" for i in test}, "case004": "unlabeled"}
    for case_id, case in record["cases"].items():
        arrays = read_h5(out, case_id)
        source_image, source_label = scan(int(case_id[4:]))
        # LPS -> RAS flips the first two axes; no resampling, no intensity change, no crop with preset none
        assert arrays["image"].dtype == np.float32 and arrays["image"].shape == SHAPE
        np.testing.assert_array_equal(arrays["image"], (source_image * 2)[::-1, ::-1, :])
        assert case["orientation_original"] == "LPS" and case["orientation"] == "RAS"
        assert case["spacing_original"] == pytest.approx([0.8, 0.8, 2.0]) and case["spacing"] == pytest.approx(
            [0.8, 0.8, 2.0])
        assert np.allclose(case["affine_original"], LPS) and case["shape_original"] == list(SHAPE)
        assert case["crop_box"] == [[0, s] for s in SHAPE] and case["intensity"] == {"kind": "none"}
        assert case["files"]["image"] == [f"imagesTr/{case_id}_0001.nii.gz"]
        for name, digest in case["sha256"].items():
            assert digest == sha256(src / name)
        if case["role"] == "unlabeled":
            assert "label" not in arrays and case["files"]["label"] is None and case["label_map"] is None
        else:
            assert arrays["label"].dtype == np.uint8 and set(np.unique(arrays["label"])) == {0, 1, 2}
            np.testing.assert_array_equal(arrays["label"], source_label[::-1, ::-1, :])
            assert case["label_map"] == {"0": 0, "1": 1, "2": 2}
            assert case["files"]["label"] == f"labelsTr/{case_id}.nii.gz"
    assert "prepared 3 labeled, 1 unlabeled, 1 test cases (3 classes" in capsys.readouterr().out


def test_record_maps_a_prediction_back(tmp_path):
    """The record's affine and the original shape and affine put a prepared label back on the source grid."""
    from nibabel.processing import resample_from_to

    src = write_nnunet(tmp_path / "nnunet", n_labeled=2, n_unlabeled=0, channels=("T1",))
    out = tmp_path / "out"
    assert run_cli(src, out, "--preset", "none", "--test-count", "1") == 0
    record = json.loads((out / "dataset.json").read_text())
    for case_id, case in record["cases"].items():
        prepared = nibabel.Nifti1Image(read_h5(out, case_id)["label"], np.array(case["affine"]))
        back = resample_from_to(prepared, (case["shape_original"], np.array(case["affine_original"])), order=0)
        np.testing.assert_array_equal(np.asarray(back.dataobj), scan(int(case_id[4:]))[1])


def test_msd_oblique_resampled_pancreas(tmp_path):
    src = write_msd(tmp_path / "msd")
    out = tmp_path / "out"
    assert run_cli(src, out, "--preset", "pancreas") == 0
    record = json.loads((out / "dataset.json").read_text())
    assert record["num_classes"] == 2 and record["labels"] == {"background": 0, "pancreas": 1}
    assert record["train"] == {"patch": [96, 96, 96], "eval_stride_xy": 16, "eval_stride_z": 16, "batch_labeled": 2,
                               "batch_unlabeled": 2}
    assert record["split"]["dropped"] == ["image0025"] and record["split"]["test"] == "imagesTs with labelsTs"
    assert data.read_list(out, "train") == ["image0001", "image0002"] and data.read_list(out, "test") == ["image0003"]
    assert (out / "unlabeled.list").read_text() == "image0004\n"
    assert not data.prepared_case_path(out, "image0025").exists()
    for case_id, case in record["cases"].items():
        arrays = read_h5(out, case_id)
        assert case["spacing_original"] == pytest.approx([1.2, 0.9, 2.5])
        assert case["spacing"] == pytest.approx([1.0, 1.0, 1.0], abs=1e-4)
        assert case["orientation_original"] == "RAS" and case["intensity"] == {
            "kind": "ct_window", "window": [-125.0, 275.0], "range": [0.0, 1.0]}
        # the body crop (HU > -125) lies inside the resampled grid and gives the stored shape
        box, resampled = case["crop_box"], case["shape_resampled"]
        assert all(0 <= lo < hi <= s for (lo, hi), s in zip(box, resampled))
        assert [hi - lo for lo, hi in box] == case["shape"] == list(arrays["image"].shape)
        assert case["shape"] != resampled  # air was cropped away
        assert 0.0 <= arrays["image"].min() and arrays["image"].max() <= 1.0
        if case["role"] == "unlabeled":
            assert "label" not in arrays
        else:
            assert set(np.unique(arrays["label"])) == {0, 1} and arrays["label"].shape == arrays["image"].shape
            assert arrays["image"][arrays["label"] == 1].mean() > arrays["image"][arrays["label"] == 0].mean()


def test_pancreas_fixed_split(tmp_path):
    """Without imagesTs or a hold-out flag the preset's MC-Net split decides; its list order is kept."""
    root = tmp_path / "nifti"
    for case_id in ("image0001", "image0050", "image0057", "image0018", "image0070"):
        image, label = scan(1, classes=2, shape=(20, 18, 10))
        save(root / "imagesTr" / f"{case_id}.nii.gz", np.where(image > 20, image, -1000.0).astype(np.float32),
             np.eye(4))
        save(root / "labelsTr" / f"{case_id}.nii.gz", label, np.eye(4))
    out = tmp_path / "out"
    assert run_cli(root, out, "--preset", "pancreas") == 0
    assert data.read_list(out, "train") == ["image0057", "image0018"]  # MC-Net's train.list order
    assert data.read_list(out, "test") == ["image0050", "image0001"]
    record = json.loads((out / "dataset.json").read_text())
    assert record["split"]["dropped"] == ["image0070"] and record["source"]["layout"] == "nifti"


def test_brats_flair_whole_tumour(tmp_path):
    """brats2019: the FLAIR channel by name, labels > 0 -> 1, crop to the brain, z-score over voxels > 0."""
    root = tmp_path / "brats"
    write_nnunet(root, n_labeled=3, n_unlabeled=0, channels=("T1", "T1ce", "FLAIR", "T2"))
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "edema": 1, "enhancing": 2}
    (root / "dataset.json").write_text(json.dumps(meta))
    for k in range(3):  # zero outside the brain, as BraTS is
        path = root / "imagesTr" / f"case{k:03d}_0002.nii.gz"
        image = np.asarray(nibabel.load(str(path)).dataobj)
        save(path, np.where(image > 60, image, 0).astype(np.float32), LPS)
    out = tmp_path / "out"
    assert run_cli(root, out, "--preset", "brats2019", "--test-count", "1") == 0
    record = json.loads((out / "dataset.json").read_text())
    assert record["channel"] == "FLAIR" and record["labels"] == {"background": 0, "whole tumour": 1}
    assert record["train"] == {"patch": [96, 96, 96], "eval_stride_xy": 64, "eval_stride_z": 64, "batch_labeled": 2,
                               "batch_unlabeled": 2}
    for case_id, case in record["cases"].items():
        arrays = read_h5(out, case_id)
        assert case["files"]["image"] == [f"imagesTr/{case_id}_0002.nii.gz"]
        assert case["label_map"] == {"0": 0, "1": 1, "2": 1} and set(np.unique(arrays["label"])) == {0, 1}
        intensity = case["intensity"]
        assert intensity["kind"] == "zscore" and intensity["std"] > 0 and intensity["clip_percentile"] == 99.9
        assert case["shape"] != case["shape_resampled"]  # cropped to the brain
        inside = arrays["image"] > -intensity["mean"] / intensity["std"] + 1e-4
        assert abs(arrays["image"][inside].mean()) < 0.2


def test_msd_multimodal_4d_channel(tmp_path):
    """An MSD multi-modal image is one 4D file with the 'modality' channels on its last axis."""
    root = tmp_path / "msd4d"
    training = []
    for k in range(3):
        image, label = scan(k, shape=(20, 18, 10))
        save(root / "imagesTr" / f"b{k}.nii.gz", np.stack([image, -image, image * 3], -1), LPS)
        save(root / "labelsTr" / f"b{k}.nii.gz", label, LPS)
        training.append({"image": f"./imagesTr/b{k}.nii.gz", "label": f"./labelsTr/b{k}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "FLAIR", "1": "T1w", "2": "T2w"},
                                                   "labels": {"0": "background", "1": "a", "2": "b"},
                                                   "training": training, "test": []}))
    out = tmp_path / "out"
    assert run_cli(root, out, "--preset", "none", "--channel", "2", "--test-count", "1") == 0
    record = json.loads((out / "dataset.json").read_text())
    assert record["channel"] == "T2w" and record["num_classes"] == 3
    for case_id in record["cases"]:
        np.testing.assert_array_equal(read_h5(out, case_id)["image"],
                                      (scan(int(case_id[1:]), shape=(20, 18, 10))[0] * 3)[::-1, ::-1, :])


def test_unlabeled_cases_never_open_a_label(tmp_path, monkeypatch):
    """Every file nibabel opens is an image or the label of a labeled/test case; an --unlabeled DIR with a
    booby-trapped 'label' beside its images is never looked into."""
    src = write_nnunet(tmp_path / "nnunet", n_labeled=3, n_unlabeled=1, channels=("T1",))
    extra = tmp_path / "more"
    save(extra / "extra01.nii.gz", scan(7)[0], LPS)
    (extra / "labelsTr").mkdir()
    (extra / "labelsTr" / "extra01.nii.gz").write_bytes(b"not a NIfTI file: opening it fails")
    opened = []
    real_load = nibabel.load
    monkeypatch.setattr(nibabel, "load", lambda path, *a, **k: opened.append(Path(path)) or real_load(path, *a, **k))
    out = tmp_path / "out"
    assert run_cli(src, out, "--preset", "none", "--test-count", "1", "--unlabeled", extra) == 0
    record = json.loads((out / "dataset.json").read_text())
    assert sorted((out / "unlabeled.list").read_text().split()) == ["case003", "extra01"]
    assert all("labelsTr" not in p.parts or p.parent.parent == src for p in opened)
    assert src / "labelsTr" / "case003.nii.gz" not in opened  # (there is none, and none is looked for)
    assert {p.name for p in opened if "labelsTr" in p.parts} == {f"case00{k}.nii.gz" for k in range(3)}
    for case_id in ("case003", "extra01"):
        assert "label" not in read_h5(out, case_id) and record["cases"][case_id]["files"]["label"] is None


def test_overwrite_and_interrupted_prepare(tmp_path, monkeypatch, capsys):
    src = write_nnunet(tmp_path / "nnunet", n_labeled=3, n_unlabeled=0, channels=("T1",))
    out = tmp_path / "out"
    assert run_cli(src, out, "--preset", "none", "--test-count", "1") == 0
    assert run_cli(src, out, "--preset", "none", "--test-count", "1") == 2
    assert "already holds a prepared set" in capsys.readouterr().err
    before = tree_hashes(out)
    calls = []

    def dies_on_the_second(path, fill):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_write(path, fill)

    real_write = files.atomic_write_h5
    monkeypatch.setattr(files, "atomic_write_h5", dies_on_the_second)  # how prepare writes each case's h5
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(src, out, "none", test_count=1, overwrite=True)
    assert tree_hashes(out) == before  # the old set exactly as it was, no staging folder left
    first = tmp_path / "first"
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(src, first, "none", test_count=1)
    assert not first.exists()  # a first prepare that fails leaves nothing a reader could take for a data set
    monkeypatch.setattr(files, "atomic_write_h5", real_write)
    assert run_cli(src, out, "--preset", "none", "--test-count", "1", "--overwrite") == 0


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (links by their target text), the lock file aside."""
    return {str(p.relative_to(folder)): os.readlink(p) if p.is_symlink() else files.sha256(p)
            for p in sorted(folder.rglob("*")) if (p.is_file() or p.is_symlink()) and p.name != files.LOCK_NAME}


# ----------------------------------------------------------------------------- bad input: one line, exit 2
def _nifti_case(root: Path, case_id="c1", image=None, label=None, affine=LPS, label_affine=None):
    img, lab = scan(1, classes=2, shape=(20, 18, 10))
    save(root / "imagesTr" / f"{case_id}.nii.gz", img if image is None else image, affine)
    save(root / "labelsTr" / f"{case_id}.nii.gz", lab if label is None else label,
         affine if label_affine is None else label_affine)
    return root


def _good_nifti(root: Path) -> Path:
    for k in range(2, 4):
        _nifti_case(root, f"c{k}")
    return root


def _shape_mismatch(root):
    _nifti_case(_good_nifti(root), label=np.zeros((20, 18, 9), np.uint8))


def _affine_mismatch(root):
    _nifti_case(_good_nifti(root), label_affine=oblique())


def _undeclared_label(root):
    write_nnunet(root, n_labeled=3, n_unlabeled=0, channels=("T1",))
    label = scan(0)[1]
    label[0, 0, 0] = 7
    save(root / "labelsTr" / "case000.nii.gz", label, LPS)


def _nan_voxels(root):
    image = scan(1, shape=(20, 18, 10))[0]
    image[3, 3, 3] = np.nan
    _nifti_case(_good_nifti(root), image=image)


def _inf_voxels(root):
    image = scan(1, shape=(20, 18, 10))[0]
    image[3, 3, 3] = np.inf
    _nifti_case(_good_nifti(root), image=image)


def _empty_image(root):
    _nifti_case(_good_nifti(root), image=np.zeros((20, 18, 10), np.float32))


def _four_d_image(root):
    _nifti_case(_good_nifti(root), image=np.zeros((20, 18, 10, 2), np.float32))


def _msd_missing_file(root):
    write_msd(root)
    (root / "labelsTr" / "image0002.nii.gz").unlink()


def _msd_unlisted_file(root):  # (an unlisted image alone is an unlabeled case: test_own_data_defaults)
    write_msd(root)
    save(root / "imagesTr" / "image0009.nii.gz", scan(9)[0], np.eye(4))
    save(root / "labelsTr" / "image0009.nii.gz", scan(9)[1], np.eye(4))


def _nnunet_num_training(root):
    write_nnunet(root)
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps(meta | {"numTraining": 7}))


def _nnunet_missing_channel(root):
    write_nnunet(root)
    (root / "imagesTr" / "case001_0001.nii.gz").unlink()


def _msd_entry(entry):
    def build(root):
        write_msd(root)
        meta = json.loads((root / "dataset.json").read_text())
        meta["training"][0]["image"] = entry
        (root / "dataset.json").write_text(json.dumps(meta))
    return build


def _msd_meta(**fields):
    def build(root):
        write_msd(root)
        meta = json.loads((root / "dataset.json").read_text())
        (root / "dataset.json").write_text(json.dumps(meta | fields))
    return build


def _image_sform(sform):
    def build(root):
        _nifti_case(_good_nifti(root))
        with_sform(root / "imagesTr" / "c1.nii.gz", sform)
    return build


def _uint64_label(root):
    write_nnunet(root, n_labeled=3, n_unlabeled=0, channels=("T1",))
    label = scan(0)[1].astype(np.uint64)
    label[0, 0, 0] = 2**64 - 1
    nibabel.save(nibabel.Nifti1Image(label, LPS, dtype=np.uint64), str(root / "labelsTr" / "case000.nii.gz"))


def _deep_json(root):
    write_msd(root)
    (root / "dataset.json").write_text("[" * 100_000 + "]" * 100_000)


def _train_and_test(root):
    write_msd(root)
    image, label = scan(3, classes=2)
    save(root / "imagesTs" / "image0001.nii.gz", image, oblique())
    save(root / "labelsTs" / "image0001.nii.gz", label, oblique())
    meta = json.loads((root / "dataset.json").read_text())
    meta["test"].append("./imagesTs/image0001.nii.gz")
    (root / "dataset.json").write_text(json.dumps(meta))


BAD = {
    "shape": (_shape_mismatch, [], "label shape (20, 18, 9) != image shape (20, 18, 10)"),
    "affine": (_affine_mismatch, [], "label affine differs from the image's"),
    "label value": (_undeclared_label, [], "label values [7] not in the declared labels (dataset.json) [0, 1, 2]"),
    "nan": (_nan_voxels, [], "image has 1 NaN or Inf voxels"),
    "inf": (_inf_voxels, [], "image has 1 NaN or Inf voxels"),
    "empty": (_empty_image, [], "an empty image"),
    "4d": (_four_d_image, [], "a 4D volume of shape (20, 18, 10, 2); expected 3D"),
    "list names a missing file": (_msd_missing_file, [], "names a missing file"),
    "folder disagrees with the list": (_msd_unlisted_file, [], "image0009.nii.gz is not in the 'training' list"),
    "numTraining disagrees": (_nnunet_num_training, [], "numTraining is 7 but imagesTr holds 5 cases (4 with a label"),
    "missing channel file": (_nnunet_missing_channel, [], "case case001 has channel files [0], expected 0..1"),
    "relative path id": (_msd_entry("../x.nii.gz"), [], "list entry '../x.nii.gz' is a path leaving"),
    "absolute path id": (_msd_entry("/abs/x.nii.gz"), [], "list entry '/abs/x.nii.gz' is a path leaving"),
    "train and test": (_train_and_test, [], "case image0001 is both a training and a test case"),
    "two channels": (lambda r: write_nnunet(r), ["--channel", "T1", "--channel", "FLAIR", "--test-count", "1"],
                     "the trainer reads one input channel"),
    "channel not chosen": (lambda r: write_nnunet(r), ["--test-count", "1"],
                           "has 2 input channels (T1, FLAIR); the trainer reads one channel"),
    "no test cases": (lambda r: write_nnunet(r, n_labeled=1, channels=("T1",)), [],
                      "the automatic hold-out (the default without imagesTs and labelsTs) holds out 0 of 1 labeled"),
    "one class only": (lambda r: _nifti_case(_good_nifti(r), label=np.zeros((20, 18, 10), np.uint8))
                       and [_nifti_case(r, f"c{k}", label=np.zeros((20, 18, 10), np.uint8)) for k in (2, 3)], [],
                       "1 classes (background); the trainer needs 2..255"),
    "bad flag": (lambda r: write_nnunet(r, channels=("T1",)), ["--test-fraction", "1.5"],
                 "argument --test-fraction: expected a finite number in (0, 1)"),
    "zero voxel size": (_image_sform(np.diag([0.8, 0.0, 2.0, 1.0])), [],
                        ("src/imagesTr/c1.nii.gz: the NIfTI affine (sform / qform / pixdim) gives array axis 1 a voxel "
                         "size of 0 mm")),
    "two axes on one world axis": (_image_sform([[0.8, 0.8, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 0]]), [],
                                   ("src/imagesTr/c1.nii.gz: the NIfTI affine (sform / qform / pixdim) points array "
                                    "axes 0 and 1 along one world direction")),
    "NaN in the affine": (_image_sform(np.diag([0.8, np.nan, 2.0, 1.0])), [],
                          "src/imagesTr/c1.nii.gz: the NIfTI affine (sform / qform / pixdim) holds NaN or Inf"),
    "test entry without image": (_msd_meta(test=[{"label": "./labelsTs/image0003.nii.gz"}]), [],
                                 ("src/dataset.json: test entry 1 is {'label': './labelsTs/image0003.nii.gz'}, "
                                  "expected an image path or {\"image\": path}")),
    "test not a list": (_msd_meta(test="./imagesTs/image0003.nii.gz"), [], "src/dataset.json: 'test' must be a list"),
    "negative label": (_msd_meta(labels={"-1": "outside", "0": "background", "1": "pancreas"}), [],
                       "src/dataset.json: label 'outside' is -1: negative label values are not allowed"),
    "uint64 label value": (_uint64_label, [], ("src/labelsTr/case000.nii.gz: label values [18446744073709551615] not "
                                               "in the declared labels")),
    "dataset.json nested 100,000 deep": (_deep_json, [], ("src/dataset.json: the data set description (Decathlon / "
                                                          "nnU-Net) is nested too deeply to read")),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_one_line(tmp_path, capsys, name):
    build, flags, message = BAD[name]
    src = tmp_path / "src"
    src.mkdir()
    build(src)
    out = tmp_path / "out"
    needs_test = ("--test-count" not in flags and name not in ("no test cases", "bad flag")
                  and not (src / "imagesTs").exists())
    assert run_cli(src, out, "--preset", "none", *flags, *(["--test-count", "1"] if needs_test else [])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not any((out / n).exists() for n in ("dataset.json", "train.list", "test.list", "unlabeled.list"))
    assert not list(out.rglob("*.h5")) if out.exists() else True


def test_hidden_files_are_skipped_in_every_layout(tmp_path):
    """A .DS_Store and macOS's ._{name} twins in imagesTr / labelsTr are no cases, in an nnU-Net folder as in a
    plain NIfTI one: both prepare as if they were not there."""
    nnunet = write_nnunet(tmp_path / "nnunet", n_labeled=2, n_unlabeled=0, channels=("T1",))
    plain = _good_nifti(tmp_path / "plain")
    for root, ids in ((nnunet, ["case000", "case001"]), (plain, ["c2", "c3"])):
        for folder in ("imagesTr", "labelsTr"):
            last = max((root / folder).iterdir()).name
            (root / folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
            (root / folder / f"._{last}").write_bytes(b"\0\5\26\7 AppleDouble")
        out = tmp_path / f"{root.name}_out"
        assert run_cli(root, out, "--preset", "none", "--test-count", "1") == 0
        assert sorted(json.loads((out / "dataset.json").read_text())["cases"]) == ids


def test_missing_extra_names_the_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "monai", None)  # import monai -> ImportError
    assert run_cli(write_nnunet(tmp_path / "src", channels=("T1",)), tmp_path / "out", "--test-count", "1") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'uamt_fast[data]'" in err


def test_other_data_set_in_out_is_refused(tmp_path, capsys):
    """OUT holding lists that prepare did not write (an LA root) is refused even with --overwrite."""
    out = tmp_path / "la"
    data.write_synthetic_la(out, n_train=1, n_test=1, shape=(16, 16, 16), seed=0)
    src = write_nnunet(tmp_path / "src", channels=("T1",))
    assert run_cli(src, out, "--preset", "none", "--test-count", "1", "--overwrite") == 2
    assert "holds a data set that prepare did not write" in capsys.readouterr().err
    assert data.read_list(out, "train") and (out / data.IMAGES_DIR).is_dir()


def test_subprocess_bad_input(tmp_path):
    src = tmp_path / "src"
    _nan_voxels(src)
    proc = subprocess.run([sys.executable, "-m", "uamt_fast.data", "prepare", str(src), str(tmp_path / "out"),
                           "--preset", "none", "--test-count", "1"], capture_output=True, text=True, check=False,
                          cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "NaN or Inf voxels" in lines[0], proc.stderr


# ----------------------------------------------------------------------------- the real LA data
@pytest.mark.real_data
def test_real_la_round_trip(tmp_path, la_root):
    """Three real LA cases exported to an MSD folder (0.625 mm, RAS) come back from prepare --preset la with
    the same arrays: labels exactly, images to float32 rounding."""
    ids = data.read_list(la_root, "train")[:2] + data.read_list(la_root, "test")[:1]
    cases = {case.id: case for case in data.load_cases(la_root, ids)}
    affine = np.diag([0.625, 0.625, 0.625, 1.0])
    src, training = tmp_path / "msd", []
    for case_id in ids:
        folder, lfolder = ("imagesTs", "labelsTs") if case_id == ids[2] else ("imagesTr", "labelsTr")
        save(src / folder / f"{case_id}.nii.gz", cases[case_id].image, affine)
        save(src / lfolder / f"{case_id}.nii.gz", cases[case_id].label, affine)
        if folder == "imagesTr":
            training.append({"image": f"./{folder}/{case_id}.nii.gz", "label": f"./{lfolder}/{case_id}.nii.gz"})
    (src / "dataset.json").write_text(json.dumps({"modality": {"0": "MRI"}, "labels": {"0": "background",
                                                  "1": "left atrium"}, "training": training,
                                                  "test": [f"./imagesTs/{ids[2]}.nii.gz"]}))
    out = tmp_path / "out"
    assert run_cli(src, out, "--preset", "la", "--workers", "2") == 0
    assert data.read_list(out, "train") == sorted(ids[:2]) and data.read_list(out, "test") == [ids[2]]
    record = json.loads((out / "dataset.json").read_text())
    assert record["num_classes"] == 2 and record["train"]["patch"] == [112, 112, 80]
    for case_id in ids:
        back = data.load_case(out, case_id)
        np.testing.assert_array_equal(back.label, cases[case_id].label)
        np.testing.assert_allclose(back.image, cases[case_id].image, rtol=0, atol=np.finfo(np.float32).eps * 8)
        assert record["cases"][case_id]["spacing"] == pytest.approx([0.625] * 3)


def test_core_import_needs_no_extra():
    """import uamt_fast, its data module and even prepare/formats load neither MONAI nor nibabel."""
    code = ("import sys, uamt_fast, uamt_fast.data, uamt_fast.data.formats, uamt_fast.data.prepare; "
            "print(sorted(m for m in ('monai', 'nibabel') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


def test_a_progress_line_a_case_as_it_finishes(tmp_path, capsys):
    """``[k/n] id seconds (ETA)`` on stdout, counted in the order the workers finish, then the summary's time."""
    src = write_nnunet(tmp_path / "src", n_labeled=3, n_unlabeled=0, channels=("T1",))
    assert run_cli(src, tmp_path / "out", "--preset", "none", "--test-count", "1", "--workers", "2") == 0
    captured = capsys.readouterr()
    lines = [re.fullmatch(r"\[(\d)/3\] (case\d+) \d+\.\d s( \(ETA \d+:\d\d:\d\d\))?", line)
             for line in captured.out.splitlines() if line.startswith("[")]
    assert [(m[1], bool(m[3])) for m in lines] == [("1", True), ("2", True), ("3", False)], captured.out
    assert sorted(m[2] for m in lines) == ["case000", "case001", "case002"] and captured.err == ""
    assert re.search(r"^prepared .* in \d+\.\d s; test cases: ", captured.out, re.MULTILINE), captured.out


# ----------------------------------------------------------------------------- writes: links, one writer, staging
def test_links_planted_in_out_are_never_written_through_nor_removed_beyond(tmp_path, capsys):
    src = write_nnunet(tmp_path / "nnunet", n_labeled=3, n_unlabeled=0, channels=("T1",))
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"the user's own file")
    out = tmp_path / "out"
    out.mkdir()
    (out / "dataset.json.tmp").symlink_to(victim)
    (out / "train.list.tmp").symlink_to(victim)
    assert run_cli(src, out, "--preset", "none", "--test-count", "1") == 0
    assert victim.read_bytes() == b"the user's own file"
    cases = out / data.CASES_DIR
    (cases / "case000.h5.tmp").symlink_to(victim)
    outside = tmp_path / "outside"  # a case file that is a link to a file of the user's
    outside.mkdir()
    (outside / "mine.h5").write_bytes(b"the user's h5")
    (cases / "case001.h5").unlink()
    (cases / "case001.h5").symlink_to(outside / "mine.h5")
    assert run_cli(src, out, "--preset", "none", "--test-count", "1", "--overwrite") == 0
    assert victim.read_bytes() == b"the user's own file" and (outside / "mine.h5").read_bytes() == b"the user's h5"
    assert not (cases / "case001.h5").is_symlink() and "image" in read_h5(out, "case001")
    cases.rename(tmp_path / "moved")  # the cases folder itself a link: refused, nothing written
    cases.symlink_to(outside, target_is_directory=True)
    assert run_cli(src, out, "--preset", "none", "--test-count", "1", "--overwrite") == 2
    assert "symbolic link" in capsys.readouterr().err
    assert sorted(p.name for p in outside.iterdir()) == ["mine.h5"]


def test_one_prepare_a_folder(tmp_path, capsys):
    one = write_nnunet(tmp_path / "one", n_labeled=3, n_unlabeled=0, channels=("T1",))
    other = tmp_path / "other"
    shutil.copytree(one, other)
    for path in (other / "imagesTr").iterdir():  # another data set: the images differ
        img = nibabel.load(str(path))
        save(path, np.asarray(img.dataobj) * 3.0 + 1.0, img.affine)
    out = tmp_path / "out"
    out.mkdir()
    with files.FolderLock(out, "OUT", "prepare"):  # a prepare running there now
        assert run_cli(one, out, "--preset", "none", "--test-count", "1") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"prepare is in progress there (pid {os.getpid()} holds" in err
    assert sorted(p.name for p in out.iterdir()) == [files.LOCK_NAME]
    procs = [subprocess.Popen([sys.executable, "-m", "uamt_fast.data", "prepare", str(s), str(out), "--preset", "none",
                               "--test-count", "1"], stderr=subprocess.PIPE, text=True) for s in (one, other)]
    codes = [p.wait(timeout=300) for p in procs]
    assert sorted(codes) == [0, 2], [p.stderr.read() for p in procs]
    winner = (one, other)[codes.index(0)]
    record = json.loads((out / "dataset.json").read_text())
    assert record["source"]["path"] == str(winner.resolve())
    reference = tmp_path / "reference"
    assert run_cli(winner, reference, "--preset", "none", "--test-count", "1") == 0
    for case_id in record["cases"]:  # every case file is the winner's: one run's set, not a mix
        np.testing.assert_array_equal(read_h5(out, case_id)["image"], read_h5(reference, case_id)["image"])


def test_a_failing_overwrite_leaves_the_old_set_as_it_was(tmp_path, capsys):
    src = write_nnunet(tmp_path / "nnunet", n_labeled=3, n_unlabeled=0, channels=("T1",))
    out = tmp_path / "out"
    assert run_cli(src, out, "--preset", "none", "--test-count", "1") == 0
    before = tree_hashes(out)
    last = sorted((src / "imagesTr").iterdir())[-1]
    img = nibabel.load(str(last))
    image = np.asarray(img.dataobj).astype(np.float32)
    image[1, 2, 3] = np.nan
    save(last, image, img.affine)
    assert run_cli(src, out, "--preset", "none", "--test-count", "1", "--overwrite") == 2
    assert f"{last}: image has 1 NaN or Inf voxels" in capsys.readouterr().err
    assert tree_hashes(out) == before and not list(out.glob(".prepare-*"))
    first = tmp_path / "first"
    assert run_cli(src, first, "--preset", "none", "--test-count", "1") == 2
    assert not first.exists()  # no empty skeleton for train.py to misread
