"""The released augmentation of one volume: RandomRotFlip then RandomCrop (zero padding), as one crop; and
SSL4MIS's of one 2D slice (``rot_flip_2d``, ``rotate_nearest``; the resize to the patch is the evaluation's
``uamt_fast.evaluation.slicewise.zoom_nearest``, scipy's order-0 zoom, as SSL4MIS uses one zoom for both).

``rot_flip_crop`` touches only the patch-sized box of the source that the crop reads; ``padding`` is the
released RandomCrop's padding rule. ``uamt_fast.data.sampling.TwoStreamSampler`` draws the parameters (and
``SliceSampler`` those of the slices). The 2D functions are torch versions of SSL4MIS's
code/dataloaders/dataset.py (HiLab-git/SSL4MIS @06df604: ``random_rot_flip``, ``random_rotate``) that give
numpy's and scipy.ndimage's values exactly (tests/training/test_train_2d.py compares them), on any device.
"""
from __future__ import annotations

import math

import torch


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


# ----------------------------------------------------------------------------- 2D slices (SSL4MIS)
def rot_flip_2d(plane: torch.Tensor, k: int, flip_axis: int) -> torch.Tensor:
    """``np.flip(np.rot90(plane, k), flip_axis)`` of a 2D ``plane`` (SSL4MIS's ``random_rot_flip``)."""
    return torch.flip(torch.rot90(plane, k, (0, 1)), (flip_axis,))


def rotate_nearest(plane: torch.Tensor, angle: float) -> torch.Tensor:
    """``scipy.ndimage.rotate(plane, angle, order=0, reshape=False)`` (SSL4MIS's ``random_rotate``): the output
    voxel o reads the input at ``R o`` about the centre (n - 1) / 2, R = [[cos, sin], [-sin, cos]] (scipy's
    matrix), the nearest voxel; 0 where that coordinate lies outside [0, n - 1] (scipy's mode 'constant')."""
    n0, n1 = plane.shape
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    o0 = torch.arange(n0, dtype=torch.float64, device=plane.device).view(-1, 1) - (n0 - 1) / 2
    o1 = torch.arange(n1, dtype=torch.float64, device=plane.device).view(1, -1) - (n1 - 1) / 2
    x0, x1 = c * o0 + s * o1 + (n0 - 1) / 2, -s * o0 + c * o1 + (n1 - 1) / 2
    inside = (x0 >= 0) & (x0 <= n0 - 1) & (x1 >= 0) & (x1 <= n1 - 1)
    nearest0, nearest1 = torch.floor(x0 + 0.5).long(), torch.floor(x1 + 0.5).long()  # scipy's order 0
    read = plane[nearest0.clamp(0, n0 - 1), nearest1.clamp(0, n1 - 1)]
    return torch.where(inside, read, plane.new_zeros(()))


__all__ = ["padding", "rot_flip_2d", "rot_flip_crop", "rotate_nearest"]
