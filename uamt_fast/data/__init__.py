"""Left atrium (LA) MRI data: the UA-MT release layout, a lossless packed copy, synthetic scans, batches.

One module per concern; the package re-exports their public names (``from uamt_fast import data;
data.load_case(...)``):

- ``layout``: a data root on disk: where a case lives (the release's and a prepared set's layout), case ids, the
  train / test / unlabeled lists, several roots as one set
- ``record``: the ``dataset.json`` of a prepared set (classes, labels, spacing, source), read and checked
- ``affine``: the checks on an affine (array index -> world mm)
- ``cases``: one scan in memory (``Case``): an h5 or packed case file read and checked; downsampling
- ``packing``: the lossless packed copy (``python -m uamt_fast.data pack``) and its split into parts
- ``synthetic``: LA-like synthetic scans (``python -m uamt_fast.data synth``)
- ``augmentation``: the released RandomRotFlip + RandomCrop of one volume
- ``sampling``: the labeled / unlabeled split and the two-stream training batches
- ``formats``: source folders (Decathlon, nnU-Net v2 raw, NIfTI); ``prepare``: a source into the layout
  (``python -m uamt_fast.data prepare``); ``presets``: the benchmarks' settings; ``output_folder``: OUT while a
  prepare runs. These are not re-exported here: import them as modules.
"""
from __future__ import annotations

from uamt_fast.data.augmentation import padding, rot_flip_crop
from uamt_fast.data.cases import (
    Case,
    downsample,
    h5_shapes,
    load_case,
    load_cases,
    read_h5_arrays,
    read_h5_case,
    read_packed,
)
from uamt_fast.data.affine import check_affine
from uamt_fast.data.layout import (
    CASE_SUFFIX,
    CASES_DIR,
    H5_NAME,
    IGNORE_LABEL,
    IMAGES_DIR,
    LA_SPACING,
    PACKED_FORMAT,
    PACKED_NAME,
    RECORD_FORMAT,
    RECORD_NAME,
    SPLITS,
    DataError,
    as_roots,
    case_file,
    case_of_file,
    case_places,
    check_case_id,
    find_case,
    make_folder,
    make_subfolder,
    prepared_case_path,
    read_list,
    read_splits,
    read_unlabeled,
    release_case_folder,
    root_case_files,
    split_fingerprint,
)
from uamt_fast.data.packing import pack_case, pack_dataset, quantize, split_into_parts
from uamt_fast.data.record import case_spacing, input_folders, label_names, num_classes, read_record
from uamt_fast.data.sampling import TwoStreamSampler, semi_supervised_split
from uamt_fast.data.synthetic import write_synthetic_la

__all__ = [
    "CASES_DIR", "CASE_SUFFIX", "H5_NAME", "IGNORE_LABEL", "IMAGES_DIR", "LA_SPACING", "PACKED_FORMAT", "PACKED_NAME",
    "RECORD_FORMAT", "RECORD_NAME", "SPLITS",
    "Case", "DataError", "TwoStreamSampler",
    "as_roots", "case_file", "case_of_file", "case_places", "case_spacing", "check_affine", "check_case_id",
    "downsample", "find_case", "h5_shapes", "input_folders", "label_names", "load_case", "load_cases", "make_folder",
    "make_subfolder", "num_classes", "pack_case", "pack_dataset", "padding", "prepared_case_path", "quantize",
    "read_h5_arrays", "read_h5_case",
    "read_list", "read_packed", "read_record", "read_splits", "read_unlabeled", "release_case_folder",
    "root_case_files", "rot_flip_crop", "semi_supervised_split", "split_fingerprint", "split_into_parts",
    "write_synthetic_la",
]
