"""Left atrium (LA) MRI data: the UA-MT release layout, a lossless packed copy, synthetic scans, batches.

On disk (the layout of the authors' release, github.com/yulequan/UA-MT ``data/``)::

    <root>/train.list, <root>/test.list           one case id a line
    <root>/2018LA_Seg_Training Set/<id>/mri_norm2.h5
        image  float32 (X, Y, Z), normalized (zero mean, unit variance over the scan before cropping)
        label  uint8   (X, Y, Z) in {0, 1} (a prepared set: 0..C-1, and IGNORE_LABEL = 255 for voxels
               that are not annotated where its dataset.json declares "ignore_label": 255)

A *packed* root (``python -m uamt_fast.data pack``) has the same lists and folders with
``mri_norm2.npz`` instead: the LA scans are 8-bit MRI normalized per scan, so each image is an
affine map of at most 256 levels and stores as uint8 codes plus the 256 float32 level values
(bit-exact, ~1.2 MiB a case instead of ~2.2 MiB). ``load_case`` reads either transparently.

Several roots (``roots`` = one folder or a list of them, e.g. the parts written by ``pack
--max-part-mib``) act as one data set: every root that has a list has the same one (the parts each carry
the full lists, so the order of the roots never changes the labeled set) and each case is read from the
one root whose image folder holds it.

Case ids are folder names, never paths: ids that are empty, ``.``, ``..``, hold ``/`` or ``\\`` or
non-printing characters (NUL, tab, ...) are refused wherever they enter (lists, ``--cases``, the API), and
so is an id in both train.list and test.list (the test mean would score a training case).

``TwoStreamSampler`` draws the training batches exactly as the released code does (its
TwoStreamBatchSampler, RandomRotFlip and RandomCrop), on any device, from one CPU generator.
"""
from __future__ import annotations

import bz2
import dataclasses
import hashlib
import json
import math
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from uamt_fast import files

IMAGES_DIR = "2018LA_Seg_Training Set"
H5_NAME = "mri_norm2.h5"
PACKED_NAME = "mri_norm2.npz"
PACKED_FORMAT = "uamt_fast.la_pack.v1"
RECORD_NAME = "dataset.json"  # written by prepare: classes, labels, geometry of every case
RECORD_FORMAT = "uamt_fast.prepared/1"
LA_SPACING = (0.625, 0.625, 0.625)  # mm: the 2018 Atrial Segmentation Challenge's isotropic MRI
IGNORE_LABEL = 255  # the stored label value of "not annotated" voxels (nnU-Net's "ignore" label), never a class


class DataError(ValueError):
    """Bad or missing data; the message names the file or option at fault."""


@dataclass(frozen=True)
class Case:
    """One scan in memory: ``image`` float32 (X, Y, Z), normalized; ``label`` uint8 (X, Y, Z) in 0..C-1, or
    None for an unlabeled case (its label was never read, or never existed); ``spacing`` in mm per axis;
    ``ignore_label``: the label value of voxels that are not annotated (``IGNORE_LABEL``, where the data set's
    record declares one), which no loss or metric counts; None: every voxel is annotated."""

    id: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple = LA_SPACING
    ignore_label: int | None = None

    def __post_init__(self):  # cheap structural checks; value checks happen where data is read
        if self.image.ndim != 3 or (self.label is not None and self.image.shape != self.label.shape):
            raise DataError(f"case {self.id}: image {self.image.shape} and label "
                            f"{None if self.label is None else self.label.shape} must be equal 3D shapes")
        if self.image.dtype != np.float32 or (self.label is not None and self.label.dtype != np.uint8):
            raise DataError(f"case {self.id}: expected float32 image and uint8 label, "
                            f"got {self.image.dtype}, {None if self.label is None else self.label.dtype}")


