"""prepare --preset acdc: ACDC's raw folder and SSL4MIS's h5 release -> the layout, with SSL4MIS's split.

Synthetic folders of both forms (``acdc.write_synthetic``: 6 of the split's patients, 32 x 32 x 6 voxels at
1.5 x 1.5 x 10 mm, an LV disc in a myocardium ring, a crescent RV) through the real command line (once as a
subprocess, else ``data.main`` in-process); the split itself against SSL4MIS's files by their sha256.
"""
import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

nibabel = pytest.importorskip("nibabel")
pytest.importorskip("monai")

from uamt_fast import data
from uamt_fast.data import __main__ as data_cli  # python -m uamt_fast.data
from uamt_fast.data import acdc, acdc_split
from uamt_fast.data.layout import DataError

STACKED = "patient099_frame02"  # the h5 form's volume left to be stacked from its slices


def read_h5(out: Path, case_id: str) -> dict[str, np.ndarray]:
    with h5py.File(out / "cases" / f"{case_id}.h5", "r") as f:
        return {k: f[k][...] for k in f}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict:
    """Both forms written and prepared: raw through a subprocess, h5 in-process (stdout of each kept)."""
    tmp = tmp_path_factory.mktemp("acdc")
    raw = acdc.write_synthetic(tmp / "raw", "raw", (*acdc.SYNTHETIC_PATIENTS, 101))
    for gt in (raw / "testing" / "patient101").glob("*_gt.nii.gz"):
        gt.unlink()  # outside the split: never read, so its missing labels are no error
    h5 = acdc.write_synthetic(tmp / "h5", "h5")
    (h5 / "data" / f"{STACKED}.h5").unlink()
    run = subprocess.Popen([sys.executable, "-m", "uamt_fast.data", "prepare", str(raw), str(tmp / "out_raw"),
                            "--preset", "acdc", "--workers", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):  # (while the subprocess runs)
        h5_rc = data_cli.main(["prepare", str(h5), str(tmp / "out_h5"), "--preset", "acdc", "--workers", "1"])
    stdout, stderr = run.communicate(timeout=120)
    return {"raw": raw, "h5": h5, "out_raw": tmp / "out_raw", "out_h5": tmp / "out_h5", "rc": run.returncode,
            "stdout": stdout, "stderr": stderr, "h5_rc": h5_rc, "h5_stdout": shown.getvalue()}


def test_the_split_is_ssl4mis_lists_byte_for_byte():
    lists = acdc.split_lists()
    for name, ids in lists.items():  # the expansion of the kept patient numbers is SSL4MIS's file exactly
        assert hashlib.sha256("".join(f"{i}\n" for i in ids).encode()).hexdigest() == acdc_split.LIST_SHA256[name]
    assert [len(lists[n]) for n in ("train", "val", "test")] == [140, 20, 40]
    patients = [set(p) for p in acdc_split.PATIENTS.values()]
    assert sum(map(len, patients)) == 100 and set.union(*patients) == set(range(1, 101))  # by patient, disjoint
    assert lists["train"][:4] == ["patient099_frame01", "patient099_frame02", "patient038_frame01",
                                  "patient038_frame02"]


def test_the_labeled_slices_are_the_first_patients_slices():
    per_patient = [2 * n for n in acdc_split.SLICES_PER_VOLUME]  # both frames
    assert sum(per_patient) == 1312 and len(per_patient) == 70
    for patients, slices in acdc_split.LABELED_SLICES.items():  # (SSL4MIS's key 140: all 70 patients)
        assert sum(per_patient[: min(patients, 70)]) == slices
    train = acdc.split_lists()["train"]
    assert acdc.labeled_cases(train, 3) == train[:6] and len(acdc.labeled_cases(train, 7)) == 14
    for bad in (0, 71):
        with pytest.raises(DataError, match="--labeled-patients"):
            acdc.labeled_cases(train, bad)


def test_the_raw_form_prepares_into_the_layout(prepared):
    out, raw, stdout = prepared["out_raw"], prepared["raw"], prepared["stdout"]
    assert prepared["rc"] == 0, prepared["stderr"]
    assert "6 of its 100 patients" in stdout and "its subset in its order" in stdout  # one line says so
    assert "left out: patient101" in stdout
    lists = {name: (out / f"{name}.list").read_text().split() for name in ("train", "val", "test")}
    assert lists == {"train": acdc.volume_ids((99, 38, 50, 100)), "val": acdc.volume_ids((28,)),
                     "test": acdc.volume_ids((11,))}  # SSL4MIS's order, not sorted
    assert not (out / "unlabeled.list").exists()
    record = json.loads((out / data.RECORD_NAME).read_text())
    assert record["labels"] == {"background": 0, "RV": 1, "Myo": 2, "LV": 3} and record["num_classes"] == 4
    assert record["preset"] == "acdc" and record["source"]["layout"] == "acdc-raw"
    assert record["split"]["frames"]["patient099_frame02"] == {"phase": "ES", "frame": 3 + 99 % 7}
    assert data.read_record(out) == record  # the record passes its checks
    for case_id in (*lists["train"][:2], *lists["val"], *lists["test"]):
        case = record["cases"][case_id]
        assert case["spacing"] == [1.5, 1.5, 10.0] and case["role"] in ("labeled", "val", "test")
        assert case["orientation"] == case["orientation_original"] == "LSA" and case["affine"] == case["affine_original"]
        nifti = nibabel.load(str(raw / case["files"]["image"][0])).get_fdata()
        gt = np.asarray(nibabel.load(str(raw / case["files"]["label"])).dataobj)
        arrays = read_h5(out, case_id)
        assert arrays["image"].shape == (32, 32, 6) and arrays["image"].dtype == np.float32  # slices on the last axis
        expected = (nifti - nifti.min()) / (nifti.max() - nifti.min())  # SSL4MIS's per-volume min-max
        np.testing.assert_allclose(arrays["image"], expected, rtol=0, atol=1e-6)
        assert arrays["image"].min() == 0.0 and arrays["image"].max() == 1.0
        np.testing.assert_array_equal(arrays["label"], gt)
        assert set(np.unique(arrays["label"][..., 1:])) == {0, 1, 2, 3}  # every class on a slice past the apex
    assert record["cases"]["patient099_frame02"]["files"]["image"] == ["training/patient099/patient099_frame04.nii.gz"]


def test_the_h5_form_prepares_to_the_raw_forms_arrays(prepared):
    assert prepared["h5_rc"] == 0
    assert "1 volume(s) stacked from data/slices" in prepared["h5_stdout"]
    out, out_raw = prepared["out_h5"], prepared["out_raw"]
    record = json.loads((out / data.RECORD_NAME).read_text())
    assert record["source"]["layout"] == "acdc-h5" and "voxels" in record["split"]["spacing"]
    assert record["split"]["order"] == json.loads((out_raw / data.RECORD_NAME).read_text())["split"]["order"]
    assert len(record["cases"][STACKED]["files"]["image"]) == 6  # its six slices, in order
    for case_id in record["cases"]:
        assert "spacing" not in record["cases"][case_id]  # the release keeps none: no mm metrics
        assert data.load_cases([out], [case_id])[0].spacing is None
        mine, theirs = read_h5(out, case_id), read_h5(out_raw, case_id)
        for key in ("image", "label"):  # (Z, Y, X) transposed back: the raw form's arrays exactly
            np.testing.assert_array_equal(mine[key], theirs[key], err_msg=f"{case_id} {key}")


def ssl4mis_lists_disagree(root: Path) -> Path:
    acdc.write_synthetic(root, "h5", (99, 11), shape=(8, 8, 2))
    (root / "val.list").write_text("patient011_frame01\n")
    return root


def raw_with(root: Path, change=None) -> Path:
    acdc.write_synthetic(root, "raw", (99, 11), shape=(8, 8, 2))
    if change:
        change(root / "training" / "patient099")
    return root


BAD = {
    "missing label": (lambda r: raw_with(r, lambda p: (p / "patient099_frame04_gt.nii.gz").unlink()), [],
                      "patient099_frame04_gt.nii.gz: missing (the label of the ES frame"),
    "no ES line": (lambda r: raw_with(r, lambda p: (p / "Info.cfg").write_text("ED: 1\nGroup: NOR\n")), [],
                   "Info.cfg: no 'ES: <frame number>' line"),
    "no Info.cfg": (lambda r: raw_with(r, lambda p: (p / "Info.cfg").unlink()), [], "Info.cfg: missing"),
    "same ED and ES": (lambda r: raw_with(r, lambda p: (p / "Info.cfg").write_text("ED: 4\nES: 4\n")), [],
                       "ED and ES are both frame 4"),
    "a test flag": (raw_with, ["--test-count", "1"], "--preset acdc uses SSL4MIS's test.list"),
    "no test patient": (lambda r: acdc.write_synthetic(r, "raw", (99,), shape=(8, 8, 2)), [],
                        "no patient of SSL4MIS's test.list"),
    "lists disagree": (ssl4mis_lists_disagree, [], "val.list: names patient011_frame01, which SSL4MIS's split puts "
                                                   "in test.list"),
    "not ACDC": (lambda r: r.mkdir() or r, [], "not an ACDC folder"),
    "another preset": (raw_with, ["--preset", "auto"], "ACDC patient folders; prepare it with --preset acdc"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_inputs_are_one_line_and_exit_2(name, tmp_path, capsys):
    make, flags, message = BAD[name]
    src = make(tmp_path / "src")
    preset = [] if "--preset" in flags else ["--preset", "acdc"]
    assert data_cli.main(["prepare", str(src), str(tmp_path / "out"), *preset, *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_predict_preprocesses_a_raw_frame_as_prepare_did(prepared):
    """predict's path for a new NIfTI (``prepare.transform_case`` with the recorded preset): the file's own axes,
    min-max, and a grid that maps back onto the input's one to one."""
    from types import SimpleNamespace

    from uamt_fast import predict

    out, raw = prepared["out_raw"], prepared["raw"]
    record = data.read_record(out)
    frame = raw / record["cases"]["patient011_frame02"]["files"]["image"][0]
    scan = predict.Scan("patient011_frame02", "nifti", (frame,), image=frame)
    loaded = predict.read_scan(scan, SimpleNamespace(record=record))
    np.testing.assert_array_equal(loaded.image, read_h5(out, "patient011_frame02")["image"])
    assert loaded.geometry["affine"] == loaded.geometry["affine_original"]
    assert loaded.geometry["shape"] == loaded.geometry["shape_original"] == [32, 32, 6]
