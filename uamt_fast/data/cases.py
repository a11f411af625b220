"""One scan in memory (``Case``): reading a case file of a data root, checking it, downsampling it.

A case file is a prepared set's ``cases/<id>.h5``, the release's ``mri_norm2.h5`` or the packed ``mri_norm2.npz``
(``uamt_fast.data.packing``); ``load_case`` reads any of them transparently, from the one root that holds the case
(``layout.case_file``), and checks its arrays (a non-empty 3D float image, all finite; labels in 0..C-1 for the C
classes of the set's record).
"""
from __future__ import annotations

import bz2
import dataclasses
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from uamt_fast.data.layout import (
    LA_SPACING,
    PACKED_FORMAT,
    PACKED_NAME,
    DataError,
    as_roots,
    case_file,
)
from uamt_fast.data.record import case_spacing, read_record


@dataclass(frozen=True)
class Case:
    """One scan in memory: ``image`` float32 (X, Y, Z), normalized; ``label`` uint8 (X, Y, Z) in 0..C-1, or
    None for an unlabeled case (its label was never read, or never existed); ``spacing`` in mm per axis (None: the
    source kept none, so distances are scored in voxels only);
    ``ignore_label``: the label value of voxels that are not annotated (``IGNORE_LABEL``, where the data set's
    record declares one), which no loss or metric counts; None: every voxel is annotated."""

    id: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple | None = LA_SPACING
    ignore_label: int | None = None

    def __post_init__(self):  # cheap structural checks; value checks happen where data is read
        if self.image.ndim != 3 or (self.label is not None and self.image.shape != self.label.shape):
            raise DataError(f"case {self.id}: image {self.image.shape} and label "
                            f"{None if self.label is None else self.label.shape} must be equal 3D shapes")
        if self.image.dtype != np.float32 or (self.label is not None and self.label.dtype != np.uint8):
            raise DataError(f"case {self.id}: expected float32 image and uint8 label, "
                            f"got {self.image.dtype}, {None if self.label is None else self.label.dtype}")


def load_case(roots, case_id: str, labeled: bool = True, record: dict | None = None) -> Case:
    """Read and validate one case (``cases/<id>.h5``, ``mri_norm2.h5`` or the packed ``mri_norm2.npz``) from the
    root holding it.

    ``labeled=False`` (a case of unlabeled.list): its label is not read, even where the file has one.
    ``record``: the set's ``read_record`` (read here when not given): the class count labels are checked
    against, and the case's spacing."""
    roots = as_roots(roots)
    record = read_record(roots) if record is None else record
    path = case_file(roots, case_id)
    if path.name == PACKED_NAME:
        image, label = read_packed(path)
        label = label if labeled else None
    else:
        image, label = _read_h5(path, labeled)
    classes = 2 if record is None else record["num_classes"]
    ignore = None if record is None else record.get("ignore_label")
    return _validated(case_id, image, label, path, classes, case_spacing(record, case_id), ignore)


def load_cases(roots, ids, labeled: bool = True) -> list[Case]:
    """``load_case`` for each id, in order. Threads decode packed cases in parallel (bz2 releases the
    GIL); h5 files gain little (h5py serializes HDF5 calls) but lose nothing."""
    ids, roots = list(ids), as_roots(roots)
    record = read_record(roots)
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(ids), os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda i: load_case(roots, i, labeled, record), ids))


def read_h5_case(case_id: str, path, labeled: bool = True) -> Case:
    """One h5 case file of either layout (``image``, and ``label`` when ``labeled``), checked as
    ``load_case`` checks it (non-empty 3D float image, all finite; labels {0, 1})."""
    path = Path(path)
    return _validated(case_id, *_read_h5(path, labeled), path)


def _read_h5(path: Path, labeled: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    arrays = read_h5_arrays(path, ("image", "label") if labeled else ("image",))
    return arrays["image"], arrays.get("label")


# An h5 dataset may keep its data outside its file (an external link, a virtual dataset, external raw storage):
# reading it would read, or block on, whatever file it names. A case file's datasets are plain ones of its own.
MAX_H5_ELEMENTS = 1 << 30  # a dataset claiming more is refused before its data is read (4 GiB as float32)


def _own_dataset(f: h5py.File, name: str, path: Path) -> h5py.Dataset:
    link = f.get(name, getlink=True)
    if link is None:
        raise DataError(f"{path}: no dataset '{name}' (found {sorted(f.keys())})")
    if not isinstance(link, h5py.HardLink):  # (resolving a soft or external link may open another file)
        raise DataError(f"{path}: '{name}' is a link ({type(link).__name__}), not a dataset of this file; not read")
    dataset = f[name]
    if not isinstance(dataset, h5py.Dataset):
        raise DataError(f"{path}: '{name}' is a {type(dataset).__name__}, not a dataset")
    if dataset.is_virtual or dataset.external:
        raise DataError(f"{path}: dataset '{name}' keeps its data in other files (a virtual dataset or external "
                        "storage); not read")
    if dataset.size > MAX_H5_ELEMENTS:
        raise DataError(f"{path}: dataset '{name}' claims shape {dataset.shape} = {dataset.size:,} elements, more "
                        f"than {MAX_H5_ELEMENTS:,}; not read")
    return dataset


def h5_shapes(path, names) -> dict[str, tuple]:
    """The shapes of the datasets ``names`` of an h5 file, from its header (checked as ``read_h5_arrays``)."""
    return _h5(Path(path), names, lambda d: d.shape)


def read_h5_arrays(path, names) -> dict[str, np.ndarray]:
    """The datasets ``names`` of an h5 file, each read whole; a one-line DataError naming the file and the dataset
    if one is missing, is not a plain dataset of this file (any link but a hard one, a virtual dataset, external
    storage) or claims more than ``MAX_H5_ELEMENTS`` elements (before any data is read), or the file is
    unreadable."""
    return _h5(Path(path), names, lambda d: d[()])


def _h5(path: Path, names, take) -> dict:
    try:
        with h5py.File(path, "r") as f:
            datasets = {name: _own_dataset(f, name, path) for name in names}  # (all checked before any is read)
            return {name: take(d) for name, d in datasets.items()}
    except OSError as e:  # truncated or corrupt files (h5py raises OSError for both)
        raise DataError(f"{path}: unreadable HDF5 file ({e})") from e


def read_packed(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(image float32, label uint8)`` of a packed case file (``uamt_fast.data.packing.pack_case``), or a
    one-line DataError naming the file (another format, truncated, corrupt, incomplete)."""
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


__all__ = ["MAX_H5_ELEMENTS", "Case", "downsample", "h5_shapes", "load_case", "load_cases", "read_h5_arrays",
           "read_h5_case", "read_packed"]