# ----------------------------------------------------------------------------- the record of a prepared set
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
    ``train`` (``patch``: 3 ints, ``eval_stride_xy`` / ``eval_stride_z``: ints >= 1), ``source`` (``path``,
    ``layout``: strings) and per case of ``cases`` ({id: {...}}): ``spacing`` (3 mm values in (0, 1000)),
    ``shape`` / ``shape_original`` (3 ints >= 1), ``affine`` / ``affine_original`` (``formats.check_affine``: a
    singular or non-finite one would stop predict's map back after the inference) and ``files``. A field may be
    absent (a hand-written record holds ``format`` and ``num_classes`` only); then its reader's default holds."""
    from uamt_fast.data import formats  # (formats imports this module

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
    if "patch" in settings and not sizes(settings["patch"], 1, math.inf, (int,)):
        refuse("train.patch", settings["patch"], "3 integers >= 1")
    for key in ("eval_stride_xy", "eval_stride_z"):
        if key in settings and not (type(settings[key]) is int and settings[key] >= 1):
            refuse(f"train.{key}", settings[key], "an integer >= 1")
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
                formats.check_affine(case[key], f"{path}: field {field}.{key}")
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


def case_spacing(record: dict | None, case_id: str) -> tuple:
    """The voxel spacing (mm) of a case as stored: the record's, or the LA release's 0.625 mm."""
    spacing = ((record or {}).get("cases") or {}).get(case_id, {}).get("spacing")
    if spacing is None:
        return LA_SPACING
    if len(spacing) != 3 or not all(isinstance(s, (int, float)) and 0 < s < 1e3 for s in spacing):
        raise DataError(f"{RECORD_NAME}: case {case_id}: bad spacing {spacing!r}; expected 3 positive mm values")
    return tuple(float(s) for s in spacing)


# ----------------------------------------------------------------------------- lists and cases
SPLITS = ("train", "test")


def read_list(roots, split: str) -> list[str]:
    """Case ids of ``<root>/<split>.list`` (``split`` is "train" or "test"), in file order.

    Several roots: every root that has the list must have the same ids in the same order (parts that
    each carry the full lists), else DataError naming two roots and the first difference; a root
    without that list is skipped; at least one root must have it. Refused as well: a list that is
    not UTF-8, is empty, repeats an id or holds an id that is not a plain name (``check_case_id``),
    and an id that is also in the other list (train / test) of the same roots.
    """
    roots = as_roots(roots)
    ids, path = _read_lists(roots, split)
    other = {"train": "test", "test": "train"}.get(split)
    if other and any((root / f"{other}.list").is_file() for root in roots):
        _refuse_overlap({split: (ids, path), other: _read_lists(roots, other, allow_empty=True)})
    return ids


def read_splits(roots) -> dict[str, list[str]]:
    """``{"train": ids, "test": ids}``: both lists, each checked as ``read_list`` does, no id in both."""
    roots = as_roots(roots)
    lists = {split: _read_lists(roots, split) for split in SPLITS}
    _refuse_overlap(lists)
    return {split: ids for split, (ids, _) in lists.items()}


def split_fingerprint(roots) -> dict:
    """``{"train": ids, "test": ids, "sha256": hex}`` of ``read_splits(roots)``: what a run trains and is
    scored on. ``sha256`` is the digest of the UTF-8 JSON ``[train ids, test ids]``, so any change of the
    ids or of their order (the first ``labeled`` train ids are the labeled ones) changes it."""
    splits = read_splits(roots)
    digest = hashlib.sha256(json.dumps([splits["train"], splits["test"]]).encode()).hexdigest()
    return {**splits, "sha256": digest}


def check_case_id(case_id, where: str = "case id") -> str:
    """``case_id`` if it is a plain folder name; else DataError naming ``where`` (a list file, a flag) and the id.

    Refused: anything but a non-empty str, ``.`` and ``..``, ``/`` or ``\\`` (a path, relative or absolute:
    reading or writing ``<root>/2018LA_Seg_Training Set/<id>`` would leave the root), and non-printing
    characters (NUL, tab, other control and format characters).
    """
    if not isinstance(case_id, str) or case_id in ("", ".", "..") or "/" in case_id or "\\" in case_id \
            or not case_id.isprintable():
        raise DataError(f"{where}: case id {case_id!r} is not a plain name (expected a folder name in "
                        f"'{IMAGES_DIR}': not empty, '.' or '..', no '/', '\\' or non-printing characters)")
    return case_id


def _read_lists(roots: list[Path], split: str, allow_empty: bool = False) -> tuple[list[str], Path | None]:
    """The ids of ``split``.list, the same in every root that has one, and the first such file.
    ``allow_empty``: a missing or empty list is no error (the ids are then ``[]``, the file may be None)."""
    found = [(root, ids) for root in roots if (ids := _read_one_list(root / f"{split}.list")) is not None]
    if not found:
        if allow_empty:
            return [], None
        raise DataError(f"case list not found: {roots[0] / f'{split}.list'}" if len(roots) == 1 else
                        f"case list not found: {split}.list in none of {[str(r) for r in roots]}")
    (first, ids), *others = found
    for root, other_ids in others:
        if other_ids != ids:
            k = next((i for i, (a, b) in enumerate(zip(ids, other_ids)) if a != b), min(len(ids), len(other_ids)))
            first_k, other_k = (repr(x[k]) if k < len(x) else "missing (the list ends)" for x in (ids, other_ids))
            raise DataError(f"{split}.list differs between {first} and {root}: id {k + 1} is {first_k} in the first, "
                            f"{other_k} in the second; the roots of one data set must have the same lists")
    if not ids and not allow_empty:
        raise DataError(f"{first / f'{split}.list'}: the case list is empty")
    return ids, first / f"{split}.list"


def _read_one_list(path: Path) -> list[str] | None:
    """The checked ids of one list file, or None if there is no such file."""
    if not path.is_file():
        return None
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); expected one case id a line") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the case list ({e.strerror})") from None
    ids = [check_case_id(line.strip(), str(path)) for line in text.splitlines() if line.strip()]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DataError(f"{path}: duplicate case ids {duplicates}")
    return ids


def _refuse_overlap(lists: dict) -> None:
    """DataError if an id is in both ``lists["train"]`` and ``lists["test"]`` (each ``(ids, file)``)."""
    (train, train_path), (test, test_path) = lists["train"], lists["test"]
    test_ids = set(test)
    both = [i for i in train if i in test_ids]
    if both:
        raise DataError(f"case ids {both[:5]}{' ...' if len(both) > 5 else ''} are in both {train_path} and "
                        f"{test_path}; a test case must not be a training case")


