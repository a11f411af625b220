"""The released augmentation of one volume: RandomRotFlip then RandomCrop (zero padding), as one crop.

``rot_flip_crop`` touches only the patch-sized box of the source that the crop reads; ``padding`` is the
released RandomCrop's padding rule. ``uamt_fast.data.sampling.TwoStreamSampler`` draws the parameters.
"""
from __future__ import annotations

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


__all__ = ["padding", "rot_flip_crop"]
