"""The record of a prepared set: the ``dataset.json`` that ``prepare`` writes into every root, read and checked.

It holds the format (``RECORD_FORMAT``), ``num_classes``, ``labels``, the input ``channel``, the ``ignore_label``,
the training settings (``train``: patch, strides, batch and a benchmark's protocol, ``TRAIN_FIELDS``), the
``plan`` of ``--preset auto`` (``planning``), the ``source`` folder and per case its geometry (``cases``:
spacing, shape, affine, ...). The LA release has none: then there are 2 classes at 0.625 mm. Records written
before ``plan`` and the batch settings existed read as before (both are optional, except ``plan`` for an
``auto`` record).
"""
from __future__ import annotations

import math
from pathlib import Path

from uamt_fast import files
from uamt_fast.data.affine import check_affine
from uamt_fast.data.layout import (
    IGNORE_LABEL,
    LA_SPACING,
    RECORD_FORMAT,
    RECORD_NAME,
    DataError,
    as_roots,
    check_case_id,
)
from uamt_fast.data.planning import check_plan


def _number(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


# The fields of a record's "train" (train.py Config fields: a flag given on the command line wins), each with
# what it must be: patch, sliding-window strides and batch (every preset and plan), and a benchmark's protocol
# (presets.Preset.protocol: acdc's SSL4MIS settings).
TRAIN_FIELDS = {
    "patch": (lambda v: isinstance(v, list) and len(v) == 3 and all(type(p) is int and p >= 1 for p in v),
              "3 integers >= 1"),
    "eval_stride_xy": (lambda v: type(v) is int and v >= 1, "an integer >= 1"),
    "eval_stride_z": (lambda v: type(v) is int and v >= 1, "an integer >= 1"),
    "batch_labeled": (lambda v: type(v) is int and v >= 1, "an integer >= 1"),
    "batch_unlabeled": (lambda v: type(v) is int and v >= 0, "an integer >= 0"),
    "dims": (lambda v: type(v) is int and v in (2, 3), "2 or 3"),
    "iterations": (lambda v: type(v) is int and v >= 1, "an integer >= 1"),
    "lr_schedule": (lambda v: v in ("step", "poly"), '"step" or "poly"'),
    "consistency_rampup": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "consistency_period": (lambda v: type(v) is int and v >= 0, "an integer >= 0"),
    "labeled_patients": (lambda v: type(v) is int and v >= 0, "an integer >= 0"),
}


def read_record(roots) -> dict | None:
    """The ``dataset.json`` that ``prepare`` wrote (identical in every root that has one), or None for the LA
    release, which has none. Checked: a JSON object of format RECORD_FORMAT with ``num_classes`` in [2, 255], and
    every other field train.py and predict read with its type and shape (``_check_record``)."""
    records = []
    for root in as_roots(roots):
        path = root / RECORD_NAME
        if not path.is_file():
            continue
        record = files.read_json(path, "the prepared data set's record", DataError)
        if record.get("format") != RECORD_FORMAT:
            raise DataError(f"{path}: not a uamt_fast prepared data set (expected \"format\": \"{RECORD_FORMAT}\"; "
                            "write one with python -m uamt_fast.data prepare)")
        c = record.get("num_classes")
        if type(c) is not int or not 2 <= c <= 255:
            raise DataError(f"{path}: num_classes {c!r}; expected an int in [2, 255]")
        if record.get("ignore_label", IGNORE_LABEL) != IGNORE_LABEL or type(record.get("ignore_label", 0)) is not int:
            raise DataError(f"{path}: ignore_label {record['ignore_label']!r}; the only reserved value is "
                            f"{IGNORE_LABEL} (or no ignore_label)")
        _check_record(record, path)
        records.append((path, record))
    for path, record in records[1:]:
        if record != records[0][1]:
            raise DataError(f"{path} differs from {records[0][0]}; the roots of one data set must have the same record")
    return records[0][1] if records else None


def _check_record(record: dict, path: Path) -> None:
    """The fields of a prepared set's record that train.py and predict read, each of its type and shape, or a
    one-line DataError naming the file and the field: ``preset``, ``channel`` (strings), ``labels`` ({name: int}),
    ``train`` (only ``TRAIN_FIELDS``, each as that table says), ``plan`` (required when ``preset`` is "auto":
    ``planning.check_plan``),
    ``source`` (``path``, ``layout``: strings) and per case of ``cases`` ({id: {...}}): ``spacing`` (3 mm values
    in (0, 1000)), ``shape`` / ``shape_original`` (3 ints >= 1), ``affine`` / ``affine_original``
    (``affine.check_affine``: a singular or non-finite one would stop predict's map back after the inference)
    and ``files``. A field may be
    absent (a hand-written record holds ``format`` and ``num_classes`` only); then its reader's default holds."""
    def refuse(field: str, value, expected: str):
        raise DataError(f"{path}: field {field} is {value!r:.80}; expected {expected}")

    def sizes(value, low: float, high: float, kind) -> bool:
        return isinstance(value, list) and len(value) == 3 and all(
            type(v) in kind and math.isfinite(v) and low <= v < high for v in value)

    for key in ("preset", "channel"):
        if key in record and not isinstance(record[key], str):
            refuse(key, record[key], "a string")
    labels = record.get("labels", {})
    if not isinstance(labels, dict) or not all(type(v) is int for v in labels.values()):
        refuse("labels", labels, "an object {name: label value}")
    settings = record.get("train", {})
    if not isinstance(settings, dict):
        refuse("train", settings, 'an object {"patch": [x, y, z], "eval_stride_xy": n, "eval_stride_z": n}')
    for key, value in settings.items():
        if key not in TRAIN_FIELDS:
            refuse(f"train.{key}", value, f"no such field (train holds {', '.join(TRAIN_FIELDS)})")
        valid, expected = TRAIN_FIELDS[key]
        if not valid(value):
            refuse(f"train.{key}", value, expected)
    if "plan" in record or record.get("preset") == "auto":  # predict rebuilds an auto set's preprocessing from it
        check_plan(record.get("plan"), str(path))
    source = record.get("source", {})
    if not isinstance(source, dict) or not all(isinstance(source.get(k, ""), str) for k in ("path", "layout")):
        refuse("source", source, 'an object {"path": folder, "layout": name}')
    cases = record.get("cases", {})
    if not isinstance(cases, dict):
        refuse("cases", cases, "an object {case id: {spacing, shape, affine, ...}}")
    for case_id, case in cases.items():
        field = f"cases.{check_case_id(case_id, f'{path}: field cases')}"
        if not isinstance(case, dict):
            refuse(field, case, "an object {spacing, shape, affine, ...}")
        if "spacing" in case and not sizes(case["spacing"], 1e-6, 1e3, (int, float)):
            refuse(f"{field}.spacing", case["spacing"], "3 voxel sizes in mm, each in (0, 1000)")
        for key in ("shape", "shape_original"):
            if key in case and not sizes(case[key], 1, math.inf, (int,)):
                refuse(f"{field}.{key}", case[key], "3 integers >= 1")
        for key in ("affine", "affine_original"):
            if key in case:
                check_affine(case[key], f"{path}: field {field}.{key}")
        read = case.get("files", {})
        image = read.get("image", []) if isinstance(read, dict) else None
        if not (isinstance(image, list) and all(isinstance(f, str) for f in image)
                and isinstance(read.get("label"), (str, type(None)))):
            refuse(f"{field}.files", read, '{"image": [file, ...], "label": file or null}')


def input_folders(roots) -> list[Path]:
    """The folders a run reads: its data roots and, for a prepared set, the source it was prepared from (that
    an ``--overwrite`` must never touch)."""
    roots = [Path(r) for r in roots or []]
    source = ((read_record(roots) or {}).get("source") or {}).get("path") if roots else None
    return roots + ([Path(source)] if isinstance(source, str) and source else [])


def num_classes(roots) -> int:
    """Classes of the data set, background included: the record's ``num_classes``; 2 for the LA release."""
    record = read_record(roots)
    return 2 if record is None else record["num_classes"]


def label_names(roots) -> dict[str, str]:
    """``{"1": "RV", ...}``: the foreground classes' names by label value (the record's ``labels``), for tables
    and legends; none for the LA release or a record without labels."""
    labels = (read_record(roots) or {}).get("labels") if roots else None
    return {str(v): name for name, v in (labels or {}).items() if v != 0}


def case_spacing(record: dict | None, case_id: str) -> tuple | None:
    """The voxel spacing (mm) of a case as stored: the record's; the LA release's 0.625 mm for a case of the
    release (no record); None where a prepared set's source kept none (SSL4MIS's ACDC h5): no mm metrics."""
    if record is None:
        return LA_SPACING
    spacing = (record.get("cases") or {}).get(case_id, {}).get("spacing")
    if spacing is None:
        return None
    if len(spacing) != 3 or not all(isinstance(s, (int, float)) and 0 < s < 1e3 for s in spacing):
        raise DataError(f"{RECORD_NAME}: case {case_id}: bad spacing {spacing!r}; expected 3 positive mm values")
    return tuple(float(s) for s in spacing)


__all__ = ["TRAIN_FIELDS", "case_spacing", "input_folders", "label_names", "num_classes", "read_record"]