def as_roots(roots) -> list[Path]:
    """One root (str or Path) or a list of them -> a non-empty list of existing folders, no repeats."""
    roots = [roots] if isinstance(roots, (str, os.PathLike)) else list(roots)
    if not roots:
        raise DataError("no LA data root given")
    paths = [_existing_root(r) for r in roots]
    repeated = sorted({str(p) for p in paths if paths.count(p) > 1})
    if repeated:
        raise DataError(f"LA data root given twice: {repeated}")
    for path in paths if len(paths) > 1 else []:  # (one root: read_list names the missing list itself)
        if not any((path / name).exists() for name in ("train.list", "test.list", IMAGES_DIR)):
            raise DataError(f"{path}: not an LA data root (no train.list, test.list or '{IMAGES_DIR}' folder in it)")
    return paths


def find_case(roots, case_id: str) -> Path:
    """The one root whose image folder holds ``case_id`` (a plain name, ``check_case_id``); DataError if none or
    several do."""
    check_case_id(case_id)
    roots = as_roots(roots)
    holders = [r for r in roots if (r / IMAGES_DIR / case_id).is_dir()]
    if not holders:
        where = roots[0] / IMAGES_DIR / case_id if len(roots) == 1 else f"any of {[str(r) for r in roots]}"
        raise DataError(f"case folder not found: {where}" if len(roots) == 1 else
                        f"case {case_id}: no folder {IMAGES_DIR}/{case_id} in {where}")
    if len(holders) > 1:
        raise DataError(f"case {case_id} is in several roots: {[str(r) for r in holders]}; "
                        f"each case must be in exactly one")
    return holders[0]


def semi_supervised_split(train_ids, labeled: int) -> tuple[list[str], list[str]]:
    """The paper's split: the first ``labeled`` ids are labeled, the rest unlabeled (16 of 80 = 20%)."""
    train_ids = list(train_ids)
    if not 1 <= labeled <= len(train_ids):
        raise DataError(f"labeled={labeled}: need 1 <= labeled <= {len(train_ids)} (the number of training ids)")
    return train_ids[:labeled], train_ids[labeled:]


def load_case(roots, case_id: str, labeled: bool = True, record: dict | None = None) -> Case:
    """Read and validate one case (``mri_norm2.h5``, or the packed ``mri_norm2.npz``) from the root holding it.

    ``labeled=False`` (a case of unlabeled.list): its label is not read, even where the file has one.
    ``record``: the set's ``read_record`` (read here when not given): the class count labels are checked
    against, and the case's spacing."""
    roots = as_roots(roots)
    record = read_record(roots) if record is None else record
    folder = find_case(roots, case_id) / IMAGES_DIR / case_id
    if (folder / H5_NAME).is_file():
        path = folder / H5_NAME
        image, label = _read_h5(path, labeled)
    elif (folder / PACKED_NAME).is_file():
        path = folder / PACKED_NAME
        image, label = _read_packed(path)
        label = label if labeled else None
    else:
        raise DataError(f"case file not found: {folder / H5_NAME} (nor a packed {PACKED_NAME})")
    classes = 2 if record is None else record["num_classes"]
    ignore = None if record is None else record.get("ignore_label")
    return _validated(case_id, image, label, path, classes, case_spacing(record, case_id), ignore)


def downsample(case: Case, k: int) -> Case:
    """``case`` pooled k-fold (train.py --downsample, for CPU runs): the image average-pooled (each output voxel
    the mean of a k^3 block), the label by majority (two classes: block mean >= 0.5; more: the most frequent
    class); a remainder smaller than k along an axis is dropped. With an ``ignore_label``: a block more than half
    of whose voxels are ignored is ignored, the others take the majority of their annotated voxels."""
    if k == 1:
        return case
    if min(np.shape(case.image)) < k:
        raise DataError(f"--downsample {k}: case {case.id} has shape {tuple(np.shape(case.image))}, smaller than "
                             f"{k} along an axis (nothing would be left of it)")
    image = torch.as_tensor(np.asarray(case.image))[None, None]
    image = torch.nn.functional.avg_pool3d(image, k)[0, 0].numpy()
    if case.label is None:
        return dataclasses.replace(case, image=image)
    label = torch.as_tensor(np.asarray(case.label)).long()[None]
    ignored = None if case.ignore_label is None else label == case.ignore_label
    if ignored is not None and not bool(ignored.any()):
        ignored = None
    if ignored is not None:  # the classes are voted on by the annotated voxels of each block only
        label = label.masked_fill(ignored, 0)
    if int(label.max()) <= 1:  # two classes: the majority as before (block mean >= 0.5, ties to foreground)
        fraction = torch.nn.functional.avg_pool3d(label[None].float(), k)[0, 0]
        if ignored is not None:  # of the annotated voxels
            fraction = fraction / torch.nn.functional.avg_pool3d((~ignored)[None].float(), k)[0, 0].clamp_min(1e-12)
        label = (fraction >= 0.5).to(torch.uint8)
    else:  # more: the most frequent class of each block (ties to the lower class)
        one_hot = torch.nn.functional.one_hot(label[0]).permute(3, 0, 1, 2)[None].float()
        if ignored is not None:
            one_hot = one_hot * (~ignored)[None].float()
        label = torch.nn.functional.avg_pool3d(one_hot, k)[0].argmax(0).to(torch.uint8)
    if ignored is not None:  # a block most of whose voxels are not annotated is not annotated
        label[torch.nn.functional.avg_pool3d(ignored[None].float(), k)[0, 0] > 0.5] = case.ignore_label
    return dataclasses.replace(case, image=image, label=label.numpy())


