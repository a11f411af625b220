"""NIfTI files no well-behaved writer makes, for the tests of the input checks (prepare, predict)."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def with_sform(path: Path, sform) -> Path:
    """The .nii.gz at ``path`` with its header's sform set to ``sform`` (3x4 rows, qform off) byte by byte: an
    affine nibabel refuses to write (a zero column, NaN) as a file written elsewhere may hold it."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    struct.pack_into("<hh", raw, 252, 0, 1)  # qform_code 0, sform_code 1
    struct.pack_into("<12f", raw, 280, *np.asarray(sform, np.float32)[:3].ravel())  # srow_x, srow_y, srow_z
    path.write_bytes(gzip.compress(bytes(raw)))
    return path
