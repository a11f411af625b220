"""The on-disk layout of a data root: its file names, case ids, lists and the roots of one data set.

On disk, two layouts of a case file, read alike (``case_file`` alone decides where a case of a root lives)::

    <root>/train.list, <root>/test.list           one case id a line
    <root>/2018LA_Seg_Training Set/<id>/mri_norm2.h5    the LA release (github.com/yulequan/UA-MT ``data/``)
    <root>/cases/<id>.h5                                 a prepared set (``uamt_fast.data.prepare``), any data set
        image  float32 (X, Y, Z), normalized (zero mean, unit variance over the scan before cropping)
        label  uint8   (X, Y, Z) in {0, 1} (a prepared set: 0..C-1, and IGNORE_LABEL = 255 for voxels
               that are not annotated where its dataset.json declares "ignore_label": 255)

A prepared set adds ``unlabeled.list`` and ``dataset.json`` (``uamt_fast.data.record``); a packed root
(``uamt_fast.data.packing``) holds the release's folders with ``mri_norm2.npz`` instead of ``mri_norm2.h5``.
(Sets prepared before ``cases/`` existed are in the release's layout and read as they are.)

Several roots (``roots`` = one folder or a list of them, e.g. the parts written by ``pack
--max-part-mib``) act as one data set: every root that has a list has the same one (the parts each carry
the full lists, so the order of the roots never changes the labeled set) and each case is read from the
one root that holds it (``find_case``).

Case ids are folder names, never paths: ids that are empty, ``.``, ``..``, hold ``/`` or ``\\`` or
non-printing characters (NUL, tab, ...) are refused wherever they enter (lists, ``--cases``, the API), and
so is an id in both train.list and test.list (the test mean would score a training case).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from uamt_fast import files

IMAGES_DIR = "2018LA_Seg_Training Set"  # the LA release: <root>/<IMAGES_DIR>/<id>/<H5_NAME>
H5_NAME = "mri_norm2.h5"
CASES_DIR = "cases"  # a prepared set: <root>/<CASES_DIR>/<id><CASE_SUFFIX>
CASE_SUFFIX = ".h5"
PACKED_NAME = "mri_norm2.npz"
PACKED_FORMAT = "uamt_fast.la_pack.v1"
RECORD_NAME = "dataset.json"  # written by prepare: classes, labels, geometry of every case
RECORD_FORMAT = "uamt_fast.prepared/1"
LA_SPACING = (0.625, 0.625, 0.625)  # mm: the 2018 Atrial Segmentation Challenge's isotropic MRI
IGNORE_LABEL = 255  # the stored label value of "not annotated" voxels (nnU-Net's "ignore" label), never a class


class DataError(ValueError):
    """Bad or missing data; the message names the file or option at fault."""


# ----------------------------------------------------------------------------- case ids and roots
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
        if not any((path / name).exists() for name in ("train.list", "test.list", IMAGES_DIR, CASES_DIR)):
            raise DataError(f"{path}: not a data root (no train.list, test.list, '{CASES_DIR}' or '{IMAGES_DIR}' "
                            "folder in it)")
    return paths


# ----------------------------------------------------------------------------- where a case lives
def prepared_case_path(root, case_id: str) -> Path:
    """Where a prepared set keeps case ``case_id``: ``<root>/cases/<id>.h5`` (``prepare`` writes it there)."""
    return Path(root) / CASES_DIR / f"{check_case_id(case_id)}{CASE_SUFFIX}"


def release_case_folder(root, case_id: str) -> Path:
    """Where the LA release keeps case ``case_id``: the folder ``<root>/2018LA_Seg_Training Set/<id>`` (holding
    ``mri_norm2.h5``, or the packed ``mri_norm2.npz``)."""
    return Path(root) / IMAGES_DIR / check_case_id(case_id)


def case_places(root, case_id: str) -> tuple[Path, Path]:
    """Both places a case of ``root`` may be: ``(prepared_case_path, release_case_folder)``."""
    return prepared_case_path(root, case_id), release_case_folder(root, case_id)


def find_case(roots, case_id: str) -> Path:
    """The one root that holds ``case_id`` (a plain name, ``check_case_id``) at one of its ``case_places``;
    DataError if none does, if several do, or if a root holds it at both places."""
    check_case_id(case_id)
    roots = as_roots(roots)
    holders = []
    for root in roots:
        prepared, release = case_places(root, case_id)
        if prepared.is_file() and release.is_dir():
            raise DataError(f"case {case_id} is in {root} twice ({prepared} and {release}); each case must be in "
                            "one place")
        if prepared.is_file() or release.is_dir():
            holders.append(root)
    if not holders and len(roots) == 1:  # the missing path of the layout this root has
        prepared, release = case_places(roots[0], case_id)
        raise DataError(f"case file not found: {prepared}" if (roots[0] / CASES_DIR).is_dir() else
                        f"case folder not found: {release}")
    if not holders:
        raise DataError(f"case {case_id}: no file {CASES_DIR}/{case_id}{CASE_SUFFIX} and no folder "
                        f"{IMAGES_DIR}/{case_id} in any of {[str(r) for r in roots]}")
    if len(holders) > 1:
        raise DataError(f"case {case_id} is in several roots: {[str(r) for r in holders]}; "
                        f"each case must be in exactly one")
    return holders[0]


def case_file(roots, case_id: str) -> Path:
    """The file of case ``case_id`` in the one root holding it (``find_case``): ``cases/<id>.h5`` of a prepared
    set, else the release folder's ``mri_norm2.h5`` or packed ``mri_norm2.npz``; DataError naming the path if
    the release folder holds neither."""
    root = find_case(roots, case_id)
    prepared, release = case_places(root, case_id)
    if prepared.is_file():
        return prepared
    for name in (H5_NAME, PACKED_NAME):
        if (release / name).is_file():
            return release / name
    raise DataError(f"case file not found: {release / H5_NAME} (nor a packed {PACKED_NAME})")


def root_case_files(root) -> list[Path]:
    """The h5 case files of one data root, by case id: ``cases/*.h5`` and the release's ``<id>/mri_norm2.h5``
    (``uamt_fast.predict`` reads a root given as INPUT so). Hidden names (``.x.h5``: a write in progress) are
    no cases."""
    root = Path(root)
    found = {}
    if (root / CASES_DIR).is_dir():
        found |= {p.name[: -len(CASE_SUFFIX)]: p for p in (root / CASES_DIR).iterdir()
                  if p.name.endswith(CASE_SUFFIX) and not p.name.startswith(".") and p.is_file()}
    if (root / IMAGES_DIR).is_dir():
        found |= {p.name: p / H5_NAME for p in (root / IMAGES_DIR).iterdir()
                  if not p.name.startswith(".") and (p / H5_NAME).is_file()}
    return [found[i] for i in sorted(found)]


def case_of_file(path, where: str | None = None) -> tuple[str, Path | None]:
    """``(case id, data root)`` of an h5 case file as its layout names it: ``<root>/cases/<id>.h5`` and
    ``<root>/2018LA_Seg_Training Set/<id>/mri_norm2.h5``; a file in neither layout is case ``<stem>`` of no root
    (None). The id is checked (``check_case_id``; a refusal names ``where``, by default the file)."""
    path = Path(path)
    where = str(path) if where is None else where
    if path.parent.name == CASES_DIR and path.name.endswith(CASE_SUFFIX):
        return check_case_id(path.name[: -len(CASE_SUFFIX)], where), path.parent.parent
    if path.name == H5_NAME:
        root = path.parent.parent.parent if path.parent.parent.name == IMAGES_DIR else None
        return check_case_id(path.parent.name, where), root
    return check_case_id(path.stem, where), None


def _existing_root(root) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"LA data root not found: {root}")
    return root


# ----------------------------------------------------------------------------- lists
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


# ----------------------------------------------------------------------------- writing folders
def make_folder(path, what: str) -> Path:
    """``mkdir -p path`` (``uamt_fast.files.make_folder``: refused when it is or lies under a file, or cannot be
    written), or a one-line DataError naming ``what`` (a flag, "output folder") and the path."""
    return _writable(files.make_folder, path, "data set", what)


def make_subfolder(root, *names: str) -> Path:
    """``root/names[0]/.../names[-1]``, each level made where absent (``uamt_fast.files.subfolder``: a level that
    is a link or a file is refused, so what is written below stays inside ``root``), or that refusal as a
    one-line DataError."""
    return _writable(files.subfolder, root, *names)


def _writable(make, *args) -> Path:
    """``make(*args)`` (a folder maker of ``uamt_fast.files``) with its refusal as a DataError."""
    try:
        return make(*args)
    except files.FolderError as e:
        raise DataError(str(e)) from None


__all__ = ["CASES_DIR", "CASE_SUFFIX", "H5_NAME", "IGNORE_LABEL", "IMAGES_DIR", "LA_SPACING", "PACKED_FORMAT",
           "PACKED_NAME", "RECORD_FORMAT", "RECORD_NAME", "SPLITS", "DataError", "as_roots", "case_file",
           "case_of_file", "case_places", "check_case_id", "find_case", "make_folder", "make_subfolder",
           "prepared_case_path", "read_list", "read_splits", "read_unlabeled", "release_case_folder",
           "root_case_files", "split_fingerprint"]