def load_cases(roots, ids, labeled: bool = True) -> list[Case]:
    """``load_case`` for each id, in order. Threads decode packed cases in parallel (bz2 releases the
    GIL); h5 files gain little (h5py serializes HDF5 calls) but lose nothing."""
    ids, roots = list(ids), as_roots(roots)
    record = read_record(roots)
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(ids), os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda i: load_case(roots, i, labeled, record), ids))


def read_unlabeled(roots) -> list[str]:
    """The ids of ``unlabeled.list`` (cases with an image only, written by ``prepare``); [] when no root has
    one. Checked like the other lists, and no id may also be in train.list or test.list."""
    roots = as_roots(roots)
    ids, path = _read_lists(roots, "unlabeled", allow_empty=True)
    for split in SPLITS:
        if ids and any((root / f"{split}.list").is_file() for root in roots):
            other, other_path = _read_lists(roots, split, allow_empty=True)
            both = sorted(set(ids) & set(other))
            if both:
                raise DataError(f"case ids {both[:5]} are in both {path} and {other_path}; an unlabeled case is in "
                                "no other list")
    return ids


def make_folder(path, what: str) -> Path:
    """``mkdir -p path`` (``uamt_fast.files.make_folder``: refused when it is or lies under a file, or cannot be
    written), or a one-line DataError naming ``what`` (a flag, "output folder") and the path."""
    return _writable(files.make_folder, path, "data set", what)


def _writable(make, *args) -> Path:
    """``make(*args)`` (a folder maker of ``uamt_fast.files``) with its refusal as a DataError."""
    try:
        return make(*args)
    except files.FolderError as e:
        raise DataError(str(e)) from None


def _existing_root(root) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"LA data root not found: {root}")
    return root


def read_h5_case(case_id: str, path, labeled: bool = True) -> Case:
    """One h5 case file of the release layout (``image``, and ``label`` when ``labeled``), checked as
    ``load_case`` checks it (non-empty 3D float image, all finite; labels {0, 1})."""
    path = Path(path)
    return _validated(case_id, *_read_h5(path, labeled), path)


