"""Checks of what prepare, train.py and predict read, before any work: the one JSON reader (``files.read_json``),
the prepared set's record checked field by field when it is read (``data.read_record``), and train.py's one-line
refusal of a bad record. prepare's and predict's own refusals of bad NIfTI affines, source descriptions and
records are rows of the BAD tables in tests/data/test_prepare.py and tests/test_predict.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
from trainer_cli import TINY, one_error_line  # noqa: E402

from uamt_fast import train  # noqa: E402
from uamt_fast import data, files  # noqa: E402

DEEP = "[" * 100_000 + "]" * 100_000  # parses only by recursing 100,000 levels: RecursionError in json
LPS = [[-0.8, 0, 0, 30.0], [0, -0.8, 0, 25.0], [0, 0, 2.0, -18.0], [0, 0, 0, 1]]
CASE = {"role": "labeled", "files": {"image": ["imagesTr/c1.nii.gz"], "label": "labelsTr/c1.nii.gz"},
        "affine_original": LPS, "shape_original": [40, 36, 20], "spacing": [0.8, 0.8, 2.0], "shape": [40, 36, 20],
        "affine": np.diag([0.8, 0.8, 2.0, 1.0]).tolist()}
RECORD = {"format": data.RECORD_FORMAT, "preset": "none", "num_classes": 2, "labels": {"background": 0, "organ": 1},
          "channel": "CT", "train": {"patch": [96, 96, 96], "eval_stride_xy": 16, "eval_stride_z": 16},
          "source": {"path": "/data/src", "layout": "msd"}, "cases": {"c1": CASE}}


def write_record(root: Path, record) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / data.RECORD_NAME
    if isinstance(record, bytes):
        path.write_bytes(record)
    else:
        path.write_text(record if isinstance(record, str) else json.dumps(record))
    return path


def case(**fields) -> dict:
    return RECORD | {"cases": {"c1": CASE | fields}}


BAD_RECORDS = {
    "nested 100,000 deep": (DEEP, "the prepared data set's record is nested too deeply to read"),
    "not UTF-8": (b'{"format": "\xff"}', "the prepared data set's record is not UTF-8 text (byte 12"),
    "not JSON": ('{"format": ', "the prepared data set's record is not valid JSON"),
    "a list": ("[1]", "the prepared data set's record is a JSON list; expected a JSON object"),
    "train a string": (RECORD | {"train": "patch"}, "field train is 'patch'; expected an object"),
    "patch of two": (RECORD | {"train": {"patch": [96, 96]}}, "field train.patch is [96, 96]; expected 3 integers"),
    "stride a float": (RECORD | {"train": {"eval_stride_xy": 1.5}}, ("field train.eval_stride_xy is 1.5; expected an "
                                                                     "integer >= 1")),
    "train field unknown": (RECORD | {"train": {"iteration": 5}}, "field train.iteration is 5; expected no such "
                                                                  "field (train holds patch, eval_stride_xy"),
    "protocol schedule": (RECORD | {"train": {"lr_schedule": "cosine"}}, ("field train.lr_schedule is 'cosine'; "
                                                                          'expected "step" or "poly"')),
    "protocol dims": (RECORD | {"train": {"dims": 1}}, "field train.dims is 1; expected 2 or 3"),
    "preset a number": (RECORD | {"preset": 3}, "field preset is 3; expected a string"),
    "labels a list": (RECORD | {"labels": ["background", "organ"]}, "field labels is ['background', 'organ']"),
    "source a string": (RECORD | {"source": "/data/src"}, "field source is '/data/src'"),
    "cases a list": (RECORD | {"cases": [1]}, "field cases is [1]; expected an object"),
    "cases a number": (RECORD | {"cases": 5}, "field cases is 5; expected an object"),
    "case id a path": (RECORD | {"cases": {"../c1": CASE}}, "field cases: case id '../c1' is not a plain name"),
    "case a list": (RECORD | {"cases": {"c1": [1]}}, "field cases.c1 is [1]; expected an object"),
    "spacing NaN": (case(spacing=[float("nan"), 0.8, 2.0]), ("field cases.c1.spacing is [nan, 0.8, 2.0]; expected 3 "
                                                             "voxel sizes in mm, each in (0, 1000)")),
    "spacing zero": (case(spacing=[0, 0.8, 2.0]), "field cases.c1.spacing is [0, 0.8, 2.0]"),
    "spacing ragged": (case(spacing=[0.8, [0.8], 2.0]), "field cases.c1.spacing is [0.8, [0.8], 2.0]"),
    "shape of floats": (case(shape=[40.0, 36, 20]), "field cases.c1.shape is [40.0, 36, 20]; expected 3 integers"),
    "affine 3x3": (case(affine=np.eye(3).tolist()), "field cases.c1.affine is a matrix of shape (3, 3); expected 4x4"),
    "affine 1x1": (case(affine=[[1.0]]), "field cases.c1.affine is a matrix of shape (1, 1); expected 4x4"),
    "affine ragged": (case(affine=[[1.0, 0], [0]]), "field cases.c1.affine is not a 4x4 matrix of numbers"),
    "affine NaN": (case(affine=np.diag([0.8, float("nan"), 2.0, 1.0]).tolist()), ("field cases.c1.affine holds NaN "
                                                                                  "or Inf")),
    "affine zero voxel": (case(affine=np.diag([0.8, 0.8, 0.0, 1.0]).tolist()),
                          "field cases.c1.affine gives array axis 2 a voxel size of 0 mm"),
    "affine two axes along one": (case(affine_original=[[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]]),
                                  ("field cases.c1.affine_original points array axes 0 and 1 along one world "
                                   "direction")),
    "affine axes in a plane": (case(affine=[[1, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]]),
                               "field cases.c1.affine puts the three array axes in one plane"),
    "affine last row": (case(affine=[[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]),
                        "field cases.c1.affine has last row [0.0, 0.0, 1.0, 1.0]; expected [0, 0, 0, 1]"),
    "files a string": (case(files="imagesTr/c1.nii.gz"), "field cases.c1.files is 'imagesTr/c1.nii.gz'"),
    "image files a string": (case(files={"image": "imagesTr/c1.nii.gz"}), "field cases.c1.files is {'image': "),
}


@pytest.mark.parametrize("name", list(BAD_RECORDS))
def test_read_record_refuses_each_bad_field_naming_file_and_field(tmp_path, name):
    record, message = BAD_RECORDS[name]
    path = write_record(tmp_path / "prepared", record)
    with pytest.raises(data.DataError) as refused:
        data.read_record(tmp_path / "prepared")
    text = str(refused.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text, text


def test_read_record_takes_a_whole_record_and_a_minimal_one(tmp_path):
    assert data.read_record(write_record(tmp_path / "whole", RECORD).parent) == RECORD
    minimal = {"format": data.RECORD_FORMAT, "num_classes": 3, "cases": {"c1": {"spacing": [1, 1, 1]}}}
    assert data.read_record(write_record(tmp_path / "minimal", minimal).parent) == minimal


@pytest.mark.parametrize("record, words", [(DEEP, ["nested too deeply"]), (RECORD | {"train": "patch"}, ["train"]),
                                           (RECORD | {"cases": 5}, ["cases is 5"])], ids=["deep", "train", "cases"])
def test_train_refuses_a_bad_record_in_one_line(tmp_path, capsys, record, words):
    root = data.write_synthetic_la(tmp_path / "data", n_train=3, n_test=1, shape=(16, 16, 16), seed=0)
    path = write_record(root, record)
    out = tmp_path / "run"
    assert train.main(["--data", str(root), *TINY, "--out", str(out)]) == 2
    one_error_line(capsys, f"{path}: ", *words)
    assert not out.exists()


class _Refused(ValueError):
    pass


@pytest.mark.parametrize("content, reason", [(None, "cannot read the thing (No such file or directory)"),
                                             (DEEP, "the thing is nested too deeply to read"),
                                             ('{"n": ' + "7" * 5000 + "}", "the thing is not valid JSON (Exceeds"),
                                             (b"\xfe", "the thing is not UTF-8 text (byte 0"),
                                             ('"text"', "the thing is a JSON str; expected a JSON object")],
                         ids=["missing", "deep", "long int", "not UTF-8", "a string"])
def test_read_json_turns_every_failure_into_the_callers_error(tmp_path, content, reason):
    path = tmp_path / "x.json"
    if content is not None:
        write_record(tmp_path, content).rename(path)
    with pytest.raises(_Refused) as refused:
        files.read_json(path, "the thing", _Refused)
    assert str(refused.value).startswith(f"{path}: {reason}") and "\n" not in str(refused.value)


def test_prepare_into_a_folder_with_an_unreadable_record_is_one_line(tmp_path, capsys):
    """OUT's dataset.json nested 100,000 deep is no prepared set of ours: refused as another data set."""
    pytest.importorskip("nibabel")
    pytest.importorskip("monai")
    from test_prepare import run_cli, write_nnunet

    src = write_nnunet(tmp_path / "src", n_labeled=2, n_unlabeled=0, channels=("T1",))
    write_record(tmp_path / "out", DEEP)
    assert run_cli(src, tmp_path / "out", "--preset", "none", "--test-count", "1", "--overwrite") == 2
    one_error_line(capsys, f"output folder {tmp_path / 'out'} holds a data set that prepare did not write",
                   prefix="error: ")
