"""Affines: whether the affine of a voxel grid (array index -> world mm) can be oriented, resampled, inverted.

``check_affine`` serves the NIfTI reader (``uamt_fast.data.formats.read_volume``), the record of a prepared set
(``uamt_fast.data.record``: a case's ``affine`` and ``affine_original``) and predict's input scans alike.
"""
from __future__ import annotations

import numpy as np

from uamt_fast.data.layout import DataError

MIN_VOXEL_MM = 1e-6  # a voxel size below this (1 nm) is a zero: no grid to orient or resample
MIN_ANGLE = 1e-6  # radians between two array axes' world directions below which they are one direction


def voxel_sizes(affine) -> np.ndarray:
    """The voxel size (mm) along each array axis: the lengths of the affine's first three columns."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(0))


def ras_axes(affine) -> np.ndarray:
    """For each array axis k, the RAS world axis it runs along (nibabel's ``io_orientation``): the position
    ``Orientationd(axcodes="RAS")`` gives it, so ``sizes_ras[ras_axes(affine)] = sizes`` orders per-axis values
    as they will be after orientation. Needs nibabel (the ``data`` extra)."""
    from nibabel.orientations import io_orientation

    return io_orientation(affine)[:, 0].astype(int)


def check_affine(affine, where: str) -> np.ndarray:
    """``affine`` as a float64 4x4 array when it places a 3D grid in the world the way orientation (MONAI's
    Orientationd, nibabel's ``io_orientation``) and the inverse map need it: finite numbers, last row (0, 0, 0, 1),
    every array axis a voxel size > 0 and a world direction of its own (the 3x3 part invertible, and
    ``io_orientation`` maps the three array axes to three distinct world axes). Else a one-line DataError that
    starts with ``where``: the file, and the field when the affine is one of a record (``path: field
    cases.c1.affine``). nibabel is used only when it is installed (the numpy checks alone already guarantee what it checks)."""
    try:
        a = np.array(affine, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where} is not a 4x4 matrix of numbers: {affine!r:.80}") from None
    if a.shape != (4, 4):
        raise DataError(f"{where} is a matrix of shape {a.shape}; expected 4x4")
    if not np.isfinite(a).all():
        raise DataError(f"{where} holds NaN or Inf: {a.tolist()}")
    if not np.array_equal(a[3], [0.0, 0.0, 0.0, 1.0]):
        raise DataError(f"{where} has last row {a[3].tolist()}; expected [0, 0, 0, 1]")
    zooms = voxel_sizes(a)
    for axis, zoom in enumerate(zooms):
        if not zoom >= MIN_VOXEL_MM:
            raise DataError(f"{where} gives array axis {axis} a voxel size of {zoom:g} mm; every axis needs one > 0")
    directions = a[:3, :3] / zooms
    if np.linalg.svd(directions, compute_uv=False)[-1] < MIN_ANGLE:
        cosines = np.abs(directions.T @ directions) - np.eye(3)
        i, j = np.unravel_index(np.argmax(cosines), cosines.shape)
        if cosines[i, j] > np.cos(MIN_ANGLE):
            raise DataError(f"{where} points array axes {min(i, j)} and {max(i, j)} along one world direction "
                            f"(its 3x3 part is singular: {np.round(a[:3, :3], 6).tolist()})")
        raise DataError(f"{where} puts the three array axes in one plane (its 3x3 part is singular: "
                        f"{np.round(a[:3, :3], 6).tolist()})")
    try:
        from nibabel.orientations import io_orientation
    except ImportError:
        return a
    try:
        world = io_orientation(a)[:, 0]
    except Exception as e:  # noqa: BLE001 (numpy's LinAlgError, nibabel's own errors)
        raise DataError(f"{where}: nibabel cannot orient it ({type(e).__name__}: {e})") from None
    if np.isnan(world).any() or len(set(world.tolist())) != 3:
        raise DataError(f"{where} maps the array axes to the world axes {world.tolist()}; each needs its own")
    return a


__all__ = ["MIN_ANGLE", "MIN_VOXEL_MM", "check_affine", "ras_axes", "voxel_sizes"]