def _read_h5(path: Path, labeled: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with h5py.File(path, "r") as f:
            arrays = []
            for name in ("image", "label") if labeled else ("image",):
                if not isinstance(f.get(name), h5py.Dataset):
                    raise DataError(f"{path}: no dataset '{name}' (found {sorted(f.keys())})")
                arrays.append(f[name][()])
            return arrays[0], (arrays[1] if labeled else None)
    except OSError as e:  # truncated or corrupt files (h5py raises OSError for both)
        raise DataError(f"{path}: unreadable HDF5 file ({e})") from e


def _validated(case_id: str, image: np.ndarray, label: np.ndarray | None, path: Path, classes: int = 2,
               spacing: tuple = LA_SPACING, ignore: int | None = None) -> Case:
    """A Case of checked arrays: labels in 0..classes-1, or ``ignore`` (the record's ignore_label) too."""
    if image.ndim != 3 or image.size == 0 or (label is not None and label.ndim != 3):
        raise DataError(f"{path}: image {image.shape} and label {None if label is None else label.shape} must both "
                        "be non-empty 3D arrays")
    if label is not None and image.shape != label.shape:
        raise DataError(f"{path}: image shape {image.shape} != label shape {label.shape}")
    if not np.issubdtype(image.dtype, np.floating):
        raise DataError(f"{path}: image dtype {image.dtype}; expected a normalized float image")
    if not np.isfinite(image).all():
        raise DataError(f"{path}: image has {np.size(image) - np.isfinite(image).sum()} non-finite values")
    if label is None:
        return Case(case_id, np.ascontiguousarray(image, np.float32), None, spacing, ignore)
    expected = ("{0, 1}" if classes == 2 else f"0..{classes - 1}") + ("" if ignore is None else
                                                                      f" (or {ignore}: ignore, not annotated)")
    if not (np.issubdtype(label.dtype, np.integer) or label.dtype == bool):
        raise DataError(f"{path}: label dtype {label.dtype}; expected integers in {expected}")
    if label.min() < 0 or label.max() >= classes:
        values = np.unique(label)
        bad = values[(values < 0) | ((values >= classes) & (values != (-1 if ignore is None else ignore)))]
        if bad.size:
            raise DataError(f"{path}: label values {bad[:10].tolist()} outside {expected}")
    return Case(case_id, np.ascontiguousarray(image, np.float32), np.ascontiguousarray(label, np.uint8), spacing,
                ignore)


# ----------------------------------------------------------------------------- packed copy
# One .npz per case (an uncompressed zip of small arrays): numpy reads it with no extra dependency,
# and its bz2 payloads decompress with the GIL released, so load_cases' threads run in parallel
# (h5py serializes every HDF5 call behind one lock). bz2 is chosen for size, the point of packing:
# on LA codes it is ~20% smaller than zlib (all 100 cases: 1.205 MiB a case, 47 in 60 MiB; zlib
# ~1.5 MiB) at ~0.4 s of CPU to decode a case (zlib 0.02 s); xz is 8-15% larger unless
# run at -6, which takes ~25 s a case to write.
def quantize(image: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray, float, float, float]:
    """Express an 8-bit scan normalized as ``(raw - mean) / std`` by its 8-bit codes.

    Finds ``offset``, ``scale`` and codes ``q`` in 0..255 with ``image ~= offset + scale * q`` (the
    affine fit must hold to 4 float32 ulps of max|image|, else DataError: never silently lossy) and
    returns ``(q uint8, levels float32 (256,), offset, scale, max_affine_error)`` where
    ``levels[q] == image`` bit for bit (each used level holds the exact float32 value of the scan).
    """
    values, inverse = np.unique(image, return_inverse=True)
    if values.size > 256:
        raise DataError(f"{name}: {values.size} distinct image values; an 8-bit scan has at most 256")
    v = values.astype(np.float64)
    offset, scale = v[0], 1.0
    if v.size > 1:
        codes = np.rint((v - v[0]) / np.diff(v).min())  # smallest gap ~ one level: first guess
        scale, offset = np.polyfit(codes, v, 1)  # least squares refit over all levels
    codes = np.rint((v - offset) / scale)
    error = float(np.abs((offset + scale * codes).astype(np.float32) - v).max())
    tolerance = 4 * np.finfo(np.float32).eps * max(float(np.abs(v).max()), 1e-30)
    if codes.min() < 0 or codes.max() > 255 or error > tolerance or np.unique(codes).size != v.size:
        raise DataError(f"{name}: image is not an affine map of <= 256 levels (max error {error:.3g}, "
                        f"tolerance {tolerance:.3g}); refusing to pack it lossily")
    levels = (offset + scale * np.arange(256)).astype(np.float32)
    levels[codes.astype(np.int64)] = values
    q = codes.astype(np.uint8)[inverse.reshape(image.shape)]
    return q, levels, float(offset), float(scale), error


def pack_case(case: Case, out_root) -> tuple[Path, float]:
    """Write ``case`` packed under ``out_root``; verify the file reads back bit-exact. Returns (path, affine error).
    ``case.id`` must be a plain name (``check_case_id``): the file goes to ``out_root/<IMAGES_DIR>/<id>/``."""
    check_case_id(case.id, "pack_case")
    if case.label is None or case.label.max() > 1:  # the packed label is one bit a voxel
        raise DataError(f"case {case.id}: pack stores the LA release's binary labels; this case has "
                        + ("no label" if case.label is None else f"labels up to {int(case.label.max())}")
                        + " (train from the prepared h5 folder itself)")
    q, levels, offset, scale, error = quantize(case.image, f"case {case.id}")
    path = _writable(files.subfolder, out_root, IMAGES_DIR, case.id) / PACKED_NAME
    fields = dict(format=np.array(PACKED_FORMAT), shape=np.array(case.image.shape, np.int64), levels=levels,
                  offset=np.float64(offset), scale=np.float64(scale),
                  image_codes_bz2=np.frombuffer(bz2.compress(q.tobytes(), 9), np.uint8),
                  label_bits_bz2=np.frombuffer(bz2.compress(np.packbits(case.label).tobytes(), 9), np.uint8))
    files.atomic_write(path, lambda f: np.savez(f, **fields))
    image, label = _read_packed(path)
    if not (np.array_equal(image.view(np.uint32), case.image.view(np.uint32)) and np.array_equal(label, case.label)):
        raise DataError(f"{path}: packed copy does not read back bit-exact")  # a bug, never expected
    return path, error


def _read_packed(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["format"]) != PACKED_FORMAT:
                raise DataError(f"{path}: format {str(z['format'])!r}, expected {PACKED_FORMAT!r}")
            shape = tuple(int(n) for n in z["shape"])
            codes = np.frombuffer(bz2.decompress(z["image_codes_bz2"].tobytes()), np.uint8)
            bits = np.frombuffer(bz2.decompress(z["label_bits_bz2"].tobytes()), np.uint8)
            image = z["levels"][codes.reshape(shape)]
            label = np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape)
            return image, label
    except DataError:
        raise
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:  # truncated, corrupt, incomplete
        raise DataError(f"{path}: unreadable packed case ({type(e).__name__}: {e})") from e


def pack_dataset(root, out, case_ids=None, n_train=None, n_test=None, n_unlabeled=0) -> list[tuple[str, int, float]]:
    """Pack the given ids, or the first ``n_train + n_unlabeled`` of train.list and ``n_test`` of test.list.

    The packed train.list / test.list keep the source lists' order (so the first N stay the labeled
    ones). Returns ``(id, bytes, max affine error)`` per case, train ids first. Refused: ids that are not
    plain names or in neither list, counts below 0 or beyond the lists, nothing to pack, ``out`` the
    source root itself (its lists would be replaced) or a file.
    """
    splits = read_splits(root)
    train_ids, test_ids = splits["train"], splits["test"]
    if case_ids is not None:
        case_ids = {check_case_id(i, "case_ids") for i in case_ids}
        unknown = sorted(case_ids - set(train_ids) - set(test_ids))
        if unknown:
            raise DataError(f"{root}: case ids {unknown} are in neither train.list nor test.list")
        train_ids, test_ids = [i for i in train_ids if i in case_ids], [i for i in test_ids if i in case_ids]
    else:
        wanted = {"--train": n_train or 0, "--unlabeled": n_unlabeled, "--test": n_test or 0}
        if any(n < 0 for n in wanted.values()) or wanted["--train"] + wanted["--unlabeled"] > len(train_ids) \
                or wanted["--test"] > len(test_ids):
            raise DataError(f"{root}: asked for {wanted}; the lists hold {len(train_ids)} train, "
                            f"{len(test_ids)} test ids")
        train_ids, test_ids = train_ids[: wanted["--train"] + wanted["--unlabeled"]], test_ids[: wanted["--test"]]
    if not train_ids + test_ids:
        raise DataError(f"{root}: nothing to pack (no case ids picked)")
    if Path(out).resolve() == Path(root).resolve():
        raise DataError(f"output folder {out} is the source root; its train.list and test.list would be replaced")
    out = make_folder(out, "output folder")

    def pack_one(case_id):
        path, error = pack_case(load_case(root, case_id), out)
        return case_id, path.stat().st_size, error

    with ThreadPoolExecutor(max_workers=2) as pool:  # bz2 releases the GIL
        report = list(pool.map(pack_one, train_ids + test_ids))
    for split, ids in (("train", train_ids), ("test", test_ids)):
        files.atomic_write_text(out / f"{split}.list", "".join(i + "\n" for i in ids))
    return report


