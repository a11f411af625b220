"""Mapping a prediction back to the input's grid: the inverse of the preprocessing's geometry.

``python -m uamt_fast.predict`` predicts on the model's grid (the prepared set's orientation, spacing and
crop); ``to_input_grid`` brings each output back to the grid of the scan it was given. Each voxel of the
input's grid is mapped through the input's affine to the world and back through the model grid's affine
(``affine_original`` and ``affine`` of a prepare case record: orientation, resampling and crop in one 4x4
map). Where that map is a signed axis permutation with an integer shift (``axis_map``: orientation and crop
only, no resampling) the prediction is indexed back exactly; otherwise it is resampled (``grid_sample``,
nearest for labels, trilinear for float maps). Voxels outside the model's grid get a fill value.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SLAB_POINTS = 1 << 22  # input voxels resampled per grid_sample call (bounds the grid's memory)


def to_input_grid(volume: torch.Tensor, geometry: dict, fill, mode: str = "nearest") -> torch.Tensor:
    """``volume`` (C, *shape) on the model's grid -> (C, *shape_original) on the input's grid.

    Input voxel ``i`` lies at world ``affine_original @ i``, which is model-grid voxel ``j = inv(affine) @
    affine_original @ i``. A signed permutation with an integer shift is indexed exactly; any other map is
    sampled (``mode``: "nearest" or "bilinear", i.e. trilinear). ``fill`` (one value a channel) is what
    voxels outside the model's grid get, and what the samples at its border blend with.
    """
    m = np.linalg.inv(np.asarray(geometry["affine"], np.float64)) @ np.asarray(geometry["affine_original"], np.float64)
    shape, c = tuple(geometry["shape_original"]), volume.shape[0]
    fill = torch.as_tensor(fill, dtype=volume.dtype, device=volume.device).view(c, 1, 1, 1)
    out = fill.expand(c, *shape).clone()
    axes = axis_map(m)
    if axes is not None:  # orientation and crop only: every input voxel is one model voxel
        src = volume.permute(0, *[1 + b for b, _, _ in axes])  # src axis 1 + a is model axis b of input axis a
        dst, take, flip = [slice(None)], [slice(None)], []
        for a, ((_, sign, shift), n, size) in enumerate(zip(axes, shape, src.shape[1:])):
            j = sign * np.arange(n) + shift
            inside = np.flatnonzero((j >= 0) & (j < size))
            if inside.size == 0:
                return out
            first, last = int(inside[0]), int(inside[-1])
            dst.append(slice(first, last + 1))
            take.append(slice(int(min(j[first], j[last])), int(max(j[first], j[last])) + 1))
            if sign < 0:
                flip.append(1 + a)
        piece = src[tuple(take)]
        out[tuple(dst)] = piece.flip(flip) if flip else piece
        return out
    padded = fill.expand(c, *[s + 2 for s in volume.shape[1:]]).clone()  # one voxel of fill around the grid
    padded[:, 1:-1, 1:-1, 1:-1] = volume
    size = torch.tensor(padded.shape[1:], dtype=torch.float64, device=volume.device)
    mt = torch.from_numpy(m).to(volume.device)
    slab = max(1, SLAB_POINTS // (shape[1] * shape[2]))
    yz = torch.stack(torch.meshgrid(torch.arange(shape[1]), torch.arange(shape[2]), indexing="ij"), -1)
    for x0 in range(0, shape[0], slab):
        xs = torch.arange(x0, min(x0 + slab, shape[0]))
        i = torch.cat([xs.view(-1, 1, 1, 1).expand(-1, *yz.shape[:2], 1), yz.expand(len(xs), *yz.shape)], -1)
        j = i.to(volume.device, torch.float64) @ mt[:3, :3].T + mt[:3, 3] + 1  # + 1: the padding
        grid = (2 * j / (size - 1) - 1).flip(-1).to(volume.dtype)  # grid_sample's last axis is (z, y, x)
        out[:, x0 : x0 + len(xs)] = F.grid_sample(padded[None], grid[None], mode=mode, padding_mode="border",
                                                  align_corners=True)[0]
    return out


def axis_map(m: np.ndarray, tol: float = 1e-4) -> list[tuple[int, int, int]] | None:
    """For a voxel map ``m`` (4x4) that sends input axis a to model axis b as ``j_b = sign * i_a + shift``: the
    list of (b, sign, shift) per input axis; None for any other map (resampling). Entries within ``tol`` of an
    integer count as that integer."""
    r = np.rint(m[:3, :3])
    if not (np.allclose(m[:3, :3], r, atol=tol) and np.allclose(m[:3, 3], np.rint(m[:3, 3]), atol=tol)
            and (np.abs(r).sum(0) == 1).all() and (np.abs(r).sum(1) == 1).all()):
        return None
    rows = [int(np.flatnonzero(r[:, a])[0]) for a in range(3)]
    return [(b, int(r[b, a]), int(np.rint(m[b, 3]))) for a, b in enumerate(rows)]


__all__ = ["SLAB_POINTS", "axis_map", "to_input_grid"]