def split_into_parts(out, report, max_part_bytes: int) -> list[tuple[Path, list[str], int]]:
    """Move the packed cases of ``out`` into ``out/part1``, ``out/part2``, ... of <= ``max_part_bytes``
    each (greedy, in list order: train ids, then test ids) and return ``(folder, ids, bytes)`` per part.

    Every part carries the full train.list and test.list, so ``--data part1 --data part2 ...`` in any
    order gives the same lists and the same labeled cases; a part alone names the cases it lacks.
    """
    out = Path(out)
    too_big = [(i, n) for i, n, _ in report if n > max_part_bytes]
    if too_big:
        raise DataError(f"cases larger than the part size {max_part_bytes / 2**20:.2f} MiB: {too_big}")
    groups = [[]]
    for case_id, size, _ in report:
        if sum(n for _, n in groups[-1]) + size > max_part_bytes:
            groups.append([])
        groups[-1].append((case_id, size))
    lists = {split: (out / f"{split}.list").read_text() for split in ("train", "test")}
    parts = []
    for k, group in enumerate(groups, 1):
        part = _writable(files.subfolder, out, f"part{k}")
        images = _writable(files.subfolder, part, IMAGES_DIR)
        for case_id, _ in group:
            os.replace(out / IMAGES_DIR / case_id, images / case_id)
        for split, text in lists.items():
            files.atomic_write_text(part / f"{split}.list", text)
        parts.append((part, [i for i, _ in group], sum(n for _, n in group)))
    for split in lists:
        files.remove(out, f"{split}.list")
    (out / IMAGES_DIR).rmdir()  # empty now: every case moved into a part
    return parts


# ----------------------------------------------------------------------------- synthetic scans
def write_synthetic_la(root, n_train: int = 8, n_test: int = 2, shape=(128, 128, 96), seed: int = 0) -> Path:
    """Write LA-like synthetic scans in the release layout and return ``root``.

    Each scan: an 8-bit MRI-like volume with a smooth lumpy ellipsoid (the "atrium", label 1,
    bright), a dimmer unlabeled blob (a neighbouring structure), a smooth bias field and noise,
    then normalized per scan as the release does: ``(raw - mean) / std`` in float32. Case i depends
    only on (seed, i), not on the counts. Ids: ``synth0000``..., train first, then test. Refused: a shape
    that is not 3 sizes >= 1, ``n_train`` or ``n_test`` < 1, ``seed`` < 0, ``root`` a file.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1 or n_train < 1 or n_test < 1 or seed < 0:
        raise DataError(f"write_synthetic_la: need a 3D shape of positive sizes, n_train, n_test >= 1 and seed >= 0; "
                        f"got shape={shape}, n_train={n_train}, n_test={n_test}, seed={seed}")
    root = make_folder(root, "output folder")
    ids = [f"synth{i:04d}" for i in range(n_train + n_test)]
    for i, case_id in enumerate(ids):
        image, label = _synthetic_scan(np.random.default_rng([seed, i]), shape)
        folder = _writable(files.subfolder, root, IMAGES_DIR, case_id)
        files.atomic_write_h5(folder / H5_NAME, lambda f: (f.create_dataset("image", data=image, compression="gzip"),
                                                           f.create_dataset("label", data=label, compression="gzip")))
    files.atomic_write_text(root / "train.list", "".join(i + "\n" for i in ids[:n_train]))
    files.atomic_write_text(root / "test.list", "".join(i + "\n" for i in ids[n_train:]))
    return root


def _synthetic_scan(rng: np.random.Generator, shape) -> tuple[np.ndarray, np.ndarray]:
    n = np.array(shape, np.float64)
    axes = np.ogrid[tuple(slice(0, s) for s in shape)]

    def lumpy_ellipsoid(center, radii, lumpiness):
        u = [(a - c) / r for a, c, r in zip(axes, center, radii)]  # ellipsoid coordinates, |u| = 1 on the surface
        wobble = sum(lumpiness * rng.uniform(0.5, 1) * np.sin(rng.uniform(1, 3) * u[j] + rng.uniform(0, 2 * np.pi))
                     for j in range(3))  # smooth, low-frequency boundary displacement
        return u[0] ** 2 + u[1] ** 2 + u[2] ** 2 < (1 + wobble) ** 2

    atrium = lumpy_ellipsoid(n * rng.uniform(0.4, 0.6, 3), n * rng.uniform(0.15, 0.25, 3), 0.08)
    other = lumpy_ellipsoid(n * rng.uniform(0.2, 0.8, 3), n * rng.uniform(0.08, 0.15, 3), 0.05) & ~atrium
    bias = sum(rng.uniform(-15, 15) * (a / max(s - 1, 1) - 0.5) for a, s in zip(axes, shape))
    raw = 50 + 100 * atrium + 45 * other + bias + rng.normal(0, 15, shape)
    raw = np.clip(np.rint(raw), 0, 255)  # an 8-bit scan...
    image = ((raw - raw.mean()) / max(raw.std(), 1e-6)).astype(np.float32)  # ...normalized as released
    return image, atrium.astype(np.uint8)


# ----------------------------------------------------------------------------- augmented crops
def padding(shape, patch) -> tuple[int, int, int]:
    """Zero padding per side before cropping, as the released RandomCrop does: when *any* dim is
    <= the patch, *every* dim i is padded by ``max((patch_i - shape_i) // 2 + 3, 0)`` on each side."""
    if all(s > p for s, p in zip(shape, patch)):
        return (0, 0, 0)
    return tuple(max((p - s) // 2 + 3, 0) for s, p in zip(shape, patch))


def rot_flip_crop(volume: torch.Tensor, k: int, flip_axis: int, start, patch) -> torch.Tensor:
    """``np.flip(np.rot90(V, k, axes=(0, 1)), flip_axis)``, zero-padded by ``padding``, cropped at ``start``.

    ``start`` is in the rotated, padded frame. rot90 and flip only permute and reverse axes 0 and 1,
    so the crop of the transformed volume is a patch-sized box of the original, permuted and
    reversed the same way: only that box is touched, with one flip (a copy) at most.
    """
    # For each axis of the transformed volume: the source axis it reads, and whether reversed.
    source, reversed_ = [0, 1, 2], [False, False, False]
    for _ in range(k % 4):  # rot90 = flip axis 1, then swap axes 0 and 1
        reversed_[1] = not reversed_[1]
        source[0], source[1], reversed_[0], reversed_[1] = source[1], source[0], reversed_[1], reversed_[0]
    reversed_[flip_axis] = not reversed_[flip_axis]
    rotated_shape = [volume.shape[a] for a in source]
    pad = padding(rotated_shape, patch)

    lo, hi = [0] * 3, [0] * 3  # the source box, in source coordinates (may stick out of the volume)
    for i, a in enumerate(source):
        first = start[i] - pad[i]  # crop start in the unpadded transformed frame
        n = volume.shape[a]
        lo[a], hi[a] = (n - first - patch[i], n - first) if reversed_[i] else (first, first + patch[i])
    inside = tuple(slice(max(a, 0), min(b, n)) for a, b, n in zip(lo, hi, volume.shape))
    box = volume[inside]
    box_shape = tuple(b - a for a, b in zip(lo, hi))
    if tuple(box.shape) != box_shape:  # the box reaches into the zero padding
        padded = volume.new_zeros(box_shape)
        padded[tuple(slice(s.start - a, s.stop - a) for s, a in zip(inside, lo))] = box
        box = padded
    crop = box.permute(source)
    flips = [i for i in range(3) if reversed_[i]]
    return torch.flip(crop, flips) if flips else crop


class TwoStreamSampler:
    """Batches of ``batch_labeled`` labeled then ``batch_unlabeled`` unlabeled augmented crops.

    The released TwoStreamBatchSampler: labeled cases are visited once per epoch in a fresh random
    order (``len(labeled) // batch_labeled`` batches an epoch, a remainder is dropped); unlabeled
    cases come from an endless stream of fresh permutations (a batch may straddle two). One
    difference: the released DataLoader restarts the unlabeled stream every epoch; here it never
    restarts, so all unlabeled scans are visited equally often (same distribution per crop).

    Each crop is the released RandomRotFlip then RandomCrop: k ~ U{0..3}, rot90 by k in axes
    (0, 1); flip along a ~ U{0, 1}; zero ``padding``; start_i ~ U{0 .. padded_i - patch_i - 1}
    (numpy's exclusive high, so the last offset is never drawn). Note that rot90 then flip is
    always one of 4 reflections (flip x, flip y, transpose, anti-transpose), each with p = 1/4.

    All random draws come from one CPU ``torch.Generator``; the volumes live on ``device`` and
    cropping is pure tensor slicing there, so a batch costs no host-device sync and is identical on
    CPU and GPU. ``next()`` -> (images float32 (B, 1, *patch), labels int64 (B, *patch)), labeled
    rows first (``IGNORE_LABEL`` where a voxel is not annotated; the zero padding is background). The unlabeled
    rows' labels are real labels where the case has one (-1 where it was read without), returned for logging
    only: a semi-supervised loss must not use them. ``last_case_ids`` names the rows of the last batch.
    """

    def __init__(self, labeled: list[Case], unlabeled: list[Case], patch_size=(112, 112, 80), batch_labeled: int = 2,
                 batch_unlabeled: int = 2, seed: int = 0, device="cpu"):
        self.patch = tuple(int(p) for p in patch_size)
        if len(self.patch) != 3 or min(self.patch) < 1:
            raise DataError(f"patch_size {tuple(patch_size)}: need 3 positive sizes")
        if batch_labeled < 1 or batch_unlabeled < 0:
            raise DataError(f"batch_labeled={batch_labeled} must be >= 1 and batch_unlabeled={batch_unlabeled} >= 0")
        if len(labeled) < batch_labeled:
            raise DataError(f"{len(labeled)} labeled cases cannot fill batch_labeled={batch_labeled}")
        if (batch_unlabeled > 0) != (len(unlabeled) > 0):
            raise DataError(f"batch_unlabeled={batch_unlabeled} with {len(unlabeled)} unlabeled cases: "
                            f"give unlabeled cases exactly when batch_unlabeled >= 1")
        cases = list(labeled) + list(unlabeled)
        in_plane = max(max(c.image.shape[:2]) for c in cases)  # rot90 swaps the in-plane axes
        largest = (in_plane, in_plane, max(c.image.shape[2] for c in cases))
        if any(p > s for p, s in zip(self.patch, largest)):
            raise DataError(f"patch_size {self.patch} is larger than every volume (largest extents {largest}); "
                            f"its crops would be mostly zero padding")
        self.batch_labeled, self.batch_unlabeled = batch_labeled, batch_unlabeled
        self.n_labeled = len(labeled)
        self.batches_per_epoch = len(labeled) // batch_labeled
        self.device = torch.device(device)
        self.ids = [c.id for c in cases]
        self.images = [torch.from_numpy(c.image).to(self.device) for c in cases]  # converted once, kept resident
        unlabeled_only = [c.id for c in labeled if c.label is None]
        if unlabeled_only:
            raise DataError(f"cases {unlabeled_only[:5]} have no label and cannot be labeled cases")
        # (a case read without its label, from unlabeled.list, gives rows of -1: there is nothing to log)
        self.labels = [None if c.label is None else torch.from_numpy(c.label).to(self.device) for c in cases]
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = -1  # index of the labeled pass the last batch came from
        self.last_case_ids: list[str] = []
        self._labeled_order: list[int] = []
        self._labeled_cursor = 0
        self._unlabeled_order: list[int] = []
        self._unlabeled_cursor = 0

    def _randint(self, high: int) -> int:  # uniform in [0, high), a host int
        return int(torch.randint(high, (), generator=self.generator))

    def _indices(self) -> list[int]:
        if self._labeled_cursor + self.batch_labeled > len(self._labeled_order):  # next epoch
            self._labeled_order = torch.randperm(self.n_labeled, generator=self.generator).tolist()
            self._labeled_cursor, self.epoch = 0, self.epoch + 1
        rows = self._labeled_order[self._labeled_cursor: self._labeled_cursor + self.batch_labeled]
        self._labeled_cursor += self.batch_labeled
        for _ in range(self.batch_unlabeled):
            if self._unlabeled_cursor == len(self._unlabeled_order):  # next pass over the unlabeled stream
                n_unlabeled = len(self.ids) - self.n_labeled
                self._unlabeled_order = torch.randperm(n_unlabeled, generator=self.generator).tolist()
                self._unlabeled_cursor = 0
            rows.append(self.n_labeled + self._unlabeled_order[self._unlabeled_cursor])
            self._unlabeled_cursor += 1
        return rows

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._indices()
        images = torch.empty((len(rows), 1, *self.patch), dtype=torch.float32, device=self.device)
        labels = torch.empty((len(rows), *self.patch), dtype=torch.int64, device=self.device)
        for b, r in enumerate(rows):
            k, flip_axis = self._randint(4), self._randint(2)
            shape = self.images[r].shape
            rotated = (shape[1], shape[0], shape[2]) if k % 2 else tuple(shape)
            pad = padding(rotated, self.patch)
            start = [self._randint(s + 2 * q - p) for s, q, p in zip(rotated, pad, self.patch)]
            images[b, 0] = rot_flip_crop(self.images[r], k, flip_axis, start, self.patch)
            if self.labels[r] is None:
                labels[b] = -1
            else:
                labels[b] = rot_flip_crop(self.labels[r], k, flip_axis, start, self.patch)
        self.last_case_ids = [self.ids[r] for r in rows]
        return images, labels

    __next__ = next

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        """Everything that decides future batches: a resumed sampler continues the same sequence."""
        return {"generator": self.generator.get_state(), "epoch": self.epoch,
                "labeled_order": list(self._labeled_order), "labeled_cursor": self._labeled_cursor,
                "unlabeled_order": list(self._unlabeled_order), "unlabeled_cursor": self._unlabeled_cursor,
                "sizes": [self.n_labeled, len(self.ids) - self.n_labeled, self.batch_labeled, self.batch_unlabeled]}

    def load_state_dict(self, state: dict) -> None:
        sizes = [self.n_labeled, len(self.ids) - self.n_labeled, self.batch_labeled, self.batch_unlabeled]
        if list(state["sizes"]) != sizes:
            raise DataError(f"sampler state for (labeled, unlabeled, batch_labeled, batch_unlabeled) = "
                            f"{list(state['sizes'])} does not fit this sampler's {sizes}")
        self.generator.set_state(state["generator"])
        self.epoch = int(state["epoch"])
        self._labeled_order, self._labeled_cursor = list(state["labeled_order"]), int(state["labeled_cursor"])
        self._unlabeled_order, self._unlabeled_cursor = list(state["unlabeled_order"]), int(state["unlabeled_cursor"])


# ----------------------------------------------------------------------------- command line
